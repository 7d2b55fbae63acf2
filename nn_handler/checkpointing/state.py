"""Handler -> plain dict (``dump``) and plain dict -> handler (``restore``), with the skip flags."""
from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .. import __version__, rng, specs
from ..callbacks.base import Callback
from ..data import bounded_loader_options
from ..ema import EMA
from ..enums import coerce_model_type
from ..handler import prebuilt_module
from ..training import TrainSettings
from . import format as F
from .errors import IncompatibleCheckpointError, UnsafeCheckpointError
from .fastload import build_module_from_weights
from .store import lineage_for

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

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

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def how_to_set(component: str) -> str:
    if component.startswith("metric:"):
        return f"h.add_metric({component.split(':', 1)[1]!r}, fn)"
    if component.startswith("callback"):
        return "h.add_callback(YourCallback(...))"
    return HOW_TO_SET.get(component, "its setter")


def canonical_state_dict(state_dict: Dict[str, Any], reference: Optional[Any] = None) -> Dict[str, Any]:
    """Model weights without DDP (``module.``) or torch.compile (``_orig_mod.``) prefixes.

    The one place where prefixes from other tools are tolerated; files written here never have them.
    With ``reference`` (the keys of the model being loaded), a prefix that the model's own keys
    carry too (a model whose only child is called ``module``) is removed only when that makes
    more of the keys match.
    """
    state_dict = dict(state_dict)
    own = None if reference is None else set(reference)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if not (state_dict and all(k.startswith(prefix) for k in state_dict)):
                continue
            if own is not None and any(k.startswith(prefix) for k in own):
                stripped = {k[len(prefix):] for k in state_dict}
                if len(stripped & own) <= len(set(state_dict) & own):
                    continue
            consume_prefix_in_state_dict_if_present(state_dict, prefix)
            changed = True
    return state_dict


def load_model_weights(module: nn.Module, state_dict: Dict[str, Any], strict: bool, path: str,
                       warn) -> None:
    """``module.load_state_dict`` with errors that name keys and shapes, and a warning when not strict."""
    if not isinstance(state_dict, dict):
        raise IncompatibleCheckpointError(path, f"the model weights are a {type(state_dict).__name__}, not a state_dict")
    from ..handler import _unwrap
    module = _unwrap(module)
    own = module.state_dict()
    state_dict = canonical_state_dict(state_dict, own)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        raise IncompatibleCheckpointError(path, "shape mismatch in the model weights: " + "; ".join(mismatched))
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise IncompatibleCheckpointError(
            path, f"model weights do not match the model (strict_load=True): missing keys {missing}, "
                  f"unexpected keys {unexpected}; pass strict_load=False to load what matches")
    module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        warn(f"non-strict load from {path}: missing keys {missing} (left as initialised), "
             f"unexpected keys {unexpected} (ignored)")


# ---------------------------------------------------------------------------- dump
def _component(h: "NNHandler", name: str, state: Any = None) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    spec, reason = h._records.get(name, (None, None))
    if spec is None:
        return None, reason or f"{name} was not recorded"
    entry: Dict[str, Any] = {"spec": spec}
    if state is not None:
        problem = specs.plain_problem(state, f"{name} state")
        if problem:
            return None, problem
        entry["state"] = state
    return entry, None


