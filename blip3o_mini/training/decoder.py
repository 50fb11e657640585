"""Training recipe of the pixel decoder: reconstruct ShapesWorld images from their CLIP tokens.

Mirrors how BLIP3-o's pixel decoder (Emu2's SDXL-based decoder) was trained: a diffusion model
learns p(image | CLIP features of that image) on (image, feature) pairs, with 10% of the
conditions dropped so classifier-free guidance works at sampling. The path is rectified flow
with diffusers' `FlowMatchEulerDiscreteScheduler` supplying the noise levels (the SD3 recipe):
pick a training timestep index, read its sigma, noise `x_sigma = (1 - sigma) x_1 + sigma x_0`,
and regress the UNet's prediction on its target: the clean image `x_1` (the default,
`prediction="sample"`; the MSE is the velocity MSE weighted by sigma^2) or `x_0 - x_1`. The architecture lives in `blip3o_mini.decoder`; this file is
the recipe (loss, optimiser, Lightning loop with resumable checkpoints).

Shape glossary: B batch, N CLIP tokens (64), D feature width, H = W image side (64).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoder import DecoderConfig, PixelDecoder, images_to_model
from .attention_kernel import runs_on_cpu
from .compile import check_compile, use_compile
from .distributed import TrainerConfig, check_global_batch, make_trainer, stage_trainer_config
from .ema import update_ema
from .schedule import warmup_cosine

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class DecoderTrainConfig:
    """The recipe; defaults are the toy CPU run (900 steps x 32 images: ~5 minutes on 2 idle cores)."""

    batch_size: int = 32
    max_steps: int = 900
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cond_drop_prob: float = 0.1  # BLIP3-o: 10% null conditions for CFG
    ema_decay: float = 0.995  # > 0: export an exponential moving average of the weights
    time_sampling: str = "uniform"  # or "logit_normal" (SD3)
    normalize_features: bool = True  # per-dim mean/std of the training features
    precision: str = "32-true"  # used unless the config's trainer: section sets one; never fp16
    checkpoint_every: int = 50
    log_every: int = 50
    seed: int = 0
    # torch.compile the UNet's training forward: true, false or auto (where a compiler is found;
    # training/compile.py). A speed setting, left out of the stage's fingerprint.
    compile: bool | str = False

    def __post_init__(self):
        check_compile(self.compile, "decoder.train.compile")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {self.time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


@dataclass
class DecoderLoss:
    loss: Tensor  # () MSE on the flow
    sigma: Tensor  # (B,) noise levels, 1 = pure noise
    timesteps: Tensor  # (B,) the scheduler's timesteps for those sigmas (what the UNet embeds)
    x_0: Tensor  # (B, 3, H, W) the noise
    x_t: Tensor  # (B, 3, H, W)
    pred: Tensor  # (B, 3, H, W) the UNet's x_1 (or x_0 - x_1) prediction
    target: Tensor  # (B, 3, H, W)
    keep: Tensor  # (B,) bool: False = trained with the null condition


def decoder_loss(decoder: PixelDecoder, images: Tensor, features: Tensor, *, cond_drop_prob: float = 0.1,
                 time_sampling: str = "uniform", generator: torch.Generator | None = None,
                 forward=None) -> DecoderLoss:
    """One flow-matching loss for uint8 images (B, 3, H, W) and their CLIP tokens (B, N, D).
    `forward`: the decoder's forward to call instead of `decoder` (training passes its compiled form)."""
    decoder.check_features(features)
    x_1 = images_to_model(images).to(features.device)  # (B, 3, H, W) data in [-1, 1]
    B, dev = x_1.shape[0], x_1.device
    sched = decoder.scheduler
    T = sched.config.num_train_timesteps
    if time_sampling == "uniform":
        idx = torch.randint(0, T, (B,), generator=generator)
    else:  # logit-normal over sigma, SD3's density
        u = torch.sigmoid(torch.randn(B, generator=generator))
        idx = (u * T).long().clamp(max=T - 1)
    sigma = sched.sigmas[idx].to(dev)  # (B,) in (0, 1]
    timesteps = sched.timesteps[idx].to(dev)  # (B,) = T * sigma, what the UNet embeds
    x_0 = torch.randn(x_1.shape, generator=generator).to(dev)  # (B, 3, H, W) noise
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x_1 + s * x_0  # (B, 3, H, W) == sched.scale_noise(x_1, timesteps, x_0)
    keep = torch.rand(B, generator=generator).to(dev) >= cond_drop_prob  # (B,)
    pred = (forward or decoder)(x_t, timesteps, features, keep)  # (B, 3, H, W)
    target = x_1 if decoder.cfg.prediction == "sample" else x_0 - x_1  # (B, 3, H, W)
    loss = F.mse_loss(pred.float(), target)
    return DecoderLoss(loss, sigma, timesteps, x_0, x_t, pred, target, keep)


