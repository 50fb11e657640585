"""The main job: every stage of the pipeline in order, each skipped when its artifact already
matches the config (DESIGN.md section 4), with a per-stage time table and `report.json`.

A stage is a function `(cfg, run_dir, upstream) -> StageResult`; `upstream` holds the results
of the stages before it, so a stage's fingerprint can include what it reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete

DATA_VERSION = 2  # bump when the ShapesWorld generator changes its output


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)


def data_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .data import generate, summarize
    import datasets

    section = cfg.get("data", {})
    key = fingerprint("data", DATA_VERSION, cfg.get("seed", 0), section)
    out = run_dir / "data"
    skipped = stage_complete(out, key)
    if skipped:
        ds = datasets.load_from_disk(str(out / "shapesworld"))
    else:
        ds = generate(out / "shapesworld", section.get("num_train", 10000),
                      section.get("num_val", 1000), cfg.get("seed", 0))
    summary = summarize(ds)
    print(summary)
    metrics = {"num_samples": summary.num_samples, "unseen_fraction": summary.unseen_fraction}
    if not skipped:
        mark_complete(out, key, metrics=metrics)
    return StageResult("data", key, out, skipped, metrics)


# Stages in pipeline order; later issues append CLIP, understanding, generation, decoder, eval.
STAGES: list[tuple[str, Callable[[dict, Path, dict], StageResult]]] = [
    ("data", data_stage),
]


def ensure_stage(name: str, cfg: dict, run_dir: str | Path) -> dict[str, StageResult]:
    """Run (or load from cache) every stage up to and including `name`; notebooks start here."""
    names = [n for n, _ in STAGES]
    if name not in names:
        raise ValueError(f"unknown stage {name!r}; stages are {names}")
    run_dir = Path(run_dir)
    results: dict[str, StageResult] = {}
    for n, stage in STAGES[: names.index(name) + 1]:
        results[n] = stage(cfg, run_dir, results)
    return results


def run_pipeline(cfg: dict, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, StageResult] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for name, stage in STAGES:
        print(f"== stage: {name}")
        t0 = time.perf_counter()
        results[name] = stage(cfg, run_dir, results)
        timings[name] = round(time.perf_counter() - t0, 2)
    total = round(time.perf_counter() - start, 2)
    print(f"\n{'stage':<16} {'time (s)':>9}  status")
    for name, r in results.items():
        print(f"{name:<16} {timings[name]:>9.1f}  {'cached' if r.skipped else 'ran'}")
    print(f"{'total':<16} {total:>9.1f}")
    report = {name: r.metrics for name, r in results.items()}
    report |= {"timings_s": timings, "total_s": total}
    atomic_write_json(run_dir / "report.json", report)
    return report
