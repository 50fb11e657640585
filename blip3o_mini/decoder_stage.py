"""The "decoder" stage (Stage 2, pixels): train the pixel decoder to reconstruct ShapesWorld
images from their cached CLIP features, then score the reconstructions of validation images.

BLIP3-o takes its decoder ready-made (Emu2's); the toy trains its own on (image, CLIP feature)
pairs, which is how that decoder was made. The acceptance check is the reconstruction score:
images decoded from the real CLIP features of validation images, scored by GenEval-mini
against prompts built from their scene graphs (>= 0.95 expected), plus PSNR and the
detector's colour / shape / count agreement (evaluation/reconstruction.py).

Writes RUN_DIR/decoder/:
  decoder.safetensors   UNet + condition embedder (with the feature mean/std it normalises by)
  config.json           {"model": DecoderConfig, "train": ..., "eval": ..., "clip_key": ...}
  loss_curve.json       (step, mean loss) pairs
  reconstructions.png   originals (top) and their decodes (bottom)
  metrics.json          reconstruction_geneval_mini (+ per tag), PSNR, agreement, timings
  stage.json            written last (mark_complete)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete
from .config import build, with_run_seed
from .decoder import DecoderConfig, PixelDecoder
from .report import resumed_note
from .run import StageResult, finish_on_rank_zero, remove_stale_checkpoints
from .training.compile import without_speed_keys
from .training.decoder import DecoderTrainConfig, train_decoder
from .training.distributed import stage_trainer_config

DECODER_STAGE_VERSION = 1  # bump when this stage's outputs change meaning


@dataclass
class DecoderEvalConfig:
    """How the stage scores reconstructions (first `num_images` validation images)."""

    num_images: int = 200
    num_inference_steps: int = 20
    guidance_scale: float = 1.5
    batch_size: int = 100
    seed: int = 0


def decoder_configs(section: dict | None, feature_shape: tuple[int, ...] | None = None
                    ) -> tuple[DecoderConfig, DecoderTrainConfig, DecoderEvalConfig]:
    """The `decoder:` YAML section -> (model, `train:`, `eval:`) configs. The token count and
    width come from the CLIP features (`feature_shape` = (M, N, D)) unless the section sets them."""
    section = dict(section or {})
    train, evaluation = section.pop("train", None), section.pop("eval", None)
    if feature_shape is not None:
        section.setdefault("num_tokens", feature_shape[1])
        section.setdefault("feature_dim", feature_shape[2])
    return build(DecoderConfig, section), build(DecoderTrainConfig, train), build(DecoderEvalConfig, evaluation)


def decode_features(decoder: PixelDecoder, features: torch.Tensor, num_inference_steps: int,
                    guidance_scale: float, batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """Decode (M, N, D) features in batches with one seeded CPU generator: uint8 (M, 3, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    out = [decoder.decode(features[i:i + batch_size], num_inference_steps, guidance_scale, generator)
           for i in range(0, len(features), batch_size)]
    return torch.cat(out)


def reconstruction_report(decoder: PixelDecoder, features: torch.Tensor, originals: torch.Tensor,
                          scenes: list, eval_cfg):
    """Decode (M, N, D) features with the stage's evaluation settings (`eval_cfg`) and score them
    against the originals (M, 3, H, W) and their scene graphs: a `ReconstructionReport`."""
    from .evaluation.reconstruction import evaluate_reconstruction

    decoded = decode_features(decoder, features, eval_cfg.num_inference_steps, eval_cfg.guidance_scale,
                              eval_cfg.batch_size, eval_cfg.seed)
    return evaluate_reconstruction(decoded, originals, scenes)


def save_grid(path: Path, originals: torch.Tensor, decoded: torch.Tensor, num: int = 16) -> None:
    """Originals on the top row, their decodes below: a PNG written atomically."""
    import io

    from PIL import Image
    from torchvision.utils import make_grid

    from .artifacts import atomic_write_bytes

    grid = make_grid(torch.cat([originals[:num], decoded[:num]]), nrow=min(num, len(originals)),
                     padding=2, pad_value=128)  # (3, h, w) uint8
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def decoder_key(cfg: dict, clip_key: str) -> str:
    """The stage's fingerprint. `train.compile` changes speed, not weights: left out, so
    switching it keeps a trained stage."""
    section = without_speed_keys(cfg.get("decoder", {}))
    return fingerprint("decoder", DECODER_STAGE_VERSION, cfg.get("seed", 0), section, clip_key)


def decoder_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    import datasets

    from .data.tensors import images_uint8
    from .features import feature_stats, load_split_features

    section = cfg.get("decoder", {})
    clip = upstream["clip"]
    key = decoder_key(cfg, clip.key)
    out = Path(run_dir) / "decoder"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_summary(metrics))
        return StageResult("decoder", key, out, True, metrics)

    ds = datasets.load_from_disk(str(upstream["data"].path / "shapesworld"))
    train_feats = load_split_features(clip.path, "train")  # (M, 64, D)
    model_cfg, train_cfg, eval_cfg = decoder_configs(section, tuple(train_feats.shape))
    with_run_seed(train_cfg, cfg, section.get("train"))
    stats = feature_stats(clip.path)
    if stats.normalized:  # the cache already holds (x - mean) / std: nothing left to undo
        stats.mean, stats.std = torch.zeros_like(stats.mean), torch.ones_like(stats.std)
    ckpt_dir = out / f"lightning-{key}"  # resume state of this config only
    remove_stale_checkpoints(out, ckpt_dir)
    trainer = stage_trainer_config(cfg, train_cfg.precision)  # devices / nodes / strategy of the whole job
    result = train_decoder(model_cfg, train_cfg, images_uint8(ds["train"]), train_feats, ckpt_dir,
                           stats=(stats.mean, stats.std), trainer=trainer)
    return finish_on_rank_zero("decoder", key, out, result.trainer,
                               lambda: evaluate_and_write(result, ds, clip, key, out, ckpt_dir, train_cfg, eval_cfg))


