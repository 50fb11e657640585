"""The optimizer and learning-rate schedule every recipe here uses: AdamW, linear warmup,
then cosine decay.

CLIP, the understanding backbone, the DiT and the pixel decoder all train with AdamW under
this one schedule (BLIP3-o: cosine decay after a short warmup), stepped once per optimizer
step, so a run resumed from a checkpoint continues on the same curve.
"""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at `step`: linear warmup to 1 over `warmup` steps, then cosine decay to
    `min_ratio` at `total` steps (and `min_ratio` after)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW`, with the fused kernel where every parameter allows it (the CLIP recipe).

    Same update rule; the fused kernel updates all tensors in one pass instead of a Python loop
    of small ops per tensor. On the toy CPU the loop made a CLIP step 0.43 s against 0.30 s fused
    (`python benchmarks/bench_clip_step.py --adamw per-tensor`, and without it):
    the text tower's 49,408 x 128 token table is updated every step, used rows or not. Only for
    recipes that do not clip gradients: Lightning's mixed-precision plugin refuses to clip for a
    fused optimizer (it assumes the optimizer unscales gradients itself), so the understanding,
    generation and decoder recipes, which clip, keep the per-tensor AdamW.
    """
    groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in groups]
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(groups, fused=fusable(params) or None, **kwargs)


def fusable(params) -> bool:
    """Whether torch's fused AdamW kernel takes every one of `params` (floating point, on a
    device it supports)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return all(p.dtype.is_floating_point and p.device.type in _get_fused_kernels_supported_devices()
               for p in params)


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float) -> dict:
    """`configure_optimizers`' return value: `opt` and the schedule, stepped every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warmup, total, min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
