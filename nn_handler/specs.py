"""How any component becomes recordable: ``{"_target_": "import.path", **kwargs}``.

A checkpoint never pickles a class, a function or an object. Each component is recorded
as the import path of its class (or function) plus the plain-data keyword arguments it
was built with, and rebuilt from that record on load. This module is the only place
that turns objects into such specs and specs back into objects, so the safety rules for
targets read from a file live here too.
"""
from __future__ import annotations

import functools
import importlib
import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

TARGET = "_target_"
Spec = Dict[str, Any]

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


_DEPRECATED_LOSS_ARGS = ("size_average", "reduce")  # folded into ``reduction`` by torch's losses


def builtin_loss_kwargs(loss: Any) -> Optional[Dict[str, Any]]:
    """The constructor kwargs that rebuild ``loss``, one of torch.nn's own losses, exactly; else None.

    Each constructor argument is read back from the attribute of the same name; the result is
    checked by building the loss again and comparing every public attribute. A tensor argument
    (``weight=``, ``pos_weight=``) is not plain data, so such a loss is not recovered.
    """
    import inspect

    import torch
    cls = type(loss)
    if not (isinstance(loss, torch.nn.Module) and cls.__module__ == "torch.nn.modules.loss"):
        return None
    kwargs: Dict[str, Any] = {}
    try:
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in _DEPRECATED_LOSS_ARGS:
                continue
            if not hasattr(loss, name):
                return None
            value = getattr(loss, name)
            if isinstance(value, torch.Tensor) or plain_problem(value, name):
                return None
            if param.default is inspect.Parameter.empty or value != param.default:
                kwargs[name] = value
        rebuilt = cls(**kwargs)
    except Exception:  # noqa: BLE001 (a signature or attribute this check does not understand)
        return None

    def public(module: Any) -> Dict[str, Any]:
        return {k: v for k, v in vars(module).items() if not k.startswith("_")}

    same = public(rebuilt) == public(loss) and all(
        (a is None) == (b is None) and (a is None or (a.shape == b.shape and bool((a == b).all())))
        for a, b in ((dict(rebuilt.named_buffers()).get(n), t) for n, t in loss.named_buffers()))
    return kwargs if same else None


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


# ---------------------------------------------------------------------------- what a file may name
#
# A spec read from a file resolves only objects DEFINED in a trusted module. The check runs on
# the dotted path before anything is imported: only module names that are trusted (or parents of
# trusted ones, which importing them imports anyway) are imported, each by its exact name; the
# attributes after the module are plain public names (a class attribute path), never a module
# object, never ``_private`` or ``__dunder__``; and the object found must itself be defined in a
# trusted module (its ``__module__``), so a trusted module's imports (``torch.nn.functional.torch``,
# ``matplotlib.os``) are never reachable through it.

# Classes a file may name: defined at or below these modules (then checked against the slot's kind).
CLASS_MODULES = ("torch.nn.modules", "torch.optim", "torch.utils.data.dataset",
                 "nn_handler.models", "nn_handler.callbacks", "nn_handler.sde", "nn_handler.sampler",
                 "nn_handler.losses", "nn_handler.metrics", "nn_handler.datasets")
