"""Stage 1a recipe: train the toy CLIP encoder contrastively on ShapesWorld image-caption pairs.

BLIP3-o takes its CLIP encoder pretrained (EVA-CLIP, trained with the CLIP objective on
billions of pairs); the toy world has no such model, so this stage trains one the same way:
the symmetric InfoNCE loss of CLIP (open_clip's own `ClipLoss`), a learnable temperature
clamped at 100 as in open_clip, AdamW with warmup + cosine decay, no weight decay on gains,
biases, embeddings or the temperature. Each sample pairs an image with one of its caption
paraphrases drawn at random, so the text tower learns that paraphrases mean the same scene.

The architecture is the open_clip model inside `blip3o_mini.vision.ClipEncoder`; this file is
the recipe (data, loss, optimiser, Lightning loop resumable from `last.ckpt`).

Shape glossary: B batch, H = W image side (64), T text tokens (24: the longest ShapesWorld caption is 20 with start/end), E embedding dim.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch.utils.data import DataLoader, Dataset

from ..data.world import COLORS, HELD_OUT, SHAPES
from ..vision import ClipEncoder
from .distributed import TrainerConfig, make_trainer, stage_trainer_config
from .muon import check_optimizer, hidden_matrices, make_optimizer
from .schedule import warmup_cosine

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learnable temperature here


@dataclass
class ClipTrainConfig:
    batch_size: int = 128
    max_steps: int = 700
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    precision: str = "bf16-mixed"  # bf16 autocast: ~1.5x faster on AVX512-bf16 CPUs (the trainer: section's wins)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    hard_negatives: bool = True  # add one shape-swapped caption per sample as an extra negative
    # adamw, or muon: Muon for both towers' block matrices, AdamW for the rest (training/muon.py)
    optimizer: str = "adamw"

    def __post_init__(self):
        check_optimizer(self.optimizer, "clip.train.optimizer")


_SHAPE_PHRASE = re.compile(r"\b(?:(" + "|".join(COLORS) + r") )?(" + "|".join(SHAPES) + r")(s?)\b")


def swap_shape(caption: str, generator: torch.Generator | None = None) -> str:
    """A hard negative: the caption with one object's shape changed ("a red circle and a blue
    square" -> "a red triangle and a blue square"), never into a held-out composition."""
    phrases = list(_SHAPE_PHRASE.finditer(caption))
    if not phrases:
        return caption
    m = phrases[int(torch.randint(len(phrases), (), generator=generator))]
    color, shape, plural = m.group(1), m.group(2), m.group(3)
    options = [s for s in SHAPES if s != shape and (color, s) not in HELD_OUT]
    new = options[int(torch.randint(len(options), (), generator=generator))]
    return caption[:m.start(2)] + new + plural + caption[m.end(3):]


