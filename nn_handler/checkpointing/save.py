"""Saving: a mapping of Stateful parts plus a plain header, as one verified file, written atomically.

Checkpointing knows nothing of the handler: ``NNHandler.save`` hands over ``parts()`` (checkpoint
key -> an object with ``state_dict()``/``load_state_dict()``) and ``header()`` (plain data: world
size, the model's spec). A part whose value differs between ranks (``PerRank``) is gathered from
every rank; a part that could not record all of itself says what in ``unrecorded()``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Union, runtime_checkable

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


def save(parts: Mapping[str, Any], header: Mapping[str, Any], path: PathLike, info: "distributed.DistInfo",
         warn: Callable[[str], None]) -> None:
    """Write ``header`` and ``parts`` to ``path`` atomically, with a checksum.

    Under DDP every rank calls it: the PerRank parts are gathered, rank 0 writes, and the others
    wait until the file is complete; an error on rank 0 is raised on every rank.
    """
    per_rank = distributed.all_gather_object(rank_states(parts), info)
    error: Optional[BaseException] = None
    if info.is_main:
        try:
            state = assemble(parts, header, per_rank)
            for component, reason in state[F.UNRECORDED].items():
                name = (header.get(F.MODEL) or {}).get("name") if component == "model" else None
                then = (f"to load it, define {name} there too and pass NNHandler.load(path, model_class={name})"
                        if name else "after loading, set it again")
                warn(f"{component} cannot be recorded in {os.fspath(path)} ({reason}); {then}")
            problem = plain_problem(state, "checkpoint")
            if problem:
                raise TypeError(f"cannot write {os.fspath(path)}: {problem}")
            atomic_save(state, path)
        except Exception as exc:
            error = exc
    distributed.agree(error, info, f"saving {os.fspath(path)}", os.fspath(path))
