"""The attention kernel setting (training/attention_kernel.py): the math SDPA kernel on CPU
runs, the same attention, and the pipeline runs its stages inside it."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from blip3o_mini.training.attention_kernel import attention_kernel, uses_math_kernel
from blip3o_mini.training.distributed import TrainerConfig, trainer_kwargs


def test_auto_picks_math_on_cpu_and_leaves_gpus_alone():
    assert uses_math_kernel("auto", "cpu")
    assert not uses_math_kernel("auto", "gpu")
    assert uses_math_kernel("math", "gpu")
    assert not uses_math_kernel("default", "cpu")


def test_the_kernel_is_set_inside_the_block_and_restored_after():
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernel("auto", "cpu"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernel("default", "cpu"):
        assert torch.backends.cuda.flash_sdp_enabled()


def test_math_kernel_computes_the_same_attention_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 65, 32, requires_grad=True) for _ in range(3))  # (B, H, N, Dh)

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return out.detach(), grads

    fused, fused_grads = run()
    with attention_kernel("math", "cpu"):
        math, math_grads = run()
    torch.testing.assert_close(math, fused, rtol=1e-4, atol=1e-5)
    for a, b in zip(math_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_kernel_is_a_clear_error_and_not_a_lightning_argument():
    with pytest.raises(ValueError, match="trainer.attention 'flash2'; choose one of auto, math, default"):
        TrainerConfig(attention="flash2")
    assert "attention" not in trainer_kwargs(TrainerConfig())


def test_pipeline_runs_its_stages_inside_the_kernel(monkeypatch, tmp_path):
    from blip3o_mini import run

    seen = []

    def stage(cfg, run_dir, upstream):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return run.StageResult("data", "k", run_dir, True, {})

    monkeypatch.setattr(run, "stages_for", lambda cfg: [("data", stage)])
    run.ensure_stage("data", {"trainer": {"accelerator": "cpu"}}, tmp_path)
    run.ensure_stage("data", {"trainer": {"accelerator": "cpu", "attention": "default"}}, tmp_path)
    assert seen == [False, True]
    assert torch.backends.cuda.flash_sdp_enabled()


def test_every_trainer_carries_the_kernel_into_its_training_processes():
    """ddp_spawn workers do not inherit the stage's context: the Trainer's callback enters the
    kernel where `fit` runs. Here `fit` runs outside any context, in 2 spawned CPU processes;
    every step sees math SDPA only (logged as 0 = flash off, summed over ranks)."""
    from lightning.pytorch.callbacks import Callback

    from blip3o_mini.training.distributed import make_trainer

    mine = Callback()  # a caller's own callback (module level: spawned workers unpickle it)
    trainer = make_trainer(TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn"), max_steps=2,
                           callbacks=[mine], logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    assert mine in trainer.callbacks  # the caller's callbacks are kept beside the kernel's
    assert torch.backends.cuda.flash_sdp_enabled()  # nothing entered before fit
    trainer.fit(KernelProbe(), torch.utils.data.DataLoader(torch.ones(8, 1), batch_size=2))
    assert trainer.callback_metrics["flash"].item() == 0 and trainer.callback_metrics["math"].item() == 2
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after fit


class KernelProbe(L.LightningModule):
    """Logs, at every step, whether this process's SDPA may use the flash / math kernels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, i):
        for name in ("flash", "math"):
            on = getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
            self.log(name, float(on), reduce_fx="sum", sync_dist=True)
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
