"""The pipeline's stages when a config trains on WebDataset shards (`data.shards`, the full runs).

BLIP3-o's stage 2 (DESIGN.md section 1) reads image-caption tar shards, takes its CLIP encoder
(EVA02-E-14-plus) and its understanding backbone (Qwen2.5-VL) as released, and trains only the
64 queries and the DiT. So on shards the stages before generation check and record rather than
train:

    data           index the shards: samples per shard, every sample has a caption (rank 0
                   of a launched job; the other ranks wait for its index, as in clip and
                   understanding)
    clip           no training: the targets come from `blip3o-mini extract` (`data.targets:
                   features`, checked complete and made by this config's encoder) or from the
                   pretrained encoder inside every step (`targets: images`)
    understanding  no training: record the pretrained backbone (its config must be available)
    generation     the same `generation_stage` and `generation_run` as the toy, fed by
                   `shard_targets` (targets.py's datasets) instead of ShapesWorld

`run.stages_for` swaps these in for the data, clip and understanding stages when
`uses_shards(cfg)`, so the toy stages (and their fingerprints) are untouched. The decoder and evaluation stages need ShapesWorld;
full configs list the stages they run under `stages:`.

Shape glossary: N = 64 tokens, D CLIP width.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete
from .run import DATA_VERSION, StageResult

SHARD_STAGE_VERSION = 1
INDEX = "shards.json"  # RUN_DIR/data/shards.json


def uses_shards(cfg: dict) -> bool:
    return bool((cfg.get("data") or {}).get("shards"))


def features_dir(cfg: dict, run_dir: Path) -> Path:
    """Where `blip3o-mini extract` wrote the targets: `data.features_dir`, else RUN_DIR/features."""
    return Path((cfg.get("data") or {}).get("features_dir") or Path(run_dir) / "features")


def clip_settings(cfg: dict):
    from .clip_stage import clip_configs

    return clip_configs(cfg.get("clip"))[0]


# ------------------------------------------------------------------------------ data
def index_shard(shard: str, caption_key: str = "txt", image_keys=("jpg", "jpeg", "png", "webp")) -> dict:
    """Samples of one tar from its member headers (no decoding): WebDataset groups members by
    the name up to the first dot of the file name. A sample without a caption is a ValueError
    (the reader would stop there); one without an image is counted (the reader skips it)."""
    members: dict[str, set[str]] = {}
    error = None
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    folder, _, name = m.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    members.setdefault(f"{folder}/{stem}" if folder else stem, set()).add(ext.lower())
    except (tarfile.TarError, OSError, EOFError) as e:  # a cut shard: the reader keeps what it reads
        error = f"{type(e).__name__}: {e}"
        if members:
            members.popitem()  # the sample being read when the shard ended may lack members
    no_caption = [k for k, exts in members.items() if caption_key not in exts]
    if no_caption:
        raise ValueError(f"shard {shard}: sample {no_caption[0]!r} has no caption member "
                         f"'{no_caption[0]}.{caption_key}' ({len(no_caption)} such samples); every sample needs one")
    no_image = sum(not exts.intersection(image_keys) for exts in members.values())
    return {"shard": shard, "bytes": Path(shard).stat().st_size, "num_samples": len(members) - no_image,
            "num_without_image": no_image, "error": error}


def data_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .data.webdataset import resolve_shards
    from .extract import rank_and_world

    section = cfg["data"]
    shards = resolve_shards(section["shards"])
    if section.get("instruct_shards"):  # fail now rather than after stage 2's pretraining
        from .instruct_stage import resolve_instruct_shards

        resolve_instruct_shards(cfg)
    local = [s for s in shards if "://" not in s]  # remote URLs are read, not indexed
    files = [(s, Path(s).stat().st_size, Path(s).stat().st_mtime_ns) if s in local else (s,) for s in shards]
    # instruct_shards feed the instruct stage only: new ones must not retrain stage 2 downstream
    key = fingerprint("data-shards", DATA_VERSION, SHARD_STAGE_VERSION,
                      {k: v for k, v in section.items() if k != "instruct_shards"}, files)
    out = Path(run_dir) / "data"
    if rank_and_world()[0] != 0:  # a launched job: rank 0 indexes, the other ranks wait for it
        wait_for_stage(out, key)
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_data_summary(metrics))
        return StageResult("data", key, out, True, metrics)
    index = [index_shard(s) for s in local]
    errors = [f"{i['shard']}: {i['error']}" for i in index if i["error"]]
    metrics = {"num_shards": len(shards), "num_samples": sum(i["num_samples"] for i in index),
               "num_without_image": sum(i["num_without_image"] for i in index),
               "num_remote_shards": len(shards) - len(local), "shard_errors": errors,
               "targets": section.get("targets", "features")}
    print(_data_summary(metrics))
    atomic_write_json(out / INDEX, index)
    atomic_write_json(out / "metrics.json", metrics)
    mark_complete(out, key, metrics=metrics)
    return StageResult("data", key, out, False, metrics)


def wait_for_stage(out: Path, key: str, poll_s: float = 5.0) -> None:
    """Block until another process marks the stage complete (torchrun and srun stop every rank
    when one fails, so a failed rank 0 does not leave the others waiting)."""
    import time

    while not stage_complete(out, key):
        time.sleep(poll_s)


def _data_summary(m: dict) -> str:
    errors = m["shard_errors"]
    return (f"data: {m['num_shards']} shard(s), {m['num_samples']} samples with image and caption "
            f"({m['num_without_image']} without image, skipped by the reader)"
            + (f"; {len(errors)} shard(s) cut short (first: {errors[0]})" if errors else ""))


# ------------------------------------------------------------------------------ clip
def check_features(cfg: dict, run_dir: Path) -> dict:
    """Every shard's features exist, all from one encoder (`check_extraction`), made with this
    config's CLIP settings (as `blip3o-mini extract` records them). The encoder itself (4.4B
    parameters at full size) is not loaded to compare weights."""
    from .data.webdataset import resolve_shards
    from .extract import check_extraction, output_names, read_metadata

    d, shards = features_dir(cfg, run_dir), resolve_shards(cfg["data"]["shards"])
    counts = check_extraction(shards, d)  # FileNotFoundError naming `blip3o-mini extract`
    first = d / output_names(shards)[shards[0]]
    meta = read_metadata(first)
    made_by = json.loads(meta.get("clip_config", "{}"))
    want = clip_settings(cfg)
    for name in ("model_name", "pool_grid", "normalize_features", "image_size"):
        if name in made_by and getattr(want, name) is not None and made_by[name] != getattr(want, name):
            raise ValueError(f"{d} holds features of clip.{name}={made_by[name]!r} but the config says "
                             f"{getattr(want, name)!r}; extract again with `blip3o-mini extract --config ...`")
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as f:
        shape = f.get_slice("features").get_shape()  # (n, N, D)
    return {"num_feature_files": len(counts), "num_samples": sum(counts.values()), "encoder_hash": meta["encoder"],
            "num_tokens": shape[1], "feature_dim": shape[2]}


def clip_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .extract import rank_and_world

    section, data = cfg.get("clip", {}), upstream["data"]
    clip_cfg = clip_settings(cfg)
    if not clip_cfg.pretrained:
        raise ValueError("data.shards needs a pretrained CLIP encoder (clip.pretrained: an open_clip tag or a "
                         ".safetensors path); the CLIP stage trains only on ShapesWorld (drop data.shards)")
    targets = cfg["data"].get("targets", "features")
    d = features_dir(cfg, run_dir)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.glob("*.safetensors")) \
        if targets == "features" else []
    key = fingerprint("clip-shards", SHARD_STAGE_VERSION, section, data.key, targets, files)
    out = Path(run_dir) / "clip"
    if rank_and_world()[0] != 0:  # a launched job: rank 0 checks and records, the others wait for it
        wait_for_stage(out, key)
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_clip_summary(clip_cfg, metrics))
        return StageResult("clip", key, out, True, metrics)
    if targets == "features":
        metrics = check_features(cfg, run_dir) | {"targets": "features", "features_dir": str(d)}
    else:  # the generation stage runs this encoder every step: check now that it loads
        encoder = target_encoder(cfg)
        metrics = {"targets": "images", "num_tokens": encoder.num_tokens, "feature_dim": encoder.feature_dim,
                   "encoder_hash": encoder.weights_hash()}
    print(_clip_summary(clip_cfg, metrics))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "config.json", {"clip": section, "data_key": data.key})
    mark_complete(out, key, metrics=metrics)
    return StageResult("clip", key, out, False, metrics)


def _clip_summary(clip_cfg, m: dict) -> str:
    return (f"CLIP: pretrained {clip_cfg.model_name} ({clip_cfg.pretrained}), not trained; targets: "
            f"{m['targets']}, ({m['num_tokens']}, {m['feature_dim']}) per image")


def target_encoder(cfg: dict):
    """The configured pretrained CLIP encoder (for `targets: images`), frozen."""
    from .vision import ClipEncoder

    return ClipEncoder(clip_settings(cfg)).requires_grad_(False).eval()


# ------------------------------------------------------------------------------ understanding
def understanding_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from dataclasses import asdict

    from .config import build
    from .extract import rank_and_world
    from .understanding_stage import UNDERSTANDING_STAGE_VERSION, UnderstandingConfig

    section = cfg.get("understanding", {})
    ucfg = build(UnderstandingConfig, section)
    if not ucfg.pretrained:
        raise ValueError("data.shards needs a pretrained understanding backbone (understanding.pretrained, e.g. "
                         "Qwen/Qwen2.5-VL-3B-Instruct); the toy backbone trains only on ShapesWorld")
    key = fingerprint("understanding", UNDERSTANDING_STAGE_VERSION, cfg.get("seed", 0), section,
                      upstream["clip"].key)
    out = Path(run_dir) / "understanding"
    if rank_and_world()[0] != 0:  # as the clip stage: rank 0 records, the others wait for it
        wait_for_stage(out, key)
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_understanding_summary(metrics))
        return StageResult("understanding", key, out, True, metrics)
    from transformers import AutoConfig

    try:  # fail here, not after the CLIP stage's work, when the checkpoint is not on disk
        config = AutoConfig.from_pretrained(ucfg.pretrained)
    except OSError as e:
        raise FileNotFoundError(f"understanding.pretrained {ucfg.pretrained!r} is not available offline "
                                f"({type(e).__name__}); download it first: huggingface-cli download "
                                f"{ucfg.pretrained}") from None
    text = getattr(config, "text_config", config)
    metrics = {"pretrained": ucfg.pretrained, "trained": False, "model_type": config.model_type,
               "hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers}
    print(_understanding_summary(metrics))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "config.json", {"understanding": asdict(ucfg), "clip_key": upstream["clip"].key,
                                            "seed": cfg.get("seed", 0)})
    mark_complete(out, key, metrics=metrics)
    return StageResult("understanding", key, out, False, metrics)


def _understanding_summary(m: dict) -> str:
    return (f"understanding: pretrained {m['pretrained']} ({m['model_type']}, {m['num_layers']} layers x "
            f"{m['hidden_size']}), used as released: not trained, frozen in stage 2")


# ------------------------------------------------------------------------------ generation
@dataclass
class ShardTargets:
    """What stage 2 trains on: (caption, target) pairs and how to read the targets."""

    dataset: object  # ShardFeatureDataset (map-style) or ShardImageStream (iterable)
    feature_dim: int
    encoder: object = None  # the frozen CLIP encoder for `targets: images`
    num_samples: int | None = None


def shard_targets(cfg: dict, run_dir: Path, upstream: dict) -> ShardTargets:
    """`data.targets: features` -> the extracted files; `images` -> the tar stream + the encoder."""
    from .data.webdataset import resolve_shards
    from .extract import output_names
    from .targets import ShardFeatureDataset, ShardImageStream

    clip = upstream["clip"].metrics
    if clip["targets"] == "features":  # this config's shards' files, in shard order
        names = output_names(resolve_shards(cfg["data"]["shards"]))
        data = ShardFeatureDataset([features_dir(cfg, run_dir) / name for name in names.values()])
        return ShardTargets(data, clip["feature_dim"], None, len(data))
    encoder = target_encoder(cfg)
    stream = ShardImageStream(cfg["data"]["shards"], encoder.image_size[0])
    return ShardTargets(stream, encoder.feature_dim, encoder, upstream["data"].metrics.get("num_samples"))


def measure_target_stats(targets: ShardTargets, whiten: bool = False, num: int = 1024):
    """Per-dim mean/std (D,) of the first `num` targets (for `feature_norm: standardize`), and
    their whitening (principal variances (D,), directions (D, D)) when `whiten`, else None."""
    import itertools

    import torch

    from .features import measure_stats, measure_whitening

    ds = targets.dataset
    items = iter(ds) if targets.encoder is not None else (ds[i] for i in range(len(ds)))
    x = torch.stack([t for _, t in itertools.islice(items, num)])  # (n, N, D) or uint8 (n, 3, S, S)
    if targets.encoder is not None:
        with torch.no_grad():
            x = torch.cat([targets.encoder.encode_tokens(x[i:i + 64]) for i in range(0, len(x), 64)])  # (n, N, D)
    mean, std = measure_stats(x.float())  # (D,), (D,)
    return mean, std, measure_whitening(x.float(), mean, std) if whiten else None
