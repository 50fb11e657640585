"""Stage 2 recipe: train the queries and the NextDiT by flow matching on CLIP features, with the
understanding backbone frozen (BLIP3-o's sequential training).

BLIP3-o's recipe: AdamW, lr 1e-4 with cosine decay to 1e-5 after a short warmup, weight decay
0, gradient clipping 1.0, bf16. The same module serves the toy run and the full run; only the
config changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..generation import Blip3oGenerator
from .clip import TrainResult


@dataclass
class GenerationTrainConfig:
    batch_size: int = 64
    max_steps: int = 3000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "32-true"
    log_every: int = 25
    num_workers: int = 0
    checkpoint_every: int = 200
    seed: int = 0
    # Lightning trainer flags: the toy run and the multi-GPU run differ only here.
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"


class CaptionFeatureDataset(Dataset):
    """(a caption paraphrase, its image's CLIP features (N, F)); a random paraphrase per visit."""

    def __init__(self, captions: list[list[str]], features: Tensor):
        if len(captions) != len(features):
            raise ValueError(f"{len(captions)} caption lists but {len(features)} feature rows; "
                             "the CLIP feature cache must be aligned with the dataset split")
        self.captions, self.features = captions, features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[str, Tensor]:
        options = self.captions[i]  # paraphrases; the global RNG is seeded by seed_everything
        return options[int(torch.randint(len(options), (1,)))], self.features[i]


def collate(batch: list[tuple[str, Tensor]]) -> tuple[list[str], Tensor]:
    prompts, feats = zip(*batch)
    return list(prompts), torch.stack(feats)  # (B, N, F)


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class GenerationModule(L.LightningModule):
    """Trains `generator` (queries + DiT) through a frozen `backbone`.

    The backbone is a registered submodule so Lightning moves it across devices and casts it
    for precision, but it is frozen, kept in eval mode, and left out of checkpoints (it is the
    understanding stage's artifact, not this stage's)."""

    def __init__(self, generator: Blip3oGenerator, backbone: torch.nn.Module, cfg: GenerationTrainConfig):
        super().__init__()
        self.generator, self.backbone, self.cfg = generator, backbone, cfg
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.strict_loading = False  # checkpoints hold the generator only
        self.losses: list[tuple[int, float]] = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no statistics updates, ever
        return self

    def training_step(self, batch, batch_idx: int) -> Tensor:
        prompts, features = batch
        out = self.generator.loss(self.backbone, prompts, features)
        self.log("train/loss", out.loss, prog_bar=True)
        if self.global_step % self.cfg.log_every == 0:
            self.losses.append((int(self.global_step), float(out.loss.detach())))
        return out.loss

    def configure_optimizers(self):
        params = [p for p in self.generator.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                betas=(0.9, 0.999))
        lam = lambda s: cosine_with_warmup(s, self.cfg.warmup_steps, self.cfg.max_steps,  # noqa: E731
                                           self.cfg.min_lr / self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("backbone.")}
        checkpoint["loss_history"] = self.losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.losses = [tuple(x) for x in checkpoint.get("loss_history", [])]


def train_generation(generator: Blip3oGenerator, backbone: torch.nn.Module, captions: list[list[str]],
                     features: Tensor, cfg: GenerationTrainConfig, ckpt_dir: str | Path) -> TrainResult:
    """Train `generator` in place on CLIP features (N, 64, F) and their images' caption
    paraphrases, through the frozen `backbone`; resume from `ckpt_dir/last.ckpt` when an earlier
    run was interrupted."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(cfg.seed, verbose=False)
    loader = DataLoader(CaptionFeatureDataset(captions, features), batch_size=cfg.batch_size,
                        shuffle=True, drop_last=True, collate_fn=collate, num_workers=cfg.num_workers)
    module = GenerationModule(generator, backbone, cfg)
    last = Path(ckpt_dir) / "last.ckpt"
    resumed = None
    if last.exists():  # our own Lightning checkpoint, written by this function
        resumed = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
    trainer = L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices,
        num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every)],
    )
    start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    generator.eval().cpu()
    backbone.cpu()
    return TrainResult(module.losses, int(trainer.global_step), time.perf_counter() - start, resumed)