def dump(h: "NNHandler", per_rank: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The whole handler as tensors and plain containers, readable with ``weights_only=True``.

    ``per_rank`` holds every rank's ``rank_state(h)``, in rank order (this process's alone by default).
    """
    per_rank = per_rank if per_rank is not None else [rank_state(h)]
    from ..handler import _unwrap
    unrecorded: Dict[str, str] = {}

    def put(name: str, live: Any, state: Any = None) -> Optional[Dict[str, Any]]:
        if live is None:
            return None
        entry, reason = _component(h, name, state)
        if entry is None:
            unrecorded[name] = reason or "not recordable"
        return entry

    model_spec, model_reason = h._records["model"]
    if model_spec is None:
        unrecorded["model"] = model_reason or "not recordable"
    metrics: Dict[str, Any] = {}
    for name in h._metrics:
        spec, reason = h._records.get(f"metric:{name}", (None, "not recorded"))
        metrics[name] = spec
        if spec is None:
            unrecorded[f"metric:{name}"] = reason or "not recordable"
    callbacks: List[Dict[str, Any]] = []
    for index, cb in enumerate(h._callbacks):
        if not cb.recorded:
            continue
        spec, reason = specs.record(type(cb), cb.init_kwargs)
        reason = cb._init_problem or reason
        state = cb.state_dict()
        problem = specs.plain_problem(state, f"{type(cb).__name__} state")
        if spec is None or reason or problem:
            unrecorded[f"callback[{index}] {type(cb).__name__}"] = reason or problem
            continue
        callbacks.append({"spec": spec, "state": state})
    data: Dict[str, Any] = {}
    for name, slot in h._data.items():
        if slot.is_set or slot.missing_dataset:
            data[name], reason = slot.record()
            if reason:
                unrecorded[f"data.{name}"] = reason
    sde, sampler = h._sde, h._sampler
    return {
        F.FORMAT: F.FORMAT_NAME,
        F.VERSION: F.FORMAT_VERSION,
        F.VERSIONS: {"nn_handler": str(__version__), "torch": str(torch.__version__)},
        F.CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        F.WORLD_SIZE: h.world_size,
        F.MODEL: {"spec": model_spec, "model_type": str(h.model_type)},
        F.MODEL_STATE: dict(_unwrap(h.module).state_dict()),  # the user's own keys, never stripped
        F.OPTIMIZER: put("optimizer", h._optimizer, h._optimizer.state_dict() if h._optimizer else None),
        F.SCHEDULER: put("scheduler", h._scheduler, h._scheduler.state_dict() if h._scheduler else None),
        F.GRAD_SCALER: h._grad_scaler.state_dict() if h._grad_scaler is not None else None,
        F.LOSS: put("loss_fn", h._loss_fn),
        F.METRICS: metrics,
        F.HISTORY: h._history.state_dict(),
        F.CALLBACKS: callbacks,
        F.SDE: put("sde", sde, sde.state_dict() if hasattr(sde, "state_dict") else None),
        F.SAMPLER: put("sampler", sampler, sampler.state_dict() if hasattr(sampler, "state_dict") else None),
        F.EMA: h._ema.state_dict() if h._ema is not None else None,
        F.SETTINGS: h._settings.to_dict(),
        F.PROGRESS: _progress(h, per_rank),
        F.DATA: data,
        F.RNG: [r["rng"] for r in per_rank],  # one per rank
        F.UNRECORDED: unrecorded,
        F.METADATA: dict(h.metadata),
    }


def rank_state(h: "NNHandler") -> Dict[str, Any]:
    """What each rank contributes to a checkpoint: its random streams and its share of a partial epoch."""
    position = h._position
    return {"rng": rng.capture(),
            "partial": position.sums.state_dict() if position is not None and position.step > 0 else None}


def _progress(h: "NNHandler", per_rank: List[Dict[str, Any]]) -> Dict[str, Any]:
    progress = {"epoch": h.epoch, "global_step": h.global_step, "data_seed": h._data_seed}
    position = h._position
    if position is not None and position.step > 0:
        # Saved inside an epoch (after an optimizer step): resuming goes on with the next batch.
        progress["position"] = {"epoch": position.epoch, "step_in_epoch": position.step,
                                "partial": [r["partial"] for r in per_rank]}
    return progress


# ---------------------------------------------------------------------------- restore
_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _sde_or_sampler_base(key: str) -> type:
    if key == F.SDE:
        from ..sde import SDE
        return SDE
    from ..sampler import Sampler
    return Sampler

def _build(entry: Dict[str, Any], what: str, expected: Any = None, trusted: Any = (),
           functions: bool = False) -> Tuple[Any, Dict[str, Any]]:
    """The class (or function) a recorded component names, checked against what a file may name."""
    target, kwargs = specs.split(entry["spec"])
    return specs.resolve(target, what, expected=expected, functions=functions, trusted=trusted), kwargs


def unsafe(path: str, exc: "specs.UntrustedTarget", skip_flag: Optional[str] = None) -> UnsafeCheckpointError:
    """The refusal of a target a file names, with how to allow it when the user trusts the file."""
    how = []
    if exc.package:
        how.append(f"pass trusted_packages=[{exc.package!r}] to NNHandler.load")
    if skip_flag:
        how.append(f"pass {skip_flag}=True to leave it out")
    hint = f" (if you trust this file: {', or '.join(how)})" if how else ""
    error = UnsafeCheckpointError(path, f"{exc}{hint}")
    error.target, error.slot, error.package, error.skip_flag = exc.target, exc.slot, exc.package, skip_flag
    error.refusal = str(exc)
    return error


def recorded_model_problem(handler_class: type, model_class: Any, kwargs: Dict[str, Any],
                           weight_elements: int) -> Optional[str]:
    """Why a model built from a file's spec (class and kwargs) must not be built, or None.

    The kwargs go to the model only: a name the handler itself takes (``logger_mode``,
    ``use_distributed``) is never one a save recorded. And a model whose weights the file does
    not hold (so it is built for real) may not need far more than the file's weights: a small
    file cannot make load allocate gigabytes through a recorded ``width=8192``.
    """
    import inspect as _inspect
    own = {n for n, p in _inspect.signature(handler_class.__init__).parameters.items()
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    clash = sorted(set(kwargs) & own)
    if clash:
        return f"the recorded model kwargs {clash} are {handler_class.__name__}'s own parameters, never recorded"
    try:
        with torch.device("meta"):
            module = model_class(**kwargs)
    except Exception:
        return None  # the real build reports its own error
    if not isinstance(module, nn.Module):
        return None
    need = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))
    if need > 2 * weight_elements + (16 << 20):
        return (f"the recorded model {model_class.__qualname__}({kwargs}) has {need:,} weight elements, far more "
                f"than the {weight_elements:,} the file holds; pass model_class= and its kwargs if you mean it")
    return None


def _elements(weights: Any) -> int:
    return sum(v.numel() for v in (weights or {}).values()
               if isinstance(v, torch.Tensor) and v.layout == torch.strided)


def resolve_recorded_model(target: str, path: str, trusted_packages: Any = ()) -> Any:
    """The model class (or trusted factory) a checkpoint at ``path`` records as ``target``, under
    ``load``'s trust rules; ``UnsafeCheckpointError`` when they refuse it. Nothing is built."""
    return _model_class({"spec": {specs.TARGET: target}}, os.fspath(path), specs.Trust.of(trusted_packages))[0]


