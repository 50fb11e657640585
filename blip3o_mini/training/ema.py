"""An exponential moving average (EMA) of a model's weights, the weights diffusion models often
sample with: the average of the last ~1 / (1 - decay) steps smooths out the noise of the final
optimiser steps. The pixel decoder exports one; `scripts/ablate_dit_geneval.py` measures one for
the DiT (docs/status.md: it does not help the toy DiT, so the generation stage exports its final
weights).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)): the warm-up
    forgets the random initial weights fast. Buffers are copied, not averaged."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)  # e + (1 - d) (p - e)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
