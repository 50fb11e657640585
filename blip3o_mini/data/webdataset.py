"""WebDataset `.tar` shards: the on-disk format of BLIP3-o's real training data.

BLIP3-o trains on image-caption shards (`jpg` + `txt` per sample, e.g. BLIP3o-Pretrain and
BLIP3o-60k) and loads them with Hugging Face `datasets`' "webdataset" builder. This file holds
both directions, so the toy and the full run read data through the same code:

- `export_shards` writes a ShapesWorld split as shards `{prefix}-{k:06d}.tar` whose samples are
  `{key}.jpg` (the image, JPEG), `{key}.txt` (the canonical caption) and `{key}.json` (scene
  graph, captions, questions and answers), each shard written atomically.
- `ShardReader` reads shards (paths, globs or directories) and yields
  `{"key", "image" (PIL RGB), "caption", "json" (dict or None), "shard"}`. An image that does not
  decode is skipped and counted in `reader.stats` (with a one-line warning), never a crash and
  never a silent drop; a sample without a caption is a `ValueError` naming shard and key.
  `rank` / `world_size` give each process a disjoint part of the data for multi-GPU runs.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SHARD_NAME = "{prefix}-{index:06d}.tar"
# Members the "webdataset" builder decodes to str itself; any other caption member arrives as bytes.
TEXT_EXTENSIONS = ("txt", "text", "transcript")


# ---------------------------------------------------------------------------------- writing

def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same samples give byte-identical shards
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: ShapesWorld's flat colours and sharp edges survive with little ringing.
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_shard(path: str | Path, samples: list[dict], quality: int = 95) -> Path:
    """Write one shard atomically (temporary file in the same folder, then `os.replace`).

    Each sample is `{"key": str, "image": PIL image, "caption": str, "json": dict | None}`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for s in samples:
                    key = s["key"]
                    if not re.fullmatch(r"[^./]+", key):
                        raise ValueError(f"sample key {key!r} must not contain '.' or '/' "
                                         "(WebDataset splits a member name at its first dot)")
                    _add_member(tar, f"{key}.jpg", jpeg_bytes(s["image"], quality))
                    _add_member(tar, f"{key}.txt", s["caption"].encode("utf-8"))
                    if s.get("json") is not None:
                        _add_member(tar, f"{key}.json", json.dumps(s["json"], sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; shards are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _shapesworld_samples(d) -> Iterator[dict]:
    """Rows of a ShapesWorld `datasets.Dataset` as shard samples (json: every non-image column)."""
    import datasets

    rows = d.cast_column("image", datasets.Image(decode=False))
    for batch in rows.iter(batch_size=256):
        for i, key in enumerate(batch["id"]):
            row = {k: v[i] for k, v in batch.items()}
            image = Image.open(io.BytesIO(row.pop("image")["bytes"]))
            yield {"key": key, "image": image, "caption": row["captions"][0], "json": row}


def export_shards(d, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                  quality: int = 95) -> list[Path]:
    """Write a ShapesWorld split as `out_dir/{prefix}-{k:06d}.tar`; return the shard paths.

    Shards left by an earlier, larger export with the same prefix are removed, so a glob over
    `out_dir` reads exactly this export.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if "/" in prefix or not prefix:
        raise ValueError(f"shard prefix must be a non-empty file name stem, got {prefix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    chunk: list[dict] = []
    for sample in _shapesworld_samples(d):
        chunk.append(sample)
        if len(chunk) == samples_per_shard:
            paths.append(write_shard(out_dir / SHARD_NAME.format(prefix=prefix, index=len(paths)), chunk, quality))
            chunk = []
    if chunk:
        paths.append(write_shard(out_dir / SHARD_NAME.format(prefix=prefix, index=len(paths)), chunk, quality))
    stale = re.compile(re.escape(prefix) + r"-(\d{6})\.tar")
    for p in out_dir.iterdir():
        m = stale.fullmatch(p.name)
        if m and int(m.group(1)) >= len(paths):
            p.unlink()
    return paths


# ---------------------------------------------------------------------------------- reading

@dataclass
class WebDatasetConfig:
    """Which tar members hold what; a full config sets it from YAML (`config.build`)."""

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # first present one is used
    caption_key: str = "txt"
    json_key: str = "json"
    streaming: bool = True  # False: `datasets` first converts each shard to an Arrow cache
    cache_dir: str | None = None  # where that cache goes (None: the `datasets` default)


@dataclass
class ReadStats:
    """What a pass over the shards read and what it had to skip, and why."""

    num_read: int = 0
    num_skipped: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)
    shard_errors: list[tuple[str, str]] = field(default_factory=list)  # (shard, error): ended early

    def summary(self) -> str:
        line = f"read {self.num_read} sample(s), skipped {self.num_skipped}"
        if self.skipped:
            shard, key, reason = self.skipped[0]
            line += f" (first: {key!r} in {shard}: {reason})"
        if self.shard_errors:
            shard, error = self.shard_errors[0]
            line += f"; {len(self.shard_errors)} shard(s) ended early (first: {shard}: {error})"
        return line


def resolve_shards(shards: str | Path | list[str | Path]) -> list[str]:
    """Expand paths, globs (`shards/train-*.tar`) and directories (their `*.tar`) into a sorted,
    de-duplicated list of shard files; a pattern that matches nothing is an error."""
    patterns = [shards] if isinstance(shards, (str, Path)) else list(shards)
    if not patterns:
        raise ValueError("no shards given; pass a .tar path, a glob such as 'shards/*.tar' or a directory")
    out: list[str] = []
    for pattern in map(str, patterns):
        if "://" in pattern:  # a remote URL: `datasets` opens it
            out.append(pattern)
            continue
        if os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no WebDataset shard matches {pattern!r}; pass existing .tar "
                                    "files, a glob such as 'shards/train-*.tar' or a directory")
        out += [m for m in matches if m not in out]
    return out


def decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"not an image file PIL can identify ({len(data)} bytes)") from None
    image.load()  # decode now: a truncated or garbage file fails here, not in the training loop
    return image.convert("RGB")


class ShardReader:
    """Iterate over WebDataset shards through `datasets.load_dataset("webdataset", ...)`.

    With `world_size > 1`, rank `r` reads shards `r, r + W, r + 2W, ...` when the number of
    shards is a multiple of `W` (`split_by == "shard"`), otherwise every rank reads all shards
    and keeps the samples whose position in the stream is `r` modulo `W` (`split_by ==
    "sample"`), as `datasets.distributed.split_dataset_by_node` does. Either way no two ranks
    read the same sample and together they read all of them.

    `stats` describes the last pass; a pass that skipped anything logs `stats.summary()`.
    """

    def __init__(self, shards: str | Path | list[str | Path], config: WebDatasetConfig | None = None,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.config = config or WebDatasetConfig()
        if not self.config.image_keys:
            raise ValueError("WebDatasetConfig.image_keys is empty; list the image member extensions, e.g. ['jpg']")
        self.rank, self.world_size = rank, world_size
        all_shards = resolve_shards(shards)
        self.split_by = "shard" if len(all_shards) % world_size == 0 else "sample"
        self.shards = all_shards[rank::world_size] if self.split_by == "shard" else all_shards
        self.stats = ReadStats()

    def _features(self):
        import datasets

        c = self.config
        return datasets.Features({
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            # decode=False: bytes come through as they are and `decode_image` decides.
            **{k: datasets.Image(decode=False) for k in c.image_keys},
            c.caption_key: datasets.Value("string" if c.caption_key in TEXT_EXTENSIONS else "binary"),
            c.json_key: datasets.Json(),
        })

    def _records(self, shard: str) -> Iterator[dict]:
        import datasets

        # Explicit features: no schema guessing from the first samples, members other than
        # these are dropped, and a missing member reads as None (checked in `__iter__`).
        ds = datasets.load_dataset("webdataset", data_files={"train": [shard]}, split="train",
                                   streaming=self.config.streaming, features=self._features(),
                                   cache_dir=None if self.config.streaming else self.config.cache_dir)
        yield from ds

    def __iter__(self) -> Iterator[dict]:
        from datasets.exceptions import DatasetsError

        c, stats = self.config, ReadStats()
        self.stats = stats
        position = -1  # position in the stream of every sample of every shard (sample split)
        for shard in self.shards:
            records = self._records(shard)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except (tarfile.TarError, OSError, EOFError, ValueError, DatasetsError) as e:
                    # A cut or corrupt tar: keep what was read, record the shard, go on.
                    cause = e.__cause__ or e
                    stats.shard_errors.append((shard, f"{type(cause).__name__}: {cause}"))
                    break
                position += 1
                if self.split_by == "sample" and position % self.world_size != self.rank:
                    continue
                key = record["__key__"]
                caption = record[c.caption_key]
                if caption is None:
                    raise ValueError(f"shard {shard}: sample {key!r} has no caption member "
                                     f"'{key}.{c.caption_key}'; every sample needs one (set "
                                     "WebDatasetConfig.caption_key if captions use another extension)")
                if isinstance(caption, bytes):
                    try:
                        caption = caption.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ValueError(f"shard {shard}: caption '{key}.{c.caption_key}' is not UTF-8 text") from None
                image_field = next((record[k] for k in c.image_keys if record[k] is not None), None)
                try:
                    if image_field is None:
                        raise ValueError(f"no image member (looked for {', '.join(c.image_keys)})")
                    image = decode_image(image_field["bytes"])
                except Exception as e:  # any undecodable image: skip, count, report
                    stats.num_skipped += 1
                    stats.skipped.append((shard, key, f"{type(e).__name__}: {e}"))
                    continue
                stats.num_read += 1
                yield {"key": key, "image": image, "caption": caption.strip(),
                       "json": record[c.json_key], "shard": shard}
        if stats.num_skipped or stats.shard_errors:
            log.warning("WebDataset reader (rank %d/%d): %s", self.rank, self.world_size, stats.summary())


def read_shards(shards: str | Path | list[str | Path], **kwargs) -> list[dict]:
    """All samples of some shards as a list (small shards only: tests, fixtures, notebooks)."""
    return list(ShardReader(shards, **kwargs))
