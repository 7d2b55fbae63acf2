"""Datasets and loaders: built from specs or objects, ordered by (seed, epoch), sharded over ranks."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from . import specs
from .distributed import DistInfo


class EpochSampler(DistributedSampler):
    """The order of an epoch is a function of ``(seed, epoch)`` alone, as in DistributedSampler.

    The same class serves one process (``num_replicas=1``) and DDP, so the data order of a
    run can be reproduced, and resumed, from two integers. Training pads every rank to the
    same number of samples (DDP needs equal step counts); evaluation (``pad=False``) gives
    each sample to exactly one rank, so averages over the ranks are exact.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int = 0,
                 pad: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad = pad
        self.start = 0  # samples of this epoch's order to skip: a mid-epoch resume
        self.loader_generator: Optional[torch.Generator] = None  # the DataLoader's own, reseeded per epoch
        if not pad:
            self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        if self.pad:
            order = super().__iter__()
            return itertools.islice(order, self.start, None) if self.start else order
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return iter(order[self.rank::self.num_replicas][self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


@dataclass
class DataSlot:
    """One loader of the handler (``train`` or ``val``) and how to rebuild it."""

    name: str
    dataset: Any = None
    spec: Optional[Dict[str, Any]] = None  # the dataset's spec when it was given as one
    options: Dict[str, Any] = field(default_factory=dict)  # DataLoader keyword arguments, shuffle included
    loader: Optional[DataLoader] = None
    sampler: Optional[EpochSampler] = None
    # After load: the dataset was given as an object and is not in the file.
    missing_dataset: bool = False

    @property
    def is_set(self) -> bool:
        return self.loader is not None

    def record(self) -> Tuple[Dict[str, Any], Optional[str]]:
        """Plain-data record of this slot, and why part of it could not be recorded."""
        options = specs.to_plain(self.options)
        problem = specs.plain_problem(options, f"{self.name} loader options")
        reason = None
        if problem:
            reason = problem
            options = {k: v for k, v in options.items() if not specs.plain_problem(v, k)}
        if self.spec is None and (self.dataset is not None or self.missing_dataset):
            why = f"the {self.name} dataset was given as an object, not a spec"
            reason = f"{reason}; {why}" if reason else why
        return {"dataset": self.spec, "options": options}, reason


def build_dataset(dataset: Any, what: str, *, from_file: bool,
                  trusted: Tuple[str, ...] = ()) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """A Dataset object, or a ``{"_target_": ...}`` spec built into one: ``(dataset, spec or None)``."""
    if isinstance(dataset, Mapping) or type(dataset).__name__ == "DictConfig":
        spec = specs.to_plain(dataset)
        return specs.instantiate(spec, what, from_file=from_file, trusted=trusted, expected=Dataset), spec
    return dataset, None


def build_loader(dataset: Any, options: Mapping[str, Any], info: DistInfo,
                 pad: bool = True) -> Tuple[DataLoader, Optional[EpochSampler]]:
    opts = dict(options)
    shuffle = bool(opts.pop("shuffle", False))
    if isinstance(dataset, IterableDataset) or "sampler" in opts or "batch_sampler" in opts:
        if shuffle:
            raise ValueError("shuffle=True needs a map-style dataset and the handler's own sampler")
        return DataLoader(dataset, **opts), None
    sampler = EpochSampler(dataset, num_replicas=info.world_size if info.enabled else 1,
                           rank=info.rank if info.enabled else 0, shuffle=shuffle, pad=pad)
    if "generator" not in opts:
        # The loader draws its workers' base seed from this generator, not from the global
        # stream, so starting an epoch (or resuming inside one) leaves the global stream alone.
        sampler.loader_generator = opts["generator"] = torch.Generator()
    return DataLoader(dataset, sampler=sampler, **opts), sampler
