"""Offline CLIP-target extraction: run the (4B-parameter) CLIP vision tower over WebDataset tar
shards once, so generation training reads 64 x D feature tokens instead of re-encoding every
image at every step.

BLIP3-o's targets are EVA02-E-14-plus tokens at 448 px pooled to 64 x 1792 (`ClipEncoder`). The
official code runs the encoder inside each training step; that costs ~8.9 TFLOP per image,
more than the backbone and the DiT together (`sizing.train_flops_per_sample`). Extracting once
trades that for disk: 64 x 1792 values per image, 229 KB in bf16 (`--dtype bfloat16`), 459 KB
in float32.

The job is sharded across ranks by *input shard*: rank r of W takes shards r, r + W, ... (sorted
paths), so ranks never read the same sample and every shard is done once. Each input shard
gives one output file `OUT/<shard name>.safetensors` with
    tensors   features (n, 64, D)
    metadata  keys (JSON list, the samples' WebDataset keys, in shard order), captions (JSON
              list), shard, encoder (the encoder's weights hash), num_skipped, clip_config (JSON:
              model_name, image_size, pool_grid, normalize_features; checked by the clip stage)
written atomically, so a killed job leaves whole files only, and a re-run skips shards already
done by the same encoder. Images are resized (shorter side, bicubic) and centre-cropped to the
encoder's size, as CLIP preprocessing does; undecodable images are skipped and counted.

Run it with torchrun or SLURM (one process per GPU): `blip3o-mini extract --shards 'data/*.tar'
--out runs/full-8b/features --config full-8b`; the rank comes from RANK / WORLD_SIZE or
SLURM_PROCID / SLURM_NTASKS. `targets.py` reads the files back for training.

Shape glossary: n samples in a shard, B batch, S encoder image size, N = 64 tokens, D width.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .artifacts import load_tensors, save_tensors
from .data.webdataset import ShardReader, resolve_shards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ShardResult:
    shard: str
    path: Path
    num_samples: int
    num_skipped: int
    reused: bool  # the output already existed for this encoder


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK / WORLD_SIZE, else SLURM's, else (0, 1)."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def output_names(shards: list[str]) -> dict[str, str]:
    """Output file name per shard: its stem, or `<folder>-<stem>` where stems repeat."""
    stems = [Path(s).name.removesuffix(".tar") for s in shards]
    names = {s: (f"{Path(s).parent.name}-{stem}" if stems.count(stem) > 1 else stem) + ".safetensors"
             for s, stem in zip(shards, stems)}
    if len(set(names.values())) != len(shards):
        raise ValueError("two shards map to the same output file name; give shards unique names "
                         "(or unique parent folders)")
    return names


def assigned_shards(shards: list[str], rank: int, world_size: int) -> list[str]:
    return shards[rank::world_size]


def center_square(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> uint8 (3, size, size): shorter side to `size` (bicubic), centre crop."""
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)  # (3, S, S)


@torch.inference_mode()
def extract_shard(encoder, shard: str, out_path: str | Path, *, batch_size: int = 64,
                  dtype: torch.dtype = torch.float32, encoder_hash: str | None = None) -> ShardResult:
    """Encode every sample of one shard and write `out_path` (see the module docstring)."""
    encoder.eval()
    device = encoder.pixel_mean.device
    size = encoder.image_size[0]
    reader = ShardReader(shard)
    keys, captions, chunks, pending = [], [], [], []

    def flush():
        images = torch.stack([center_square(s["image"], size) for s in pending]).to(device)  # (B, 3, S, S)
        chunks.append(encoder.encode_tokens(images).to(dtype).cpu())  # (B, N, D)
        pending.clear()

    for sample in reader:
        keys.append(sample["key"])
        captions.append(sample["caption"])
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    feats = torch.cat(chunks) if chunks else torch.zeros(0, encoder.num_tokens, encoder.feature_dim, dtype=dtype)
    settings = {k: getattr(encoder.cfg, k) for k in ("model_name", "pool_grid", "normalize_features")}
    meta = {"keys": json.dumps(keys), "captions": json.dumps(captions), "shard": Path(shard).name,
            "encoder": encoder_hash or encoder.weights_hash(), "num_skipped": str(reader.stats.num_skipped),
            "clip_config": json.dumps(settings | {"image_size": size})}
    save_tensors(out_path, {"features": feats.contiguous()}, metadata=meta)
    return ShardResult(shard, Path(out_path), len(keys), reader.stats.num_skipped, reused=False)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def run_extraction(encoder, shards, out_dir: str | Path, rank: int | None = None, world_size: int | None = None,
                   batch_size: int = 64, dtype: str = "float32") -> list[ShardResult]:
    """This rank's part of the job: its shards, skipping outputs this encoder already wrote."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    rank, world_size = rank_and_world(rank, world_size)
    all_shards = resolve_shards(shards)
    names = output_names(all_shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_hash = encoder.weights_hash()
    results = []
    for shard in assigned_shards(all_shards, rank, world_size):
        path = out_dir / names[shard]
        if path.exists() and read_metadata(path).get("encoder") == encoder_hash:
            meta = read_metadata(path)
            results.append(ShardResult(shard, path, len(json.loads(meta["keys"])), int(meta["num_skipped"]), True))
            continue
        results.append(extract_shard(encoder, shard, path, batch_size=batch_size, dtype=DTYPES[dtype],
                                     encoder_hash=encoder_hash))
    return results


def check_extraction(shards, out_dir: str | Path) -> dict[str, int]:
    """Every shard has its output, all by one encoder, no key twice: {output file: samples}."""
    all_shards = resolve_shards(shards)
    names = output_names(all_shards)
    missing = [s for s in all_shards if not (Path(out_dir) / names[s]).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(all_shards)} shard(s) have no features in {out_dir} "
                                f"(first: {missing[0]}); run `blip3o-mini extract` for every rank")
    counts, seen, encoders = {}, set(), set()
    for shard in all_shards:
        meta = read_metadata(Path(out_dir) / names[shard])
        keys = json.loads(meta["keys"])
        if seen.intersection(keys):
            raise ValueError(f"sample key {sorted(seen.intersection(keys))[0]!r} appears in two shards; "
                             "keys must be unique across the data set")
        seen.update(keys)
        encoders.add(meta["encoder"])
        counts[names[shard]] = len(keys)
    if len(encoders) > 1:
        raise ValueError(f"{out_dir} mixes features of {len(encoders)} encoders; delete it and extract again")
    return counts


def load_extracted(path: str | Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(keys, captions, features (n, N, D)) of one output file."""
    meta = read_metadata(path)
    return json.loads(meta["keys"]), json.loads(meta["captions"]), load_tensors(path)["features"]
