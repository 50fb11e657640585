"""The "generation" stage (Stage 2): train the 64 queries and the NextDiT on the CLIP features of
ShapesWorld images through the frozen understanding backbone, then check that understanding is
untouched (backbone weights hash and VQA accuracy identical before and after). On WebDataset
shards (full configs) the same code trains on the targets `shard_stages.shard_targets` reads
(extracted features or images encoded every step) and checks the backbone hash only.

Writes RUN_DIR/generation/:
  generator.safetensors  queries + DiT + feature mean/std
  generator_config.json  GeneratorConfig + widths
  loss_history.json      (step, loss) pairs
  metrics.json           training figures, backbone hash before/after, VQA after stage 2
  stage.json             written last (mark_complete)

Under DDP every rank trains; global rank 0 alone measures and writes the files while the others
wait at a barrier (`run.finish_on_rank_zero`). The instruct stage (instruct_stage.py) continues
this generator on BLIP3o-60k and writes the same files to RUN_DIR/instruct/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .artifacts import (atomic_write_json, fingerprint, load_tensors, mark_complete, save_tensors,
                        stage_complete)
from .generation import Blip3oGenerator, GeneratorConfig
from .report import resumed_note
from .run import StageResult, finish_on_rank_zero, remove_stale_checkpoints
from .training.clip import TrainResult
from .training.compile import without_speed_keys
from .training.generation import CaptionFeatureDataset

GENERATION_STAGE_VERSION = 1
WEIGHTS = "generator.safetensors"
CONFIG = "generator_config.json"


def save_generator(generator: Blip3oGenerator, directory: str | Path) -> None:
    directory = Path(directory)
    save_tensors(directory / WEIGHTS, generator.state_dict())
    atomic_write_json(directory / CONFIG, generator.config_dict())


def load_generator(directory: str | Path) -> Blip3oGenerator:
    """A trained generator (queries + DiT) from a stage or pipeline directory."""
    directory = Path(directory)
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory / CONFIG} not found; train the generation stage first "
                                "(blip3o-mini run) or point to RUN_DIR/generation")
    info = json.loads((directory / CONFIG).read_text())
    gen = Blip3oGenerator(GeneratorConfig(**info["generator"]), info["feature_dim"], info["cond_dim"])
    gen.load_state_dict(load_tensors(directory / WEIGHTS))
    return gen.eval()


def trained_generator_dir(run_dir: str | Path) -> Path:
    """The generator a finished run samples with: RUN_DIR/instruct when instruction tuning
    completed there (full configs with data.instruct_shards), else RUN_DIR/generation."""
    run_dir = Path(run_dir)
    return run_dir / ("instruct" if stage_complete(run_dir / "instruct", None) else "generation")


def weights_hash(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen module did not change."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


SAMPLING_KEYS = ("num_steps", "guidance_scale", "guidance_interval", "sde_noise")  # generation.flow keys read only when sampling


def training_section(section: dict) -> dict:
    """The `generation:` section less the flow's sampling keys and the recipe's speed keys: the
    stage's fingerprint, so a change of sampling steps or CFG scale re-runs the evaluation, not
    the training, and switching `compile` keeps a trained stage."""
    out = without_speed_keys(section)
    if "flow" in section:
        out["flow"] = {k: v for k, v in (section["flow"] or {}).items() if k not in SAMPLING_KEYS}
    return out


def generation_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from . import shard_stages
    from .understanding_stage import evaluate_stage_vqa, load_stage_backbone

    section = cfg.get("generation", {})
    clip, und, data = upstream["clip"], upstream["understanding"], upstream["data"]
    key = fingerprint("generation", GENERATION_STAGE_VERSION, cfg.get("seed", 0), training_section(section),
                      clip.key, und.key)
    out = Path(run_dir) / "generation"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_summary(metrics))
        return StageResult("generation", key, out, True, metrics)

    from .describe import generation_configs

    gen_cfg, train_cfg, _ = generation_configs(cfg)
    shards = shard_stages.uses_shards(cfg)
    whiten = gen_cfg.feature_norm == "whiten"
    if shards:  # tar shards: extracted features, or images through the pretrained CLIP every step
        targets = shard_stages.shard_targets(cfg, run_dir, upstream)
        dataset, feature_dim, encoder = targets.dataset, targets.feature_dim, targets.encoder
        mean, std, whitening = shard_stages.measure_target_stats(targets, whiten) \
            if gen_cfg.feature_norm != "none" else (None, None, None)
    else:  # ShapesWorld with the CLIP stage's cached features
        dataset, feature_dim, mean, std, whitening = shapesworld_targets(data.path, clip.path, whiten)
        encoder = None
    backbone = load_stage_backbone(und.path).freeze()
    hash_before = weights_hash(backbone)

    torch.manual_seed(train_cfg.seed)
    generator = Blip3oGenerator(gen_cfg, feature_dim, backbone.hidden_size, mean, std, whitening)
    if gen_cfg.cond_norm != "none":  # Q's statistics with the initial queries, before the first step
        fit_condition_norm(generator, backbone, condition_prompts(dataset, COND_NORM_PROMPTS, train_cfg.seed))
    ckpt_dir = out / f"lightning-{key}"
    remove_stale_checkpoints(out, ckpt_dir)
    result = train(cfg, generator, backbone, dataset, ckpt_dir, encoder)

    def write() -> None:  # global rank 0 only: checks, metrics and every file of the stage
        hash_after = weights_hash(backbone)
        t0 = time.perf_counter()
        vqa_after = None if shards else evaluate_stage_vqa(backbone, run_dir)  # VQA needs ShapesWorld
        metrics = train_metrics(result, generator) | {
            "backbone_hash_before": hash_before, "backbone_hash_after": hash_after,
            "backbone_unchanged": hash_before == hash_after,
            "vqa_accuracy_after": vqa_after, "vqa_seconds": round(time.perf_counter() - t0, 1)}
        if shards:
            metrics |= {"targets": cfg["data"].get("targets", "features"), "num_train_samples": targets.num_samples}
        print(_summary(metrics))
        write_generator_stage(out, key, generator, result, metrics, ckpt_dir,
                              {"generation": section, "clip_key": clip.key, "understanding_key": und.key})

    return finish_on_rank_zero("generation", key, out, result.trainer, write)


COND_NORM_PROMPTS = 2048  # training captions whose Q measures `generation.cond_norm` (x 64 query positions)


def condition_prompts(dataset, num: int, seed: int = 0) -> list[str]:
    """`num` training prompts of a `(prompt, target)` dataset: a seeded sample of a map-style
    one (a caption dataset's pairs without their features), the first `num` of a stream."""
    import itertools

    if isinstance(dataset, torch.utils.data.IterableDataset):
        return [text for text, _ in itertools.islice(iter(dataset), num)]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    pairs = getattr(dataset, "pairs", None)  # CaptionFeatureDataset: (text, row) without loading features
    return [pairs[i][0] if pairs is not None else dataset[i][0] for i in order]


def run_condition_prompts(run_dir: Path, seed: int) -> list[str]:
    """`condition_prompts` of a ShapesWorld run's training captions, as its generation stage
    draws them (for scripts that fit `cond_norm` on a finished run)."""
    import datasets

    from .training.generation import CaptionFeatureDataset

    captions = datasets.load_from_disk(str(Path(run_dir) / "data" / "shapesworld"))["train"]["captions"]
    return condition_prompts(CaptionFeatureDataset(captions, torch.zeros(len(captions))), COND_NORM_PROMPTS, seed)


def fit_condition_norm(generator: Blip3oGenerator, backbone, prompts: list[str]) -> None:
    """`generator.fit_condition_norm` on the accelerator when there is one (the full run's
    backbone is too large to read thousands of prompts on the CPU), the modules back on the CPU after.
    Every rank of a multi-GPU run fits the same statistics on its own device (LOCAL_RANK; the
    trainer has not placed the process yet)."""
    import os

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    generator.to(device), backbone.to(device)
    generator.fit_condition_norm(backbone, prompts)
    generator.cpu(), backbone.cpu()


def train_metrics(result: TrainResult, generator: Blip3oGenerator) -> dict:
    return result.metrics() | result.extra | {"num_params_trainable": sum(p.numel() for p in generator.parameters())}


def write_generator_stage(out: Path, key: str, generator: Blip3oGenerator, result: TrainResult, metrics: dict,
                          ckpt_dir: Path, config: dict) -> None:
    """The files of a stage that trains the generator (generation, instruct), stage.json last,
    then its resume state removed. Called on global rank 0 only (`run.finish_on_rank_zero`)."""
    save_generator(generator, out)
    atomic_write_json(out / "loss_history.json", result.loss_history)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "config.json", config)
    mark_complete(out, key, metrics=metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def shapesworld_targets(data_dir: Path, clip_dir: Path, whiten: bool = False):
    """(captions x cached CLIP features dataset, feature width, mean (F,), std (F,), whitening
    (principal variances (F,), directions (F, F)) or None) of the toy run."""
    import datasets

    from .features import feature_stats, load_split_features, measure_whitening

    ds = datasets.load_from_disk(str(data_dir / "shapesworld"))
    features = load_split_features(clip_dir, "train")  # (N, 64, F)
    stats = feature_stats(clip_dir)
    # The cached features are raw unless the CLIP stage normalised them; either way the
    # generator's own standardisation uses the statistics of what it is trained on.
    mean, std = (torch.zeros_like(stats.mean), torch.ones_like(stats.std)) if stats.normalized \
        else (stats.mean, stats.std)
    whitening = measure_whitening(features, mean, std) if whiten else None
    return CaptionFeatureDataset(ds["train"]["captions"], features), features.shape[-1], mean, std, whitening


def train(cfg: dict, generator: Blip3oGenerator, backbone, dataset, ckpt_dir: Path, encoder=None) -> TrainResult:
    """Fit through `generation_run`, the one code path of the toy and the multi-GPU runs;
    resume from `ckpt_dir/last.ckpt` when an earlier run was interrupted. `encoder`: the frozen
    CLIP encoder when the dataset yields images (`data.targets: images`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .training.generation_run import generation_run

    run = generation_run(cfg, backbone, dataset, generator.feature_dim, encoder=encoder, generator=generator)
    last = ckpt_dir / "last.ckpt"
    resumed = None
    if last.exists():  # our own Lightning checkpoint, written by this function
        resumed = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
    every = run.train_cfg.checkpoint_every
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=every)]
    torch.manual_seed(run.train_cfg.seed)
    start = time.perf_counter()
    trainer = run.fit(ckpt_path=str(last) if last.exists() else None, callbacks=callbacks)
    generator.eval().cpu()
    backbone.cpu()
    return TrainResult(run.module.losses, int(trainer.global_step), time.perf_counter() - start, resumed,
                       trainer=trainer, extra={"train_compiled": run.module.compiled})


def _summary(m: dict, name: str = "generation") -> str:
    vqa = "n/a (no ShapesWorld)" if m["vqa_accuracy_after"] is None else f"{m['vqa_accuracy_after']:.4f}"
    return (f"{name}: {m['train_steps']} steps in {m['train_seconds']:.0f} s{resumed_note(m)}, final loss "
            f"{m['final_loss']:.3f}; backbone unchanged: {m['backbone_unchanged']}; VQA after stage 2: {vqa}")
