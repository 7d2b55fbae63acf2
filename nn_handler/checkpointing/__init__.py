"""Saving and loading handler checkpoints: ``save``, ``load``, ``initialize_from_checkpoint``.

The functions take the handler class first (``load(NNHandler, path, ...)``); the same
functions back ``NNHandler.load`` and ``NNHandler.initialize_from_checkpoint``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import distributed
from ..specs import plain_problem
from ..enums import ModelType, coerce_model_type
from . import format as _format
from .errors import (CheckpointError, CorruptCheckpointError, IncompatibleCheckpointError, NotACheckpointError,
                     UnsafeCheckpointError)
from .io import atomic_save, check_readable_file, safe_load
from .state import dump, load_model_weights, restore

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

__all__ = [
    "load", "initialize_from_checkpoint", "save",
    "CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "NotACheckpointError",
    "IncompatibleCheckpointError",
]

PathLike = Union[str, os.PathLike]
DeviceLike = Optional[Union[str, torch.device]]


def save(handler: "NNHandler", path: PathLike) -> None:
    """Write the handler to ``path`` atomically.

    Under DDP rank 0 writes while the others wait at a barrier; an error on rank 0 is
    raised on every rank.
    """
    info = handler._dist
    error: Optional[str] = None
    if info.is_main:
        try:
            state = dump(handler)
            for component, reason in state[_format.UNRECORDED].items():
                handler._warn(f"{component} cannot be recorded in {os.fspath(path)} ({reason}); "
                              f"after loading, set it again")
            problem = plain_problem(state, "checkpoint")
            if problem:
                raise TypeError(f"cannot write {os.fspath(path)}: {problem}")
            atomic_save(state, path)
        except Exception as exc:
            if not info.enabled:
                raise
            error = f"{type(exc).__name__}: {exc}"
    error = distributed.broadcast_object(error, info)
    if error is not None:
        raise RuntimeError(f"saving {os.fspath(path)} failed on rank 0: {error}")


def _read(path: PathLike, device: torch.device) -> Any:
    check_readable_file(path)
    return safe_load(path, map_location=device)


def load(handler_class: type, path: PathLike, device: DeviceLike = None, strict_load: bool = False,
         skip_optimizer: bool = False, skip_scheduler: bool = False, skip_history: bool = False,
         skip_callbacks: bool = False, skip_sampler_sde: bool = False, skip_ema: bool = False) -> "NNHandler":
    """A handler rebuilt from a file written by ``NNHandler.save``.

    ``device=None`` means the DDP-assigned device (cuda:LOCAL_RANK or cpu) under DDP,
    otherwise cuda when available, else cpu. Tensors are mapped straight onto it. Each
    ``skip_*`` flag leaves that component as a fresh handler has it.
    """
    info = distributed.env_topology()
    target = distributed.resolve_device(device, info)
    path_str = os.fspath(path)
    state = _format.check_and_migrate(_read(path, target), path_str)
    handler = restore(handler_class, state, path_str, target, strict_load, skip_optimizer, skip_scheduler,
                      skip_history, skip_callbacks, skip_sampler_sde, skip_ema)
    distributed.barrier(handler._dist)
    return handler


def initialize_from_checkpoint(handler_class: type, checkpoint_path: PathLike, model_class: type,
                               model_type: Optional[Union[ModelType, str]] = None, device: DeviceLike = None,
                               strict_load: bool = True, **model_kwargs: Any) -> "NNHandler":
    """A new handler whose model has only the weights from ``checkpoint_path``.

    The file is a bare state_dict or a dict with ``model_state_dict`` (a handler file);
    optimizer, scheduler, history and the rest are not loaded.
    """
    info = distributed.env_topology()
    target = distributed.resolve_device(device, info)
    path_str = os.fspath(checkpoint_path)
    obj = _read(checkpoint_path, target)
    if isinstance(obj, dict) and isinstance(obj.get(_format.MODEL_STATE), dict):
        weights = obj[_format.MODEL_STATE]
    elif isinstance(obj, dict) and _format._looks_like_state_dict(obj):
        weights = obj
    else:
        raise NotACheckpointError(path_str, "no model weights found: expected a state_dict or a dict with "
                                            f"'{_format.MODEL_STATE}'")
    handler = handler_class(model_class, device=target, model_type=coerce_model_type(model_type), **model_kwargs)
    load_model_weights(handler.module, weights, strict_load, path_str, handler._warn)
    distributed.barrier(handler._dist)
    return handler
