"""ShapesWorld splits as tensors, the form every training stage consumes."""

from __future__ import annotations

import numpy as np
import torch


def images_uint8(split) -> torch.Tensor:
    """All images of a `datasets` split as one uint8 tensor (N, 3, H, W); 10k images = 123 MB."""
    arr = np.stack([np.asarray(img.convert("RGB")) for img in split["image"]])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
