"""The attention kernel inside every training process (training/attention_kernel.py).

`run.py` enters the kernel around each stage, in the process that runs it. Lightning's
`ddp_spawn` starts fresh worker processes for `fit`, which do not inherit that context, so every
Trainer also carries this callback: it enters the same kernel from `setup` to `teardown` in
whichever process trains (nested in the stage's own context elsewhere, a no-op there).
"""

from __future__ import annotations

import contextlib

from lightning.pytorch.callbacks import Callback

from .attention_kernel import attention_kernel


class AttentionKernel(Callback):
    def __init__(self, attention: str = "auto", accelerator: str = "auto"):
        self.attention, self.accelerator = attention, accelerator
        self._stack: contextlib.ExitStack | None = None  # made in the training process

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(attention_kernel(self.attention, self.accelerator))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
