"""The summary the step benchmarks print: each mode's median step time and, with both, how much
faster the compiled step is (`bench_understanding_step.py`, `bench_decoder_step.py`)."""

from __future__ import annotations

import statistics


def summarize(results: dict[str, list[float]], out: dict) -> dict:
    """Add `<mode>_step_s` (median seconds) for each mode in `results` ("eager", "compiled") and
    `speedup` when both ran to `out`; print them; return `out`."""
    for name, times in results.items():
        out[f"{name}_step_s"] = round(statistics.median(times), 4)
        print(f"  {name:<9} {out[f'{name}_step_s']:.3f} s a step (median of {len(times)})")
    if "compiled" in results:
        out["speedup"] = round(out["eager_step_s"] / out["compiled_step_s"], 2)
        print(f"  compiled is {out['speedup']:.2f}x the eager step's speed")
    return out
