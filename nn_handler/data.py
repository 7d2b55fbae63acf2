"""Datasets and loaders: built from specs or objects, ordered by (seed, epoch), sharded over ranks."""
from __future__ import annotations

import itertools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

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


# What a file may set of a DataLoader: plain values of the right type, within bounds. Nothing
# that is called (sampler, batch_sampler, collate_fn, worker_init_fn, generator) ever comes
# from a file; the caller passes those.
MAX_BATCH_SIZE = 1 << 20
MAX_PREFETCH_FACTOR = 64
MAX_TIMEOUT_S = 24 * 3600.0
_DEVICE_NAME = re.compile(r"[a-z_]{1,16}(:\d{1,4})?")
_FLAGS = ("shuffle", "pin_memory", "drop_last", "persistent_workers", "in_order")
_POSITIVE_INTS = {"batch_size": MAX_BATCH_SIZE, "prefetch_factor": MAX_PREFETCH_FACTOR}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def max_workers() -> int:
    """The most DataLoader worker processes options read from a file may ask for: the CPU count
    (the CPUs this process may run on, where the platform says)."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            count = min(count, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, count)


def bounded_loader_options(options: Any, where: str,
                           warn: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """The DataLoader options a file records, reduced to plain values of the right type and size.

    ``num_workers`` is clamped to the CPU count; ``batch_size`` must be a positive int (at
    most ``MAX_BATCH_SIZE``) or None; ``prefetch_factor`` a positive int (at most
    ``MAX_PREFETCH_FACTOR``); ``timeout`` a finite number of seconds (at most a day);
    ``multiprocessing_context`` a start method name; ``pin_memory_device`` a device name;
    ``shuffle``, ``pin_memory``, ``drop_last``, ``persistent_workers`` and ``in_order``
    bools. Options that need worker processes are dropped when there are none. Anything
    else (a sampler, a ``collate_fn``, a ``worker_init_fn``...) is dropped. What was dropped
    or clamped is told in one message to ``warn`` (default: the ``nn_handler`` logger),
    naming ``where``. Options the caller passes are the caller's and never go through here.
    """
    warn = warn or logging.getLogger("nn_handler").warning
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        warn(f"{where}: the recorded DataLoader options are a {type(options).__name__}, not a mapping; "
             f"ignored (the DataLoader defaults are used)")
        return {}
    kept: Dict[str, Any] = {}
    notes: List[str] = []

    def drop(key: Any, value: Any, why: str) -> None:
        notes.append(f"{key}={_short(value)} dropped ({why})")

    for key, value in options.items():
        if not isinstance(key, str):
            drop(key, value, "not an option name")
        elif key in _FLAGS:
            if isinstance(value, bool):
                kept[key] = value
            else:
                drop(key, value, "not a bool")
        elif key in _POSITIVE_INTS:  # batch_size, prefetch_factor: None or an int from 1 to the bound
            top = _POSITIVE_INTS[key]
            if value is None or (_is_int(value) and 1 <= value <= top):
                kept[key] = value
            else:
                drop(key, value, f"not an int from 1 to {top} or None")
        elif key == "num_workers":
            if not _is_int(value) or value < 0:
                drop(key, value, "not an int >= 0")
            elif value > max_workers():
                kept[key] = max_workers()
                notes.append(f"num_workers={value} clamped to {max_workers()} (the CPU count)")
            else:
                kept[key] = value
        elif key == "timeout":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and 0 <= value <= MAX_TIMEOUT_S:
                kept[key] = value
            else:
                drop(key, value, f"not a number of seconds from 0 to {MAX_TIMEOUT_S:g}")
        elif key == "multiprocessing_context":
            methods = _start_methods()
            if value is None or (isinstance(value, str) and value in methods):
                kept[key] = value
            else:
                drop(key, value, f"not one of {sorted(methods)}")
        elif key == "pin_memory_device":
            if isinstance(value, str) and (value == "" or _DEVICE_NAME.fullmatch(value)):
                kept[key] = value
            else:
                drop(key, value, "not a device name")
        else:
            drop(key, value, "a file may not set it; pass it to set_train_loader/set_val_loader")
    if not kept.get("num_workers"):  # these need worker processes (DataLoader refuses them without)
        for key in ("prefetch_factor", "persistent_workers", "multiprocessing_context"):
            if key in kept and kept[key] not in (None, False):
                drop(key, kept.pop(key), "needs num_workers > 0")
    if kept.get("batch_size", 1) is None and kept.get("drop_last"):
        drop("drop_last", kept.pop("drop_last"), "needs a batch_size")
    if notes:
        warn(f"{where}: the recorded DataLoader options were bounded: {'; '.join(notes)}")
    return kept


def _start_methods() -> List[str]:
    import torch.multiprocessing
    return list(torch.multiprocessing.get_all_start_methods())


def _short(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value[:61])
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value) if not _is_int(value) or abs(value) < 10 ** 30 else "a huge int"
    else:
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


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
