"""Which kernel `F.scaled_dot_product_attention` uses: every model here attends through it
(open_clip's towers, the transformers LM with attn_implementation="sdpa", the NextDiT, the
diffusers UNet).

On CPUs PyTorch picks its fused flash-attention kernel. At the toy's sizes (head width 32,
sequences of 24 to 150 tokens) that kernel, its backward above all, is slower than the plain
"math" one (two matmuls and a softmax): measured on the 2-core toy machine, the math kernel
makes a CLIP step 1.4x and a generation step 1.5x faster. On GPUs the fused kernels are the
fast ones and memory-lean, so `auto` leaves them alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

ATTENTION_KERNELS = ("auto", "math", "default")


def check_attention(attention: str) -> None:
    """A one-line error for a kernel name that is not one of ATTENTION_KERNELS."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"unknown trainer.attention {attention!r}; choose one of {', '.join(ATTENTION_KERNELS)}")


def uses_math_kernel(attention: str, accelerator: str) -> bool:
    """`auto`: the math kernel when the job runs on CPU (accelerator "cpu", or "auto" without
    CUDA); `math`: always; `default`: never (PyTorch's own choice)."""
    check_attention(attention)
    return runs_on_cpu(accelerator) if attention == "auto" else attention == "math"


def runs_on_cpu(accelerator: str) -> bool:
    """Whether a job with this `trainer.accelerator` runs on the CPU: "cpu", or "auto" without CUDA."""
    if accelerator == "auto":
        import torch  # here, so checking a config's trainer: section does not import torch

        return not torch.cuda.is_available()
    return accelerator == "cpu"


@contextlib.contextmanager
def attention_kernel(attention: str = "auto", accelerator: str = "auto") -> Iterator[None]:
    """Run a block (a whole pipeline, a stage) with the attention kernel the setting asks for."""
    if not uses_math_kernel(attention, accelerator):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
