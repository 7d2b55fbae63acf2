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
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is None:  # never imported: nothing here can be one of its containers (and
        return value       # importing it would add ~0.2 s to every load)
    DictConfig, ListConfig, OmegaConf = omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.OmegaConf
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


# What a checkpoint may name besides a class of the component's own kind (an nn.Module model,
# an Optimizer, a Callback, ...): classes and functions from these modules, and anything in
# a trusted package (the model's own top-level package and those the caller names).
_CLASS_MODULES = ("torch.nn", "torch.optim", "torch.utils.data", "nn_handler.sde", "nn_handler.sampler",
                  "nn_handler.models", "nn_handler.callbacks")
_FUNCTION_MODULES = ("torch.nn.functional", "nn_handler.metrics", "nn_handler.datasets", "nn_handler.training")
_NEVER_TRUSTED = ("torch", "nn_handler")  # too wide as a whole: only the lists above


class UntrustedTarget(SpecError):
    """A spec read from a file names a callable outside the trusted classes, functions and packages."""


def _within(path: str, modules: Tuple[str, ...]) -> bool:
    return any(path.startswith(m + ".") for m in modules)


def resolve(path: str, what: str, *, expected: Any = None, from_file: bool = True,
            trusted: Tuple[str, ...] = ()) -> Any:
    """Import the target of a spec and check its kind; from a file, only what may be trusted.

    ``expected`` (a class or a tuple of classes) is what the component must be; without it
    any callable will do. A target read from a file must be a class of the expected kind, or
    a class (torch's and nn_handler's only from the modules listed above), or a function from
    the modules listed above or from one of the ``trusted`` top-level packages. Functions are
    what an attacker needs (``torch.utils.collect_env.run(command)``, say); anything else
    raises UntrustedTarget without being called.
    """
    if from_file:
        check_target_allowed(path, what)
    obj = import_object(path)
    kinds = expected if isinstance(expected, tuple) else ((expected,) if expected is not None else ())
    if kinds and isinstance(obj, type) and issubclass(obj, kinds):
        return obj
    if from_file:
        top = path.split(".", 1)[0]
        if isinstance(obj, type):  # a class: torch's and ours only from the listed modules, others freely
            allowed = _within(path, _CLASS_MODULES) if top in _NEVER_TRUSTED else True
        else:  # a function: only the listed modules, or a package the caller trusts
            allowed = _within(path, _FUNCTION_MODULES) or (top in trusted and top not in _NEVER_TRUSTED)
        if not allowed:
            kind = f"a {' or '.join(k.__qualname__ for k in kinds)} subclass, " if kinds else ""
            raise UntrustedTarget(
                f"{what}: not building {path!r} from a checkpoint: it is not {kind}nor a trusted class or "
                f"function, and {top!r} is not a trusted package (pass trusted_packages=[{top!r}] to "
                f"NNHandler.load if you trust it)")
    if not callable(obj):
        raise SpecError(f"{what}: target {path!r} is not callable")
    return obj


def build_from_file(spec: Any, what: str, trusted: Tuple[str, ...] = (), expected: Any = None) -> Any:
    """Build a (possibly nested) spec read from a file: every target checked by ``resolve``, no
    string interpolation (unlike Hydra's ``instantiate``), ``_args_`` and ``_partial_`` honoured."""
    if isinstance(spec, Mapping) and TARGET in spec:
        target = resolve(str(spec[TARGET]), what, expected=expected, trusted=trusted)
        kwargs = {k: build_from_file(v, what, trusted) for k, v in spec.items()
                  if k not in (TARGET, "_args_", "_partial_", "_convert_", "_recursive_")}
        args = [build_from_file(v, what, trusted) for v in spec.get("_args_", ())]
        if spec.get("_partial_"):
            import functools
            return functools.partial(target, *args, **kwargs)
        try:
            return target(*args, **kwargs)
        except Exception as exc:
            raise SpecError(f"{what}: building {spec[TARGET]!r} failed: {exc}") from exc
    if isinstance(spec, Mapping):
        return {k: build_from_file(v, what, trusted) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(build_from_file(v, what, trusted) for v in spec)
    return spec


def instantiate(spec: Mapping[str, Any], what: str, *, from_file: bool = True, trusted: Tuple[str, ...] = (),
                expected: Any = None) -> Any:
    """Build an object from a (possibly nested) spec.

    A spec from the user's own code or config goes to Hydra's ``instantiate``; a spec read from
    a file goes to ``build_from_file`` (checked targets, no interpolation).
    """
    path, _ = split(spec)
    if from_file:
        return build_from_file(dict(spec), what, trusted, expected)
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(dict(spec), _convert_="all")
    except Exception as exc:
        raise SpecError(f"{what}: building {path!r} failed: {exc}") from exc
