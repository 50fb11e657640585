"""How much of a training step is matrix products, and at what rate: the figure that says whether
a step is bound by arithmetic (only fewer FLOPs make it shorter) or by everything around it
(kernels, casts, Python), for the step benchmarks (`bench_clip_step.py`,
`bench_understanding_step.py`)."""

from __future__ import annotations

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_profile(steps) -> dict:
    """Run the callables in `steps` (one training step each) under `torch.profiler` and return,
    per step: the profiled time (`profiled_step_s`), the share of it in matrix products
    (`matmul_share`), their FLOPs counted from the recorded shapes (`matmul_gflop_per_step`) and
    the rate they ran at (`matmul_gflop_per_s`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for step in steps:
            step()
    events = prof.key_averages()  # one row per op, FLOPs summed over its shapes
    n = len(steps)
    total = sum(e.self_cpu_time_total for e in events) / n / 1e6  # s per step
    mat = [e for e in events if e.key in MATMULS]
    mat_s = sum(e.self_cpu_time_total for e in mat) / n / 1e6
    flops = sum(e.flops for e in mat) / n
    return {"profiled_step_s": round(total, 4), "matmul_share": round(mat_s / total, 3),
            "matmul_gflop_per_step": round(flops / 1e9, 1),
            "matmul_gflop_per_s": round(flops / 1e9 / mat_s, 1) if mat_s else None}


def print_matmul_profile(out: dict) -> None:
    print(f"matrix products: {out['matmul_share']:.0%} of the profiled step, "
          f"{out['matmul_gflop_per_step']} GFLOP at {out['matmul_gflop_per_s']} GFLOP/s")
