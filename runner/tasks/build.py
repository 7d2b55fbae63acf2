"""Config -> components: the handler, its model (``ModelChoice``), data, loss, metrics, optimizer, scheduler
and SDE, the load flags and the trust lists a checkpoint is built under."""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf

from nn_handler import NNHandler, specs
from nn_handler.checkpointing import (
    CheckpointError,
    CheckpointFile,
    UnsafeCheckpointError,
    recorded_model_problem,
    resolve_recorded_model,
)
from nn_handler.data import bounded_loader_options
from nn_handler.parts import SKIP_FLAGS

from ..context import RunContext
from ..drift import normalized
from ..errors import RunnerError
from .checkpoints import checkpoint_info, open_checkpoint

log = logging.getLogger("runner")

MAX_SAMPLE_ELEMENTS = 2 ** 28  # n * prod(shape) for a sample shape not given by the user (from a file)


# ---------------------------------------------------------------------------- config nodes
def plain(node: Any) -> Any:
    """A config node as plain data."""
    return specs.to_plain(node)


def import_target(target: Any, key: str) -> Any:
    """The object the config's dotted path ``target`` (at ``key``) imports to."""
    if not isinstance(target, str) or not target:
        raise RunnerError(f"{key} must be a dotted import path, got {target!r}")
    try:
        return specs.import_object(target)
    except specs.SpecError as exc:
        raise RunnerError(f"{key}={target!r} does not import: {exc}") from None


def component(node: Any, key: str) -> Tuple[Any, Dict[str, Any]]:
    """``(class or function, kwargs)`` of a ``_target_`` spec in the config at ``key``."""
    spec = plain(node) or {}
    if specs.TARGET not in spec:
        raise RunnerError(f"{key} needs a {specs.TARGET} (the dotted path of the class) and its kwargs")
    target, kwargs = specs.split(spec)
    return import_target(target, f"{key}.{specs.TARGET}"), kwargs


# ---------------------------------------------------------------------------- the model
def _full_kwargs(cls: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor kwargs with the signature's defaults filled in, for comparing two configs."""
    try:
        bound = inspect.signature(cls).bind_partial(**kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        for name, param in inspect.signature(cls).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}) or {})
        return normalized(values)
    except (TypeError, ValueError):
        return normalized(kwargs)


class ModelChoice:
    """The model a load-based task builds: the recorded one, or the one the config names.

    ``ctx`` (where given) says what the user gave on the command line: a ``model_type`` only the
    config sets (a default) does not replace the recorded one."""

    def __init__(self, cfg: DictConfig, info: Dict[str, Any], path_value: Any, path: str,
                 ctx: Optional[RunContext] = None):
        self.path, self.trusted = path, trusted_packages_of(cfg)
        node = plain(cfg.model) or {}
        recorded = info.get("model")
        self.recorded = recorded
        self.configured = specs.TARGET in node
        if self.configured:
            self.target, self.kwargs = specs.split(node)
            self.cls = import_target(self.target, f"model.{specs.TARGET}")
        else:
            if recorded is None:
                raise RunnerError(_no_recorded_model(info, path_value))
            self.target = recorded["target"]
            # Keys given without a _target_ change the recorded constructor kwargs.
            self.kwargs = {**recorded["kwargs"], **node}
            self.configured = bool(node)
            try:
                self.cls = resolve_recorded_model(self.target, path, self.trusted)
                problem = recorded_model_problem(NNHandler, self.cls, recorded["kwargs"],
                                                 int(info.get("parameters") or 0))
                if problem:
                    raise UnsafeCheckpointError(path, problem)
            except UnsafeCheckpointError:
                raise
            except specs.SpecError as exc:
                raise RunnerError(f"the model recorded in checkpoint.path={path_value} cannot be built here: {exc}; "
                                  f"or give the model with model=...") from None
        recorded_type = recorded.get("model_type") if recorded else None
        # The user's model_type (the command line's; without ``ctx`` the config's), else the recorded one.
        self.given_model_type = cfg.model_type if ctx is None or ctx.given("model_type") else None
        self.model_type = self.given_model_type or recorded_type or cfg.model_type

    def differences(self) -> List[str]:
        """How the configured model differs from the recorded one (class, then each kwarg)."""
        if not self.configured or self.recorded is None:
            return []
        out = []
        if self.target != self.recorded["target"]:
            out.append(f"class: checkpoint {self.recorded['target']} vs config {self.target}")
        mine = _full_kwargs(self.cls, self.kwargs)
        try:
            # The file's target: imported only under the trust rules (never a plain import).
            theirs = _full_kwargs(resolve_recorded_model(self.recorded["target"], self.path, self.trusted),
                                  self.recorded["kwargs"])
        except (specs.SpecError, CheckpointError):
            theirs = normalized(self.recorded["kwargs"])
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<unset>") != theirs.get(key, "<unset>"):
                out.append(f"{key}: checkpoint {theirs.get(key, '<unset>')!r} vs config {mine.get(key, '<unset>')!r}")
        return out


