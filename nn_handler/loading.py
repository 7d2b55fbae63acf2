"""A handler from a checkpoint: open it once, build the model, then restore each named part.

The flow of ``NNHandler.load(path)``:

1. ``CheckpointFile.open(path)`` on every rank; ``state()`` verifies the checksum while the
   tensors are copied into memory (once), ``format.check_and_migrate`` brings an older format up to date;
2. the model class the file records is resolved under the trust rules (``checkpointing.models``)
   and built on the meta device around the file's weights (``fastload``), or built for real
   and given them;
3. each part of ``NNHandler.parts`` loads its entry, in order, minus the parts ``left_out``
   (``parts.SKIP_FLAGS``); a refused target raises ``UnsafeCheckpointError``, any other part that
   cannot be restored is told in one warning and left as a fresh handler has it;
4. the random streams last (building the parts above draws random numbers).

Every rank takes each step or every rank raises (``distributed.agree``).
"""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Optional, Sequence, Union

import torch

from . import distributed, specs
from .callbacks.base import dispatch
from .checkpointing import format as F
from .checkpointing.errors import CheckpointError, IncompatibleCheckpointError, NotACheckpointError, UnsafeCheckpointError
from .checkpointing.fastload import build_module_from_weights
from .checkpointing.file import CheckpointFile
from .checkpointing.models import (
    canonical_state_dict,
    load_model_weights,
    recorded_model_class,
    recorded_model_problem,
    recorded_unnamed_kwargs,
    unnamed_model_message,
    unsafe,
    weight_elements,
)
from .checkpointing.store import lineage_for
from .enums import ModelType, coerce_model_type
from .parts import HOW_TO_SET, LoadContext, flag_leaving_out, how_to_set
from .train.settings import TrainSettings

if TYPE_CHECKING:  # pragma: no cover
    from .handler import NNHandler

PathLike = Union[str, os.PathLike]
DeviceLike = Optional[Union[str, torch.device]]

# The order parts load in: what a later part is built around comes first (the scheduler around the
# optimizer, the GradScaler with the optimizer); the random streams come last, apart.
ORDER = (F.LOSS, F.METRICS, F.DATA, F.OPTIMIZER, F.GRAD_SCALER, F.SCHEDULER, F.HISTORY, F.CALLBACKS, F.SDE,
         F.SAMPLER, F.SETTINGS, F.EMA, F.METADATA, F.PROGRESS)
_BASES: Dict[str, Callable[[], Any]] = {}


def _opened(path: Union[PathLike, CheckpointFile], info: distributed.DistInfo) -> Any:
    """``path`` opened on every rank (closed after the block), or the caller's open CheckpointFile (left open)."""
    if isinstance(path, CheckpointFile):
        return contextlib.nullcontext(path)
    return CheckpointFile.open(path, info)


