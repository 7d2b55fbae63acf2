"""Saving: a mapping of Stateful parts plus a plain header, as one verified file, written atomically.

Checkpointing knows nothing of the handler: ``NNHandler.save`` hands over ``parts()`` (checkpoint
key -> an object with ``state_dict()``/``load_state_dict()``) and ``header()`` (plain data: world
size, the model's spec). A part whose value differs between ranks (``PerRank``) is gathered from
every rank; a part that could not record all of itself says what in ``unrecorded()``.
"""
from __future__ import annotations

import datetime
import os
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from .. import distributed
from ..specs import plain_problem
from ..version import __version__
from . import format as F
from .io import atomic_save

PathLike = Union[str, os.PathLike]


@runtime_checkable
class Stateful(Protocol):
    """torch.distributed.checkpoint's protocol: plain data out, the same data back in."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class PerRank(Protocol):
    """A part whose value differs between ranks (random streams, a partial epoch's sums): a save
    gathers ``rank_state()`` from every rank and rank 0 writes ``gathered_state_dict(states)``."""

    def rank_state(self) -> Any: ...

    def gathered_state_dict(self, states: List[Any]) -> Any: ...


@runtime_checkable
class ShardedPart(Protocol):
    """A part with tensors that a sharded checkpoint keeps as DCP shards (the model's weights, the optimizer's
    state, the EMA): ``sharded_state()`` is ``(plain state without those tensors, {key: tensor})``; a load gives
    ``load_state_dict`` the plain state, then fills ``sharded_targets()`` (tensors laid out as this process
    holds them: DCP reshards into them) and hands them to ``load_sharded`` with the plain state again."""

    def sharded_state(self) -> Tuple[Any, Dict[str, torch.Tensor]]: ...

    def sharded_targets(self) -> Dict[str, torch.Tensor]: ...

    def load_sharded(self, tensors: Dict[str, torch.Tensor], plain: Any) -> None: ...


class _Fixed:
    """A part's plain state taken once (what a sharded save keeps in the header), saying what it could not record."""

    def __init__(self, state: Any, part: Any):
        self._state, self._part = state, part

    def state_dict(self) -> Any:
        return self._state

    def unrecorded(self) -> Dict[str, str]:
        return self._part.unrecorded() if callable(getattr(self._part, "unrecorded", None)) else {}


def rank_states(parts: Mapping[str, Any]) -> Dict[str, Any]:
    """This rank's share of every PerRank part."""
    return {name: part.rank_state() for name, part in parts.items() if isinstance(part, PerRank)}


def assemble(parts: Mapping[str, Any], header: Mapping[str, Any],
             per_rank: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The checkpoint as tensors and plain containers, readable with ``weights_only=True``: the format's
    own fields, ``header``, each part's state (a PerRank part from ``per_rank``: every rank's
    ``rank_states``, this process's alone by default), and what could not be recorded."""
    per_rank = per_rank if per_rank is not None else [rank_states(parts)]
    state: Dict[str, Any] = {
        F.FORMAT: F.FORMAT_NAME,
        F.VERSION: F.FORMAT_VERSION,
        F.VERSIONS: {"nn_handler": str(__version__), "torch": str(torch.__version__)},
        F.CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    unrecorded: Dict[str, str] = dict(header.get(F.UNRECORDED) or {})
    state.update({k: v for k, v in header.items() if k != F.UNRECORDED})
    for name, part in parts.items():
        if isinstance(part, PerRank):
            state[name] = part.gathered_state_dict([r.get(name) for r in per_rank])
        else:
            state[name] = part.state_dict()
        if callable(getattr(part, "unrecorded", None)):
            unrecorded.update(part.unrecorded())
    state[F.UNRECORDED] = unrecorded
    metadata = state.pop(F.METADATA, None)  # last, as files have always had it
    if metadata is not None:
        state[F.METADATA] = metadata
    return state


def _copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "device_mesh"):
        return t.clone()
    return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()


def _storage(t: torch.Tensor) -> int:
    local = getattr(t, "to_local", None)
    return (local() if callable(local) else t).untyped_storage().data_ptr()


class _Later:
    """A tensor a background save copies in its own thread, before the training next changes it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``tree`` (dicts, lists and tuples) with ``fn`` applied to every other value."""
    if isinstance(tree, dict):
        return {k: _leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_leaves(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_leaves(v, fn) for v in tree)
    return fn(tree)


def staged(tree: Any, later: Optional[set] = None) -> Any:
    """A copy of ``tree`` whose tensors are this process's own CPU copies (a DTensor keeps its layout):
    what a background save writes while training changes the live tensors. A tensor whose storage is in
    ``later`` (what only the optimizer step changes: weights, optimizer state, EMA) is left for
    ``finish_staging`` to copy in the background thread."""
    def stage(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return _Later(value) if later and _storage(value) in later else _copy(value)

    return _leaves(tree, stage)


def finish_staging(tree: Any) -> Any:
    """``tree`` with every tensor ``staged`` left for later copied now."""
    return _leaves(tree, lambda value: _copy(value.tensor) if isinstance(value, _Later) else value)


def storages(*trees: Any) -> set:
    """The storages of every tensor in ``trees`` (for ``staged``'s ``later``)."""
    found: set = set()
    _leaves(list(trees), lambda value: found.add(_storage(value)) if isinstance(value, torch.Tensor) else None)
    return found


def snapshot(parts: Mapping[str, Any], header: Mapping[str, Any], info: "distributed.DistInfo", *,
             sharded: bool = False, stage: bool = False, later: Optional[set] = None) -> Any:
    """What a save writes, taken now on every rank (collective: the PerRank parts are gathered, and a sharded
    model's full state too): ``sharded.Snapshot(state, tensors, parts)``. ``sharded`` leaves the tensors of
    every ShardedPart out of the state, as shards; ``stage`` copies every tensor, so that training may go on."""
    from .sharded import SEP, Snapshot
    per_rank = distributed.all_gather_object(rank_states(parts), info)
    tensors: Dict[str, torch.Tensor] = {}
    names: List[str] = []
    if sharded:
        plain: Dict[str, Any] = {}
        for name, part in parts.items():
            if isinstance(part, ShardedPart):
                state, own = part.sharded_state()
                plain[name] = _Fixed(state, part)
                if own:
                    names.append(name)
                    tensors.update({f"{name}{SEP}{key}": t for key, t in own.items()})
            else:
                plain[name] = part
        parts = plain
    state = assemble(parts, header, per_rank)  # on every rank: a sharded model's full state is a collective
    if sharded:
        state[F.VERSION] = F.SHARDED_VERSION
    if stage:
        state = staged(state, later) if info.is_main else {}
        tensors = staged(tensors, later)
    return Snapshot(state if info.is_main else {}, tensors, names)


def _checked(state: Dict[str, Any], path: PathLike, warn: Callable[[str], None]) -> None:
    for component, reason in state[F.UNRECORDED].items():
        name = (state.get(F.MODEL) or {}).get("name") if component == "model" else None
        then = (f"to load it, define {name} there too and pass NNHandler.load(path, model_class={name})"
                if name else "after loading, set it again")
        warn(f"{component} cannot be recorded in {os.fspath(path)} ({reason}); {then}")
    problem = plain_problem(state, "checkpoint")
    if problem:
        raise TypeError(f"cannot write {os.fspath(path)}: {problem}")


def write(snap: Any, path: PathLike, info: "distributed.DistInfo", warn: Callable[[str], None],
          group: Any = None, sharded: bool = False, agree: bool = True) -> Optional[BaseException]:
    """Write a ``snapshot`` to ``path``: one file by rank 0, or a sharded directory by every rank of ``group``.
    With ``agree`` every rank raises if any failed; without, this rank's own error is returned (a background
    save: the ranks agree later, on the training thread)."""
    from . import sharded as shards
    error: Optional[BaseException] = None
    try:
        if info.is_main:
            _checked(snap.state, path, warn)
        if sharded:
            shards.write(snap, path, info, group)
        elif info.is_main:
            atomic_save(snap.state, path)
    except Exception as exc:
        error = exc
    if agree:
        distributed.agree(error, info, f"saving {os.fspath(path)}", os.fspath(path))
        return None
    return error


def save(parts: Mapping[str, Any], header: Mapping[str, Any], path: PathLike, info: "distributed.DistInfo",
         warn: Callable[[str], None], sharded: bool = False) -> None:
    """Write ``header`` and ``parts`` to ``path`` atomically, with a checksum (``sharded``: as a DCP directory).

    Under DDP every rank calls it: the PerRank parts are gathered, rank 0 writes (every rank its shards), and
    the others wait until the checkpoint is complete; an error on any rank is raised on every rank.
    """
    write(snapshot(parts, header, info, sharded=sharded), path, info, warn, sharded=sharded)


class BackgroundSave:
    """At most one save in flight, written by a thread while training goes on.

    ``submit`` waits for the save before it (raising its error), then starts the write of a staged
    snapshot; ``wait`` joins it, and every rank raises if the write failed on any (call it on every
    rank at the same point: the next save, the end of training, a pre-emption). A sharded write
    synchronises the ranks over a process group of its own (gloo), never the training's.
    """

    def __init__(self, info: "distributed.DistInfo"):
        self._info = info
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._path = ""
        self._group: Any = None
        self._staged = threading.Event()  # the background thread has copied what the training changes next
        self._staged.set()

    @property
    def in_flight(self) -> bool:
        """A save was submitted and not waited for (it may have finished writing)."""
        return self._thread is not None

    @property
    def writing(self) -> bool:
        """The background write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def group(self) -> Any:
        """The checkpoint thread's own group (made once, collectively, on the training thread)."""
        import torch.distributed as dist
        if self._group is None and self._info.enabled and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def submit(self, write_fn: Callable[[], Optional[BaseException]], path: PathLike,
               stage: Optional[Callable[[], None]] = None) -> None:
        """Write in a thread: ``stage()`` first (copying what was left for later; ``wait_staged`` waits for
        it), then ``write_fn()``."""
        self.wait()
        self._path = os.fspath(path)
        self._staged.clear()

        def run() -> None:
            try:
                try:
                    if stage is not None:
                        stage()
                finally:
                    self._staged.set()
                self._error = write_fn()
            except BaseException as exc:  # noqa: BLE001 (told on the training thread)
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"nn_handler-save {os.path.basename(self._path)}")
        self._thread.start()

    def wait_staged(self) -> None:
        """Wait until the save in flight has its own copy of everything (no collective: any rank, any time)."""
        self._staged.wait()

    def wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join()
        error, self._error = self._error, None
        distributed.agree(error, self._info, f"saving {self._path} in the background", self._path)
