"""Training splits of a benchmark: ``sdzero train`` fits on one split and validates on another.

Samples are the test split's dicts (original images and keypoints); a batch is a list of them,
since images differ in size (a method maps them into its own frame). The training order is a
permutation drawn from ``(seed, epoch)``, so a resumed run sees what an uninterrupted one sees.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.base import BenchmarkDataModule, LimitedDataset
from datamodules.files import DatasetFormatError
from sdzero.errors import ConfigError


class EpochShuffle(DistributedSampler):
    """A fresh permutation of ``range(length)`` each epoch, drawn from ``(seed, epoch)`` alone:
    Lightning calls :meth:`set_epoch`, so a run resumed from a checkpoint sees the same order as
    an uninterrupted one (torch's RandomSampler draws from the global RNG instead).

    Under torch.distributed rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of that one
    permutation (padded with its head to a multiple of ``W``): the ranks' batches of ``B`` are
    together the batch of ``W * B`` one process sees, so DDP trains on the same global batches.
    Being a ``DistributedSampler``, Lightning uses it as it is (its wrapper would shuffle again).
    """

    def __init__(self, length: int, seed: int) -> None:
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        super().__init__(range(int(length)), num_replicas=world, rank=rank, shuffle=False)
        self.length, self.seed = int(length), int(seed)

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])


def as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate for training batches: samples differ in size, so a batch is the list of samples."""
    return list(batch)


class TrainableDataModule(BenchmarkDataModule):
    """A benchmark that also has training splits (SPair ``trn``/``val``, CUB ``train``, ...).

    ``setup("fit")`` reads ``train_split`` (and ``val_split``, when not ``None``) with the same
    loader as the test split; their loaders yield lists of ``batch_size`` samples (shuffled for
    training; Lightning shards them over ranks).

    :param train_split: the split ``fit`` trains on (``data.train_split``), or ``None``: none.
    :param val_split: the split validated on after each epoch (``data.val_split``), or ``None``.
    :param batch_size: samples per training/validation batch (``data.batch_size``).
    :param train_limit: use only the first ``train_limit`` samples of each of the two splits.
    """

    def __init__(
        self,
        root: str,
        limit: int | None = None,
        num_workers: int = 0,
        train_split: str | None = None,
        val_split: str | None = None,
        batch_size: int = 8,
        train_limit: int | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(root, limit=limit, num_workers=num_workers, on_bad_sample=on_bad_sample)
        for key, value in (("batch_size", batch_size), ("train_limit", train_limit)):
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.train_limit = int(batch_size), train_limit
        self.train_set: LimitedDataset | None = None
        self.val_set: LimitedDataset | None = None

    def build_split(self, split: str) -> Dataset:
        """The dataset of the named split (read and validated like the test split)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage != "fit" or self.train_set is not None:
            return
        if self.train_split is None:
            raise ConfigError(
                f"data.train_split: {type(self).__name__} trains on no split (null); name one"
            )
        self.train_set = self._split(self.train_split, "train_split")
        if self.val_split is not None:
            self.val_set = self._split(self.val_split, "val_split")

    def _split(self, split: str, key: str) -> LimitedDataset:
        dataset = self.build_split(split)
        if len(dataset) == 0:
            raise DatasetFormatError(
                f"data.{key}={split!r}: {type(self).__name__}'s split under {self.root!r} is empty"
            )
        return LimitedDataset(dataset, self.train_limit)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochShuffle` seeded with the run seed (``PL_GLOBAL_SEED``)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._loader(self.train_set, EpochShuffle(len(self.train_set), seed))

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, None)

    def _loader(self, dataset: Dataset | None, sampler: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') was not called")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=as_list,
        )