# Functions a file may name: defined in exactly these modules (the ones meant to hold losses,
# metrics and datasets).
FUNCTION_MODULES = ("torch.nn.functional", "nn_handler.losses", "nn_handler.metrics", "nn_handler.datasets")
# Targets moved since older files were written: old path -> new path.
RENAMED = {"nn_handler.training.denoising_score_matching": "nn_handler.losses.denoising_score_matching"}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Trust:
    """What a spec read from a file may name besides the library's own lists.

    ``names``: dotted names the caller vouches for (packages, modules, or single objects such as
    ``mypkg.data.build``): an object is trusted when its defining module, or its full name, is one
    of them or lies below one. ``modules``: modules trusted exactly (not their submodules): the
    recorded model class's own module.
    """

    names: Tuple[str, ...] = ()
    modules: Tuple[str, ...] = ()

    @classmethod
    def of(cls, value: Any) -> "Trust":
        if isinstance(value, Trust):
            return value
        if isinstance(value, str):
            value = (value,)
        names = []
        for name in value or ():
            if not isinstance(name, str) or not all(_IDENTIFIER.match(p) for p in name.split(".")):
                raise SpecError(f"trusted package {name!r} is not a dotted module or object name")
            names.append(name)
        return cls(names=tuple(names))

    def with_modules(self, *modules: str) -> "Trust":
        return Trust(self.names, self.modules + tuple(m for m in modules if m not in self.modules))

    def with_model_module(self, model: Any) -> "Trust":
        """Trust what the model class's own module defines, for the other slots: a user's module,
        never torch's or nn_handler's (their own lists apply) nor the standard library's."""
        module = getattr(model, "__module__", None)
        if not isinstance(module, str) or not all(_IDENTIFIER.match(p) for p in module.split(".")):
            return self
        top = module.split(".", 1)[0]
        if top in ("torch", "nn_handler", "builtins", "__main__") or top in sys.stdlib_module_names:
            return self
        return self.with_modules(module)

    def vouches_for(self, obj: Any) -> bool:
        """Whether the caller's names cover ``obj`` (by its defining module or its full name)."""
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str):
            return False
        full = f"{module}.{getattr(obj, '__qualname__', '')}"
        return any(_at_or_below(module, n) or _at_or_below(full, n) for n in self.names)

    def covers(self, name: str) -> bool:
        """Whether the caller vouches for ``name`` (a module, or an object's full name)."""
        return name in self.modules or any(_at_or_below(name, n) for n in self.names)


class UntrustedTarget(SpecError):
    """A spec read from a file names something it may not: untrusted, or not of the slot's kind.

    ``target`` is the dotted path, ``slot`` the component, ``package`` what to trust to allow it.
    """

    def __init__(self, message: str, target: str, slot: str, package: Optional[str]):
        super().__init__(message)
        self.target, self.slot, self.package = target, slot, package


