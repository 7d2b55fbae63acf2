"""Checkpoint files: one opened checkpoint (``CheckpointFile``), saving a mapping of Stateful parts
(``save``), the format and its migrations, a run's checkpoint directory (``CheckpointStore``,
``find_latest``), and reading what a file records (``read_info``, ``inspect``, ``diff``).

Nothing here knows the handler, the training loop or the callbacks: ``NNHandler.save`` hands
over its parts and header, ``NNHandler.load`` (``nn_handler.loading``) reads a ``CheckpointFile``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch

from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from .file import CheckpointFile, broken_header_is_damage, named_after
from .inspect import diff, inspect, safetensors_info
from .io import atomic_save, file_checksum, safe_load
from .models import recorded_model_problem, resolve_recorded_model
from .save import Stateful, save
from .store import CheckpointStore, NoCheckpointFound, SkippedCheckpoints, find_latest, open_latest, resolve_checkpoint

__all__ = [
    "CheckpointFile", "save", "Stateful", "read_info", "read_checkpoint", "inspect", "diff", "file_checksum",
    "atomic_save", "resolve_recorded_model", "recorded_model_problem", "CheckpointStore", "find_latest", "open_latest",
    "resolve_checkpoint", "NoCheckpointFound", "SkippedCheckpoints",
    "CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "NotACheckpointError",
    "IncompatibleCheckpointError",
]

PathLike = Union[str, os.PathLike]


def read_checkpoint(path: PathLike, map_location: Any = None, mmap: bool = False) -> Any:
    """The verified contents of ``path``: checksum checked, then a ``weights_only`` load.

    On the CPU (``map_location`` None or "cpu") tensors are copied into the process's own
    memory and checksummed on the way, unless ``mmap=True`` keeps them mapped from the file.
    Files written by other tools carry no checksum and load (safely) with that noted in the
    log; a file whose contents say it is an nn_handler checkpoint must carry a valid one.
    """
    with CheckpointFile.open(path) as ckpt:
        if map_location is None or isinstance(map_location, (str, torch.device)):
            return ckpt.state(torch.device("cpu" if map_location is None else map_location), mmap=mmap)
        ckpt.verify()
        try:
            return safe_load(ckpt._open_source(), map_location=map_location, mmap=mmap)
        except CheckpointError as exc:
            raise named_after(exc, ckpt.path) from None


def read_info(path: Union[PathLike, CheckpointFile]) -> Dict[str, Any]:
    """What a checkpoint records, without building anything or reading its tensors' data.

    Keys: ``kind`` ("handler" or "weights"), ``format_version``, ``versions``, ``created``,
    ``world_size``, ``model`` ({"target", "kwargs", "model_type"} or None), ``optimizer``,
    ``scheduler``, ``loss_fn`` (specs or None), ``data`` ({"train"/"val": {"dataset", "options"}}),
    ``progress`` ({"epoch", "global_step"}), ``train_settings``, ``history`` (last values),
    ``callbacks`` (targets), ``ema`` (decay or None), ``unrecorded``, ``metadata`` (run id, lineage,
    the run's config: plain data), ``parameters`` (count).

    The file is verified first (a damaged one raises CorruptCheckpointError). Every field
    passed on has the type documented here: a record of another type (a forged file can hold
    anything at any key) raises IncompatibleCheckpointError naming the file and the field.
    Only CheckpointError subclasses are raised for anything the file holds. Given an open
    ``CheckpointFile`` it verifies that one (once) instead of opening the path again.
    """
    path_str = path.path if isinstance(path, CheckpointFile) else os.fspath(path)
    try:
        ckpt = CheckpointFile.open(path)
        try:
            if ckpt.safetensors:  # its header only: see inspect.safetensors_info for the keys
                return safetensors_info(ckpt)
            ckpt.verify()
            return ckpt.header()
        finally:
            if ckpt is not path:
                ckpt.close()
    except NotACheckpointError as exc:  # a broken header under a valid checksum record: damage
        raise broken_header_is_damage(path_str, exc) from None
