"""Data sharding for multi-GPU runs: every sample once per epoch, no sample on two ranks, and a
mid-epoch resume that neither repeats nor skips a sample.

BLIP3-o trains on 32 GPUs with a global batch of 512 (16 per GPU). A *global batch* here is a
contiguous chunk of one permutation of the dataset, and rank r reads the r-th slice of it:

    epoch e:   perm = randperm(N, seed + e)                      (or arange(N) without shuffle)
    global batch k = perm[k*G : (k+1)*G],  G = world_size * batch_size
    rank r, batch k = perm[k*G + r*b : k*G + (r+1)*b],  b = batch_size

so one process with batch G sees exactly the samples (and the order) that W processes see
together (the DDP equivalence test relies on it), and the state of the whole job is two numbers:
`(epoch, position)`, position = samples of this epoch already trained on, summed over ranks.
That state does not depend on the world size, so a plain training loop may resume on a different
number of GPUs (Lightning counts batches, so resume a Lightning run on the same world size).
A last chunk shorter than G is split as evenly as possible; it must give every rank at least one
sample (DDP ranks must step together), else `drop_last=True` drops it.

torch's `DistributedSampler` pads the last batch with repeated samples (or drops it) and has no
resumable state; Lightning is told not to swap it in (`use_distributed_sampler=False`, see
`training/distributed.py`). `ResumableLoader` exposes the position as the loader's
`state_dict`, which Lightning keeps in every checkpoint; `ShardedDataModule` builds it inside
each launched process, where the rank is known.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler


class ShardedSampler(Sampler[int]):
    """Indices of this rank's part of each global batch, in order; use it with
    `DataLoader(dataset, batch_size=batch_size, sampler=sampler)`."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples}); nothing to shard")
        if batch_size < 1:
            raise ValueError(f"batch_size (per rank) must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.position = 0, 0
        self._check_tail()

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    # -- the layout -------------------------------------------------------------------------
    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def _check_tail(self) -> None:
        """A short last global batch must reach every rank (of a whole epoch and of the rest of a
        resumed one, which differ when the world size changed)."""
        for start in {0, self.position}:
            tail = (self.num_samples - start) % self.global_batch_size
            if 0 < tail < self.world_size and not self.drop_last:
                raise ValueError(
                    f"the last global batch has {tail} sample(s) for {self.world_size} ranks, so some "
                    f"rank would get none and DDP would wait for it forever; use drop_last=True or a "
                    f"dataset size whose remainder modulo {self.global_batch_size} is 0 or >= {self.world_size}")

    def rank_slice(self, chunk_len: int) -> tuple[int, int]:
        """[start, end) of this rank's part of a global batch of `chunk_len` samples."""
        if chunk_len == self.global_batch_size:
            return self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        base, extra = divmod(chunk_len, self.world_size)  # short last chunk: as even as possible
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def batches(self, position: int | None = None) -> list[list[int]]:
        """This rank's batches of the current epoch from `position` (default: the current one)."""
        perm, G = self.permutation(self.epoch), self.global_batch_size
        out = []
        for s in range(self.position if position is None else position, self.num_samples, G):
            chunk = perm[s:s + G]
            if len(chunk) < G and self.drop_last:
                break
            a, b = self.rank_slice(len(chunk))
            out.append(chunk[a:b])
        return out

    def __iter__(self):
        self._check_tail()
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        """This rank's samples in a *whole* epoch (what Lightning expects of a resumable loader:
        it counts the batches already trained and stops after the rest)."""
        return sum(len(b) for b in self.batches(position=0))

    # -- epochs and resumption -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning (and by hand) at the start of every epoch; a new epoch restarts
        at position 0, the epoch being resumed keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_batches: int = 1) -> None:
        """Record `num_batches` trained global batches (each rank calls it after each step)."""
        self.position = min(self.num_samples, self.position + num_batches * self.global_batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resume with the same dataset and seed")
        if not 0 <= state["position"] <= self.num_samples:
            raise ValueError(f"sampler position {state['position']} outside [0, {self.num_samples}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._check_tail()


class ResumableLoader(DataLoader):
    """A `DataLoader` over a `ShardedSampler` whose `state_dict` is the sampler's
    `(epoch, position)`. The position advances as batches are handed to the training loop, so
    batches that worker processes prefetched are not counted; Lightning saves and restores it
    with every checkpoint (it does so for any loader with `state_dict` / `load_state_dict`)."""

    def __init__(self, dataset, sampler: ShardedSampler, **kwargs):
        if not isinstance(sampler, ShardedSampler):
            raise ValueError(f"ResumableLoader needs a ShardedSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, **kwargs)

    def __iter__(self):
        for batch in super().__iter__():
            self.sampler.advance(1)  # this batch is the loop's now: a checkpoint after it skips it
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class ShardedDataModule(L.LightningDataModule):
    """Builds the training loader once Lightning knows this process's rank and the world size
    (inside each launched process, so `ddp`, `torchrun` and SLURM launches all shard right).
    A map-style dataset gets a `ShardedSampler`; an `IterableDataset` (a stream of tar shards)
    is batched as it comes, since it splits itself across ranks."""

    def __init__(self, dataset, batch_size: int, collate_fn=None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_workers: int = 0):
        super().__init__()
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.shuffle, self.seed, self.drop_last, self.num_workers = shuffle, seed, drop_last, num_workers

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.dataset, IterableDataset):  # a stream splits itself across ranks
            return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                              num_workers=self.num_workers)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ShardedSampler(len(self.dataset), self.batch_size, rank, world, shuffle=self.shuffle,
                                 seed=self.seed, drop_last=self.drop_last)
        return ResumableLoader(self.dataset, sampler, collate_fn=self.collate_fn,
                               num_workers=self.num_workers, persistent_workers=False)
