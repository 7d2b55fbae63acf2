"""The handler's state as named Stateful parts: each has ``state_dict()`` and ``load_state_dict(state)``.

``NNHandler.parts()`` maps each checkpoint key (``checkpointing.format``) to one of these, or to
a part that is Stateful itself (``History``, ``TrainSettings``, ``Progress``). Checkpointing
saves that mapping plus a plain header and knows nothing else of the handler; a load restores
it part by part (``nn_handler.loading``), leaving out the parts named by ``left_out`` (the one
place where ``NNHandler.load``'s ``skip_*`` flags become part names).

A part holds the live objects it reads, never the handler; what a load must build (an optimizer
around the model's parameters, a loader around a dataset) it builds through the handler's own
setters, handed to it. What a file may name is resolved under ``LoadContext.trust``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import fsdp, rng, specs
from .callbacks.base import Callback
from .checkpointing.save import PerRank, Stateful  # noqa: F401 (the protocols the parts follow, defined once)
from .data import DataSlot, bounded_loader_options
from .ema import EMA, ema_for

SHARDED_MARK = "sharded"  # in a sharded checkpoint's plain state of a part: its tensors are in the shards
Record = Tuple[Optional[Dict[str, Any]], Optional[str]]  # (spec, why it could not be recorded)


# NNHandler.load's flags -> the parts each leaves as a fresh handler has them.
SKIP_FLAGS: Dict[str, Tuple[str, ...]] = {
    "skip_optimizer": ("optimizer", "grad_scaler"),
    "skip_scheduler": ("scheduler",),
    "skip_history": ("history",),
    "skip_callbacks": ("callbacks",),
    "skip_sampler_sde": ("sde", "sampler"),
    "skip_ema": ("ema",),
}
# The components whose records a skip flag also leaves unreported (a skipped part's "unrecorded" note).
SKIPPED_RECORDS = {"optimizer": "optimizer", "scheduler": "scheduler", "callbacks": "callback", "sde": "sde",
                   "sampler": "sampler"}


def left_out(**flags: bool) -> FrozenSet[str]:
    """The part names that ``NNHandler.load``'s ``skip_*`` flags leave out."""
    unknown = sorted(set(flags) - set(SKIP_FLAGS))
    if unknown:
        raise TypeError(f"unknown load flags {unknown}; the flags are {sorted(SKIP_FLAGS)}")
    return frozenset(name for flag, on in flags.items() if on for name in SKIP_FLAGS[flag])


def flag_leaving_out(part: str) -> Optional[str]:
    """The ``skip_*`` flag that leaves ``part`` out (for messages), or None."""
    return next((flag for flag, names in SKIP_FLAGS.items() if part in names), None)


# How a user sets each component again when a checkpoint could not restore it.
HOW_TO_SET = {
    "model": "NNHandler.initialize_from_checkpoint(path, model_class=YourModel, **kwargs)",
    "optimizer": "h.set_optimizer(OptimizerClass, **kwargs)",
    "scheduler": "h.set_scheduler(SchedulerClass, **kwargs)",
    "loss_fn": "h.set_loss_fn(loss_fn, **kwargs)",
    "sde": "h.set_sde(SDEClass, **kwargs)",
    "sampler": "h.set_sampler(SamplerClass, **kwargs)",
    "data.train": "h.set_train_loader(dataset)",
    "data.val": "h.set_val_loader(dataset)",
}


def how_to_set(component: str) -> str:
    if component.startswith("metric:"):
        return f"h.add_metric({component.split(':', 1)[1]!r}, fn)"
    if component.startswith("callback"):
        return "h.add_callback(YourCallback(...))"
    return HOW_TO_SET.get(component, "its setter")


