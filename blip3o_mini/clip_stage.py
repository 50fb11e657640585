"""The "clip" stage (Stage 1a): train the toy CLIP encoder, measure its feature statistics,
evaluate it, and cache the 64-token features of every split for the stages after it.

Writes RUN_DIR/clip/:
  encoder/            ClipEncoder.save: open_clip_model.safetensors, open_clip_config.json,
                      clip_config.json, feature_stats.safetensors (per-dim mean/std)
  features/           <split>-<encoder hash>-<data key>.safetensors, (N, 64, D) float32
  loss_history.json   (step, loss) pairs, for the notebook's loss curve
  metrics.json        zero-shot colour/shape accuracy, recall@1, timings, feature statistics
  config.json         the config section this stage ran with
  stage.json          written last (mark_complete)
A config with `pretrained` set (the full run's EVA02-E-14-plus) skips training (`max_steps: 0`
is implied by a pretrained encoder) and only extracts and evaluates.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete
from .config import build
from .features import ENCODER_DIR, FEATURES_DIR, extract_features, measure_stats, write_cache
from .report import resumed_note
from .run import StageResult, finish_on_rank_zero, remove_stale_checkpoints
from .training.clip import ClipTrainConfig, train_clip
from .training.distributed import stage_trainer_config
from .vision import ClipConfig, ClipEncoder

CLIP_STAGE_VERSION = 1  # bump when this stage's outputs change meaning


def clip_configs(section: dict | None) -> tuple[ClipConfig, ClipTrainConfig]:
    """The `clip:` YAML section -> (encoder config, training config under `train:`)."""
    section = dict(section or {})
    train = section.pop("train", None)
    return build(ClipConfig, section), build(ClipTrainConfig, train)


def clip_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    import datasets

    from .data.tensors import images_uint8
    from .evaluation.clip import evaluate_clip

    section = cfg.get("clip", {})
    data = upstream["data"]
    key = fingerprint("clip", CLIP_STAGE_VERSION, cfg.get("seed", 0), section, data.key)
    out = Path(run_dir) / "clip"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_summary(metrics))
        return StageResult("clip", key, out, True, metrics)

    clip_cfg, train_cfg = clip_configs(section)
    ds = datasets.load_from_disk(str(data.path / "shapesworld"))
    torch.manual_seed(cfg.get("seed", 0))
    encoder = ClipEncoder(clip_cfg)
    train_images = images_uint8(ds["train"])
    metrics: dict = {}
    result = None
    if clip_cfg.pretrained is None and train_cfg.max_steps > 0:
        ckpt_dir = out / f"lightning-{key}"  # resume state of this config only
        remove_stale_checkpoints(out, ckpt_dir)
        result = train_clip(encoder, train_images, ds["train"]["captions"], train_cfg, ckpt_dir,
                            trainer=stage_trainer_config(cfg, train_cfg.precision))
        metrics |= result.metrics()

    def write() -> None:  # global rank 0 only (run.finish_on_rank_zero): features, checks, files
        if result is not None:
            atomic_write_json(out / "loss_history.json", result.loss_history)
        t0 = time.perf_counter()
        raw = extract_features(encoder, train_images, normalize=False)  # (N, 64, D)
        mean, std = measure_stats(raw)
        encoder.set_feature_stats(mean, std)
        encoder.save(out / ENCODER_DIR)
        train_feats = (raw - encoder.feature_mean) / encoder.feature_std if clip_cfg.normalize_features else raw
        write_cache(encoder, train_feats, out / FEATURES_DIR, "train", data.key)
        for split in (s for s in ds if s != "train"):
            write_cache(encoder, extract_features(encoder, images_uint8(ds[split])), out / FEATURES_DIR, split,
                        data.key)
        metrics["feature_seconds"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        metrics.update(evaluate_clip(encoder, ds["val"]).to_dict())
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
        metrics.update({"feature_dim": encoder.feature_dim, "num_tokens": encoder.num_tokens,
                        "normalize_features": clip_cfg.normalize_features,
                        "feature_mean_avg": float(mean.mean()), "feature_mean_abs_max": float(mean.abs().max()),
                        "feature_std_avg": float(std.mean()), "feature_std_min": float(std.min()),
                        "feature_std_max": float(std.max()), "encoder_hash": encoder.weights_hash()})
        print(_summary(metrics))
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "config.json", {"clip": section, "data_key": data.key, "seed": cfg.get("seed", 0)})
        mark_complete(out, key, metrics=metrics)
        for done in out.glob("lightning-*"):  # resume state is not needed once the stage is complete
            shutil.rmtree(done, ignore_errors=True)

    return finish_on_rank_zero("clip", key, out, result and result.trainer, write)


def _summary(m: dict) -> str:
    trained = (f"trained {m['train_steps']} steps in {m['train_seconds']:.0f} s{resumed_note(m)}, final loss "
               f"{m['final_loss']:.3f}; ") if m.get("train_steps") else ""
    return (f"CLIP: {trained}zero_shot_color_acc {m['zero_shot_color_acc']:.3f}, zero_shot_shape_acc "
            f"{m['zero_shot_shape_acc']:.3f} (seen compositions, n={m['num_single_object']}), recall_at_1 "
            f"{m['recall_at_1']:.3f} (among 64, {m['num_retrieval_queries']} queries); unseen "
            f"compositions: colour {m['zero_shot_color_acc_unseen']:.3f}, shape "
            f"{m['zero_shot_shape_acc_unseen']:.3f} (n={m['num_unseen_single_object']}); features "
            f"(64, {m['feature_dim']}), per-dim std {m['feature_std_min']:.2f}..{m['feature_std_max']:.2f}, "
            f"normalised: {m['normalize_features']}")