def _model_class(entry: Dict[str, Any], path: str, trust: "specs.Trust") -> Tuple[Any, Dict[str, Any]]:
    """The recorded model class (or a factory the caller trusts), checked before anything is built."""
    target, kwargs = specs.split(entry["spec"])
    try:
        found = specs.resolve(target, "model", expected=nn.Module, functions=True, trusted=trust)
        if not isinstance(found, type) and not trust.vouches_for(found):
            # A factory is called before it can be checked: only one the caller names.
            raise specs.refusal(target, "model", "a function as the model is built only when the caller trusts it")
        return found, kwargs
    except specs.UntrustedTarget as exc:
        own = specs.model_module_trust(target, os.path.dirname(os.path.abspath(path)))
        if not own:
            raise unsafe(path, exc) from None
        # The model's own (installed or already imported) module: its nn.Module classes only.
        try:
            return specs.resolve(target, "model", expected=nn.Module, functions=False,
                                 trusted=trust.with_modules(*own)), kwargs
        except specs.UntrustedTarget as again:
            raise unsafe(path, again) from None


def restore(handler_class: type, state: Dict[str, Any], path: str, device: Any, strict_load: bool,
            skip_optimizer: bool, skip_scheduler: bool, skip_history: bool, skip_callbacks: bool,
            skip_sampler_sde: bool, skip_ema: bool, model_class: Any = None,
            model_kwargs: Optional[Dict[str, Any]] = None, model_type: Any = None,
            trusted_packages: Any = ()) -> "NNHandler":
    """A handler built from ``state`` (already verified and migrated).

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
                path, f"the model class was not recorded in this checkpoint "
                      f"({unrecorded.get('model', 'unknown reason')}): load its weights with {HOW_TO_SET['model']}")
        try:
            model_class, recorded_kwargs = _model_class(model_entry, path, trust)
        except specs.SpecError as exc:
            raise IncompatibleCheckpointError(path, f"cannot rebuild the model: {exc}") from None
        if model_kwargs is None:  # the file's kwargs: to the model only, within a size bound
            model_kwargs = recorded_kwargs
            problem = recorded_model_problem(handler_class, model_class, model_kwargs,
                                             _elements(state[F.MODEL_STATE]))
            if problem:
                raise UnsafeCheckpointError(path, problem)
    module = build_module_from_weights(model_class, model_kwargs or {}, state[F.MODEL_STATE], torch.device(device))
    with prebuilt_module(module):
        h = handler_class(model_class, device=device,
                          model_type=coerce_model_type(model_type or model_entry.get("model_type")),
                          **(model_kwargs or {}))
    if module is None:
        load_model_weights(h.module, state[F.MODEL_STATE], strict_load, path, h._warn)
    skipped = set()
    # The model class's own module (the caller's, or the recorded one that resolved) is trusted
    # for the other slots too: what is defined in that module, not what it imports.
    trusted = trust.with_model_module(model_class)

    def attempt(component: str, fn, skip_flag: Optional[str] = None) -> None:
        """Restore one component; a refused target raises, another failure is told (naming it and
        the file), never swallowed silently."""
        try:
            fn()
        except specs.UntrustedTarget as exc:
            raise unsafe(path, exc, skip_flag) from None
        except Exception as exc:  # a renamed argument, a module missing here, a state that does not fit
            reason = str(exc) if isinstance(exc, specs.SpecError) else f"{type(exc).__name__}: {exc}"
            h._not_restored[component] = reason
            h._warn(f"{component} from {path} was not restored: {reason}; set it again with {how_to_set(component)}")

    if state.get(F.LOSS):
        def set_loss():
            fn, kwargs = _build(state[F.LOSS], "loss_fn", nn.Module, trusted, functions=True)
            h.set_loss_fn(fn, **kwargs)
        attempt("loss_fn", set_loss)
    for name, spec in (state.get(F.METRICS) or {}).items():
        if spec is not None:
            attempt(f"metric:{name}", lambda name=name, spec=spec: h.add_metric(name, specs.resolve(
                specs.split(spec)[0], f"metric {name!r}", expected=nn.Module, trusted=trusted)))

    for name, record in (state.get(F.DATA) or {}).items():
        slot = h._data.get(name)
        if slot is None:
            continue
        options = bounded_loader_options(record.get("options"), f"the {name} loader in {path}", h._warn)
        if record.get("dataset") is not None:
            try:
                h._set_loader(name, record["dataset"], dict(options), from_file=True,
                              trusted=trusted)
                continue
            except specs.UntrustedTarget as exc:
                raise unsafe(path, exc) from None
            except Exception as exc:  # a dataset that cannot be rebuilt here must not block inference
                h._not_restored[f"data.{name}"] = str(exc)
                h._warn(f"the {name} dataset recorded in {path} could not be rebuilt ({exc}); "
                        f"set it again with {how_to_set('data.' + name)}")
        slot.options = dict(options)
        slot.missing_dataset = True

    if skip_optimizer:
        skipped.update({"optimizer"})
    elif state.get(F.OPTIMIZER):
        def set_optimizer():
            cls, kwargs = _build(state[F.OPTIMIZER], "optimizer", torch.optim.Optimizer, trusted)
            h.set_optimizer(cls, **kwargs)
            try:
                h.optimizer.load_state_dict(state[F.OPTIMIZER]["state"])
            except (ValueError, KeyError) as exc:  # e.g. model_class= built a model with other parameters
                h._optimizer = None
                h._records.pop("optimizer", None)
                raise specs.SpecError(f"its saved state does not fit this model's parameters ({exc})") from exc
            if state.get(F.GRAD_SCALER) is not None:
                h._grad_scaler_for(True)
                if h._grad_scaler is not None:
                    h._grad_scaler.load_state_dict(state[F.GRAD_SCALER])
        attempt("optimizer", set_optimizer, "skip_optimizer")

    if skip_scheduler:
        skipped.add("scheduler")
    elif state.get(F.SCHEDULER):
        if h.optimizer is None:
            h._not_restored["scheduler"] = "the optimizer was not restored, and a scheduler needs one"
            h._warn(f"the scheduler in {path} was not restored because the optimizer was not "
                    f"(skip_optimizer=True or not recorded); set both again, the scheduler with "
                    f"{how_to_set('scheduler')}, or pass skip_scheduler=True to silence this")
        else:
            def set_scheduler():
                cls, kwargs = _build(state[F.SCHEDULER], "scheduler", _SCHEDULERS, trusted)
                h.set_scheduler(cls, **kwargs)
                h.scheduler.load_state_dict(state[F.SCHEDULER]["state"])
            attempt("scheduler", set_scheduler, "skip_scheduler")

    if not skip_history and h._dist.is_main:
        h._history.load_state_dict(state.get(F.HISTORY) or {})

    if skip_callbacks:
        skipped.add("callback")
    else:
        for index, entry in enumerate(state.get(F.CALLBACKS) or []):
            def add_callback(entry=entry):
                cls, kwargs = _build(entry, "callback", Callback, trusted)
                cb = cls(**kwargs)
                if callable(getattr(cb, "confine_paths", None)):  # its recorded paths stay inside the file's directory
                    cb.confine_paths(os.path.dirname(os.path.abspath(path)))
                cb.load_state_dict(entry.get("state") or {})
                h.add_callback(cb)
            attempt(f"callback[{index}]", add_callback, "skip_callbacks")

    if skip_sampler_sde:
        skipped.update({"sde", "sampler"})
    else:
        for key, setter in ((F.SDE, h.set_sde), (F.SAMPLER, h.set_sampler)):
            entry = state.get(key)
            if entry:
                def set_component(entry=entry, setter=setter, key=key):
                    cls, kwargs = _build(entry, key, _sde_or_sampler_base(key), trusted)
                    setter(cls, **kwargs)
                    live = h.sde if key == F.SDE else h.sampler
                    if "state" in entry and hasattr(live, "load_state_dict"):
                        live.load_state_dict(entry["state"])
                attempt(key, set_component, "skip_sampler_sde")

    settings = TrainSettings.from_dict(state.get(F.SETTINGS) or {})
    if skip_ema:
        settings.ema_decay = None
    elif state.get(F.EMA) is not None:
        ema_state = state[F.EMA]
        h._ema = EMA(h.module, ema_state["decay"])
        try:
            h._ema.load_state_dict(ema_state)
        except (RuntimeError, KeyError) as exc:  # e.g. model_class= built a model with other parameters
            h._ema = None
            h._warn(f"the EMA weights in {path} do not fit this model and were not restored "
                    f"({' '.join(str(exc).split())}); training starts a new average (decay "
                    f"{settings.ema_decay}), or pass skip_ema=True")
    h._settings = settings

    h.metadata = dict(state.get(F.METADATA) or {})
    progress = state.get(F.PROGRESS) or {}
    h.epoch = int(progress.get("epoch", 0))
    h.global_step = int(progress.get("global_step", 0))
    h._data_seed = progress.get("data_seed")
    position = progress.get("position")
    if position:
        partials = position.get("partial") or []
        mine = partials[h.rank] if h.rank < len(partials) else None
        h._resume_position = {"epoch": int(position["epoch"]), "step_in_epoch": int(position["step_in_epoch"]),
                              "partial": mine or {"total": torch.zeros((), dtype=torch.float64), "count": 0,
                                                  "metrics": {}}}
    h.metadata["lineage"] = lineage_for(path, (state.get(F.METADATA) or {}).get("lineage"))

    for component, reason in unrecorded.items():
        if component == "model" or any(component.startswith(s) for s in skipped):
            continue
        h._not_restored[component] = f"not recorded when {path} was saved: {reason}"
        h._warn(f"{component} was not recorded in {path} ({reason}); set it again with {how_to_set(component)}")

    saved_world = int(state.get(F.WORLD_SIZE) or 1)
    if saved_world != h.world_size:
        h._warn(f"{path} was saved by {saved_world} process(es) and is loaded by {h.world_size}: training goes on, "
                f"but the data order differs from the original run and random states are restored only for "
                f"ranks below {min(saved_world, h.world_size)}")
    rng_states = state.get(F.RNG) or []
    if isinstance(rng_states, dict):  # files written before states were kept per rank
        rng_states = [rng_states]
    if h.rank < len(rng_states):
        rng.restore(rng_states[h.rank])  # last: building the components above draws random numbers
    return h
