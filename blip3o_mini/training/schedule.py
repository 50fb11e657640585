"""The learning-rate schedule every recipe here uses: linear warmup, then cosine decay.

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


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float) -> dict:
    """`configure_optimizers`' return value: `opt` and the schedule, stepped every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warmup, total, min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
