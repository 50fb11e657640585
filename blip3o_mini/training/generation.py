"""Stage 2 recipe: train the queries and the NextDiT by flow matching on CLIP features, with the
understanding backbone frozen (BLIP3-o's sequential training).

BLIP3-o's recipe: AdamW, lr 1e-4 with cosine decay to 1e-5 after a short warmup, weight decay
0, gradient clipping 1.0, bf16. The same module serves the toy run and the full run; only the
config changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..backbone_interface import Backbone
from ..generation import Blip3oGenerator
from .compile import check_compile, use_compile
from .muon import check_optimizer, hidden_matrices, make_optimizer
from .schedule import warmup_cosine


@dataclass
class GenerationTrainConfig:
    batch_size: int = 64
    max_steps: int = 3000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    query_lr_scale: float = 1.0  # the queries' lr relative to the DiT's (BLIP3-o: one lr for both; 0 freezes them)
    precision: str = "32-true"
    log_every: int = 25
    num_workers: int = 0
    checkpoint_every: int = 200
    seed: int = 0  # the DiT's and queries' start and the data order; left out of a run's config, the run's `seed:`
    # torch.compile the DiT's training forward and the LM's pass for Q: true, false or auto
    # (where a compiler is found; training/compile.py). A speed setting, left out of the stage's
    # fingerprint.
    compile: bool | str = False
    # adamw, or muon: Muon for the DiT blocks' matrices, AdamW for the rest (training/muon.py)
    optimizer: str = "adamw"

    def __post_init__(self):
        check_compile(self.compile, "generation.train.compile")
        check_optimizer(self.optimizer, "generation.train.optimizer")
        if self.query_lr_scale < 0:
            raise ValueError(f"generation.train.query_lr_scale must be >= 0 (0 freezes the queries), "
                             f"got {self.query_lr_scale}")


class CaptionFeatureDataset(Dataset):
    """Every (caption paraphrase, its image's CLIP features (N, F)) pair, flattened: an epoch
    visits each paraphrase once. Items depend only on their index, so the sharded sampler's
    ranks and a mid-epoch resume see exactly the same pairs as a single process would."""

    def __init__(self, captions: list[list[str]], features: Tensor):
        if len(captions) != len(features):
            raise ValueError(f"{len(captions)} caption lists but {len(features)} feature rows; "
                             "the CLIP feature cache must be aligned with the dataset split")
        self.features = features
        self.pairs = [(text, row) for row, options in enumerate(captions) for text in options]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[str, Tensor]:
        text, row = self.pairs[i]
        return text, self.features[row]


def collate(batch: list[tuple[str, Tensor]]) -> tuple[list[str], Tensor]:
    prompts, feats = zip(*batch)
    return list(prompts), torch.stack(feats)  # (B, N, F)


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
        if cfg.query_lr_scale == 0:  # frozen queries: Q needs no graph, so no backward through the LM
            self.generator.queries.requires_grad_(False)
        self.strict_loading = False  # checkpoints hold the generator only
        self.losses: list[tuple[int, float]] = []
        self.compiled = use_compile(cfg.compile)  # generation_run resolves it for the trainer's device
        self._dit_forward = None  # made at the first step, in the process that trains (ddp_spawn pickles us)
        self._run_lm = None  # the backbone's LM, compiled likewise (a `Backbone`'s; None for other QueryBackbones)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no statistics updates, ever
        return self

    def training_step(self, batch, batch_idx: int) -> Tensor:
        prompts, features = batch
        if self.compiled and self._dit_forward is None:
            # A compiled *function*, not a submodule: the DiT's weights stay registered once, under
            # `generator.dit`, and sampling (other batch shapes) keeps the eager DiT.
            self._dit_forward = torch.compile(self.generator.dit.forward, dynamic=False)
            if isinstance(self.backbone, Backbone):  # Q's pass: prompts differ in length, so a symbolic T
                self._run_lm = torch.compile(self.backbone.run_lm, dynamic=True)
        out = self.generator.loss(self.backbone, prompts, features, dit=self._dit_forward, run_lm=self._run_lm)
        self.log("train/loss", out.loss, prog_bar=True)
        if self.global_step % self.cfg.log_every == 0:
            self.losses.append((int(self.global_step), float(out.loss.detach())))
        return out.loss

    def configure_optimizers(self):
        queries = self.generator.queries  # (Nq, K): every prompt's condition moves when they do
        rest = [p for p in self.generator.parameters() if p.requires_grad and p is not queries]
        groups = [{"params": rest}]
        if queries.requires_grad:
            groups.append({"params": [queries], "lr": self.cfg.lr * self.cfg.query_lr_scale})
        opt = make_optimizer(self.cfg.optimizer, groups, hidden_matrices(self.generator.dit.blocks),
                             "generation.train.optimizer", self._trainer,
                             lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.999))
        return warmup_cosine(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr / self.cfg.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("backbone.")}
        checkpoint["loss_history"] = self.losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.losses = [tuple(x) for x in checkpoint.get("loss_history", [])]