def _no_recorded_model(info: Dict[str, Any], path_value: Any) -> str:
    """What to do about a checkpoint that does not say which model to build."""
    how = ("give the model on the command line: model=NAME (a group of yours with --config-dir DIR) or "
           "model._target_=pkg.module.ClassOrFunction with its kwargs")
    if info.get("kind") == "handler":
        why = ((info.get("unrecorded") or {}).get("model") or "no reason recorded")
        return (f"checkpoint.path={path_value} is a training checkpoint, but its model was not recorded ({why}), so "
                f"it does not say which model to build: {how}, the same model it was trained with")
    return f"checkpoint.path={path_value} holds only model weights (a bare state_dict), so it does not say which " \
           f"model to build: {how}, e.g. model=mlp"


def handler_checkpoint(cfg: DictConfig, ctx: RunContext, needed: str) -> Tuple[CheckpointFile, Dict[str, Any], ModelChoice]:
    """``(opened checkpoint, info, model choice)`` of ``checkpoint.path``, which must hold a whole handler
    (``needed``: why)."""
    ckpt = open_checkpoint(cfg, ctx)
    info = checkpoint_info(ckpt, cfg.checkpoint.path)
    if info["kind"] != "handler":
        raise RunnerError(f"checkpoint.path={cfg.checkpoint.path} holds only model weights, {needed}")
    return ckpt, info, ModelChoice(cfg, info, cfg.checkpoint.path, ckpt.path, ctx)


def new_handler(target: str, kwargs: Dict[str, Any], build: Callable[[], NNHandler]) -> NNHandler:
    """``build()``, with a model that cannot be built from its kwargs told as the user's error."""
    try:
        return build()
    except TypeError as exc:
        raise RunnerError(f"model ({target}) cannot be built with {kwargs}: {exc}") from None


def from_weights(path: Union[str, CheckpointFile], cfg: DictConfig, choice: ModelChoice) -> NNHandler:
    """``NNHandler.initialize_from_checkpoint``: ``choice``'s model with the file's weights, nothing else."""
    return new_handler(choice.target, choice.kwargs, lambda: NNHandler.initialize_from_checkpoint(
        path, choice.cls, model_type=choice.model_type, device=cfg.device, strict_load=bool(cfg.load.strict),
        **choice.kwargs))


def load_handler(path: Any, cfg: DictConfig, choice: ModelChoice, *, configured: bool = True) -> NNHandler:
    """``NNHandler.load`` with the config's load flags: into ``choice``'s model when ``configured``, else the
    recorded one (its recorded model type unless the user gave one)."""
    if not configured:
        return NNHandler.load(path, **load_flags(cfg), model_type=choice.given_model_type)
    return new_handler(choice.target, choice.kwargs, lambda: NNHandler.load(
        path, **load_flags(cfg), model_class=choice.cls, model_kwargs=choice.kwargs, model_type=choice.model_type))


def load_flags(cfg: DictConfig) -> Dict[str, Any]:
    """``NNHandler.load``'s keyword arguments from ``load.*``, ``device`` and ``strategy``."""
    load = cfg.load
    return dict(device=cfg.device, strict_load=bool(load.strict), trusted_packages=trusted_packages_of(cfg),
                strategy=strategy_of(cfg), **{flag: bool(load[flag]) for flag in SKIP_FLAGS})


