"""How well a generator's DiT predicts each principal direction of the CLIP tokens.

At time t the DiT's velocity gives its guess of the clean tokens, x1_hat = x_t + (1 - t) * v
(our time: t = 0 noise, t = 1 data). Mapped back to the encoder's scale, standardised and rotated
onto the principal directions of the training tokens, the guess leaves in each direction i a
fraction of that direction's variance unexplained:

    FVU_i(t) = E[(x1_hat_i - x1_i)^2] / var_i       0: perfect, 1: as good as guessing the mean

Directions the generator does not produce (beyond `whiten_dims`) sit at the mean: FVU 1. The
toy's decoder needs about 24 directions to paint a square's corners (notebook 05), so FVU in
directions 8-32 at mid and low noise says whether samples can come out with the right shapes.

Shape glossary: M images, N = 64 tokens, F feature width, L generated coordinates per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..flow import interpolate

GROUPS = ((0, 4), (4, 8), (8, 16), (16, 24), (24, 32), (32, None))


@torch.no_grad()
def direction_fvu(generator, backbone, features: Tensor, captions: list[str], mean: Tensor, std: Tensor,
                  var: Tensor, basis: Tensor, times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
                  groups=GROUPS, seed: int = 0) -> dict[float, dict[str, float]]:
    """{t: {"a-b": mean FVU over directions a..b-1}} of `generator`'s DiT on `features` (M, N, F)
    with their `captions` (conditional, no guidance). `mean`, `std` (F,) standardise; `var` (F,)
    and `basis` (F, F) are the principal variances and directions (largest first) of the
    standardised training tokens (features.measure_whitening)."""
    g = torch.Generator().manual_seed(seed)
    cond = generator.condition(backbone, captions)  # (M, Nq, K)
    x1 = generator.normalize(features)  # (M, N, L)
    x0 = torch.randn(x1.shape, generator=g)  # (M, N, L)
    truth = ((features - mean) / std) @ basis  # (M, N, F) principal coordinates
    out = {}
    for t in times:
        tt = torch.full((len(x1),), t)  # (M,)
        x_t = interpolate(x0, x1, tt)  # (M, N, L)
        guess = generator.denormalize(x_t + (1 - t) * generator.dit(x_t, tt, cond, None))  # (M, N, F)
        err = (((guess - mean) / std) @ basis - truth).pow(2).flatten(0, 1).mean(0) / var  # (F,)
        out[t] = {f"{a}-{b or len(var)}": err[a:b].mean().item() for a, b in groups}
    return out
