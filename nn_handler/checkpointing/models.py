"""The recorded model: canonical weight keys, loading weights with errors that name keys and shapes,
and the trust rules for the model class a file names (checked before anything is built)."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .. import specs
from ..modules import unwrap
from .errors import IncompatibleCheckpointError, UnsafeCheckpointError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    module = unwrap(module)
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


def weight_elements(weights: Any) -> int:
    """The elements of a state_dict's dense tensors (what building the model for real may be measured against)."""
    return sum(v.numel() for v in (weights or {}).values()
               if isinstance(v, torch.Tensor) and v.layout == torch.strided)


def resolve_recorded_model(target: str, path: str, trusted_packages: Any = ()) -> Any:
    """The model class (or trusted factory) a checkpoint at ``path`` records as ``target``, under
    ``load``'s trust rules; ``UnsafeCheckpointError`` when they refuse it. Nothing is built."""
    return recorded_model_class({"spec": {specs.TARGET: target}}, os.fspath(path), specs.Trust.of(trusted_packages))[0]


def _function_refusal(target: str, found: Any) -> "specs.UntrustedTarget":
    """The refusal of a recorded model factory nobody vouched for, naming what to trust."""
    module = getattr(found, "__module__", None) or target.rsplit(".", 1)[0]
    return specs.refusal(target, "model", f"it is a function returning the model, and a function a file names is "
                                          f"called only when the caller trusts it by name ({module!r} or its package)")