@dataclass
class LoadContext:
    """What restoring parts from one file needs besides their state: the file (for messages and the
    directory a callback's paths stay inside), what the file may name, and where to tell problems."""

    path: str
    trust: specs.Trust = field(default_factory=lambda: specs.Trust.of(()))
    warn: Callable[[str], None] = lambda message: None
    not_restored: Dict[str, str] = field(default_factory=dict)  # component -> why (the handler's own dict)
    rank: int = 0
    is_main: bool = True

    def build(self, entry: Mapping[str, Any], what: str, expected: Any = None,
              functions: bool = False) -> Tuple[Any, Dict[str, Any]]:
        """``(class or function, kwargs)`` of a component ``entry``'s spec, resolved under the trust rules."""
        target, kwargs = specs.split(entry["spec"])
        return specs.resolve(target, what, expected=expected, functions=functions, trusted=self.trust), kwargs

    def not_restored_because(self, component: str, reason: str) -> None:
        self.not_restored[component] = reason
        self.warn(f"{component} from {self.path} was not restored: {reason}; set it again with {how_to_set(component)}")


def _default_context() -> LoadContext:
    return LoadContext(path="<state_dict>")


def _entry(record: Record, name: str, state: Any = None,
           stateful: bool = False) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    spec, reason = record
    if spec is None:
        return None, reason or f"{name} was not recorded"
    entry: Dict[str, Any] = {"spec": spec}
    if stateful:
        problem = specs.plain_problem(state, f"{name} state")
        if problem:
            return None, problem
        entry["state"] = state
    return entry, None


