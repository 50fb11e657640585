"""Stage 1b recipe: teach the toy backbone to understand ShapesWorld images, LLaVA-style.

BLIP3-o starts from Qwen2.5-VL, whose understanding was trained this way (LLaVA: frozen CLIP
encoder, a projector and the LM trained on image-conversation data, loss on the answers only).
The toy world has no such model, so this stage trains one: every training image contributes
its caption ("describe the image." -> canonical caption) and its question-answer pairs. The
CLIP encoder stays frozen and is never run here: the stage reads the features cached by stage
1a. Rows are packed per image with a shared image prefix (`packing.py`).

The architecture is `blip3o_mini.backbone.ToyBackbone`; this file is the recipe (data, loss,
optimiser, Lightning loop resumable from `last.ckpt`).

Shape glossary: B batch, T row length, N image tokens (64), D CLIP width, H LM width, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..backbone import ToyBackbone
from ..data.dataset import scene_of
from ..data.text import QUESTION_TYPES, count_turns, direction_turns, position_turns, relation_turns
from ..data.world import DEFAULT_RELATION_RULE
from ..tokenizer import CAPTION_PROMPT
from .attention_kernel import runs_on_cpu
from .clip import TrainResult  # the same result record as the CLIP and generation recipes
from .compile import check_compile, use_compile
from .distributed import TrainerConfig, make_trainer, stage_trainer_config
from .muon import check_optimizer, hidden_matrices, make_optimizer
from .packing import IGNORE, Packer, PackedRow, collate_rows, packed_attention_mask
from .schedule import warmup_cosine


@dataclass
class UnderstandingTrainConfig:
    batch_size: int = 32
    max_steps: int = 700
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    precision: str = "bf16-mixed"  # bf16 autocast (fast on AVX512-bf16 CPUs); the trainer: section's wins
    num_threads: int | None = None  # CPU threads while training (None: torch's default); see torch_threads
    seed: int = 0  # the LM's start and the data order; left out of a run's config, the run's `seed:`
    log_every: int = 10
    print_every: int = 100  # a progress line (step, loss, seconds); 0: silent
    checkpoint_every: int = 50
    position_turns: bool = False  # also train "where is the red circle?" turns (data.text.position_turns)
    relation_turns: bool = False  # also train every pair's relation question (data.text.relation_turns)
    count_turns: bool = False  # also train every shape's count question (data.text.count_turns)
    direction_turns: bool = False  # also train "where is A from B?" -> left / ... (data.text.direction_turns)
    type_loss_every: int = 0  # every N steps the answer loss on held-out questions of each type (0: off)
    # torch.compile the LM's training forward: true, false or auto (where a
    # compiler is found; training/compile.py). A speed setting, left out of the stage's fingerprint.
    compile: bool | str = False
    # adamw, or muon: Muon for the LM's layers' matrices, AdamW for the rest (training/muon.py)
    optimizer: str = "adamw"

    def __post_init__(self):
        check_compile(self.compile, "understanding.train.compile")
        check_optimizer(self.optimizer, "understanding.train.optimizer")


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run a block with `num_threads` intra-op CPU threads, restoring the previous count after.
    On the shared 2-core toy machine one thread trains this small LM ~10x faster than two: the
    kernels are tiny and two threads spend the step waiting for each other at every op."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def conversation(row: dict, caption_prompt: str = CAPTION_PROMPT, positions: bool = False,
                 relations: bool = False, counts: bool = False, directions: bool = False,
                 rule: str = DEFAULT_RELATION_RULE) -> list[tuple[str, str]]:
    """An image's training turns: captioning as a question, then its question-answer pairs,
    then with `positions` where each object is (`position_turns`), with `relations` every
    pair's relation (`relation_turns`), with `counts` every shape's count not yet asked
    (`count_turns`), with `directions` where each named object is from each other one
    (`direction_turns`); these need the row's scene graph (`objects`), and state relations by
    `rule`, the rule the rows' own text was written with (`data.relation_rule`)."""
    turns = [(caption_prompt, row["captions"][0]), *zip(row["questions"], row["answers"])]
    # In this order; directions last, so no relation question can read a direction's answer
    extras = [(name, make) for flag, name, make in (
        (positions, "position_turns", position_turns),
        (relations, "relation_turns", lambda scene: relation_turns(scene, rule)),
        (counts, "count_turns", lambda scene: count_turns(scene, tuple(row["questions"]))),
        (directions, "direction_turns", lambda scene: direction_turns(scene, rule))) if flag]
    if extras and "objects" not in row:
        raise ValueError(f"{extras[0][0]} needs each row's scene graph (`objects`); ShapesWorld rows carry "
                         f"it, WebDataset shards do not: set understanding.train.{extras[0][0]}: false")
    scene = scene_of(row) if extras else None
    return turns + [turn for _, make in extras for turn in make(scene)]


