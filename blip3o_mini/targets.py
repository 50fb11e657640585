"""Where stage 2's CLIP targets come from, chosen by `generation.targets` in the config:

    features   read the files `blip3o-mini extract` wrote once (`ShardFeatureDataset`): a map-style
               dataset, so `data/sharding.py` shards it across ranks and resumes mid-epoch
    images     read images from the tar shards and run the frozen CLIP tower inside every
               training step (`ShardImageStream` + `ImageTargetsModule`), as BLIP3-o's official
               code does: no disk, ~8.9 TFLOP more per image at full size

Both yield `(prompt, target)` pairs that `training.generation.collate` batches, so the
LightningModule and the generator are the same either way.

Shape glossary: N = 64 tokens, D CLIP width, S encoder image size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from .extract import center_square, read_metadata
from .training.generation import GenerationModule


class ShardFeatureDataset(Dataset):
    """(caption, features (N, D) float32) over every `*.safetensors` file of an extraction
    directory (or a list of files), rows in file-name then shard order; features are read
    lazily, one row at a time, so the data set may be far larger than memory."""

    def __init__(self, files: str | Path | list[str | Path]):
        if isinstance(files, (str, Path)) and Path(files).is_dir():
            files = sorted(Path(files).glob("*.safetensors"))
        files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not files:
            raise FileNotFoundError("no extracted feature files (*.safetensors) found; run "
                                    "`blip3o-mini extract --shards ... --out DIR` first")
        self.files, self.keys, self.captions, self.index = files, [], [], []
        for i, f in enumerate(files):
            meta = read_metadata(f)
            if "keys" not in meta or "captions" not in meta:
                raise ValueError(f"{f} was not written by blip3o-mini extract (no keys/captions metadata)")
            keys, caps = json.loads(meta["keys"]), json.loads(meta["captions"])
            self.keys += keys
            self.captions += caps
            self.index += [(i, row) for row in range(len(keys))]
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, i: int):
        from safetensors import safe_open

        if i not in self._handles:  # opened lazily in each DataLoader worker
            self._handles[i] = safe_open(str(self.files[i]), framework="pt")
        return self._handles[i]

    def __getitem__(self, j: int) -> tuple[str, Tensor]:
        i, row = self.index[j]
        feats = self._handle(i).get_slice("features")[row:row + 1][0]  # (N, D)
        return self.captions[j], feats.float()

    def __getstate__(self):  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}


class ShardImageStream(IterableDataset):
    """(caption, uint8 image (3, S, S)) straight from tar shards, this process's part of them
    (`ShardReader`'s rank split, the rank read from torch.distributed when iterating). A stream
    cannot resume mid-epoch and ranks may get a sample more or less at the end of an epoch, so
    keep `max_steps` within an epoch; prefer extracted features for long runs."""

    def __init__(self, shards, image_size: int):
        self.shards, self.image_size = shards, image_size

    def __iter__(self):
        import torch.distributed as dist

        from .data.webdataset import ShardReader

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for s in ShardReader(self.shards, rank=rank, world_size=world):
            yield s["caption"], center_square(s["image"], self.image_size)


class ImageTargetsModule(GenerationModule):
    """`GenerationModule` whose batches hold images: the frozen CLIP encoder turns them into
    the (B, N, D) targets inside the step. The encoder is never trained nor checkpointed."""

    def __init__(self, generator, backbone, encoder, cfg):
        super().__init__(generator, backbone, cfg)
        self.encoder = encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def training_step(self, batch, batch_idx: int) -> Tensor:
        prompts, images = batch  # images (B, 3, S, S) uint8
        with torch.no_grad():
            features = self.encoder.encode_tokens(images).float()  # (B, N, D)
        return super().training_step((prompts, features), batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("encoder.")}


def generation_module(targets: str, generator, backbone, train_cfg, encoder=None) -> GenerationModule:
    """The stage-2 LightningModule for `generation.targets` ("features" or "images")."""
    if targets == "features":
        return GenerationModule(generator, backbone, train_cfg)
    if targets == "images":
        if encoder is None:
            raise ValueError("generation.targets is 'images' but no CLIP encoder was given; pass the "
                             "clip stage's encoder, or extract features and use targets: features")
        return ImageTargetsModule(generator, backbone, encoder, train_cfg)
    raise ValueError(f"generation.targets must be 'features' or 'images', got {targets!r}")