def _import_refusal(target: str, trust: "specs.Trust") -> Optional[str]:
    """Why a target the caller vouches for was still refused: it does not import here (or None)."""
    if not trust.covers(target):
        return None
    module = target.rsplit(".", 1)[0]
    import importlib.util
    try:
        importable = importlib.util.find_spec(module.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        importable = False
    if importable:
        return None
    return (f"model: {target!r} is trusted but {module.split('.', 1)[0]!r} does not import here: make its package "
            f"importable (run from the directory that holds it, or put that directory on PYTHONPATH)")


def recorded_model_class(entry: Dict[str, Any], path: str, trust: "specs.Trust") -> Tuple[Any, Dict[str, Any]]:
    """The recorded model class (or a factory function the caller trusts by name), checked before anything
    is built. A factory is called before its result can be checked, so only one the caller vouches for
    (``trusted_packages=``) is returned; the model's own module alone makes only its classes buildable."""
    target, kwargs = specs.split(entry["spec"])
    try:
        found = specs.resolve(target, "model", expected=nn.Module, functions=True, trusted=trust)
        if not isinstance(found, type) and not trust.vouches_for(found):
            raise _function_refusal(target, found)
        return found, kwargs
    except specs.UntrustedTarget as exc:
        not_importable = _import_refusal(target, trust)
        if not_importable:
            raise specs.SpecError(not_importable) from None
        own = specs.model_module_trust(target, os.path.dirname(os.path.abspath(path)))
        if not own:
            raise unsafe(path, exc) from None
        # The model's own (installed or already imported) module: its nn.Module classes only.
        try:
            found = specs.resolve(target, "model", expected=nn.Module, functions=True, trusted=trust.with_modules(*own))
        except specs.UntrustedTarget as again:
            raise unsafe(path, again) from None
        if not isinstance(found, type):
            raise unsafe(path, _function_refusal(target, found)) from None
        return found, kwargs


# ---------------------------------------------------------------------------- a class no file can name
# What a file records of a model class it cannot name (one defined in a ``__main__`` script): its
# ``name`` and, when plain, its ``kwargs``. Both come from a file: the name is shown only when it
# looks like a class name, and the kwargs are reused only as bounded JSON-like data.
_MAX_NAME = 200
_MAX_KWARG_ITEMS = 1_000  # entries per list or dict
_MAX_KWARG_NODES = 10_000  # values in all
_MAX_KWARG_DEPTH = 8
_MAX_KWARG_TEXT = 10_000  # characters per string


def recorded_model_name(entry: Any) -> Optional[str]:
    """The class name a file records for a model it could not name, if it looks like one (``Outer.Inner``)."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
        return None
    return name if all(part.isidentifier() for part in name.split(".")) else None


def _json_like_problem(value: Any, where: str, depth: int, count: list) -> Optional[str]:
    count[0] += 1
    if count[0] > _MAX_KWARG_NODES:
        return f"{where}: more than {_MAX_KWARG_NODES} values in all"
    if value is None or type(value) in (bool, float):
        return None
    if type(value) is int:
        return None if -(1 << 63) <= value < (1 << 63) else f"{where}: an integer out of the 64-bit range"
    if type(value) is str:
        return None if len(value) <= _MAX_KWARG_TEXT else f"{where}: a string of {len(value)} characters"
    if isinstance(value, (list, tuple, dict)):
        if depth >= _MAX_KWARG_DEPTH:
            return f"{where}: nested deeper than {_MAX_KWARG_DEPTH} levels"
        if len(value) > _MAX_KWARG_ITEMS:
            return f"{where}: {len(value)} entries (at most {_MAX_KWARG_ITEMS})"
        if type(value) is dict:
            for key, item in value.items():
                if type(key) is not str or len(key) > _MAX_NAME:
                    return f"{where}: a key that is not a short string"
                if key == specs.TARGET:
                    return f"{where}: a {specs.TARGET!r} (a component to build is never rebuilt from these kwargs)"
                problem = _json_like_problem(item, f"{where}[{key!r}]", depth + 1, count)
                if problem:
                    return problem
            return None
        if type(value) in (list, tuple):
            for i, item in enumerate(value):
                problem = _json_like_problem(item, f"{where}[{i}]", depth + 1, count)
                if problem:
                    return problem
            return None
    return f"{where}: a {type(value).__name__}, not JSON-like data"


def recorded_unnamed_kwargs(entry: Any, model_class: Any, path: str) -> Dict[str, Any]:
    """The kwargs a file records for a class it could not name, to build ``model_class`` with when the
    caller passed none: ``{}`` unless the recorded name is ``model_class``'s. Kwargs that are not
    bounded JSON-like data raise IncompatibleCheckpointError naming ``model.kwargs``."""
    name = recorded_model_name(entry)
    if name is None or name != getattr(model_class, "__qualname__", None) or "kwargs" not in entry:
        return {}
    kwargs = entry["kwargs"]
    if type(kwargs) is not dict:
        problem = f"a {type(kwargs).__name__}, not a mapping"
    else:
        problem = _json_like_problem(kwargs, "model.kwargs", 0, [0])
    if problem:
        raise IncompatibleCheckpointError(
            path, f"the recorded model.kwargs of {name} are not plain data ({problem[:300]}); pass "
                  f"model_kwargs={{...}} to build {name} with your own")
    return dict(kwargs)


def unnamed_model_message(entry: Any, reason: str, load_call: str = "NNHandler.load(path",
                          does: str = "restores the whole training state") -> str:
    """What ``load`` says of a file whose model class was not recorded: exactly which ``model_class`` to pass."""
    name = recorded_model_name(entry)
    shown = name or "YourModel"
    kwargs = entry.get("kwargs") if isinstance(entry, dict) and name else None
    if type(kwargs) is dict and kwargs and _json_like_problem(kwargs, "model.kwargs", 0, [0]) is None:
        text = repr(kwargs)
        text = text if len(text) <= 300 else text[:300] + "..."
        how_kwargs = f" (its recorded kwargs {text} are reused unless you pass model_kwargs=)"
    elif name:
        how_kwargs = " (and model_kwargs={...} if it takes arguments)"
    else:
        how_kwargs = ", model_kwargs={...}"
    where = f"define {shown} where you load (the same class as when it was saved) and " if name else ""
    return (f"the model class{' ' + name if name else ''} was not recorded in this checkpoint ({reason}): "
            f"{where}pass model_class={shown}: {load_call}, model_class={shown}) {does}{how_kwargs}")