def _at_or_below(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _importable(module: str, trust: Trust) -> bool:
    """Whether ``module`` may be imported while resolving a file's target (before anything runs)."""
    if any(_at_or_below(module, r) for r in CLASS_MODULES + trust.names):
        return True
    # Exact modules, and the parents of any trusted name (importing a module imports its parents).
    return any(_at_or_below(r, module) for r in CLASS_MODULES + FUNCTION_MODULES + trust.names + trust.modules)


def _trusted_module(module: str, trust: Trust) -> bool:
    return (any(_at_or_below(module, r) for r in CLASS_MODULES) or module in FUNCTION_MODULES
            or trust.covers(module))


def _defined_in_trusted(obj: Any, trust: Trust) -> bool:
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return False
    full = f"{module}.{getattr(obj, '__qualname__', '')}"
    if trust.covers(module) or any(_at_or_below(full, n) for n in trust.names):
        return True
    if isinstance(obj, type):
        return any(_at_or_below(module, r) for r in CLASS_MODULES)
    return module in FUNCTION_MODULES


def _kind_names(kinds: Tuple[type, ...]) -> str:
    names = " or ".join(k.__qualname__ for k in kinds)
    return ("an " if names[:1] in "AEIOU" else "a ") + names


def _kinds(expected: Any) -> Tuple[type, ...]:
    return expected if isinstance(expected, tuple) else ((expected,) if expected is not None else ())


def refusal(path: str, what: str, why: str) -> UntrustedTarget:
    """The UntrustedTarget for ``path`` in slot ``what``, naming the package to trust where one can be."""
    top = path.split(".", 1)[0]
    package = top if _IDENTIFIER.match(top) and top not in ("torch", "nn_handler") \
        and top not in sys.stdlib_module_names else None
    return UntrustedTarget(f"{what}: refusing target {path!r}: {why}", path, what, package)


def resolve(path: str, what: str, *, expected: Any = None, functions: bool = True, from_file: bool = True,
            trusted: Any = ()) -> Any:
    """The object a spec's target names, checked for the slot ``what``.

    ``expected`` (a class or tuple of classes) is the slot's kind: a class must subclass it.
    ``functions``: whether the slot takes a function (a loss, a metric, a dataset or model
    factory); from a file only one defined in a trusted module. From a file, see the rules
    above; from the caller's own code or config (``from_file=False``) any import path works.
    Raises ``UntrustedTarget`` without importing an untrusted module or calling anything.
    """
    kinds = _kinds(expected)
    if not from_file:
        obj = import_object(path)
        if not callable(obj):
            raise SpecError(f"{what}: target {path!r} is not callable")
        return obj
    trust = Trust.of(trusted)
    if not isinstance(path, str) or not path:
        raise refusal(repr(path), what, "not a dotted import path")
    path = RENAMED.get(path, path)
    parts = path.split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise refusal(path, what, "not a dotted import path")
    obj, module_name = None, None
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if any(p.startswith("__") for p in parts[:cut]) or not _importable(candidate, trust):
            continue
        try:
            obj = importlib.import_module(candidate)
        except ModuleNotFoundError as exc:
            if exc.name and _at_or_below(candidate, exc.name):
                continue  # this prefix is not a module: a shorter one may be
            raise SpecError(f"{what}: importing {candidate!r} for {path!r} failed: {exc}") from exc
        except Exception as exc:
            raise SpecError(f"{what}: importing {candidate!r} for {path!r} failed: {exc}") from exc
        module_name = candidate
        break
    if module_name is None:
        raise refusal(path, what, "it is not defined in a trusted module")
    attrs = parts[len(module_name.split(".")):]
    for attr in attrs:
        if attr.startswith("_"):
            raise refusal(path, what, f"{attr!r} is a private name")
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            if not _trusted_module(module_name, trust):  # imported only as a trusted module's parent
                raise refusal(path, what, "it is not defined in a trusted module") from None
            if isinstance(obj, types.ModuleType) and hasattr(obj, "__path__"):  # maybe a submodule not imported
                raise refusal(path, what, f"{obj.__name__}.{attr} is not defined in {obj.__name__!r}") from None
            raise SpecError(f"{what}: cannot import {path!r}: {module_name!r} has no attribute path "
                            f"{'.'.join(attrs)!r}") from None
        if isinstance(obj, types.ModuleType):
            raise refusal(path, what, f"it goes through the module {obj.__name__!r}, not one defined in "
                                      f"{module_name!r}")
    is_class = isinstance(obj, type)
    is_function = isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) or (
        isinstance(obj, types.MethodType) and isinstance(obj.__self__, type))
    if not (is_class or is_function):
        raise refusal(path, what, f"it is a {type(obj).__name__} object, not a class or a function")
    if isinstance(obj, types.FunctionType) and "." in getattr(obj, "__qualname__", ""):
        # A plain function reached through a class is an unbound method (Module.register_forward_hook):
        # never a component.
        raise refusal(path, what, "it is a method of a class, not a class or a function of its own")
    if not _defined_in_trusted(obj, trust):
        raise refusal(path, what, f"it is defined in {getattr(obj, '__module__', None)!r}, not in a trusted module")
    if is_class and kinds and not issubclass(obj, kinds):
        raise refusal(path, what, f"{_kind_names(kinds)} subclass is expected here")
    if is_function and not functions:
        raise refusal(path, what, f"a class is expected here ({_kind_names(kinds)} subclass), "
                                  "not a function")
    return obj