def strategy_of(cfg: DictConfig) -> Any:
    """``NNHandler``'s ``strategy`` from ``strategy.*``: None for auto (as the checkpoint was, else DDP)."""
    conf = cfg.get("strategy")
    name = str(conf.name) if conf is not None else "auto"
    if name == "auto":
        return None
    if name == "ddp":
        return "ddp"
    if name != "fsdp":
        raise RunnerError(f"strategy={name!r} is not a strategy: choose auto, ddp or fsdp")
    options = OmegaConf.to_container(conf, resolve=True)
    return {k: v for k, v in options.items() if k != "name"} | {"name": "fsdp"}


# ---------------------------------------------------------------------------- handler setup
def _loader_options(cfg: DictConfig, *, val: bool, recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    data = cfg.data
    # (recorded options come from a file: only plain values within bounds, e.g. num_workers <= the CPU count)
    options: Dict[str, Any] = bounded_loader_options(
        recorded, f"the checkpoint's {'val' if val else 'train'} loader options", log.warning)
    if not recorded:
        options.update(batch_size=64, num_workers=0)
    batch = data.val_batch_size if val and data.val_batch_size is not None else data.batch_size
    for key, value in (("batch_size", batch), ("num_workers", data.num_workers), ("pin_memory", data.pin_memory),
                       ("drop_last", None if val else data.drop_last)):
        if value is not None:
            options[key] = value
    options["shuffle"] = not val
    return options


def set_data(h: NNHandler, cfg: DictConfig, info: Optional[Dict[str, Any]], *, require_train: bool) -> None:
    """Loaders from the config's dataset specs; null specs keep the checkpoint's, with changed options if any."""
    recorded = (info or {}).get("data") or {}
    changed_options = any(cfg.data[k] is not None for k in ("batch_size", "val_batch_size", "num_workers",
                                                              "pin_memory", "drop_last"))
    for name, setter in (("train", h.set_train_loader), ("val", h.set_val_loader)):
        spec = plain(cfg.data[name])
        options_recorded = (recorded.get(name) or {}).get("options")
        if spec is None and changed_options and (recorded.get(name) or {}).get("dataset") is not None:
            # Rebuild the recorded dataset with the new loader options: a spec from the file, so
            # built under the file's trust rules (a trusted_packages list), never through Hydra.
            spec, from_file = recorded[name]["dataset"], True
        else:
            from_file = False
        if spec is None:
            continue
        try:
            options = _loader_options(cfg, val=name == "val", recorded=options_recorded)
            if from_file:
                setter(spec, trusted_packages=trusted_packages_of(cfg), **options)
            else:
                setter(spec, **options)
        except specs.UntrustedTarget:
            raise
        except specs.SpecError as exc:
            raise RunnerError(f"data.{name}: {exc}") from None
        except TypeError as exc:
            raise RunnerError(f"data.{name} ({spec.get(specs.TARGET)}): {exc}") from None
    if require_train and h.train_loader is None:
        recorded_train = (recorded.get("train") or {}).get("dataset")
        if isinstance(recorded_train, dict) and recorded_train.get(specs.TARGET):
            raise RunnerError(f"no training data: the checkpoint's training dataset ({recorded_train[specs.TARGET]}) "
                              f"could not be rebuilt here (see the warning above); if it is your own package, make it "
                              f"importable (run from the directory that holds it, or put that directory on "
                              f"PYTHONPATH), or give data=NAME or data.train={{_target_: ...}}")
        raise RunnerError("no training data: give data=NAME (e.g. data=digits) or data.train={_target_: ...}"
                          + (" (the checkpoint does not record a training dataset that can be rebuilt)" if info else ""))


def set_loss(h: NNHandler, cfg: DictConfig) -> None:
    """``loss``: the configured loss (null: the model type's own objective)."""
    if not cfg.loss:  # null: the model type's own objective (score_based + sde: denoising score matching)
        return
    fn, kwargs = component(cfg.loss, "loss")
    try:
        h.set_loss_fn(fn, **kwargs)
    except TypeError as exc:
        raise RunnerError(f"loss ({cfg.loss[specs.TARGET]}): {exc}") from None


def is_generative(h: NNHandler) -> bool:
    """Whether the handler's model samples (score-based or generative) instead of predicting targets."""
    return str(getattr(h.model_type, "value", h.model_type)) in ("score_based", "generative")


def set_metrics(h: NNHandler, cfg: DictConfig) -> None:
    """``metrics.*``: each a function (predictions, targets) -> float; none for a generative model."""
    if is_generative(h):  # metrics compare outputs with targets: a generative model's batches have neither
        return
    for name, target in (plain(cfg.metrics) or {}).items():
        h.add_metric(name, import_target(target, f"metrics.{name}"))


def _apply(setter: Callable[..., None], node: DictConfig, name: str) -> None:
    """``setter(cls, **kwargs)`` for a ``_target_`` node, a bad kwarg told as the user's error."""
    cls, kwargs = component(node, name)
    try:
        setter(cls, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RunnerError(f"{name} ({node[specs.TARGET]}): {exc}") from None


def set_optimizer(h: NNHandler, cfg: DictConfig) -> None:
    """``optimizer``: a fresh optimizer from the config."""
    _apply(h.set_optimizer, cfg.optimizer, "optimizer")


def set_scheduler(h: NNHandler, cfg: DictConfig) -> None:
    """``scheduler``: a fresh scheduler from the config (null: none)."""
    if not cfg.scheduler:
        h.set_scheduler(None)
        return
    _apply(h.set_scheduler, cfg.scheduler, "scheduler")


def set_sde(h: NNHandler, cfg: DictConfig) -> None:
    """``sde``: the diffusion process of a score-based model (null: none set)."""
    if cfg.sde:
        _apply(h.set_sde, cfg.sde, "sde")


def keep_recorded_objective(h: NNHandler, cfg: DictConfig, ctx: RunContext, *, recorded: bool = True) -> None:
    """After a load: the loss and metrics the checkpoint brought back stay, unless the command line names
    others (``loss=...``, ``metrics...``): the config's defaults are not the user's choice. A model that
    needs a loss (not generative) and got none from the file takes the config's; a file that records
    no handler (``recorded=False``: bare weights) takes the config's metrics too."""
    if ctx.given("loss"):
        set_loss(h, cfg)
    elif h.loss_fn is None and not is_generative(h) and cfg.loss:
        if h.rank == 0:
            log.info("the checkpoint brings back no loss: using the config's loss (%s)", plain(cfg.loss).get(specs.TARGET))
        set_loss(h, cfg)
    if ctx.given("metrics") or not recorded:
        set_metrics(h, cfg)


def complete_from_config(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> None:
    """After a load: what the checkpoint did not bring back (or the user set again) comes from the config;
    the recorded loss and metrics stay unless the user names others (``keep_recorded_objective``)."""
    keep_recorded_objective(h, cfg, ctx)
    if h.sde is None or ctx.given("sde"):
        set_sde(h, cfg)
    if h.optimizer is None:
        set_optimizer(h, cfg)
        set_scheduler(h, cfg)
    elif h.scheduler is None and cfg.scheduler:
        set_scheduler(h, cfg)


# ---------------------------------------------------------------------------- one sample's shape
def _checked_shape(shape: Any, n: int, where: str) -> List[int]:
    """A sample shape the user did not give (the model's recorded kwargs, the data's): a short list of
    positive ints whose ``n`` samples hold at most MAX_SAMPLE_ELEMENTS elements, else a RunnerError."""
    dims: Optional[List[int]] = None
    if isinstance(shape, (list, tuple, torch.Size)) and len(shape) <= 8:
        dims = [d for d in shape if isinstance(d, int) and not isinstance(d, bool) and d >= 1]
        dims = dims if len(dims) == len(shape) else None
    if dims is None:
        raise RunnerError(f"sample.shape is needed: {where} gives {str(shape)[:80]}, which is not one sample's "
                          f"shape; give it, e.g. sample.shape=[1,8,8]")
    elements = max(1, n) * math.prod(dims)
    if elements > MAX_SAMPLE_ELEMENTS:
        raise RunnerError(f"sample.shape is needed: {where} gives {dims}, and {n} samples of it would hold "
                          f"{elements} elements (more than {MAX_SAMPLE_ELEMENTS} are not taken from a file); "
                          f"give sample.shape=[...] (and sample.n=...) on the command line")
    return dims


def sample_shape(h: NNHandler, cfg: DictConfig, info: Optional[Dict[str, Any]] = None) -> List[int]:
    """One sample's shape: ``sample.shape``, else the model's ``shape`` kwarg, else the training data's
    (those two only when ``sample.n`` samples of it stay within MAX_SAMPLE_ELEMENTS)."""
    if cfg.sample.shape:
        return [int(d) for d in cfg.sample.shape]
    n = int(cfg.sample.n or 1)
    model = (info or {}).get("model") if isinstance(info, dict) else None
    kwargs = model.get("kwargs") if isinstance(model, dict) else None
    shape = (kwargs.get("shape") if isinstance(kwargs, dict) else None) or getattr(h.module, "shape", None)
    if shape is not None and not isinstance(shape, torch.Tensor) and shape:
        return _checked_shape(shape, n, "the checkpoint's recorded model `shape` kwarg")
    dataset = h.train_loader.dataset if h.train_loader is not None else None
    if dataset is None:
        recorded = (((info or {}).get("data") or {}).get("train") or {}).get("dataset")
        if recorded is not None:
            dataset = specs.instantiate(recorded, "the checkpoint's train dataset", from_file=True,
                                        trusted=trusted_packages_of(cfg))
    if dataset is None:
        raise RunnerError("sample.shape is needed: one sample's shape, e.g. sample.shape=[1,8,8] (the model has no "
                          "`shape` kwarg and no training data is recorded)")
    first = dataset[0]
    x = first[0] if isinstance(first, (list, tuple)) else first
    return _checked_shape(list(getattr(x, "shape", None) or []), n, "the training data's first sample")


# ---------------------------------------------------------------------------- trust
# The runner's own modules whose definitions its presets name (conf/data/digits_images.yaml):
# trusted by defining module, never the whole ``runner`` package.
PRESET_MODULES = ("runner.data",)
_LIBRARY_PACKAGES = ("torch", "nn_handler", "runner")


def _config_targets(cfg: DictConfig) -> List[str]:
    """Every ``_target_`` the config holds (the user's --config-dir groups included) and every metric path."""
    found: List[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            target = node.get(specs.TARGET)
            if isinstance(target, str) and target:
                found.append(target)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    tree = OmegaConf.to_container(cfg, resolve=False)
    walk(tree)
    found.extend(v for v in (tree.get("metrics") or {}).values() if isinstance(v, str))
    return found


def _defined_as(target: str) -> Optional[Any]:
    """The object a config's target imports to (the user's own config: importing it is theirs to ask)."""
    try:
        return specs.import_object(target)
    except specs.SpecError:
        return None


def trusted_packages_of(cfg: DictConfig) -> List[str]:
    """What a checkpoint may name besides the library's own lists: exactly the targets this config
    names (each also under the name it is defined by), the runner's preset modules, and
    ``load.trusted_packages``."""
    found = set(PRESET_MODULES) | {str(name) for name in cfg.load.trusted_packages or ()}
    for target in _config_targets(cfg):
        found.add(target)
        obj = _defined_as(target)
        path = specs.import_path_of(obj)[0] if obj is not None else None
        if path:
            found.add(path)
    return sorted(found)


def trust_to_carry(cfg: DictConfig) -> List[str]:
    """The modules of the user's own targets (not torch's, nn_handler's or the runner's) and
    ``load.trusted_packages``: what a later command on this run's checkpoint must trust, since it
    builds them from the file instead of from this config."""
    modules = {str(name) for name in cfg.load.trusted_packages or ()}
    for target in _config_targets(cfg):
        obj = _defined_as(target)
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module.split(".", 1)[0] not in _LIBRARY_PACKAGES:
            modules.add(module)
    return sorted(modules)
