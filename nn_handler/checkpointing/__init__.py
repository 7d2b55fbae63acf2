"""Saving and loading handler checkpoints: ``save``, ``load``, ``initialize_from_checkpoint``.

The functions take the handler class first (``load(NNHandler, path, ...)``); the same
functions back ``NNHandler.load`` and ``NNHandler.initialize_from_checkpoint``.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .. import distributed
from ..enums import ModelType, coerce_model_type
from ..handler import prebuilt_module
from ..specs import plain_problem
from ..specs import split as specs_split
from . import format as _format
from . import io as _io
from .copyload import read_copied
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from .fastload import build_module_from_weights
from .inspect import diff, inspect
from .io import atomic_save, check_readable_file, file_checksum, safe_load, verify
from .state import (
    canonical_state_dict,
    dump,
    load_model_weights,
    rank_state,
    recorded_model_problem,
    resolve_recorded_model,
    restore,
)
from .store import CheckpointStore, NoCheckpointFound, find_latest, resolve_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

__all__ = [
    "load", "initialize_from_checkpoint", "save", "read_info", "read_checkpoint", "inspect", "diff", "file_checksum",
    "resolve_recorded_model", "recorded_model_problem", "CheckpointStore", "find_latest", "resolve_checkpoint",
    "NoCheckpointFound",
    "CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "NotACheckpointError",
    "IncompatibleCheckpointError",
]

PathLike = Union[str, os.PathLike]
logger = logging.getLogger("nn_handler")
DeviceLike = Optional[Union[str, torch.device]]


def save(handler: "NNHandler", path: PathLike) -> None:
    """Write the handler to ``path`` atomically.

    Under DDP every rank calls it: the ranks' random states are gathered, rank 0 writes,
    and the others wait until the file is complete; an error on rank 0 is raised on every
    rank.
    """
    info = handler._dist
    per_rank = distributed.all_gather_object(rank_state(handler), info)
    error: Optional[BaseException] = None
    if info.is_main:
        try:
            state = dump(handler, per_rank)
            for component, reason in state[_format.UNRECORDED].items():
                handler._warn(f"{component} cannot be recorded in {os.fspath(path)} ({reason}); "
                              f"after loading, set it again")
            problem = plain_problem(state, "checkpoint")
            if problem:
                raise TypeError(f"cannot write {os.fspath(path)}: {problem}")
            atomic_save(state, path)
        except Exception as exc:
            error = exc
    distributed.agree(error, info, f"saving {os.fspath(path)}", os.fspath(path))


def read_checkpoint(path: PathLike, map_location: Any = None, mmap: bool = False) -> Any:
    """The verified contents of ``path``: checksum checked, then a ``weights_only`` load.

    On the CPU (``map_location`` None or "cpu") tensors are copied into the process's own
    memory and checksummed on the way, unless ``mmap=True`` keeps them mapped from the file.
    Files written by other tools carry no checksum and load (safely) with that noted in the
    log; a file whose contents say it is an nn_handler checkpoint must carry a valid one.
    """
    if map_location is None or isinstance(map_location, (str, torch.device)):
        device = torch.device("cpu" if map_location is None else map_location)
        return _read(path, device, distributed.DistInfo(enabled=False), keep_mapped=mmap)
    verification = verify(path)  # checks the path first: missing, a directory, empty
    return _checked(safe_load(path, map_location=map_location, mmap=mmap), path, verification.checksum)


def _checked(obj: Any, path: PathLike, verified: bool) -> Any:
    if not verified:
        if _format.is_handler_state(obj):
            raise CorruptCheckpointError(path, "the file says it is an nn_handler checkpoint but its checksum "
                                               "record is missing or damaged")
        logger.info("%s carries no checksum (not written by nn_handler): loaded without verification",
                    os.fspath(path))
    return obj


def _read(path: PathLike, device: torch.device, info: "distributed.DistInfo", keep_mapped: bool = False) -> Any:
    """The verified contents of ``path`` on every rank, onto ``device``.

    By default CPU tensors are copied into the process's own memory, checksummed on the way
    (``copyload``); ``keep_mapped`` keeps them memory-mapped from the file (no copy). The file
    is opened once and every read goes through that descriptor, so a save that replaces
    ``path`` meanwhile cannot mix two files. Under DDP ranks that provably read the same file (same
    host, device, inode, size and mtime) split the checksum work (each hashes every n-th chunk,
    then the chunk CRCs are exchanged), so a job reads and hashes the file about once, not once
    per rank; a rank whose copy is its own (another node, another path) hashes all of it; every step ends with an agreement, so a
    failure on any rank is raised on all of them.
    """
    path_str = os.fspath(path)
    what = f"reading checkpoint {path_str}"
    copy = not keep_mapped and torch.device(device).type == "cpu"
    pin, source, trailer, error, identity = None, path_str, None, None, None
    try:
        check_readable_file(path)
        pin = os.open(path, os.O_RDONLY)
        source = _io.pinned_name(pin, path_str)
        trailer = _io.read_trailer(source) if _io._VERIFY_CHECKSUMS else None
        identity = _file_identity(pin)
    except Exception as exc:
        error = _named(exc, path_str)
    try:
        distributed.agree(error, info, what, path_str)
        sharers, my_place = [info.rank], 0
        if info.enabled:
            seen = distributed.all_gather_object((trailer, identity), info)
            error = None
            if any(t != seen[0][0] for t, _ in seen):
                error = CorruptCheckpointError(path, "the file differs between ranks (different checksum records)")
            distributed.agree(error, info, what, path_str)
            # Only ranks that provably read the same file (same host, device, inode, size and
            # mtime) split the hashing; a rank whose copy is its own verifies every chunk of it.
            sharers = [r for r, (_, ident) in enumerate(seen) if ident == identity]
            my_place = sharers.index(info.rank)
        mine_indices = range(my_place, trailer.chunks, len(sharers)) if trailer is not None else range(0)
        obj, mine, error = None, {}, None
        try:
            obj = safe_load(source, map_location=device, mmap=True)
            if copy:
                obj, mine = read_copied(obj, source, trailer, mine_indices)
            elif trailer is not None:
                mine = _io.chunk_crcs(source, trailer, list(mine_indices))
        except CheckpointError as exc:
            error = _named(exc, path_str)
            if trailer is not None:  # a damaged file: its checksum says so more precisely than the unpickler
                try:
                    _io.check_table(path_str, trailer, _io.chunk_crcs(source, trailer))
                except CorruptCheckpointError as corrupt:
                    error = corrupt
                except Exception:  # (e.g. the file is gone or empty now): the first error stands
                    pass
        except Exception as exc:
            error = exc
        distributed.agree(error, info, what, path_str)
    finally:
        if pin is not None:
            os.close(pin)
    crcs: Dict[int, int] = {}
    for rank, part in enumerate(distributed.all_gather_object(mine, info)):
        if rank in sharers:  # only the hashes of this very file
            crcs.update(part)
    error = None
    try:
        if trailer is not None:
            try:
                _io.check_table(path_str, trailer, crcs)
            except CorruptCheckpointError as exc:
                if info.enabled:
                    raise CorruptCheckpointError(path_str, f"rank {info.rank}'s copy: {exc.message}") from None
                raise
        obj = _checked(obj, path_str, trailer is not None or not _io._VERIFY_CHECKSUMS)  # (a bench switch)
    except Exception as exc:
        error, obj = exc, None
    distributed.agree(error, info, what, path_str)
    return obj


def _file_identity(fd: int) -> Tuple[str, int, int, int, int]:
    """What makes two ranks' open files provably the same file: host, device, inode, size, mtime."""
    st = os.fstat(fd)
    return socket.gethostname(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _named(exc: BaseException, path: str) -> BaseException:
    """``exc`` naming ``path`` (the reads went through a pinned /proc/self/fd name)."""
    if isinstance(exc, CheckpointError) and exc.path != path:
        renamed = type(exc)(path, exc.message)
        renamed.__cause__ = exc.__cause__
        return renamed
    return exc


def read_info(path: PathLike) -> Dict[str, Any]:
    """What a checkpoint records, without building anything or reading its tensors' data.

    Keys: ``kind`` ("handler" or "weights"), ``format_version``, ``versions``, ``created``,
    ``world_size``, ``model`` ({"target", "kwargs", "model_type"} or None), ``optimizer``,
    ``scheduler``, ``loss_fn`` (specs or None), ``data`` ({"train"/"val": {"dataset", "options"}}),
    ``progress`` ({"epoch", "global_step"}), ``train_settings``, ``history`` (last values),
    ``callbacks`` (targets), ``ema`` (decay or None), ``unrecorded``, ``parameters`` (count).

    The file is verified first (a damaged one raises CorruptCheckpointError). Every field
    passed on has the type documented here: a record of another type (a forged file can hold
    anything at any key) raises IncompatibleCheckpointError naming the file and the field.
    Only CheckpointError subclasses are raised for anything the file holds.
    """
    from .inspect import _verified  # read_checkpoint, with a broken header under a valid trailer told as damage

    path_str = os.fspath(path)
    obj = _verified(path_str)
    try:
        return _info_of(obj, path_str)
    except CheckpointError:
        raise
    except Exception as exc:  # a shape of record that the checks below did not foresee: still the file's fault
        raise IncompatibleCheckpointError(path_str, f"cannot read its records ({type(exc).__name__}: "
                                                    f"{str(exc)[:200]})") from None


def _info_of(obj: Any, path_str: str) -> Dict[str, Any]:
    """``read_info``'s dict from the loaded ``obj``: every field it passes on checked for its type."""
    F = _format
    weights = obj.get(F.MODEL_STATE) if isinstance(obj, dict) else None
    if not F.is_handler_state(obj):
        if isinstance(obj, dict) and (F._looks_like_state_dict(obj) or isinstance(weights, dict)):
            weights = weights if isinstance(weights, dict) else obj
            return {"kind": "weights", "model": None,
                    "parameters": sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor))}
        F.check_and_migrate(obj, path_str)  # raises the right error
    state = F.check_and_migrate(obj, path_str)
    model_entry = F.mapping(state.get(F.MODEL), F.MODEL, path_str, optional=False)
    model_spec = F.spec(model_entry.get("spec"), "model.spec", path_str)
    model = None
    if model_spec is not None:
        target, kwargs = specs_split(model_spec)
        model = {"target": target, "kwargs": kwargs,
                 "model_type": F.text(model_entry.get("model_type"), "model.model_type", path_str)}

    data: Dict[str, Any] = {}
    for name, entry in F.mapping(state.get(F.DATA), F.DATA, path_str).items():
        field = f"{F.DATA}.{name}"
        entry = F.mapping(entry, field, path_str, optional=False)
        options = F.mapping(entry.get("options"), f"{field}.options", path_str)
        if any(not isinstance(k, str) for k in options):
            raise F.malformed(path_str, f"{field}.options", options, "loader options with string keys")
        data[str(name)] = {**entry, "dataset": F.spec(entry.get("dataset"), f"{field}.dataset", path_str),
                           "options": options}
    progress = F.mapping(state.get(F.PROGRESS), F.PROGRESS, path_str)
    for key in ("epoch", "global_step"):
        F.count(progress.get(key), f"{F.PROGRESS}.{key}", path_str)
    history = F.mapping(state.get(F.HISTORY), F.HISTORY, path_str)
    callbacks = [F.entry_spec(entry, f"{F.CALLBACKS}[{i}]", path_str)
                 for i, entry in enumerate(F.sequence(state.get(F.CALLBACKS), F.CALLBACKS, path_str))]
    ema = F.mapping(state.get(F.EMA), F.EMA, path_str)
    weights = F.mapping(state.get(F.MODEL_STATE), F.MODEL_STATE, path_str, optional=False)
    return {
        "kind": "handler",
        "format_version": state[F.VERSION],
        "versions": F.mapping(state.get(F.VERSIONS), F.VERSIONS, path_str),
        "created": F.text(state.get(F.CREATED), F.CREATED, path_str),
        "world_size": F.count(state.get(F.WORLD_SIZE), F.WORLD_SIZE, path_str),
        "model": model,
        "optimizer": F.entry_spec(state.get(F.OPTIMIZER), F.OPTIMIZER, path_str),
        "scheduler": F.entry_spec(state.get(F.SCHEDULER), F.SCHEDULER, path_str),
        "loss_fn": F.entry_spec(state.get(F.LOSS), F.LOSS, path_str),
        "data": data,
        "progress": {k: v for k, v in progress.items() if k != "data_seed"},
        "train_settings": F.mapping(state.get(F.SETTINGS), F.SETTINGS, path_str),
        "history": {k: (v[-1] if v else None) for k, v in history.items() if isinstance(v, list)},
        "callbacks": [spec["_target_"] for spec in callbacks if spec is not None],
        "ema": F.number(ema.get("decay"), f"{F.EMA}.decay", path_str),
        "unrecorded": F.mapping(state.get(F.UNRECORDED), F.UNRECORDED, path_str),
        "parameters": sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor)),
    }


