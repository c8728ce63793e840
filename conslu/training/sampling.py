"""Batching for training: length-bucketed, DDP-sharded batches and a data loader that resumes mid-epoch.

:class:`BucketBatchSampler` cuts shuffled utterances into buckets of ``bucket_size`` batches,
sorted by length inside each bucket, and shuffles the batches, so a batch holds similar lengths
(little decoder padding) while the order still changes every epoch. It shards batches across DDP
ranks itself (``trainer.use_distributed_sampler`` is off). :class:`ResumableDataLoader` stores the
sampler position in Lightning checkpoints, so ``--ckpt_path last`` resumes mid-epoch exactly.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["BucketBatchSampler", "ResumableDataLoader"]


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches, deterministic for a (seed, epoch), sharded over DDP ranks.

    Each epoch: shuffle all indices (seeded by ``seed + epoch``), cut them into buckets of
    ``batch_size * bucket_size`` items, sort each bucket by length, cut it into batches, then
    shuffle the batches. With ``shuffle=False`` the order is fixed (buckets in index order).
    ``groups`` (one key per item, e.g. its audio context): batches never mix two groups; each group
    is bucketed as above on its own.
    Every rank gets the same number of batches (the list is padded by repeating batches from the
    start, as ``DistributedSampler`` does). ``skip_to(epoch, n)`` makes the next iteration of that
    epoch start after its first ``n`` batches (exact mid-epoch resume).
    """

    def __init__(
        self,
        lengths: Sequence[float],
        batch_size: int,
        *,
        bucket_size: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        groups: Sequence[Hashable] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.lengths = [float(x) for x in lengths]
        if groups is not None and len(groups) != len(self.lengths):
            raise ValueError(f"groups has {len(groups)} entries for {len(self.lengths)} lengths")
        self.groups = list(groups) if groups is not None else None
        self.batch_size = batch_size
        self.bucket_size = bucket_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    # DDP layout: taken from the process group at iteration time unless given explicitly.
    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_to(self, epoch: int, n_batches: int) -> None:
        self._skip = (int(epoch), int(n_batches))

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches for ``epoch``, before sharding."""
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(self.seed * 1_000_003 + epoch)
        chunk = self.batch_size * self.bucket_size
        batches: list[list[int]] = []
        for idx in self._partition():
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), chunk):
                bucket = sorted(idx[start : start + chunk], key=lambda i: self.lengths[i])
                for b in range(0, len(bucket), self.batch_size):
                    batch = bucket[b : b + self.batch_size]
                    if len(batch) == self.batch_size or not self.drop_last:
                        batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _partition(self) -> list[list[int]]:
        """Index lists that batches never cross: one per group (in first-seen order), or all indices."""
        if self.groups is None:
            return [list(range(len(self.lengths)))]
        parts: dict[Hashable, list[int]] = {}
        for i, g in enumerate(self.groups):
            parts.setdefault(g, []).append(i)
        return list(parts.values())

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        r, n = self.rank, self.num_replicas
        if n == 1 or not batches:
            return batches
        per_rank = math.ceil(len(batches) / n)
        padded = batches + [batches[i % len(batches)] for i in range(per_rank * n - len(batches))]
        return padded[r::n]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._shard(self.all_batches())
        start = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                start = min(self._skip[1], len(batches))
            self._skip = None
        return iter(batches[start:])

    def __len__(self) -> int:
        chunk = self.batch_size * self.bucket_size
        total = 0
        for part in self._partition():
            n = len(part)
            for start in range(0, n, chunk):
                size = min(chunk, n - start)
                total += size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)
        return math.ceil(total / self.num_replicas) if total else 0


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (``state_dict``/``load_state_dict``).

    The position is the number of batches the training loop has *processed* in the current epoch
    (read from ``progress``), not the number fetched, because Lightning prefetches a batch ahead.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        return {"epoch": int(getattr(sampler, "epoch", 0)), "batches": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.batch_sampler
        if isinstance(sampler, BucketBatchSampler):
            sampler.skip_to(state.get("epoch", 0), state.get("batches", 0))