def load(handler_class: type, path: Union[PathLike, CheckpointFile], device: DeviceLike = None,
         strict_load: bool = False, leave_out: FrozenSet[str] = frozenset(), *,
         model_class: Optional[type] = None, model_kwargs: Optional[Dict[str, Any]] = None,
         model_type: Optional[Union[ModelType, str]] = None, mmap: bool = False,
         trusted_packages: Sequence[str] = (), strategy: Any = None) -> "NNHandler":
    """``NNHandler.load``: see its docstring; ``leave_out`` are the part names its ``skip_*`` flags name."""
    info = distributed.setup(None)  # join the job first, so that all ranks can agree on the outcome
    target = distributed.resolve_device(device, info)
    from . import interop
    with _opened(path, info) as ckpt:
        path_str = ckpt.path
        if ckpt.safetensors:  # weights only (an export records its model): nothing else to restore
            found = interop.read_weights(ckpt, target, info)
            return from_weights(handler_class, path_str, found, model_class, model_type, target, strict_load, None,
                                trusted_packages, dict(model_kwargs or {}), info)
        obj = ckpt.state(target, mmap=mmap)  # raises on every rank if the file fails on any (its shards too)
        checksum = ckpt.checksum
        shards = ckpt.sharded_record
    if isinstance(obj, dict) and F.SHARDED in obj and shards is None:  # (defence: its tensors are in its directory)
        error = IncompatibleCheckpointError(path_str, "this is a sharded checkpoint's header: load its directory")
        distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
    if not F.is_handler_state(obj) and interop.holds_weights(obj):
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
        return from_weights(handler_class, path_str, found, model_class, model_type, target, strict_load, None,
                            trusted_packages, dict(model_kwargs or {}), info)
    state, error = None, None
    try:
        state = F.check_and_migrate(obj, path_str)
    except Exception as exc:
        error = exc
    distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
    handler, error = None, None
    try:
        handler = restore(handler_class, state, path_str, target, strict_load, leave_out, model_class=model_class,
                          model_kwargs=model_kwargs, model_type=model_type, trusted_packages=tuple(trusted_packages),
                          checksum=checksum, strategy=strategy if strategy is not None else _recorded_strategy(state, info))
    except (CheckpointError, FileNotFoundError, Warning) as exc:  # (a warning the caller made an error)
        error = exc
    except Exception as exc:  # a file with the right checksum but fields that do not make sense
        error = IncompatibleCheckpointError(path_str, f"cannot restore from this file: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
    distributed.agree(error, info, f"restoring from {path_str}", path_str)
    if shards is not None:  # the tensors of the parts, from the (verified) shards, laid out as this job holds them
        error = None
        try:
            from .checkpointing import sharded
            sharded.load(path_str, shards, handler.parts(), leave_out, strict_load, handler._warn, info, state)
        except CheckpointError as exc:
            error = exc
        except Exception as exc:
            error = IncompatibleCheckpointError(path_str, f"cannot restore its shards: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        distributed.agree(error, info, f"restoring from {path_str}", path_str)
    return handler


def _recorded_strategy(state: Dict[str, Any], info: distributed.DistInfo) -> Any:
    """The strategy a checkpoint records (FSDP's policy as plain data), for a job of several ranks; else None."""
    record = state.get(F.STRATEGY)
    if not info.enabled or not isinstance(record, dict) or record.get("strategy") != "fsdp":
        return None
    from .fsdp import FSDP
    try:
        return FSDP(**{k: record[k] for k in ("wrap", "min_params", "param_dtype", "reduce_dtype",
                                                  "reshard_after_forward") if k in record})
    except (TypeError, ValueError):
        return "fsdp"  # a policy this release cannot read: FSDP's defaults


def initialize_from_checkpoint(handler_class: type, checkpoint_path: Union[PathLike, CheckpointFile],
                               model_class: Optional[type] = None, model_type: Optional[Union[ModelType, str]] = None,
                               device: DeviceLike = None, strict_load: bool = True, *, prefix: Optional[str] = None,
                               trusted_packages: Sequence[str] = (), **model_kwargs: Any) -> "NNHandler":
    """``NNHandler.initialize_from_checkpoint``: see its docstring."""
    from . import interop
    info = distributed.setup(None)
    target = distributed.resolve_device(device, info)
    found = interop.read_weights(checkpoint_path, target, info)  # raises on every rank if any fails
    path_str = checkpoint_path.path if isinstance(checkpoint_path, CheckpointFile) else os.fspath(checkpoint_path)
    return from_weights(handler_class, path_str, found, model_class, model_type, target, strict_load, prefix,
                        trusted_packages, model_kwargs, info)


def from_weights(handler_class: type, path_str: str, found: Any, model_class: Any, model_type: Any,
                 target: torch.device, strict_load: bool, prefix: Optional[str], trusted_packages: Sequence[str],
                 model_kwargs: Dict[str, Any], info: distributed.DistInfo) -> "NNHandler":
    """A handler holding ``found``'s weights (``interop.FoundWeights``), every rank agreeing on the outcome."""
    from . import interop
    handler, error = None, None
    try:
        model_class, model_kwargs, model_type = interop.model_for(handler_class, found, model_class, model_kwargs,
                                                                  model_type, trusted_packages, path_str)
        weights = interop.select_weights(found, prefix, model_class, model_kwargs, path_str)
        module = build_module_from_weights(model_class, model_kwargs, canonical_state_dict(weights), target)
        handler = handler_class._built(model_class, module, device=target, model_type=coerce_model_type(model_type),
                                       model_kwargs=model_kwargs)
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


def restore(handler_class: type, state: Dict[str, Any], path: str, device: Any, strict_load: bool,
            leave_out: FrozenSet[str] = frozenset(), model_class: Any = None,
            model_kwargs: Optional[Dict[str, Any]] = None, model_type: Any = None,
            trusted_packages: Any = (), checksum: Any = "read", strategy: Any = None) -> "NNHandler":
    """A handler built from ``state`` (already verified and migrated), minus the parts ``leave_out``.

    ``model_class`` (with ``model_kwargs``) builds that model instead of the recorded one,
    e.g. a new head for transfer learning; the weights then load under ``strict_load``.
    What the file's components may name: see ``specs`` (the library's lists, what
    ``trusted_packages`` names, and the model class's own module). A target outside that is
    refused before anything is imported or called: ``UnsafeCheckpointError``.
    """
    unrecorded: Dict[str, str] = dict(state.get(F.UNRECORDED) or {})
    model_entry = state[F.MODEL]
    trust = specs.Trust.of(trusted_packages)
    if model_class is None:
        if model_entry.get("spec") is None:
            raise IncompatibleCheckpointError(
                path, unnamed_model_message(model_entry, str(unrecorded.get("model", "unknown reason"))[:500])
                + f"; or load only its weights with {HOW_TO_SET['model']}")
        try:
            model_class, recorded_kwargs = recorded_model_class(model_entry, path, trust)
        except specs.SpecError as exc:
            raise IncompatibleCheckpointError(path, f"cannot rebuild the model: {exc}") from None
        if model_kwargs is None:  # the file's kwargs: to the model only, within a size bound
            model_kwargs = recorded_kwargs
            elements = weight_elements(state[F.MODEL_STATE]) if F.SHARDED not in state else \
                _sharded_elements(state, path)
            problem = recorded_model_problem(handler_class, model_class, model_kwargs, elements)
            if problem:
                raise UnsafeCheckpointError(path, problem)
    elif model_kwargs is None and model_entry.get("spec") is None:  # a class the file could only name (__main__)
        model_kwargs = recorded_unnamed_kwargs(model_entry, model_class, path)
        problem = model_kwargs and recorded_model_problem(handler_class, model_class, model_kwargs,
                                                          weight_elements(state[F.MODEL_STATE]))
        if problem:
            raise UnsafeCheckpointError(path, problem)
    module = build_module_from_weights(model_class, model_kwargs or {}, state[F.MODEL_STATE], torch.device(device))
    h = handler_class._built(model_class, module, device=device,
                             model_type=coerce_model_type(model_type or model_entry.get("model_type")),
                             model_kwargs=model_kwargs or {}, strategy=strategy)
    if module is None and F.SHARDED not in state:  # (a sharded checkpoint's weights come from its shards)
        load_model_weights(h.module, state[F.MODEL_STATE], strict_load, path, h._warn)
    # The model class's own module (the caller's, or the recorded one that resolved) is trusted
    # for the other parts too: what is defined in that module, not what it imports.
    context = LoadContext(path=path, trust=trust.with_model_module(model_class), warn=h._warn,
                          not_restored=h._not_restored, rank=h.rank, is_main=h.rank == 0)
    parts = h.parts(context)
    if F.EMA in leave_out:
        settings = TrainSettings.from_dict(state.get(F.SETTINGS) or {})
        settings.ema_decay = None
        state = {**state, F.SETTINGS: settings.to_dict()}
    for name in ORDER:
        if name in leave_out or name not in parts:
            continue
        entry = state.get(name)
        if name == F.HISTORY and not context.is_main:
            continue  # the history lives on rank 0
        if name == F.SCHEDULER and entry and h.optimizer is None:
            h._not_restored["scheduler"] = "the optimizer was not restored, and a scheduler needs one"
            h._warn(f"the scheduler in {path} was not restored because the optimizer was not "
                    f"(skip_optimizer=True or not recorded); set both again, the scheduler with "
                    f"{how_to_set('scheduler')}, or pass skip_scheduler=True to silence this")
            continue
        if name == F.GRAD_SCALER and h.optimizer is None:
            continue
        _restore_part(h, parts[name], name, entry, context)
    h.metadata["lineage"] = lineage_for(path, (state.get(F.METADATA) or {}).get("lineage"), checksum=checksum)

    skipped_records = {"callback" if name == F.CALLBACKS else name for name in leave_out}
    for component, reason in unrecorded.items():
        if component == "model" or any(component.startswith(s) for s in skipped_records):
            continue
        h._not_restored[component] = f"not recorded when {path} was saved: {reason}"
        h._warn(f"{component} was not recorded in {path} ({reason}); set it again with {how_to_set(component)}")

    saved_world = int(state.get(F.WORLD_SIZE) or 1)
    if saved_world != h.world_size:
        h._warn(f"{path} was saved by {saved_world} process(es) and is loaded by {h.world_size}: training goes on, "
                f"but the data order differs from the original run and random states are restored only for "
                f"ranks below {min(saved_world, h.world_size)}")
    for cb in dispatch(h.callbacks, "on_load"):
        cb.on_load(h, path)
    parts[F.RNG].load_state_dict(state.get(F.RNG))  # last: building the parts above draws random numbers
    return h


def _sharded_elements(state: Dict[str, Any], path: str) -> int:
    from .checkpointing import sharded
    return sharded.elements(sharded.checked_record(state[F.SHARDED], path), F.MODEL_STATE)


# Components whose failure to restore is told and left unset (the others raise: their state is the run).
_COMPONENTS = {F.LOSS: "loss_fn", F.OPTIMIZER: "optimizer", F.SCHEDULER: "scheduler", F.SDE: "sde",
               F.SAMPLER: "sampler"}


def _restore_part(h: "NNHandler", part: Any, name: str, entry: Any, context: LoadContext) -> None:
    """Load one part; a refused target raises (with the skip flag that leaves it out), a component that
    cannot be rebuilt here (a renamed argument, a module missing, a state that does not fit) is told."""
    if name in _COMPONENTS and not entry:
        return
    try:
        part.load_state_dict(entry)
    except specs.UntrustedTarget as exc:
        raise unsafe(context.path, exc, flag_leaving_out(name)) from None
    except Exception as exc:
        component = _COMPONENTS.get(name)
        if component is None:
            raise
        if name == F.OPTIMIZER and h.optimizer is not None:  # built, but its saved state does not fit
            h._drop("optimizer")
            exc = specs.SpecError(f"its saved state does not fit this model's parameters ({exc})")
        reason = str(exc) if isinstance(exc, specs.SpecError) else f"{type(exc).__name__}: {exc}"
        context.not_restored_because(component, reason)


def convert(handler_class: type, source: Union[PathLike, CheckpointFile], target: PathLike, *,
            trusted_packages: Sequence[str] = (), model_class: Optional[type] = None,
            model_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """``NNHandler.convert``: a sharded checkpoint consolidated into one file, or one file sharded (a ``target``
    ending in ``.dcp``), in one process. The handler is loaded whole (the trust rules of ``load`` apply) and
    saved in the other form; the per-rank records (random streams, partial-epoch sums) and the world size
    are carried over as the source has them, so a job of the source's size resumes the converted file as
    it would the source."""
    from .checkpointing import sharded as shards
    from .checkpointing.save import snapshot, staged, write
    info = distributed.setup(None)
    if info.enabled:
        raise RuntimeError("convert a checkpoint in one process, not under torchrun: it loads the whole state there")
    with _opened(source, info) as ckpt:
        h = load(handler_class, ckpt, device="cpu", trusted_packages=trusted_packages, model_class=model_class,
                 model_kwargs=model_kwargs)
        recorded = F.check_and_migrate(ckpt.contents(), ckpt.path)
        carried = {key: staged(recorded[key]) for key in (F.RNG, F.PROGRESS, F.WORLD_SIZE) if key in recorded}
    sharded = os.fspath(target).rstrip("/").endswith(shards.SUFFIX)
    snap = snapshot(h.parts(), h.header(), info, sharded=sharded)
    snap.state.update(carried)
    write(snap, target, info, h._warn, sharded=sharded)
    return os.fspath(target)