def load(handler_class: type, path: PathLike, device: DeviceLike = None, strict_load: bool = False,
         skip_optimizer: bool = False, skip_scheduler: bool = False, skip_history: bool = False,
         skip_callbacks: bool = False, skip_sampler_sde: bool = False, skip_ema: bool = False, *,
         model_class: Optional[type] = None, model_kwargs: Optional[Dict[str, Any]] = None,
         model_type: Optional[Union[ModelType, str]] = None, mmap: bool = False,
         trusted_packages: Sequence[str] = ()) -> "NNHandler":
    """A handler rebuilt from a file written by ``NNHandler.save``.

    ``device=None`` means the DDP-assigned device (cuda:LOCAL_RANK or cpu) under DDP,
    otherwise cuda when available, else cpu. Tensors are mapped straight onto it. Each
    ``skip_*`` flag leaves that component as a fresh handler has it. The keyword-only
    ``model_class``/``model_kwargs``/``model_type`` build that model instead of the
    recorded one (its weights then load under ``strict_load``). ``mmap=True`` keeps the
    tensors memory-mapped from the file (no copy at all, fastest); the file must then not be
    rewritten in place while the handler lives (``save`` never does: it replaces the file).

    What a file may make us build: any class of a component's own kind (an ``nn.Module``
    model or loss, an ``Optimizer``, a scheduler, a ``Callback``, a ``Dataset``, an SDE or
    sampler of nn_handler's bases), torch's and nn_handler's own classes and functions for
    losses, metrics and data, and anything in the model's top-level package or in
    ``trusted_packages``. Other targets are not called: that component is not restored, with
    a warning that names it and the package to trust.
    """
    info = distributed.setup(None)  # join the job first, so that all ranks can agree on the outcome
    target = distributed.resolve_device(device, info)
    path_str = os.fspath(path)
    from .. import interop
    if interop.is_safetensors(path):  # weights only (an export records its model): nothing else to restore
        found = interop.read_weights(path, target, info, _read)
        return _from_weights(handler_class, path_str, found, model_class, model_type, target, strict_load, None,
                             trusted_packages, dict(model_kwargs or {}), info)
    obj = _read(path, target, info, keep_mapped=mmap)  # raises on every rank if the file fails on any
    if not _format.is_handler_state(obj) and interop.holds_weights(obj):
        found, error = None, None  # another tool's weights file (Lightning, {"state_dict": ...}): its weights
        try:
            if model_class is None:
                raise NotACheckpointError(path_str, "this file holds model weights but no handler state (it was not "
                                                    "written by NNHandler.save): pass model_class= (and model_kwargs=) "
                                                    "to load its weights, or use NNHandler.initialize_from_checkpoint")
            found = interop.weights_of(obj, path_str)
        except Exception as exc:
            error = exc
        distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
        return _from_weights(handler_class, path_str, found, model_class, model_type, target, strict_load, None,
                             trusted_packages, dict(model_kwargs or {}), info)
    state, error = None, None
    try:
        state = _format.check_and_migrate(obj, path_str)
    except Exception as exc:
        error = exc
    distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
    handler, error = None, None
    try:
        handler = restore(handler_class, state, path_str, target, strict_load, skip_optimizer, skip_scheduler,
                          skip_history, skip_callbacks, skip_sampler_sde, skip_ema, model_class=model_class,
                          model_kwargs=model_kwargs, model_type=model_type,
                          trusted_packages=tuple(trusted_packages))
    except (CheckpointError, FileNotFoundError, Warning) as exc:  # (a warning the caller made an error)
        error = exc
    except Exception as exc:  # a file with the right checksum but fields that do not make sense
        error = IncompatibleCheckpointError(path_str, f"cannot restore from this file: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
    distributed.agree(error, info, f"restoring from {path_str}", path_str)
    return handler


def initialize_from_checkpoint(handler_class: type, checkpoint_path: PathLike, model_class: Optional[type] = None,
                               model_type: Optional[Union[ModelType, str]] = None, device: DeviceLike = None,
                               strict_load: bool = True, *, prefix: Optional[str] = None,
                               trusted_packages: Sequence[str] = (), **model_kwargs: Any) -> "NNHandler":
    """A new handler whose model has only the weights from ``checkpoint_path``.

    The file is a handler file, a bare state_dict, a dict with ``model_state_dict``,
    ``state_dict`` (a PyTorch Lightning checkpoint: its LightningModule attribute prefix such
    as ``model.`` is removed, or the weights under ``prefix=`` are taken) or ``model``, or a
    safetensors file (``nn_handler.interop``); optimizer, scheduler, history and the rest are
    not loaded. Without ``model_class`` the model the file records (a handler file or an
    ``export``) is rebuilt under ``load``'s trust rules (``trusted_packages`` widens them). A
    handler file of a newer format version than this library reads is refused, as ``load``
    refuses it (IncompatibleCheckpointError).
    """
    from .. import interop
    info = distributed.setup(None)
    target = distributed.resolve_device(device, info)
    found = interop.read_weights(checkpoint_path, target, info, _read)  # raises on every rank if any fails
    return _from_weights(handler_class, os.fspath(checkpoint_path), found, model_class, model_type, target,
                         strict_load, prefix, trusted_packages, model_kwargs, info)


def _from_weights(handler_class: type, path_str: str, found: Any, model_class: Any, model_type: Any,
                  target: torch.device, strict_load: bool, prefix: Optional[str], trusted_packages: Sequence[str],
                  model_kwargs: Dict[str, Any], info: "distributed.DistInfo") -> "NNHandler":
    """A handler holding ``found``'s weights (``interop.FoundWeights``), every rank agreeing on the outcome."""
    from .. import interop
    handler, error = None, None
    try:
        model_class, model_kwargs, model_type = interop.model_for(handler_class, found, model_class, model_kwargs,
                                                                  model_type, trusted_packages, path_str)
        weights = interop.select_weights(found, prefix, model_class, model_kwargs, path_str)
        module = build_module_from_weights(model_class, model_kwargs, canonical_state_dict(weights), target)
        with prebuilt_module(module):
            handler = handler_class(model_class, device=target, model_type=coerce_model_type(model_type),
                                    **model_kwargs)
        if module is None:
            try:
                load_model_weights(handler.module, weights, strict_load, path_str, handler._warn)
            except (CheckpointError, Warning):  # (a warning the caller made an error)
                raise
            except Exception as exc:  # the file's weights, not the caller's model, are at fault here
                raise IncompatibleCheckpointError(path_str, f"the model weights do not fit the model "
                                                            f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    except Exception as exc:
        error = exc
    distributed.agree(error, info, f"loading weights from {path_str}", path_str)
    return handler