def training_turns(cfg: UnderstandingTrainConfig, rule: str = DEFAULT_RELATION_RULE) -> Callable[[dict], list[tuple[str, str]]]:
    """A row's training turns under `cfg`: `conversation` with the turns its flags switch on,
    relations stated by `rule` (`data.relation_rule`)."""
    return functools.partial(conversation, positions=cfg.position_turns, relations=cfg.relation_turns,
                             counts=cfg.count_turns, directions=cfg.direction_turns, rule=rule)


class PackedConversations(Dataset):
    """(CLIP features (N, D), packed row of all the image's turns), tokenised once. `turns` maps
    a dataset row to its (question, answer) turns (default: `conversation`)."""

    def __init__(self, features: torch.Tensor, rows: list[dict], packer: Packer,
                 turns: Callable[[dict], list[tuple[str, str]]] = conversation):
        if len(features) != len(rows):
            raise ValueError(f"{len(features)} feature rows but {len(rows)} dataset rows; the CLIP "
                             "features must be aligned with the dataset split (load_split_features)")
        self.features = features
        self.rows = packer.pack_many([turns(r) for r in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, PackedRow]:
        return self.features[i], self.rows[i]

    def num_tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.rows)


def collate(batch: list[tuple[torch.Tensor, PackedRow]], pad_id: int) -> dict[str, torch.Tensor]:
    out = collate_rows([row for _, row in batch], pad_id)  # (B, T) each
    out["image_features"] = torch.stack([f for f, _ in batch])  # (B, N, D)
    return out


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token cross-entropy on answer tokens only: the state at t predicts label t + 1;
    positions whose next token is not an answer token never reach the LM head."""
    targets = labels[:, 1:]  # (B, T - 1)
    keep = targets != IGNORE  # (B, T - 1)
    logits = lm_head(hidden[:, :-1][keep])  # (M, V), M answer tokens in the batch
    return F.cross_entropy(logits.float(), targets[keep])


def type_batches(features: torch.Tensor, rows: list[dict], packer: Packer,
                 max_rows: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """One held-out batch per question type: up to `max_rows` rows that ask it, each packed
    with that type's questions only, so `UnderstandingModule.loss` on it is the type's answer
    loss. A yes / no type at chance sits at ln 2 / 2 = 0.35 (its answer tokens are the word and
    the trivial end of turn): relation is learned as a sudden drop from there in some runs and
    never in others (docs/status.md), which the total loss, where it is a few answer tokens in a
    hundred, does not show."""
    out = {}
    for qtype in QUESTION_TYPES:
        idx = [i for i, r in enumerate(rows) if qtype in r["question_types"]][:max_rows]
        convs = [[(q, a) for q, a, t in zip(rows[i]["questions"], rows[i]["answers"], rows[i]["question_types"])
                  if t == qtype] for i in idx]
        if idx:
            out[qtype] = collate(list(zip(features[idx], packer.pack_many(convs))), packer.tokenizer.pad_token_id)
    return out


class UnderstandingModule(L.LightningModule):
    """The LLaVA recipe around a `ToyBackbone` (projector + LM trained, CLIP frozen upstream).
    With `watch` (`type_batches`) it records each type's held-out answer loss every
    `cfg.type_loss_every` steps."""

    def __init__(self, backbone: ToyBackbone, cfg: UnderstandingTrainConfig,
                 watch: dict[str, dict[str, torch.Tensor]] | None = None):
        super().__init__()
        self.backbone, self.cfg, self.watch = backbone, cfg, watch or {}
        self.loss_history: list[tuple[int, float]] = []  # (step, loss), kept in the checkpoint
        self.type_loss_history: dict[str, list[tuple[int, float]]] = {t: [] for t in self.watch}
        self.started = time.perf_counter()
        self.compiled = use_compile(cfg.compile)  # train_understanding resolves it for the trainer's device
        self._run_lm = None  # the compiled `backbone.run_lm`, made at the first training step

    @torch.no_grad()
    def type_losses(self) -> dict[str, float]:
        """Held-out answer loss per question type, under the training step's precision."""
        return {t: float(self.loss({k: v.to(self.device) for k, v in batch.items()}))
                for t, batch in self.watch.items()}

    def loss(self, batch: dict, run_lm: Callable | None = None) -> torch.Tensor:
        """`run_lm`: what runs the LM on the spliced embeddings, by default `backbone.run_lm`
        (training passes its compiled form)."""
        mask = packed_attention_mask(batch["segments"])  # (B, 1, T, T)
        hidden = self.backbone.hidden(batch["input_ids"], batch["image_features"], mask,
                                      batch["position_ids"], run_lm=run_lm)  # (B, T, H)
        return answer_loss(hidden, batch["labels"], self.backbone.lm.lm_head)

    def training_step(self, batch, batch_idx):
        if self.compiled and self._run_lm is None:
            # The LM is nearly all of the step (the projector and the splice are a few small ops).
            # Rows differ in length, so one graph with a symbolic T serves every batch. A compiled
            # function, not a submodule: the weights stay registered once, and the held-out losses
            # and evaluation (no gradients, other shapes) keep the eager LM.
            self._run_lm = torch.compile(self.backbone.run_lm, dynamic=True)
        loss = self.loss(batch, self._run_lm)
        self.log("train/loss", loss, prog_bar=True)
        step, last = int(self.global_step), self.global_step == self.cfg.max_steps - 1
        if step % self.cfg.log_every == 0 or last:
            self.loss_history.append((step, float(loss.detach())))
        if self.watch and self.cfg.type_loss_every and (step % self.cfg.type_loss_every == 0 or last):
            for t, value in self.type_losses().items():
                self.type_loss_history[t].append((step, value))
        if self.cfg.print_every and (step + 1) % self.cfg.print_every == 0:
            held_out = "  ".join(f"{t} {h[-1][1]:.3f}" for t, h in self.type_loss_history.items() if h)
            print(f"step {step + 1}/{self.cfg.max_steps}  loss {float(loss.detach()):.4f}  "
                  f"{time.perf_counter() - self.started:.0f} s" + (f"  held-out: {held_out}" if held_out else ""),
                  flush=True)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                excluded = p.ndim < 2 or "embed" in name or "norm" in name
                (no_decay if excluded else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # muon: the decoder layers' matrices; embeddings, head and projector keep AdamW
        opt = make_optimizer(self.cfg.optimizer, groups, hidden_matrices(self.backbone.lm.model.layers),
                             "understanding.train.optimizer", self._trainer,
                             muon_options={"weight_decay": self.cfg.weight_decay}, lr=self.cfg.lr, betas=(0.9, 0.98))
        return warmup_cosine(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_history"] = self.loss_history
        checkpoint["type_loss_history"] = self.type_loss_history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss_history = [tuple(x) for x in checkpoint.get("loss_history", [])]
        saved = checkpoint.get("type_loss_history", {})
        self.type_loss_history = {t: [tuple(x) for x in saved.get(t, [])] for t in self.watch}


def train_understanding(backbone: ToyBackbone, features: torch.Tensor, rows: list[dict],
                        cfg: UnderstandingTrainConfig, ckpt_dir: str | Path,
                        trainer: TrainerConfig | None = None,
                        turns: Callable[[dict], list[tuple[str, str]]] | None = None,
                        held_out: tuple[torch.Tensor, list[dict]] | None = None) -> TrainResult:
    """Train `backbone` (projector + LM) in place on cached CLIP features (N, 64, D) and the
    aligned dataset rows; resume from `ckpt_dir/last.ckpt` when an earlier run was interrupted.
    `trainer` (the config's `trainer:` section) sets accelerator, devices, nodes, strategy and
    precision; on several devices Lightning's `DistributedSampler` splits the shuffled rows.
    `turns`: a row's training turns (default: `conversation`, with position, relation, count and
    direction turns when `cfg.position_turns`, `cfg.relation_turns`, `cfg.count_turns` and
    `cfg.direction_turns`).
    `held_out`: (features, rows with `question_types`) whose answer loss per type is recorded every
    `cfg.type_loss_every` steps (`type_batches`; the result's `curves["type_loss"]`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(cfg.seed, verbose=False)
    turns = turns or training_turns(cfg)
    packer = Packer(backbone.tokenizer, backbone.num_placeholders)
    data = PackedConversations(features, rows, packer, turns)
    pad_id = backbone.tokenizer.pad_token_id
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=lambda b: collate(b, pad_id))
    watch = type_batches(*held_out, packer) if held_out is not None and cfg.type_loss_every else None
    module = UnderstandingModule(backbone, cfg, watch)
    trainer = trainer or stage_trainer_config({}, cfg.precision)
    module.compiled = use_compile(cfg.compile, cuda=not runs_on_cpu(trainer.accelerator))  # the trainer's device
    last = Path(ckpt_dir) / "last.ckpt"
    resumed = None
    if last.exists():  # our own Lightning checkpoint, written by this function
        resumed = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
    fit = make_trainer(
        trainer, max_steps=cfg.max_steps, gradient_clip_val=cfg.grad_clip,
        logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every)],
    )
    start = time.perf_counter()
    backbone.train()
    with torch_threads(cfg.num_threads):
        fit.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    backbone.eval().cpu()
    seconds = time.perf_counter() - start
    steps = int(fit.global_step)
    tokens_per_row = data.num_tokens() / max(1, len(data))
    curves = {"type_loss": module.type_loss_history} if watch else {}
    return TrainResult(module.loss_history, steps, seconds, resumed, trainer=fit, curves=curves,
                       extra={"rows_per_epoch": len(data), "tokens_per_row": round(tokens_per_row, 1),
                              "train_compiled": module.compiled,
                              "epochs": round(steps * cfg.batch_size / max(1, len(data)), 2)})