def evaluate_and_write(result, ds, clip, key: str, out: Path, ckpt_dir: Path, train_cfg, eval_cfg) -> None:
    """Score the trained decoder and write the stage (global rank 0 only: run.finish_on_rank_zero)."""
    from .data.dataset import scene_of
    from .data.tensors import images_uint8
    from .evaluation.reconstruction import evaluate_reconstruction
    from .features import load_split_features

    t0 = time.perf_counter()
    val = ds["val"].select(range(min(eval_cfg.num_images, len(ds["val"]))))
    originals = images_uint8(val)  # (M, 3, H, W)
    val_feats = load_split_features(clip.path, "val")[: len(val)]  # (M, 64, D)
    decoded = decode_features(result.decoder, val_feats, eval_cfg.num_inference_steps,
                              eval_cfg.guidance_scale, eval_cfg.batch_size, eval_cfg.seed)
    decode_s = time.perf_counter() - t0
    report = evaluate_reconstruction(decoded, originals, [scene_of(r) for r in val])
    metrics = report.metrics() | {
        "train_steps": train_cfg.max_steps, "train_seconds": round(result.train_seconds, 1),
        "train_precision": result.trainer.precision,
        "train_compiled": result.compiled,
        "train_images_per_second": round(result.images_per_second, 1),
        "resumed_from_step": result.resumed_from_step,
        "final_loss": result.loss_curve[-1][1] if result.loss_curve else None,
        "decode_seconds": round(decode_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
        "num_parameters": sum(p.numel() for p in result.decoder.parameters()),
        "num_inference_steps": eval_cfg.num_inference_steps, "guidance_scale": eval_cfg.guidance_scale}
    print(_summary(metrics))
    result.decoder.save(out, train=asdict(train_cfg), eval=asdict(eval_cfg), clip_key=clip.key)
    atomic_write_json(out / "loss_curve.json", result.loss_curve)
    save_grid(out / "reconstructions.png", originals, decoded)
    atomic_write_json(out / "metrics.json", metrics)
    mark_complete(out, key, metrics={k: metrics[k] for k in ("reconstruction_geneval_mini", "psnr_db")})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # resume state is not needed once complete


def _summary(m: dict) -> str:
    tags = ", ".join(f"{t} {a:.2f}" for t, a in m["reconstruction_geneval_mini_per_tag"].items())
    ag = m["agreement"]
    loss = "n/a" if m["final_loss"] is None else f"{m['final_loss']:.4f}"
    return (f"decoder: {m['train_steps']} steps in {m['train_seconds']:.0f} s{resumed_note(m)} "
            f"({m['train_images_per_second']:.0f} img/s), final loss {loss}; "
            f"reconstruction GenEval-mini {m['reconstruction_geneval_mini']:.3f} ({tags}; originals "
            f"{m['originals_geneval_mini']:.3f}), PSNR {m['psnr_db']:.1f} dB, agreement colours "
            f"{ag['colors']:.2f} shapes {ag['shapes']:.2f} count {ag['count']:.2f} objects "
            f"{ag['objects']:.2f} (n={m['num_images']}, {m['num_inference_steps']} steps, "
            f"CFG {m['guidance_scale']})")