class CaptionPairs(Dataset):
    """(uint8 image (3, H, W), one random caption paraphrase) pairs."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]]):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists; they must align")
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        options = self.captions[i]
        return self.images[i], options[int(torch.randint(len(options), ()))]


class ClipModule(L.LightningModule):
    """The contrastive recipe around a `ClipEncoder` (which holds the open_clip model)."""

    def __init__(self, encoder: ClipEncoder, cfg: ClipTrainConfig):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.loss_fn = ClipLoss()
        self.loss_history: list[tuple[int, float]] = []  # (step, loss), kept in the checkpoint

    def contrastive_loss(self, image_emb, text_emb, scale):
        """open_clip's ClipLoss; with hard negatives (text_emb rows B..2B, NegCLIP, Yuksekgonul
        et al. 2023) images also rank them, while each caption still ranks only the B images."""
        B = len(image_emb)
        if len(text_emb) == B:
            return self.loss_fn(image_emb, text_emb, scale)
        logits_per_image, logits_per_text = self.loss_fn.get_logits(image_emb, text_emb, scale)  # (B, 2B), (2B, B)
        labels = torch.arange(B, device=image_emb.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text[:B], labels)) / 2

    def training_step(self, batch, batch_idx):
        images, ids = batch  # (B, 3, H, W) uint8, (B or 2B, T): captions, then hard negatives
        model = self.encoder.model
        image_emb = model.encode_image(self.encoder.preprocess(images), normalize=True)  # (B, E)
        text_emb = model.encode_text(ids, normalize=True)  # (B or 2B, E)
        with torch.autocast(self.device.type, enabled=False):  # logits x100: keep them in fp32
            loss = self.contrastive_loss(image_emb.float(), text_emb.float(), model.logit_scale.exp().float())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", model.logit_scale.exp().detach())
        if self.global_step % self.cfg.log_every == 0 or self.global_step == self.cfg.max_steps - 1:
            self.loss_history.append((int(self.global_step), float(loss.detach())))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.encoder.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.encoder.model.named_parameters():
            excluded = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name
            (no_decay if excluded else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # muon: the Linear weights of both towers' blocks (attention out, MLP); the fused qkv stays AdamW
        model = self.encoder.model
        matrices = hidden_matrices(model.visual.transformer) + hidden_matrices(model.transformer)
        opt = make_optimizer(self.cfg.optimizer, groups, matrices, "clip.train.optimizer", self._trainer,
                             muon_options={"weight_decay": self.cfg.weight_decay}, fused=True,
                             lr=self.cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        return warmup_cosine(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_history"] = self.loss_history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss_history = [tuple(x) for x in checkpoint.get("loss_history", [])]


@dataclass
class TrainResult:
    loss_history: list[tuple[int, float]]  # (step, loss) every log_every steps
    steps: int
    seconds: float  # wall-clock of this call (a resumed run counts only its own part)
    resumed_from: int | None = None  # step of the checkpoint it resumed from
    extra: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)  # more named (step, value) curves, e.g. held-out loss per type
    trainer: object = None  # the lightning.Trainer that ran: its rank and barrier (run.finish_on_rank_zero)

    def metrics(self) -> dict:
        """The training figures every stage writes to its metrics.json."""
        return {"train_steps": self.steps, "train_seconds": round(self.seconds, 1),
                "train_precision": self.trainer.precision, "resumed_from_step": self.resumed_from,
                "final_loss": self.loss_history[-1][1] if self.loss_history else None}


def train_clip(encoder: ClipEncoder, images: torch.Tensor, captions: list[list[str]], cfg: ClipTrainConfig,
               ckpt_dir: str | Path, trainer: TrainerConfig | None = None,
               callbacks: list | None = None) -> TrainResult:
    """Train `encoder` in place on uint8 images (N, 3, H, W) and their caption paraphrases;
    resume from `ckpt_dir/last.ckpt` when an earlier run was interrupted. Extra Lightning
    `callbacks` (e.g. a live loss plot) see `module.loss_history` grow. `trainer` (the config's
    `trainer:` section) sets accelerator, devices, nodes, strategy and precision; on several
    devices each contrasts its own batch (negatives are not gathered across devices)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(cfg.seed, verbose=False)

    def collate(batch):
        texts = [c for _, c in batch]
        if cfg.hard_negatives:
            texts += [swap_shape(c) for c in texts]
        return torch.stack([x for x, _ in batch]), encoder.tokenize(texts)  # (B, 3, H, W), (B or 2B, T)

    data = DataLoader(CaptionPairs(images, captions), batch_size=cfg.batch_size, shuffle=True,
                      drop_last=True, collate_fn=collate)
    module = ClipModule(encoder, cfg)
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    resumed = None
    if last.exists():  # our own Lightning checkpoint, written by this function
        resumed = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
    fit = make_trainer(
        trainer or stage_trainer_config({}, cfg.precision), max_steps=cfg.max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every), *(callbacks or [])],
    )
    start = time.perf_counter()
    encoder.train()
    fit.fit(module, data, ckpt_path=str(last) if last.exists() else None)
    encoder.eval().cpu()
    return TrainResult(module.loss_history, int(fit.global_step), time.perf_counter() - start, resumed,
                       trainer=fit)