# ---------------------------------------------------------------------------- the parts
class Weights:
    """The model's weights: its own state_dict keys (never a wrapper's prefix). A sharded (FSDP) model's
    ``state_dict()`` is the whole weights gathered on rank 0 (every rank calls it); ``sharded_state`` keeps
    each rank's shards, for a DCP checkpoint."""

    def __init__(self, module: nn.Module, load: Callable[[Dict[str, Any]], None]):
        self._module, self._load = module, load

    def state_dict(self) -> Dict[str, Any]:
        return fsdp.model_state(self._module, full=True)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load(state)

    def sharded_state(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        return {}, fsdp.model_state(self._module, full=False)

    def sharded_targets(self) -> Dict[str, torch.Tensor]:
        return fsdp.model_state(self._module, full=False)

    def load_sharded(self, tensors: Dict[str, torch.Tensor], plain: Any = None) -> None:
        if fsdp.is_sharded(self._module):  # (DCP loaded into the shards in place; this also checks them)
            fsdp.load_model_state(self._module, tensors, full=False, strict=False)
        else:
            with torch.no_grad():
                own = self._module.state_dict()
                for key, t in tensors.items():
                    if own[key] is not t and own[key].data_ptr() != t.data_ptr():
                        own[key].copy_(t)


class Component:
    """A recordable component (optimizer, scheduler, loss, SDE, sampler): ``{"spec", "state"}`` or None.

    ``get`` returns the live object; ``rebuild(cls, **kwargs)`` is the handler's setter, used by a
    load to build the recorded class (resolved under the trust rules) before its state goes in.
    """

    def __init__(self, name: str, get: Callable[[], Any], record: Callable[[], Record],
                 rebuild: Callable[..., None], expected: Any, *, functions: bool = False, stateful: bool = True,
                 context: Optional[LoadContext] = None):
        self.name, self._get, self._record, self._rebuild = name, get, record, rebuild
        self._expected, self._functions, self._stateful = expected, functions, stateful
        self.context = context or _default_context()

    def _has_state(self, obj: Any) -> bool:
        return self._stateful and callable(getattr(obj, "state_dict", None))

    def state_dict(self) -> Optional[Dict[str, Any]]:
        obj = self._get()
        if obj is None:
            return None
        entry, _ = _entry(self._record(), self.name, obj.state_dict() if self._has_state(obj) else None,
                          self._has_state(obj))
        return entry

    def unrecorded(self) -> Dict[str, str]:
        obj = self._get()
        if obj is None:
            return {}
        entry, reason = _entry(self._record(), self.name, obj.state_dict() if self._has_state(obj) else None,
                               self._has_state(obj))
        return {} if entry is not None else {self.name: reason or "not recordable"}

    def load_state_dict(self, entry: Optional[Mapping[str, Any]]) -> None:
        """Build the recorded class with its recorded kwargs, then load its state (when it has one)."""
        if not entry:
            return
        cls, kwargs = self.context.build(entry, self.name, self._expected, functions=self._functions)
        self._rebuild(cls, **kwargs)
        obj = self._get()
        if self._stateful and "state" in entry and callable(getattr(obj, "load_state_dict", None)):
            obj.load_state_dict(entry["state"])


class OptimizerPart(Component):
    """The optimizer: as ``Component``; with a sharded (FSDP) model its single-file state is gathered whole on
    rank 0 in torch's own layout (so any strategy loads it), and a sharded checkpoint keeps each rank's
    shards of it (keyed by parameter name), the plain rest (parameter groups) in the header."""

    def __init__(self, *args: Any, model: Callable[[], nn.Module], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._model = model

    def state_dict(self) -> Optional[Dict[str, Any]]:
        obj = self._get()
        if obj is None:
            return None
        entry, _ = _entry(self._record(), self.name, fsdp.optimizer_state(self._model(), obj, full=True), True)
        return entry

    def load_state_dict(self, entry: Optional[Mapping[str, Any]]) -> None:
        if not entry:
            return
        cls, kwargs = self.context.build(entry, self.name, self._expected)
        self._rebuild(cls, **kwargs)
        state = entry.get("state")
        if isinstance(state, Mapping) and state.get(SHARDED_MARK):
            return  # its tensors come from the shards (load_sharded)
        if state is not None:
            fsdp.load_optimizer_state(self._model(), self._get(), state, full=True)

    def sharded_state(self) -> Tuple[Optional[Dict[str, Any]], Dict[str, torch.Tensor]]:
        obj = self._get()
        if obj is None:
            return None, {}
        state = fsdp.optimizer_state(self._model(), obj, full=False)
        tensors, scalars = {}, {}
        for fqn, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{fqn}/{key}"] = value
                else:
                    scalars.setdefault(fqn, {})[key] = value
        entry, _ = _entry(self._record(), self.name, {SHARDED_MARK: True, "param_groups": state["param_groups"],
                                                      "scalars": scalars}, True)
        return entry, (tensors if entry is not None else {})

    def sharded_targets(self) -> Dict[str, torch.Tensor]:
        obj = self._get()
        if obj is None:
            return {}
        state = fsdp.optimizer_state(self._model(), obj, full=False)  # (its state made, zero, if it had none)
        return {f"{fqn}/{key}": value for fqn, values in state["state"].items() for key, value in values.items()
                if isinstance(value, torch.Tensor)}

    def load_sharded(self, tensors: Dict[str, torch.Tensor], entry: Any = None) -> None:
        pending = (entry or {}).get("state") or {}
        per_param: Dict[str, Dict[str, Any]] = {}
        for key, t in tensors.items():
            fqn, name = key.rsplit("/", 1)
            per_param.setdefault(fqn, {})[name] = t
        for fqn, values in (pending.get("scalars") or {}).items():
            per_param.setdefault(fqn, {}).update(values)
        fsdp.load_optimizer_state(self._model(), self._get(), {"state": per_param,
                                                               "param_groups": pending["param_groups"]}, full=False)


class Metrics:
    """Metric name -> the metric function's spec (None: not recordable)."""

    def __init__(self, metrics: Dict[str, Callable], records: Mapping[str, Record], add: Callable[[str, Callable], None],
                 context: Optional[LoadContext] = None):
        self._metrics, self._records, self._add = metrics, records, add
        self.context = context or _default_context()

    def state_dict(self) -> Dict[str, Any]:
        return {name: self._records.get(f"metric:{name}", (None, None))[0] for name in self._metrics}

    def unrecorded(self) -> Dict[str, str]:
        out = {}
        for name in self._metrics:
            spec, reason = self._records.get(f"metric:{name}", (None, "not recorded"))
            if spec is None:
                out[f"metric:{name}"] = reason or "not recordable"
        return out

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Each recorded metric function (a metric that cannot be restored is told, the others go on)."""
        ctx = self.context
        for name, spec in (state or {}).items():
            if spec is None:
                continue
            try:
                fn = specs.resolve(specs.split(spec)[0], f"metric {name!r}", expected=nn.Module, trusted=ctx.trust)
                self._add(name, fn)
            except specs.UntrustedTarget:
                raise
            except Exception as exc:  # noqa: BLE001 (a renamed function, a module missing here)
                ctx.not_restored_because(f"metric:{name}", _reason(exc))


class Callbacks:
    """The recorded callbacks in order, each ``{"spec": its class and init kwargs, "state": its state_dict}``."""

    def __init__(self, callbacks: List[Callback], add: Callable[[Callback], None],
                 context: Optional[LoadContext] = None):
        self._callbacks, self._add = callbacks, add
        self.context = context or _default_context()

    def _entries(self) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
        entries, unrecorded = [], {}
        for index, cb in enumerate(self._callbacks):
            if not cb.recorded:
                continue
            spec, reason = specs.record(type(cb), cb.init_kwargs)
            reason = cb._init_problem or reason
            state = cb.state_dict()
            problem = specs.plain_problem(state, f"{type(cb).__name__} state")
            if spec is None or reason or problem:
                unrecorded[f"callback[{index}] {type(cb).__name__}"] = reason or problem
                continue
            entries.append({"spec": spec, "state": state})
        return entries, unrecorded

    def state_dict(self) -> List[Dict[str, Any]]:
        return self._entries()[0]

    def unrecorded(self) -> Dict[str, str]:
        return self._entries()[1]

    def load_state_dict(self, entries: Optional[List[Mapping[str, Any]]]) -> None:
        """Each recorded callback rebuilt and given its state; one that cannot be is told, the others go on."""
        ctx = self.context
        for index, entry in enumerate(entries or []):
            try:
                cls, kwargs = ctx.build(entry, "callback", Callback)
                cb = cls(**kwargs)
                if callable(getattr(cb, "confine_paths", None)):  # its recorded paths stay inside the file's directory
                    cb.confine_paths(os.path.dirname(os.path.abspath(ctx.path)))
                cb.load_state_dict(entry.get("state") or {})
                self._add(cb)
            except specs.UntrustedTarget:
                raise
            except Exception as exc:  # noqa: BLE001
                ctx.not_restored_because(f"callback[{index}]", _reason(exc))


class Data:
    """The train/val loaders: each dataset's spec (None when given as an object) and its loader options."""

    def __init__(self, slots: Dict[str, DataSlot], set_loader: Callable[..., None],
                 context: Optional[LoadContext] = None):
        self._slots, self._set_loader = slots, set_loader
        self.context = context or _default_context()

    def _records(self) -> Tuple[Dict[str, Any], Dict[str, str]]:
        data, unrecorded = {}, {}
        for name, slot in self._slots.items():
            if slot.is_set or slot.missing_dataset:
                data[name], reason = slot.record()
                if reason:
                    unrecorded[f"data.{name}"] = reason
        return data, unrecorded

    def state_dict(self) -> Dict[str, Any]:
        return self._records()[0]

    def unrecorded(self) -> Dict[str, str]:
        return self._records()[1]

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Rebuild each recorded dataset under the trust rules with its (bounded) loader options; a dataset
        that cannot be rebuilt here is told and leaves its options for ``set_*_loader`` to reuse."""
        ctx = self.context
        for name, record in (state or {}).items():
            slot = self._slots.get(name)
            if slot is None:
                continue
            options = bounded_loader_options(record.get("options"), f"the {name} loader in {ctx.path}", ctx.warn)
            if record.get("dataset") is not None:
                try:
                    self._set_loader(name, record["dataset"], dict(options), trust=ctx.trust)
                    continue
                except specs.UntrustedTarget:
                    raise
                except Exception as exc:  # a dataset that cannot be rebuilt here must not block inference
                    ctx.not_restored[f"data.{name}"] = str(exc)
                    ctx.warn(f"the {name} dataset recorded in {ctx.path} could not be rebuilt ({exc}); "
                             f"set it again with {how_to_set('data.' + name)}")
            slot = self._slots[name]
            slot.options = dict(options)
            slot.missing_dataset = True


class EmaWeights:
    """The EMA's decay, update count and averaged weights (None without EMA)."""

    def __init__(self, get: Callable[[], Optional[EMA]], put: Callable[[Optional[EMA]], None], module: nn.Module,
                 context: Optional[LoadContext] = None):
        self._get, self._put, self._module = get, put, module
        self.context = context or _default_context()

    def state_dict(self) -> Optional[Dict[str, Any]]:
        ema = self._get()
        return ema.state_dict() if ema is not None else None

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        if state is None:
            return
        ema = ema_for(self._module, state["decay"])
        if state.get(SHARDED_MARK):  # its weights come from the shards (load_sharded)
            self._put(ema)
            return
        try:
            ema.load_state_dict(dict(state))
        except (RuntimeError, KeyError) as exc:  # e.g. model_class= built a model with other parameters
            self._put(None)
            self.context.warn(f"the EMA weights in {self.context.path} do not fit this model and were not restored "
                              f"({' '.join(str(exc).split())}); training starts a new average, or pass skip_ema=True")
            return
        self._put(ema)

    def sharded_state(self) -> Tuple[Optional[Dict[str, Any]], Dict[str, torch.Tensor]]:
        ema = self._get()
        if ema is None:
            return None, {}
        plain, tensors = ema.sharded_state()
        return {**plain, SHARDED_MARK: True}, tensors

    def sharded_targets(self) -> Dict[str, torch.Tensor]:
        ema = self._get()
        return ema.sharded_state()[1] if ema is not None else {}

    def load_sharded(self, tensors: Dict[str, torch.Tensor], plain: Any = None) -> None:
        ema = self._get()
        if ema is not None:
            ema.load_sharded(dict(plain or {}), tensors)


class GradScaler:
    """AMP's loss scale (float16 on CUDA), or None."""

    def __init__(self, get: Callable[[], Optional[torch.amp.GradScaler]], ensure: Callable[[], Optional[torch.amp.GradScaler]]):
        self._get, self._ensure = get, ensure

    def state_dict(self) -> Optional[Dict[str, Any]]:
        scaler = self._get()
        return scaler.state_dict() if scaler is not None else None

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        if state is not None:
            scaler = self._ensure()
            if scaler is not None:  # (a CPU load of a CUDA run's file has no scaler to give it to)
                scaler.load_state_dict(dict(state))


class RandomStreams:
    """Every random stream (torch, CUDA, Python, NumPy), one record per rank."""

    def __init__(self, rank: int = 0):
        self._rank = rank

    def rank_state(self) -> Dict[str, Any]:
        return rng.capture()

    def gathered_state_dict(self, states: List[Any]) -> List[Any]:
        return list(states)

    def state_dict(self) -> List[Any]:
        return [rng.capture()]

    def load_state_dict(self, states: Any) -> None:
        """This rank's streams (a file from fewer ranks restores those below its world size)."""
        if isinstance(states, dict):  # files written before states were kept per rank
            states = [states]
        states = states or []
        if self._rank < len(states):
            rng.restore(states[self._rank])


class Metadata:
    """Plain data about the run (run id, lineage, the run's config), held in a dict the caller owns."""

    def __init__(self, holder: Callable[[], Dict[str, Any]], put: Callable[[Dict[str, Any]], None]):
        self._holder, self._put = holder, put

    def state_dict(self) -> Dict[str, Any]:
        return dict(self._holder())

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        self._put(dict(state or {}))


class ProgressPart:
    """The ``Progress`` part with its partial-epoch sums gathered from every rank (``PerRank``)."""

    def __init__(self, progress: Any, rank: int = 0):
        self._progress, self._rank = progress, rank

    def rank_state(self) -> Any:
        return self._progress.rank_state()

    def gathered_state_dict(self, states: List[Any]) -> Dict[str, Any]:
        return self._progress.state_dict(states)

    def state_dict(self) -> Dict[str, Any]:
        return self._progress.state_dict()

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        self._progress.load_state_dict(dict(state or {}), rank=self._rank)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, specs.SpecError) else f"{type(exc).__name__}: {exc}"