def model_module_trust(path: Any, checkpoint_dir: Any) -> Tuple[str, ...]:
    """The modules a recorded model target may come from when a plain ``NNHandler.load(path)``
    trusts it (every dotted prefix of the target: which one is the module is known only after
    importing; the model's own ``__module__`` is what the other slots then trust).

    So that the documented load keeps working for a user's own model, its module is trusted
    when it is already imported in this process, or when its top-level package is found on the
    import path somewhere other than the working directory and the checkpoint's own directory
    (an installed distribution, a PYTHONPATH entry: places that someone who only hands over a
    file cannot write; never a ``setup.py`` lying next to the user or the file). Never the
    standard library, torch or nn_handler (their own lists apply). Nothing is imported here.
    """
    if not isinstance(path, str):
        return ()
    parts = RENAMED.get(path, path).split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.match(p) and not p.startswith("__") for p in parts):
        return ()
    top = parts[0]
    if top in sys.stdlib_module_names or top in ("builtins", "torch", "nn_handler"):
        return ()
    for cut in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:cut]) in sys.modules:
            return (".".join(parts[:cut]),)
    import importlib.util
    import os
    try:
        found = importlib.util.find_spec(top)  # a top-level name: the finders run, nothing is imported
    except (ImportError, ValueError):
        return ()
    if found is None or not found.has_location or not found.origin:
        return ()
    where = list(found.submodule_search_locations or [])
    entries = {os.path.dirname(os.path.realpath(p)) for p in where} if where else \
        {os.path.dirname(os.path.realpath(found.origin))}
    forbidden = {os.path.realpath(os.getcwd()), os.path.realpath(os.fspath(checkpoint_dir))}
    if entries & forbidden or not entries:
        return ()
    return tuple(".".join(parts[:cut]) for cut in range(1, len(parts)))


def build_from_file(spec: Any, what: str, trusted: Any = (), expected: Any = None, functions: bool = True) -> Any:
    """Build a (possibly nested) spec read from a file: every target checked by ``resolve`` before
    anything is called (the outer one against the slot's kind, nested ones as plain trusted classes
    or functions), no string interpolation (unlike Hydra's ``instantiate``), ``_args_`` and
    ``_partial_`` honoured."""
    trust = Trust.of(trusted)
    if isinstance(spec, Mapping) and TARGET in spec:
        target = resolve(spec[TARGET], what, expected=expected, functions=functions, trusted=trust)
        args = spec.get("_args_", ())
        if not isinstance(args, (list, tuple)):
            raise SpecError(f"{what}: '_args_' of {spec[TARGET]!r} is a {type(args).__name__}, not a list")
        kwargs = {k: build_from_file(v, what, trust) for k, v in spec.items()
                  if k not in (TARGET, "_args_", "_partial_", "_convert_", "_recursive_")}
        positional = [build_from_file(v, what, trust) for v in args]
        if any(not isinstance(k, str) or not _IDENTIFIER.match(k) for k in kwargs):
            raise SpecError(f"{what}: the keyword arguments of {spec[TARGET]!r} are not all names")
        if spec.get("_partial_") is True:
            return functools.partial(target, *positional, **kwargs)
        try:
            return target(*positional, **kwargs)
        except Exception as exc:
            raise SpecError(f"{what}: building {spec[TARGET]!r} failed: {exc}") from exc
    if isinstance(spec, Mapping):
        return {k: build_from_file(v, what, trust) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(build_from_file(v, what, trust) for v in spec)
    return spec


def instantiate(spec: Mapping[str, Any], what: str, *, from_file: bool = True, trusted: Any = (),
                expected: Any = None, functions: bool = True) -> Any:
    """Build an object from a (possibly nested) spec.

    A spec from the user's own code or config goes to Hydra's ``instantiate``; a spec read from
    a file goes to ``build_from_file`` (checked targets, no interpolation).
    """
    path, _ = split(spec)
    if from_file:
        return build_from_file(dict(spec), what, trusted, expected, functions)
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(dict(spec), _convert_="all")
    except Exception as exc:
        raise SpecError(f"{what}: building {path!r} failed: {exc}") from exc
