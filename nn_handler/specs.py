"""How any component becomes recordable: ``{"_target_": "import.path", **kwargs}``.

A checkpoint never pickles a class, a function or an object. Each component is recorded
as the import path of its class (or function) plus the plain-data keyword arguments it
was built with, and rebuilt from that record on load. This module is the only place
that turns objects into such specs and specs back into objects, so the safety rules for
targets read from a file live here too.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

TARGET = "_target_"
Spec = Dict[str, Any]

# Targets that a spec read from a file may never name: they execute code from, or
# deserialise objects out of, something other than the spec itself.
_DENIED_PREFIXES = (
    "torch.load", "torch.hub", "torch.jit", "torch.package", "torch.serialization",
    "torch.utils.cpp_extension", "torch._C", "torch.ops", "torch.compile",
    "numpy.load", "numpy.lib", "pandas.read_pickle", "joblib", "dill", "cloudpickle",
    "nn_handler.checkpointing",
)


class SpecError(ValueError):
    """A spec cannot be recorded, resolved or built. The message names the component."""


def plain_problem(value: Any, where: str) -> Optional[str]:
    """Why ``value`` is not plain data that ``torch.load(weights_only=True)`` reads, or None."""
    # Exact types: a str or int subclass (an enum, torch's TorchVersion) pickles as its class.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, (torch.Tensor, torch.dtype)):
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = plain_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"{where} has a key of type {type(key).__name__}"
            problem = plain_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__}, not plain data"


def to_plain(value: Any) -> Any:
    """OmegaConf containers (from a Hydra config) become plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    return value


def import_path_of(obj: Any) -> Tuple[Optional[str], Optional[str]]:
    """The dotted path that imports back to ``obj``, or ``(None, reason)``."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None or qualname is None:
        return None, f"{obj!r} has no importable name"
    if "<lambda>" in qualname:
        return None, f"{module}.{qualname} is a lambda"
    if "<locals>" in qualname:
        return None, f"{module}.{qualname} is defined inside a function"
    if module == "__main__":
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if main_spec is None or not main_spec.name or main_spec.name == "__main__":
            return None, f"{qualname} is defined in the __main__ script; move it into an importable module"
        module = main_spec.name
    path = f"{module}.{qualname}"
    try:
        found = import_object(path)
    except SpecError as exc:
        return None, str(exc)
    # A script run as ``python -m pkg.mod`` imports back as a second copy of its module.
    same_copy = obj.__module__ == "__main__" and getattr(found, "__qualname__", None) == qualname
    if found is not obj and not same_copy:
        return None, f"{path} does not import back to the same object"
    return path, None


def record(target: Any, kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[Optional[Spec], Optional[str]]:
    """Record ``target(**kwargs)`` as a spec: ``(spec, None)`` or ``(None, reason)``."""
    path, reason = import_path_of(target)
    if path is None:
        return None, reason
    plain = to_plain(dict(kwargs or {}))
    problem = plain_problem(plain, "kwargs")
    if problem:
        return None, problem
    return {TARGET: path, **plain}, None


def split(spec: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(target path, kwargs)`` of a spec."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get(TARGET), str):
        raise SpecError(f"not a spec (a mapping with a string {TARGET!r}): {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != TARGET}
    return spec[TARGET], kwargs


def import_object(path: str) -> Any:
    """Import ``pkg.mod.Name[.Attr...]``: the longest importable module prefix, then attributes."""
    if not isinstance(path, str) or not path or path.startswith(".") or ".." in path:
        raise SpecError(f"invalid import path {path!r}")
    parts = path.split(".")
    error: Optional[BaseException] = None
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this prefix is not a module" moves on; a missing dependency inside
            # the module is the user's real error.
            if exc.name and not module_name.startswith(exc.name) and exc.name != module_name:
                raise SpecError(f"importing {module_name!r} for {path!r} failed: {exc}") from exc
            error = exc
            continue
        except Exception as exc:
            raise SpecError(f"importing {module_name!r} for {path!r} failed: {exc}") from exc
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError as exc:
                raise SpecError(f"cannot import {path!r}: {module_name!r} has no attribute path "
                                f"{'.'.join(parts[cut:])!r}") from exc
        return obj
    raise SpecError(f"cannot import {path!r}: no module found ({error})")


def check_target_allowed(path: str, what: str) -> None:
    """Refuse targets that a file must never make us call (standard library, loaders)."""
    top = path.split(".", 1)[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise SpecError(f"{what}: refusing target {path!r} read from a checkpoint: "
                        "standard-library callables are never built from a file")
    for prefix in _DENIED_PREFIXES:
        if path == prefix or path.startswith(prefix + "."):
            raise SpecError(f"{what}: refusing target {path!r} read from a checkpoint: it loads or runs code")


def resolve(path: str, what: str, *, expected: Optional[type] = None, from_file: bool = True) -> Any:
    """Import the target of a spec, with the safety rules for files, and check its kind."""
    if from_file:
        check_target_allowed(path, what)
    obj = import_object(path)
    if expected is not None and not (isinstance(obj, type) and issubclass(obj, expected)):
        raise SpecError(f"{what}: target {path!r} is not a subclass of "
                        f"{expected.__module__}.{expected.__qualname__}")
    if expected is None and not callable(obj):
        raise SpecError(f"{what}: target {path!r} is not callable")
    return obj


def _check_nested(value: Any, what: str) -> None:
    if isinstance(value, Mapping):
        if TARGET in value:
            check_target_allowed(str(value[TARGET]), what)
        for item in value.values():
            _check_nested(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_nested(item, what)


def instantiate(spec: Mapping[str, Any], what: str, *, from_file: bool = True) -> Any:
    """Build an object from a (possibly nested) spec with Hydra's ``instantiate``.

    Every ``_target_`` inside is checked first when the spec comes from a file.
    """
    path, _ = split(spec)
    if from_file:
        _check_nested(dict(spec), what)
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(dict(spec), _convert_="all")
    except Exception as exc:
        raise SpecError(f"{what}: building {path!r} failed: {exc}") from exc
