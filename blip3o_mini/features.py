"""CLIP feature extraction and its cache: the (N, 64, D) targets of BLIP3-o's generation stage.

BLIP3-o trains its diffusion transformer to produce the 64 pooled CLIP tokens of an image
(`ClipEncoder.encode_tokens`); every later stage (understanding projector, DiT, pixel decoder)
reads them from here rather than re-running the encoder.

The cache lives in the CLIP stage directory, one safetensors file per split named by the
encoder's weights hash and the data stage key: a changed encoder (or regenerated data) never
serves stale features, it recomputes them. Rows follow the dataset split's row order.

Normalisation: BLIP3-o uses the raw last-block tokens (`normalize_features: false`, the toy
default too). With the switch on, the features are standardised per dimension with statistics
measured on the training split; `feature_stats` returns them and the choice either way.

Shape glossary: N images, T = 64 tokens, D feature dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import STAGE_FILE, load_tensors, save_tensors
from .vision import CLIP_CONFIG, STATS_FILE, ClipEncoder

ENCODER_DIR = "encoder"  # RUN_DIR/clip/encoder: ClipEncoder.save layout
FEATURES_DIR = "features"  # RUN_DIR/clip/features/<split>-<encoder hash>-<data key>.safetensors


@dataclass
class FeatureStats:
    """Per-dimension statistics of the raw features on the training split."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    normalized: bool  # True when the cached features are (x - mean) / std


def extract_features(encoder: ClipEncoder, images_uint8: torch.Tensor, batch_size: int = 256,
                     normalize: bool | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 images -> (N, 64, D) float32 features, in row order, in eval mode
    (`normalize`: None follows the encoder's `normalize_features`)."""
    if len(images_uint8) == 0:
        raise ValueError("no images to encode (got an empty tensor)")
    was_training = encoder.training
    encoder.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images_uint8), batch_size):
            out.append(encoder.encode_tokens(images_uint8[i:i + batch_size], normalize).float().cpu())  # (b, T, D)
    encoder.train(was_training)
    return torch.cat(out)  # (N, T, D)


def measure_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) over every token of (N, T, D) raw features."""
    flat = features.reshape(-1, features.shape[-1]).double()  # (N*T, D)
    return flat.mean(0).float(), flat.std(0).float()


def measure_whitening(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal variances (D,) and directions (D, D) (one per column, largest first) of the
    standardised tokens of (N, T, D) features. Variances are floored at `floor` so that
    directions the features never use are not scaled up without bound."""
    flat = ((features.reshape(-1, features.shape[-1]) - mean) / std).double()  # (N*T, D)
    var, basis = torch.linalg.eigh(torch.cov(flat.T))  # ascending
    return var.flip(0).clamp_min(floor).float(), basis.flip(1).float()  # (D,), (D, D)


def cache_path(cache_dir: str | Path, split: str, encoder_hash: str, data_key: str) -> Path:
    return Path(cache_dir) / f"{split}-{encoder_hash}-{data_key}.safetensors"


def cached_features(encoder: ClipEncoder, images, cache_dir: str | Path, split: str,
                    data_key: str, batch_size: int = 256) -> torch.Tensor:
    """Features of a split from the cache, computing and caching them on a miss.

    `images` is the (N, 3, H, W) uint8 tensor or a zero-argument function returning it (so a
    cache hit never decodes the dataset).
    """
    path = cache_path(cache_dir, split, encoder.weights_hash(), data_key)
    if path.exists():
        return load_tensors(path)["features"]
    images = images() if callable(images) else images
    feats = extract_features(encoder, images, batch_size)
    write_cache(encoder, feats, cache_dir, split, data_key)
    return feats


def write_cache(encoder: ClipEncoder, feats: torch.Tensor, cache_dir: str | Path, split: str,
                data_key: str) -> Path:
    """Store `encoder`'s (N, 64, D) features of `split`, removing entries of other encoders."""
    path = cache_path(cache_dir, split, encoder.weights_hash(), data_key)
    for old in Path(cache_dir).glob(f"{split}-*.safetensors"):  # stale: other encoder or data
        if old != path:
            old.unlink(missing_ok=True)
    save_tensors(path, {"features": feats.float().contiguous()})
    return path


def data_key(run_dir: str | Path) -> str:
    """Fingerprint of the data stage in `run_dir` ("nodata" when it has none)."""
    f = Path(run_dir) / "data" / STAGE_FILE
    return json.loads(f.read_text()).get("key", "nodata") if f.exists() else "nodata"


def load_encoder(clip_stage_dir: str | Path) -> ClipEncoder:
    """The trained encoder of a CLIP stage directory (safetensors only)."""
    d = Path(clip_stage_dir) / ENCODER_DIR
    if not d.is_dir():
        raise FileNotFoundError(f"{d} not found; train the CLIP stage first "
                                "(blip3o-mini run, or ensure_stage('clip', cfg, run_dir))")
    return ClipEncoder.load(d)


def load_split_features(clip_stage_dir: str | Path, split: str, batch_size: int = 256) -> torch.Tensor:
    """(N, 64, D) float32 features of dataset split `split`, rows in the split's row order.

    Reads the cache written by the CLIP stage; recomputes (and re-caches) them when the cache
    does not match the stage's encoder or the run's data.
    """
    clip_dir = Path(clip_stage_dir)
    run_dir = clip_dir.parent
    encoder = load_encoder(clip_dir)

    def images():
        import datasets

        from .data.tensors import images_uint8

        ds_path = run_dir / "data" / "shapesworld"
        if not ds_path.exists():
            raise FileNotFoundError(f"{ds_path} not found; the CLIP stage reads the data stage of its run dir")
        ds = datasets.load_from_disk(str(ds_path))
        if split not in ds:
            raise ValueError(f"unknown split {split!r}; the dataset has {sorted(ds)}")
        return images_uint8(ds[split])

    return cached_features(encoder, images, clip_dir / FEATURES_DIR, split, data_key(run_dir), batch_size)


def feature_stats(clip_stage_dir: str | Path) -> FeatureStats:
    """The recorded per-dimension mean/std and whether the features are normalised."""
    d = Path(clip_stage_dir) / ENCODER_DIR
    stats = load_tensors(d / STATS_FILE)
    normalized = json.loads((d / CLIP_CONFIG).read_text())["normalize_features"]
    return FeatureStats(stats["mean"], stats["std"], bool(normalized))