class DecoderModule(L.LightningModule):
    """The recipe around a `PixelDecoder`; keeps its loss curve in the checkpoint so a resumed
    run reports the whole curve."""

    def __init__(self, model_cfg: DecoderConfig, train_cfg: DecoderTrainConfig):
        super().__init__()
        self.decoder = PixelDecoder(model_cfg)
        self.train_cfg = train_cfg
        # the EMA copy lives in the module, so Lightning checkpoints (and resumes) it too
        self.ema = copy.deepcopy(self.decoder).requires_grad_(False) if train_cfg.ema_decay > 0 else None
        self.loss_curve: list[tuple[int, float]] = []  # (step, mean loss since the last entry)
        self._window: list[float] = []
        self.compiled = use_compile(train_cfg.compile)  # train_decoder resolves it for the trainer's device
        self._forward = None  # the compiled `decoder.forward`, made at the first training step

    def training_step(self, batch, batch_idx):
        images, features = batch  # (B, 3, H, W) uint8, (B, N, D)
        if self.compiled and self._forward is None:
            # A compiled *function*, not a submodule: the weights stay registered once, under
            # `decoder`, and the EMA copy and sampling stay eager. Batches keep one shape (drop_last).
            self._forward = torch.compile(self.decoder.forward, dynamic=False)
        out = decoder_loss(self.decoder, images, features, cond_drop_prob=self.train_cfg.cond_drop_prob,
                           time_sampling=self.train_cfg.time_sampling, forward=self._forward)
        self._window.append(out.loss.item())
        if (self.global_step + 1) % self.train_cfg.log_every == 0:
            self.loss_curve.append((self.global_step + 1, sum(self._window) / len(self._window)))
            self._window = []
        self.log("train/loss", out.loss, prog_bar=True)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            update_ema(self.ema, self.decoder, self.train_cfg.ema_decay, self.global_step)

    def exported(self) -> PixelDecoder:
        """The weights a stage saves: the EMA when one is kept."""
        return self.ema if self.ema is not None else self.decoder

    def configure_optimizers(self):
        c = self.train_cfg
        opt = torch.optim.AdamW(self.decoder.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                betas=(0.9, 0.99))
        return warmup_cosine(opt, c.warmup_steps, c.max_steps, c.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_curve"] = list(self.loss_curve)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss_curve = [tuple(x) for x in checkpoint.get("loss_curve", [])]


class _Throughput(L.Callback):
    """Prints step, loss and images/s every `log_every` steps (no progress bar in logs)."""

    def __init__(self, every: int):
        self.every, self.t0, self.images, self.start_step = every, None, 0, 0

    def on_train_start(self, trainer, module):
        self.start_step = trainer.global_step  # > 0 when resumed from a checkpoint
        if self.start_step:
            print(f"decoder: resumed from step {self.start_step}", flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.t0 is None:
            self.t0 = time.perf_counter()
            return
        self.images += batch[0].shape[0]
        step = trainer.global_step
        if step % self.every == 0 and module.loss_curve:
            rate = self.images / (time.perf_counter() - self.t0)
            print(f"decoder step {step:>5}/{trainer.max_steps}  loss {module.loss_curve[-1][1]:.4f}  "
                  f"{rate:.1f} img/s", flush=True)


@dataclass
class TrainResult:
    decoder: PixelDecoder
    loss_curve: list[tuple[int, float]]
    train_seconds: float
    images_per_second: float
    resumed_from_step: int
    compiled: bool = False  # whether the UNet's training forward was compiled
    trainer: object = None  # the lightning.Trainer that ran: its rank and barrier (run.finish_on_rank_zero)


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std over every token of every image: (D,), (D,)."""
    flat = features.reshape(-1, features.shape[-1])  # (B*N, D)
    return flat.mean(0), flat.std(0)


def train_decoder(model_cfg: DecoderConfig, train_cfg: DecoderTrainConfig, images: Tensor, features: Tensor,
                  ckpt_dir: str | Path, stats: tuple[Tensor, Tensor] | None = None,
                  trainer: TrainerConfig | None = None) -> TrainResult:
    """Train (or resume from `ckpt_dir/last.ckpt`) on uint8 images (M, 3, H, W) and their CLIP
    tokens (M, N, D); `stats` = per-dim (mean, std) for normalisation (computed if None).
    `trainer` (the config's `trainer:` section) sets devices, nodes and strategy; the data is
    sharded across ranks by `data.sharding`, so a multi-GPU run is configuration only."""
    if images.shape[0] != features.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {features.shape[0]} feature rows; both must "
                         "come from the same split in the same order")
    if images.shape[0] < train_cfg.batch_size:
        raise ValueError(f"{images.shape[0]} training images is fewer than batch_size {train_cfg.batch_size}")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import TensorDataset

    from ..data.sharding import ShardedDataModule

    L.seed_everything(train_cfg.seed, verbose=False)
    module = DecoderModule(model_cfg, train_cfg)
    module.decoder.check_features(features[:1])
    if train_cfg.normalize_features:
        mean, std = stats if stats is not None else feature_stats(features)
        for m in filter(None, (module.decoder, module.ema)):
            m.cond_embed.set_feature_stats(mean, std)
    tc = trainer or stage_trainer_config({}, train_cfg.precision)
    check_global_batch(tc, train_cfg.batch_size)
    module.compiled = use_compile(train_cfg.compile, cuda=not runs_on_cpu(tc.accelerator))  # the trainer's device
    data = ShardedDataModule(TensorDataset(images, features.float()), train_cfg.batch_size,
                             seed=train_cfg.seed, drop_last=True)
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=train_cfg.checkpoint_every)
    progress = _Throughput(train_cfg.log_every)
    fit = make_trainer(tc, max_steps=train_cfg.max_steps, gradient_clip_val=train_cfg.grad_clip,
                       callbacks=[checkpoint, progress], logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=ckpt_dir, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    fit.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    seconds = time.perf_counter() - t0
    resumed = progress.start_step
    steps_run = max(1, fit.global_step - resumed)
    decoder = module.exported().cpu().eval()
    return TrainResult(decoder, module.loss_curve, seconds, steps_run * train_cfg.batch_size / seconds, resumed,
                       module.compiled,
                       trainer=fit)
