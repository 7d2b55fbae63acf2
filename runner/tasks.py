"""The four tasks as load policies over NNHandler: what to build, what to restore, then train or predict.

- train:    a fresh handler from the config.
- resume:   ``NNHandler.load`` with the load flags; the model must be the recorded one.
- finetune: ``NNHandler.load`` into the configured (or recorded) model; optimizer and
            scheduler from the config (the task skips the saved ones by default).
- infer:    ``NNHandler.initialize_from_checkpoint``; predictions and, with targets, metrics.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nn_handler import NNHandler, rng, specs
from nn_handler.checkpointing import (
    CheckpointError,
    UnsafeCheckpointError,
    read_info,
    recorded_model_problem,
    resolve_recorded_model,
)
from nn_handler.checkpointing import diff as diff_checkpoints
from nn_handler.checkpointing import inspect as inspect_checkpoint
from nn_handler.checkpointing.io import safe_load
from nn_handler.checkpointing.store import CheckpointStore, NoCheckpointFound, find_latest
from nn_handler.data import bounded_loader_options
from nn_handler.distributed import env_topology
from nn_handler.training import Preempted

from . import drift, inspection, reporting
from .callbacks import EpochProgressBar
from .errors import RunnerError
from .launch import RunContext

log = logging.getLogger("runner")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pth"
PREDICTIONS_FILE = "predictions.pt"
SAMPLES_FILE = "samples.pt"
SAMPLES_PNG = "samples.png"
SAMPLES_DIR = "samples"


# ---------------------------------------------------------------------------- errors
@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The library's errors about the user's inputs become one-line RunnerErrors."""
    try:
        yield
    except RunnerError:
        raise
    except UnsafeCheckpointError as exc:
        refusal = getattr(exc, "refusal", None)
        if refusal is None:
            raise RunnerError(f"cannot use the checkpoint: {exc}") from exc
        raise RunnerError(f"cannot use the checkpoint {exc.path}: {refusal}{_trust_hint(exc)}") from exc
    except specs.UntrustedTarget as exc:
        raise RunnerError(f"{exc}{_trust_hint(exc)}") from exc
    except CheckpointError as exc:
        raise RunnerError(f"cannot use the checkpoint: {exc}") from exc
    except specs.SpecError as exc:
        raise RunnerError(str(exc)) from exc
    except OSError as exc:  # a missing file, a full disk or a permission error during a save: the
        raise RunnerError(str(exc)) from exc  # library's message names the path and what is intact


def _trust_hint(exc: Any) -> str:
    """How to allow a refused target from the command line, when the user trusts the file."""
    how = []
    if getattr(exc, "package", None):
        how.append(f"add load.trusted_packages=[{exc.package}]")
    if getattr(exc, "skip_flag", None):
        how.append(f"add load.{exc.skip_flag}=true to leave it out")
    return f" (if you trust this file: {', or '.join(how)})" if how else ""


def run(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    task = TASKS.get(str(cfg.task))
    if task is None:
        raise RunnerError(f"task={cfg.task!r} is not a task: choose one of {', '.join(TASKS)}")
    with user_errors():
        if bool(cfg.auto_resume) and str(cfg.task) in TRAINING_TASKS:
            found = _own_checkpoint(ctx)
            if found is not None:
                return continue_run(cfg, ctx, found)
        return task(cfg, ctx)


# ---------------------------------------------------------------------------- config -> components
def _plain(node: Any) -> Any:
    return specs.to_plain(node)


def _import(target: Any, key: str) -> Any:
    if not isinstance(target, str) or not target:
        raise RunnerError(f"{key} must be a dotted import path, got {target!r}")
    try:
        return specs.import_object(target)
    except specs.SpecError as exc:
        raise RunnerError(f"{key}={target!r} does not import: {exc}") from None


def _component(node: Any, key: str) -> Tuple[Any, Dict[str, Any]]:
    """``(class or function, kwargs)`` of a ``_target_`` spec in the config at ``key``."""
    spec = _plain(node) or {}
    if specs.TARGET not in spec:
        raise RunnerError(f"{key} needs a {specs.TARGET} (the dotted path of the class) and its kwargs")
    target, kwargs = specs.split(spec)
    return _import(target, f"{key}.{specs.TARGET}"), kwargs


def checkpoint_path(cfg: DictConfig, ctx: RunContext) -> str:
    """``checkpoint.path`` resolved against the launch directory; a directory means its last checkpoint."""
    value = cfg.checkpoint.path
    if value in (None, ""):
        raise RunnerError(f"task={cfg.task} needs checkpoint.path=FILE: the checkpoint to load, e.g. "
                          f"checkpoint.path=outputs/<date>/<time>/{CHECKPOINT_DIR}/{LAST} (a run directory works too)")
    return resolve_checkpoint(value, "checkpoint.path", ctx)


def resolve_checkpoint(value: Any, key: str, ctx: RunContext) -> str:
    """The file that the config's ``key=value`` names, relative to the launch directory; a directory
    means the newest complete, verified checkpoint inside it (searched recursively, ordered by the
    training progress the files record; damaged or partial files are skipped with a warning)."""
    path = os.path.normpath(os.path.join(ctx.launch_dir, os.path.expanduser(str(value))))
    if os.path.isdir(path):
        return newest_checkpoint(path, f"{key}={value}")
    if not os.path.exists(path):
        raise RunnerError(f"{key}={value}: no such file {path}"
                          + ("" if os.path.isabs(str(value)) else f" (relative paths start at {ctx.launch_dir})"))
    return path


def newest_checkpoint(directory: str, what: str) -> str:
    """``find_latest(directory)``; each file it skips is named in a warning (rank 0), none is a RunnerError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = find_latest(directory)
        except NoCheckpointFound:
            found = None
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipping")]
    if env_topology().rank == 0:
        for message in skipped:
            log.warning("%s", message)
    if found is None:
        raise RunnerError(f"{what}: no complete, verified checkpoint in the directory {directory} "
                          f"(searched recursively{'; skipped: ' + '; '.join(skipped) if skipped else ''})")
    if skipped and env_topology().rank == 0:
        log.warning("using %s", found)
    return str(found)


def _own_checkpoint(ctx: RunContext) -> Optional[str]:
    """auto_resume: the newest valid checkpoint in this run's ``checkpoints/``, or None."""
    directory = os.path.join(ctx.output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(directory) or not any(f.endswith((".pth", ".pt", ".ckpt")) for f in os.listdir(directory)):
        return None
    try:
        return newest_checkpoint(directory, "auto_resume")
    except RunnerError as exc:
        if env_topology().rank == 0:
            log.warning("auto_resume: %s; starting afresh", exc)
        return None


def _info(path: str, value: Any) -> Dict[str, Any]:
    try:
        return read_info(path)
    except CheckpointError as exc:
        raise RunnerError(f"checkpoint.path={value}: {exc}") from None


def _normalized(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    return value


def _full_kwargs(cls: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor kwargs with the signature's defaults filled in, for comparing two configs."""
    try:
        bound = inspect.signature(cls).bind_partial(**kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        for name, param in inspect.signature(cls).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}) or {})
        return _normalized(values)
    except (TypeError, ValueError):
        return _normalized(kwargs)


class ModelChoice:
    """The model a load-based task builds: the recorded one, or the one the config names."""

    def __init__(self, cfg: DictConfig, info: Dict[str, Any], path_value: Any, path: str):
        self.path, self.trusted = path, _trusted_packages(cfg)
        node = _plain(cfg.model) or {}
        recorded = info.get("model")
        self.recorded = recorded
        self.configured = specs.TARGET in node
        if self.configured:
            self.target, self.kwargs = specs.split(node)
            self.cls = _import(self.target, f"model.{specs.TARGET}")
        else:
            if recorded is None:
                raise RunnerError(f"checkpoint.path={path_value} holds only model weights (a bare state_dict), so it "
                                  f"does not say which model to build: give it, e.g. model=mlp or "
                                  f"model._target_=pkg.module.Class with its kwargs")
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
                                  f"give the model with model=...") from None
        recorded_type = recorded.get("model_type") if recorded else None
        self.model_type = cfg.model_type or recorded_type

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
            theirs = _normalized(self.recorded["kwargs"])
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<unset>") != theirs.get(key, "<unset>"):
                out.append(f"{key}: checkpoint {theirs.get(key, '<unset>')!r} vs config {mine.get(key, '<unset>')!r}")
        return out


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


def _set_data(h: NNHandler, cfg: DictConfig, info: Optional[Dict[str, Any]], *, require_train: bool) -> None:
    """Loaders from the config's dataset specs; null specs keep the checkpoint's, with changed options if any."""
    recorded = (info or {}).get("data") or {}
    changed_options = any(cfg.data[k] is not None for k in ("batch_size", "val_batch_size", "num_workers",
                                                              "pin_memory", "drop_last"))
    for name, setter in (("train", h.set_train_loader), ("val", h.set_val_loader)):
        spec = _plain(cfg.data[name])
        options_recorded = (recorded.get(name) or {}).get("options")
        if spec is None and changed_options and (recorded.get(name) or {}).get("dataset") is not None:
            # Rebuild the recorded dataset with the new loader options: a spec from the file, so
            # built under the file's trust rules, never through Hydra.
            spec, from_file = recorded[name]["dataset"], True
        else:
            from_file = False
        if spec is None:
            continue
        try:
            options = _loader_options(cfg, val=name == "val", recorded=options_recorded)
            if from_file:
                h._set_loader(name, spec, options, from_file=True, trusted=_trusted_packages(cfg))
            else:
                setter(spec, **options)
        except specs.UntrustedTarget:
            raise
        except specs.SpecError as exc:
            raise RunnerError(f"data.{name}: {exc}") from None
        except TypeError as exc:
            raise RunnerError(f"data.{name} ({spec.get(specs.TARGET)}): {exc}") from None
    if require_train and h.train_loader is None:
        raise RunnerError("no training data: give data=NAME (e.g. data=digits) or data.train={_target_: ...}"
                          + (" (the checkpoint does not record a training dataset that can be rebuilt)" if info else ""))


def _set_loss(h: NNHandler, cfg: DictConfig) -> None:
    if not cfg.loss:  # null: the model type's own objective (score_based + sde: denoising score matching)
        return
    fn, kwargs = _component(cfg.loss, "loss")
    try:
        h.set_loss_fn(fn, **kwargs)
    except TypeError as exc:
        raise RunnerError(f"loss ({cfg.loss[specs.TARGET]}): {exc}") from None


def _generative(h: NNHandler) -> bool:
    return str(getattr(h.model_type, "value", h.model_type)) in ("score_based", "generative")


def _set_metrics(h: NNHandler, cfg: DictConfig) -> None:
    if _generative(h):  # metrics compare outputs with targets: a generative model's batches have neither
        return
    for name, target in (_plain(cfg.metrics) or {}).items():
        h.add_metric(name, _import(target, f"metrics.{name}"))


def _apply(setter: Callable[..., None], node: DictConfig, name: str) -> None:
    """``setter(cls, **kwargs)`` for a ``_target_`` node, a bad kwarg told as the user's error."""
    cls, kwargs = _component(node, name)
    try:
        setter(cls, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RunnerError(f"{name} ({node[specs.TARGET]}): {exc}") from None


def _set_optimizer(h: NNHandler, cfg: DictConfig) -> None:
    _apply(h.set_optimizer, cfg.optimizer, "optimizer")


def _set_scheduler(h: NNHandler, cfg: DictConfig) -> None:
    if not cfg.scheduler:
        h.set_scheduler(None)
        return
    _apply(h.set_scheduler, cfg.scheduler, "scheduler")


def _set_sde(h: NNHandler, cfg: DictConfig) -> None:
    if cfg.sde:
        _apply(h.set_sde, cfg.sde, "sde")


def _new_handler(target: str, kwargs: Dict[str, Any], build: Callable[[], NNHandler]) -> NNHandler:
    """``build()``, with a model that cannot be built from its kwargs told as the user's error."""
    try:
        return build()
    except TypeError as exc:
        raise RunnerError(f"model ({target}) cannot be built with {kwargs}: {exc}") from None


def _load(path: Any, cfg: DictConfig, choice: Optional["ModelChoice"] = None) -> NNHandler:
    """``NNHandler.load`` with the config's load flags: into ``choice``'s model when given, else the recorded one."""
    if choice is None:
        return NNHandler.load(path, **_load_flags(cfg), model_type=cfg.model_type)
    return _new_handler(choice.target, choice.kwargs, lambda: NNHandler.load(
        path, **_load_flags(cfg), model_class=choice.cls, model_kwargs=choice.kwargs, model_type=choice.model_type))


def _load_flags(cfg: DictConfig) -> Dict[str, Any]:
    load = cfg.load
    return dict(device=cfg.device, strict_load=bool(load.strict), skip_optimizer=bool(load.skip_optimizer),
                skip_scheduler=bool(load.skip_scheduler), skip_history=bool(load.skip_history),
                skip_callbacks=bool(load.skip_callbacks), skip_sampler_sde=bool(load.skip_sampler_sde),
                skip_ema=bool(load.skip_ema), trusted_packages=_trusted_packages(cfg))


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


def _trusted_packages(cfg: DictConfig) -> List[str]:
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


def _complete_from_config(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> None:
    """After a load: what the checkpoint did not bring back (or the user set again) comes from the config."""
    if h.loss_fn is None or ctx.given("loss"):
        _set_loss(h, cfg)
    if h.sde is None or ctx.given("sde"):
        _set_sde(h, cfg)
    _set_metrics(h, cfg)
    if h.optimizer is None:
        _set_optimizer(h, cfg)
        _set_scheduler(h, cfg)
    elif h.scheduler is None and cfg.scheduler:
        _set_scheduler(h, cfg)



# ---------------------------------------------------------------------------- run config, lineage, drift
def run_config_of(cfg: DictConfig) -> Dict[str, Any]:
    """The fully resolved run config as plain data (the task function's cfg holds no hydra node)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    return specs.to_plain(container)


def stored_metadata(path: str) -> Dict[str, Any]:
    """The ``metadata`` a checkpoint holds (run config, lineage), read memory-mapped: no tensor data."""
    try:
        obj = safe_load(path, map_location="cpu", mmap=True)
    except CheckpointError:
        return {}
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def _world_size() -> int:
    topology = env_topology()
    return int(topology.world_size) if topology.enabled else 1


class Drift:
    """The config of a load-based run against the run config stored in its checkpoint."""

    def __init__(self, cfg: DictConfig, ctx: RunContext, path: str, info: Dict[str, Any], choice: "ModelChoice"):
        task = str(cfg.task)
        self.previous: Dict[str, Any] = stored_metadata(path).get("run_config") or {}
        current = run_config_of(cfg)
        # What this run takes from the checkpoint instead of the config (null = "as recorded").
        if task == "resume":
            for key in ("optimizer", "scheduler"):
                if not (ctx.given(key) or cfg.load[f"skip_{key}"]):
                    current[key] = None
        if info.get("loss_fn") and not ctx.given("loss"):
            current["loss"] = None
        keep = ["seed"] + (["optimizer", "scheduler"] if task == "finetune" else [])
        # What this run's checkpoints store: the config it actually ran with.
        # (a checkpoint without a run config still records its optimizer, scheduler and loss specs)
        recorded = {"optimizer": info.get("optimizer"), "scheduler": info.get("scheduler"), "loss": info.get("loss_fn")}
        self.effective = drift.inherit(current, {**recorded, **self.previous}, keep=keep)
        self.effective["model"] = {specs.TARGET: choice.target, **_normalized(choice.kwargs)}
        stored = dict(self.previous)
        if stored:
            stored["world_size"] = info.get("world_size")
        self.differences = drift.classify(stored, {**current, "world_size": _world_size()}, task)
        self.task = task

    def report(self, model_differences: List[str], allow: bool) -> None:
        """Log harmless ones, warn risky ones in one table; refuse fatal ones unless ``allow``."""
        harmless = drift.by_level(self.differences, drift.HARMLESS)
        risky = drift.by_level(self.differences, drift.RISKY)
        fatal = drift.by_level(self.differences, drift.FATAL)
        # The model's differences from the recorded one (defaults of the constructor filled in), named
        # as config keys, then any other fatal difference from the stored run config.
        fatal_lines = [("model class" + line[len("class"):]) if line.startswith("class:") else f"model.{line}"
                       for line in model_differences]
        named = {line.split(":", 1)[0] for line in fatal_lines}
        fatal_lines += [f"{d.key}: checkpoint {d.stored!r} vs config {d.current!r}" for d in fatal
                        if d.key not in named and not (d.key == "model._target_" and "model class" in named)]
        rank0 = env_topology().rank == 0
        if not self.previous and rank0:
            log.info("the checkpoint records no run config (not written by the runner): only the model is compared")
        if harmless and rank0:
            log.info("config drift from the checkpoint (harmless): %s", drift.one_line(harmless))
        if risky and rank0:
            log.warning("config drift from the checkpoint: %d risky difference(s); the run goes on\n%s",
                        len(risky), drift.table(risky))
        if not fatal_lines:
            return
        if not allow:
            raise RunnerError(f"task={self.task} needs the architecture of the checkpoint, but the configured model "
                              f"differs: " + "; ".join(fatal_lines) + ". Drop model=... to use the recorded one, use "
                              "task=finetune, or set resume.allow_drift=true to go on anyway")
        if rank0:
            log.warning("config drift from the checkpoint: the model differs (resume.allow_drift=true, going on): %s",
                        "; ".join(fatal_lines))


def _apply_resume_overrides(h: NNHandler, cfg: DictConfig, ctx: RunContext, info: Dict[str, Any]) -> None:
    """``optimizer.*`` / ``scheduler.*`` given to a resume take effect on the restored components."""
    if ctx.given("optimizer") and not cfg.load.skip_optimizer and h.optimizer is not None:
        cls, kwargs = _component(cfg.optimizer, "optimizer")
        if type(h.optimizer) is not cls:
            log.warning("optimizer changed to %s: it starts with a fresh state", cfg.optimizer[specs.TARGET])
            _set_optimizer(h, cfg)
        else:
            recorded = specs.split(info["optimizer"])[1] if info.get("optimizer") else {}
            changed = {k: v for k, v in kwargs.items() if _normalized(recorded.get(k, drift.UNSET)) != _normalized(v)}
            if changed:
                optimizer_state = h.optimizer.state_dict()
                scheduler_state = h.scheduler.state_dict() if h.scheduler is not None else None
                try:
                    h.set_optimizer(cls, **{**recorded, **kwargs})
                except (TypeError, ValueError) as exc:
                    raise RunnerError(f"optimizer ({cfg.optimizer[specs.TARGET]}): {exc}") from None
                h.optimizer.load_state_dict(optimizer_state)  # moments and step counts continue
                for group in h.optimizer.param_groups:
                    for key, value in changed.items():
                        if key in group:
                            group[key] = tuple(value) if isinstance(value, list) else value
                    if "lr" in changed and "initial_lr" in group:
                        group["initial_lr"] = changed["lr"]
                if scheduler_state is not None and h.scheduler is not None:
                    h.scheduler.load_state_dict(scheduler_state)
                    if "lr" in changed and hasattr(h.scheduler, "base_lrs"):
                        h.scheduler.base_lrs = [changed["lr"]] * len(h.optimizer.param_groups)
                log.info("resume: optimizer state restored, with %s from the config", kwargs_text(changed))
    if ctx.given("scheduler") and not cfg.load.skip_scheduler and h.optimizer is not None:
        log.info("resume: scheduler from the config (its schedule starts afresh)")
        _set_scheduler(h, cfg)


def kwargs_text(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


# ---------------------------------------------------------------------------- training
def _store(cfg: DictConfig, directory: str) -> CheckpointStore:
    save = cfg.save
    try:
        return CheckpointStore(directory, keep_last=save.keep_last, keep_best=save.keep_best, monitor=save.monitor,
                               mode=str(save.mode))
    except ValueError as exc:
        raise RunnerError(f"save: {exc}") from None


def _every(cfg: DictConfig) -> Tuple[Optional[int], Optional[int]]:
    """``(every_n_steps, every_n_epochs)`` of ``save.*`` (``checkpoint.save_every``: the old name of the second)."""
    steps, epochs = cfg.save.every_n_steps, cfg.save.every_n_epochs
    for key, value in (("save.every_n_steps", steps), ("save.every_n_epochs", epochs)):
        if value is not None and int(value) < 0:
            raise RunnerError(f"{key} must be >= 0 (0 or null: off), got {value}")
    if not epochs and cfg.checkpoint.save_every:
        if env_topology().rank == 0:
            log.warning("checkpoint.save_every is deprecated: use save.every_n_epochs")
        epochs = cfg.checkpoint.save_every
    return (int(steps) if steps else None), (int(epochs) if epochs else None)


MAX_SAMPLE_ELEMENTS = 2 ** 28  # n * prod(shape) for a sample shape not given by the user (from a file)
MAX_RECORDED_STEPS = 100_000  # sample.steps / corrector_steps taken from a checkpoint's run config


def _checked_shape(shape: Any, n: int, where: str) -> List[int]:
    """A sample shape the user did not give (the model's recorded kwargs, the data's): a short list of
    positive ints whose ``n`` samples hold at most MAX_SAMPLE_ELEMENTS elements, else a RunnerError."""
    import math

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


def _sample_shape(h: NNHandler, cfg: DictConfig, info: Optional[Dict[str, Any]] = None) -> List[int]:
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
                                        trusted=_trusted_packages(cfg))
    if dataset is None:
        raise RunnerError("sample.shape is needed: one sample's shape, e.g. sample.shape=[1,8,8] (the model has no "
                          "`shape` kwarg and no training data is recorded)")
    first = dataset[0]
    x = first[0] if isinstance(first, (list, tuple)) else first
    return _checked_shape(list(getattr(x, "shape", None) or []), n, "the training data's first sample")


def _sample_grid(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> Optional[Any]:
    """``sample.every_n_epochs``: a SampleGrid writing into this run's ``samples/`` (a restored one is moved here)."""
    every = int(cfg.sample.every_n_epochs or 0)
    if every <= 0 or not _generative(h):
        return None
    from nn_handler.callbacks import SampleGrid

    directory = os.path.join(ctx.output_dir, SAMPLES_DIR)
    for cb in h.callbacks:
        if isinstance(cb, SampleGrid):
            cb.dirpath = directory
            if isinstance(getattr(cb, "_init_kwargs", None), dict) and "dirpath" in cb._init_kwargs:
                cb._init_kwargs["dirpath"] = directory
            return cb
    value_range = list(cfg.sample.value_range) if cfg.sample.value_range else None
    grid = SampleGrid(_sample_shape(h, cfg), every_n_epochs=every, n=int(cfg.sample.n), steps=int(cfg.sample.steps),
                      corrector_steps=int(cfg.sample.corrector_steps), seed=cfg.sample.seed, dirpath=directory,
                      value_range=value_range)
    h.add_callback(grid)
    return grid


def _fit(h: NNHandler, cfg: DictConfig, ctx: RunContext, checkpoint_read: Optional[str],
         run_config: Optional[Dict[str, Any]] = None, epochs: Optional[int] = None,
         seed: Any = "config") -> Dict[str, Any]:
    t = cfg.train
    epochs = int(t.epochs) if epochs is None else int(epochs)
    seed = cfg.seed if seed == "config" else seed
    # Every checkpoint this run writes (last.pth, periodic ones, a callback's) records the resolved
    # run config (the handler itself records the lineage: run id and parent file) and the epoch
    # the run trains up to (auto_resume of a requeued resume/finetune continues to it).
    h.metadata["run_config"] = run_config if run_config is not None else run_config_of(cfg)
    h.metadata["runner"] = {"task": str(cfg.task), "target_epoch": h.epoch + epochs}
    ckpt_dir = os.path.join(ctx.output_dir, CHECKPOINT_DIR)
    store = _store(cfg, ckpt_dir)
    every_n_steps, every_n_epochs = _every(cfg)
    last = os.path.join(ckpt_dir, LAST)
    # Without periodic saves (and nothing of the store's here yet) the final checkpoint is a plain
    # last.pth; otherwise it goes through the store too and last.pth links to the newest file.
    # (Decided before training, from what every rank sees alike.)
    through_store = bool(every_n_steps or every_n_epochs) or os.path.islink(last) or (
        os.path.isdir(ckpt_dir) and any(f.startswith("ckpt-") for f in os.listdir(ckpt_dir)))
    for cb in h.callbacks:  # a restored callback's recorded paths (ModelCheckpoint's) stay inside this run
        if callable(getattr(cb, "confine_paths", None)):
            cb.confine_paths(ctx.output_dir, fallback=ckpt_dir)
    h.add_callback(EpochProgressBar(epochs, enabled=bool(t.progress_bar)))
    grid = _sample_grid(h, cfg, ctx)
    log.info("%s: %s on %s, world size %d, from epoch %d, %d epoch(s)", cfg.task, type(h.module).__name__,
             h.device, h.world_size, h.epoch, epochs)
    try:
        h.train(epochs, validate_every=t.validate_every, gradient_accumulation_steps=t.gradient_accumulation_steps,
                use_amp=t.use_amp, gradient_clipping_norm=t.gradient_clipping_norm, ema_decay=t.ema_decay,
                seed=seed, progress_bar=False, checkpoint_dir=store, save_every_n_steps=every_n_steps,
                save_every_n_epochs=every_n_epochs, handle_signals=True)
    except Preempted as exc:
        record = reporting.training_metrics(h, str(cfg.task), checkpoint_read, exc.checkpoint, status="preempted",
                                            signal=exc.signum, exit_code=exc.code)
        if h.rank == 0:
            reporting.write_metrics(ctx.output_dir, record)
            log.warning("stopped by signal %d at epoch %d, step %d: checkpoint %s; exit code %s. To continue: "
                        "re-run the same command with auto_resume=true (same hydra.run.dir), or "
                        "task=resume checkpoint.path=%s", exc.signum, h.epoch, h.global_step, exc.checkpoint,
                        exc.code, ctx.output_dir)
        raise
    except (ValueError, TypeError) as exc:
        if "must be" in str(exc):  # the library's validation of train.* settings
            raise RunnerError(f"train: {exc}") from None
        raise
    if grid is not None and epochs and h.epoch % grid.every_n_epochs != 0:
        grid.write(h)  # the final picture (every rank samples its share; rank 0 writes)
    if not epochs and checkpoint_read is not None:
        written = checkpoint_read  # nothing left to train (auto_resume of a finished run): nothing to save
    elif through_store:
        written = str(store.save(h))
    else:
        h.save(last)
        written = last
    record = reporting.training_metrics(h, str(cfg.task), checkpoint_read, written, status="completed")
    if h.rank == 0:
        reporting.write_metrics(ctx.output_dir, record)
        for name, plot in (("losses.png", h.plot_losses), ("metrics.png", h.plot_metrics)):
            try:
                plot(os.path.join(ctx.output_dir, name))
            except Exception as exc:  # pictures are a convenience: never fail a finished run for them
                log.debug("no %s: %s", name, exc)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                            if isinstance(v, float) and k.startswith(("train_", "val_")))
        log.info("done after epoch %d: %s", h.epoch, summary)
        print(reporting.next_commands(last, ctx.launch_dir, trust=trust_to_carry(cfg)), flush=True)
    return record


def train(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    cls, kwargs = _component(cfg.model, "model")
    if cfg.seed is not None:
        rng.seed_everything(int(cfg.seed))  # the initial weights too
    h = _new_handler(cfg.model[specs.TARGET], kwargs, lambda: NNHandler(
        cls, device=cfg.device, model_type=cfg.model_type or "classification", **kwargs))
    _set_loss(h, cfg)
    _set_sde(h, cfg)
    _set_metrics(h, cfg)
    _set_optimizer(h, cfg)
    _set_scheduler(h, cfg)
    _set_data(h, cfg, None, require_train=True)
    return _fit(h, cfg, ctx, checkpoint_read=None)


MAX_RECORDED_EPOCHS = 10 ** 6  # a recorded runner.target_epoch beyond the file's epoch + this is ignored


def continue_run(cfg: DictConfig, ctx: RunContext, path: str) -> Dict[str, Any]:
    """auto_resume: this run directory already holds ``path``; go on from it up to the run's total.

    ``task=train``: ``train.epochs`` is the total. A requeued ``resume``/``finetune`` trains up to
    the epoch its first attempt aimed at (recorded in the checkpoint). Everything comes back from
    the file (the run's own): weights, optimizer, scheduler, EMA, data, random streams, position.
    """
    h = NNHandler.load(path, device=cfg.device, model_type=cfg.model_type, trusted_packages=_trusted_packages(cfg))
    _complete_from_config(h, cfg, ctx)
    recorded = h.metadata.get("runner")
    recorded_target = recorded.get("target_epoch") if isinstance(recorded, dict) else None
    if recorded_target is not None and not (isinstance(recorded_target, int) and not isinstance(recorded_target, bool)
                                            and 0 <= recorded_target <= h.epoch + MAX_RECORDED_EPOCHS):
        if h.rank == 0:
            log.warning("auto_resume: ignoring the target epoch %s recorded in %s (not an epoch from 0 to %d); "
                        "training up to train.epochs=%s", str(recorded_target)[:40], path,
                        h.epoch + MAX_RECORDED_EPOCHS, cfg.train.epochs)
        recorded_target = None
    target = int(cfg.train.epochs) if str(cfg.task) == "train" or not recorded_target else recorded_target
    if h.train_loader is None:
        _set_data(h, cfg, _info(path, path), require_train=True)
    position = " (inside epoch %d)" % (h.epoch + 1) if h._resume_position else ""
    if h.rank == 0:
        log.info("auto_resume: continuing from %s: epoch %d%s, step %d, of %d epoch(s) in all", path, h.epoch,
                 position, h.global_step, target)
    epochs = max(0, target - h.epoch)
    if epochs == 0 and h._resume_position:
        epochs = 1
    return _fit(h, cfg, ctx, checkpoint_read=path, run_config=h.metadata.get("run_config"), epochs=epochs,
                seed=None)


def _handler_checkpoint(cfg: DictConfig, ctx: RunContext, needed: str) -> Tuple[str, Dict[str, Any], "ModelChoice"]:
    """``(path, info, model choice)`` of ``checkpoint.path``, which must hold a whole handler (``needed``: why)."""
    path = checkpoint_path(cfg, ctx)
    info = _info(path, cfg.checkpoint.path)
    if info["kind"] != "handler":
        raise RunnerError(f"checkpoint.path={cfg.checkpoint.path} holds only model weights, {needed}")
    return path, info, ModelChoice(cfg, info, cfg.checkpoint.path, path)


def resume(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    path, info, choice = _handler_checkpoint(cfg, ctx, "not a training state to resume: use task=finetune "
                                                       "model=... (or task=infer)")
    model_differences = choice.differences()
    check = Drift(cfg, ctx, path, info, choice)
    check.report(model_differences, allow=bool(cfg.resume.allow_drift))
    if model_differences or drift.by_level(check.differences, drift.FATAL):
        # allowed drift: the configured model, with the checkpoint's weights under load.strict
        h = _load(path, cfg, choice)
    else:
        h = _load(path, cfg)
    _complete_from_config(h, cfg, ctx)
    _apply_resume_overrides(h, cfg, ctx, info)
    _set_data(h, cfg, info, require_train=True)
    return _fit(h, cfg, ctx, checkpoint_read=path, run_config=check.effective)


def finetune(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    path = checkpoint_path(cfg, ctx)
    info = _info(path, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path)
    check = Drift(cfg, ctx, path, info, choice)
    check.report([], allow=True)
    if cfg.seed is not None:
        rng.seed_everything(int(cfg.seed))
    if info["kind"] != "handler":
        # A bare state_dict: the configured model with those weights, everything else from the config.
        h = _new_handler(choice.target, choice.kwargs, lambda: NNHandler.initialize_from_checkpoint(
            path, choice.cls, model_type=choice.model_type, device=cfg.device, strict_load=bool(cfg.load.strict),
            **choice.kwargs))
    else:
        h = _load(path, cfg, choice if choice.configured else None)
    if cfg.load.skip_optimizer or h.optimizer is None:
        _set_optimizer(h, cfg)
    if cfg.load.skip_scheduler or h.scheduler is None:
        _set_scheduler(h, cfg)
    if h.loss_fn is None or ctx.given("loss"):
        _set_loss(h, cfg)
    _set_metrics(h, cfg)
    _set_data(h, cfg, info if info["kind"] == "handler" else None, require_train=True)
    return _fit(h, cfg, ctx, checkpoint_read=path, run_config=check.effective)


def _targets(dataset: Any) -> Optional[torch.Tensor]:
    """The dataset's targets in order, when its items are (input, target) pairs."""
    try:
        first = dataset[0]
    except Exception:
        return None
    if not (isinstance(first, (list, tuple)) and len(first) >= 2):
        return None
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False)
    return torch.cat([batch[1] for batch in loader])


def infer(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    path = checkpoint_path(cfg, ctx)
    info = _info(path, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path)
    h = _new_handler(choice.target, choice.kwargs, lambda: NNHandler.initialize_from_checkpoint(
        path, choice.cls, model_type=choice.model_type, device=cfg.device, strict_load=bool(cfg.load.strict),
        **choice.kwargs))
    # The data: data.predict, else data.val, else the validation set recorded in the checkpoint.
    key, spec, from_file = None, None, False
    for name in ("predict", "val"):
        if cfg.data[name] is not None:
            key, spec = f"data.{name}", _plain(cfg.data[name])
            break
    if spec is None:
        recorded = ((info.get("data") or {}).get("val") or {}).get("dataset")
        if recorded is None:
            raise RunnerError("task=infer needs data to predict on: give data.predict={_target_: ...}, data=NAME, "
                              "or a checkpoint that records its validation dataset")
        key, spec, from_file = "the checkpoint's val dataset", recorded, True
    try:
        dataset = specs.instantiate(spec, key, from_file=from_file, trusted=_trusted_packages(cfg))
    except specs.UntrustedTarget:
        raise
    except specs.SpecError as exc:
        raise RunnerError(f"{key}: {exc}") from None
    batch_size = int(cfg.data.val_batch_size or cfg.data.batch_size or 256)
    h.eval()
    try:
        predictions = h.predict(dataset, batch_size=batch_size)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
        raise RunnerError(f"predicting on {key} ({spec.get(specs.TARGET)}) failed: {type(exc).__name__}: {exc}") from exc
    record: Dict[str, Any] = {"task": "infer", "epoch": (info.get("progress") or {}).get("epoch"),
                              "train_loss": None, "val_loss": None, "samples": int(predictions.shape[0])}
    targets = _targets(dataset)
    if targets is not None:
        if ctx.given("loss") or not info.get("loss_fn"):
            loss_cls, loss_kwargs = _component(cfg.loss, "loss")
        else:  # the file's loss: under the file's trust rules (and the model's own module), never a plain import
            trust = specs.Trust.of(_trusted_packages(cfg)).with_model_module(choice.cls)
            target, kwargs = specs.split(info["loss_fn"])
            loss_cls = specs.resolve(target, "the checkpoint's loss_fn", expected=nn.Module, trusted=trust)
            loss_kwargs = specs.build_from_file(kwargs, "the checkpoint's loss_fn", trust)
        try:
            loss_fn = loss_cls(**loss_kwargs) if isinstance(loss_cls, type) else \
                (lambda out, y: loss_cls(out, y, **loss_kwargs))
            with torch.no_grad():
                record["loss"] = float(loss_fn(predictions, targets))
                for name, target in (_plain(cfg.metrics) or {}).items():
                    record[name] = float(_import(target, f"metrics.{name}")(predictions, targets))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RunnerError(f"task=infer: the loss or a metric cannot be computed on the predictions "
                              f"({type(exc).__name__}: {exc}); give loss=... or metrics=... for this data") from exc
    record.update(world_size=h.world_size, checkpoint_read=path, checkpoint_written=None)
    if h.rank == 0:
        out = os.path.join(ctx.output_dir, PREDICTIONS_FILE)
        torch.save(predictions, out)
        reporting.write_metrics(ctx.output_dir, record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        log.info("predicted %d samples from %s: %s", predictions.shape[0], path, shown or "no targets")
        print(f"predictions: {out}", flush=True)
    return record


# ---------------------------------------------------------------------------- sample
SAMPLE_SETTINGS = ("steps", "corrector_steps", "value_range")


def _recorded_sample_settings(h: NNHandler, cfg: DictConfig, ctx: RunContext, path: str) -> Dict[str, Any]:
    """``sample.steps``, ``sample.corrector_steps`` and ``sample.value_range`` for task=sample: each one
    given on the command line, else the one the training run used (its recorded run config's
    ``sample.*``, else its SampleGrid callback's), else the config's. So the samples of a run
    trained with ``experiment=...`` come out as its grids did (same solver, same black..white range)."""
    run_config = stored_metadata(path).get("run_config")
    recorded = run_config.get("sample") if isinstance(run_config, dict) else None
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    from nn_handler.callbacks import SampleGrid

    grid = next((cb for cb in h.callbacks if isinstance(cb, SampleGrid)), None)
    settings: Dict[str, Any] = {}
    for key in SAMPLE_SETTINGS:
        value = cfg.sample[key]
        if not ctx.given(f"sample.{key}"):
            stored = recorded.get(key)
            if stored is None and grid is not None:
                stored = getattr(grid, key, None)
            if stored is not None:
                value = _recorded_sample_setting(key, stored, path)
        settings[key] = list(value) if key == "value_range" and value is not None else value
    inherited = {k: v for k, v in settings.items() if not ctx.given(f"sample.{k}") and v != cfg.sample[k]}
    if inherited and h.rank == 0:
        log.info("task=sample: as the training run sampled: %s (give sample.<key>=... to change)",
                 ", ".join(f"sample.{k}={v}" for k, v in inherited.items()))
    return settings


def _recorded_sample_setting(key: str, value: Any, path: str) -> Any:
    """A ``sample.<key>`` the checkpoint records, if sane: steps 1..MAX_RECORDED_STEPS, corrector
    steps 0..MAX_RECORDED_STEPS, value_range two finite numbers; else a RunnerError asking for it."""
    import math

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "value_range":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    else:
        low = 1 if key == "steps" else 0
        ok = number and math.isfinite(value) and float(value).is_integer() and low <= value <= MAX_RECORDED_STEPS
        value = int(value) if ok else value
    if not ok:
        rule = "two finite numbers [lo, hi]" if key == "value_range" else \
            f"a whole number from {1 if key == 'steps' else 0} to {MAX_RECORDED_STEPS}"
        raise RunnerError(f"the checkpoint {path} records sample.{key}={str(value)[:80]}, which is not used from a "
                          f"file (it must be {rule}); give sample.{key}=... on the command line")
    return value


def sample_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``h.sample`` from a trained generative model: ``samples.pt`` (the tensor) and ``samples.png``.

    The EMA weights are used when the checkpoint has them, unless ``load.skip_ema=true`` (then the
    live weights). ``seed`` fixes the noise (null: the global random stream).
    """
    path, info, choice = _handler_checkpoint(cfg, ctx, "task=sample needs a checkpoint of a trained generative "
                                                       "model (with its SDE or sampler)")
    h = _load(path, cfg, choice if choice.configured else None)
    if h.sde is None or ctx.given("sde"):
        _set_sde(h, cfg)
    shape = _sample_shape(h, cfg, info)
    settings = _recorded_sample_settings(h, cfg, ctx, path)
    n, steps, corrector_steps = int(cfg.sample.n), int(settings["steps"]), int(settings["corrector_steps"])
    if n < 1 or steps < 1 or corrector_steps < 0:
        raise RunnerError(f"sample.n and sample.steps must be >= 1 and sample.corrector_steps >= 0, got {n}, "
                          f"{steps} and {corrector_steps}")
    use_ema = not bool(cfg.load.skip_ema)
    h.eval()
    try:
        samples = h.sample([n, *shape], steps, corrector_steps=corrector_steps,
                           seed=None if cfg.seed is None else int(cfg.seed), use_ema=use_ema)
    except RuntimeError as exc:
        if "sde" in str(exc).lower() or "sampler" in str(exc).lower():
            raise RunnerError(f"task=sample: {exc}") from None
        raise
    weights = "ema" if use_ema and h.ema is not None else "live"
    record: Dict[str, Any] = {"task": "sample", "epoch": h.epoch, "train_loss": None, "val_loss": None,
                              "samples": n, "shape": [n, *shape], "steps": steps, "seed": cfg.seed,
                              "weights": weights, "world_size": h.world_size, "checkpoint_read": path,
                              "checkpoint_written": None}
    if h.rank == 0:
        from nn_handler.plotting import save_samples_png

        out = os.path.join(ctx.output_dir, SAMPLES_FILE)
        torch.save(samples, out)
        value_range = list(settings["value_range"]) if settings["value_range"] else None
        png = save_samples_png(samples, os.path.join(ctx.output_dir, SAMPLES_PNG), value_range=value_range,
                               title=f"{n} samples, {steps} steps, {weights} weights, epoch {h.epoch}")
        reporting.write_metrics(ctx.output_dir, record)
        log.info("sampled %d x %s from %s (%s weights)", n, shape, path, weights)
        print(f"samples: {out}\npicture: {png}", flush=True)
    return record


# ---------------------------------------------------------------------------- inspect, diff
def _output_format(cfg: DictConfig, key: str) -> str:
    value = str(cfg[key].format)
    if value not in inspection.FORMATS:
        raise RunnerError(f"{key}.format={value!r}: choose one of {', '.join(inspection.FORMATS)}")
    return value


def _emit(text: str) -> None:
    if env_topology().rank == 0:
        print(text, flush=True)


def inspect_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """Print what the checkpoint records; a damaged file is reported, then the command fails."""
    fmt = _output_format(cfg, "inspect")
    path = checkpoint_path(cfg, ctx)
    report = inspect_checkpoint(path)
    _emit(inspection.to_json(report) if fmt == "json" else inspection.format_inspect(report))
    problem = inspection.damage(report)
    if problem:
        raise RunnerError(f"checkpoint.path={cfg.checkpoint.path} ({path}) cannot be trusted: {problem}")
    return report


def diff_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """Print what differs between checkpoint.path (a) and diff.other (b)."""
    fmt = _output_format(cfg, "diff")
    a = checkpoint_path(cfg, ctx)
    if cfg.diff.other in (None, ""):
        raise RunnerError("task=diff needs diff.other=FILE: the checkpoint to compare checkpoint.path with")
    b = resolve_checkpoint(cfg.diff.other, "diff.other", ctx)
    result = diff_checkpoints(a, b)
    _emit(inspection.to_json(result) if fmt == "json" else inspection.format_diff(result, top=int(cfg.diff.top)))
    return result


EXPORT_FILE = "model.safetensors"


def export_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``h.export``: the checkpoint's model weights (the EMA weights when it has them, unless
    ``export.ema=false``) as ``<run dir>/model.safetensors``, the model's spec in its metadata."""
    path = checkpoint_path(cfg, ctx)
    info = _info(path, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path)
    use_ema = bool(cfg.export.ema)
    if info["kind"] == "handler":  # the model and its EMA weights only: nothing else is built
        flags = {**_load_flags(cfg), "skip_optimizer": True, "skip_scheduler": True, "skip_history": True,
                 "skip_callbacks": True, "skip_sampler_sde": True, "skip_ema": not use_ema}
        extra = dict(model_class=choice.cls, model_kwargs=choice.kwargs) if choice.configured else {}
        h = _new_handler(choice.target, choice.kwargs, lambda: NNHandler.load(
            path, **flags, model_type=choice.model_type, **extra))
    else:
        h = _new_handler(choice.target, choice.kwargs, lambda: NNHandler.initialize_from_checkpoint(
            path, choice.cls, model_type=choice.model_type, device=cfg.device, strict_load=bool(cfg.load.strict),
            **choice.kwargs))
    out = os.path.join(ctx.output_dir, EXPORT_FILE)
    h.export(out, ema=use_ema)
    weights = "ema" if use_ema and h.ema is not None else "live"
    record: Dict[str, Any] = {"task": "export", "epoch": (info.get("progress") or {}).get("epoch"),
                              "train_loss": None, "val_loss": None, "weights": weights, "world_size": h.world_size,
                              "checkpoint_read": path, "checkpoint_written": out}
    if h.rank == 0:
        reporting.write_metrics(ctx.output_dir, record)
        log.info("exported the %s weights of %s to %s", weights, path, out)
        print(f"exported: {out}", flush=True)
    return record


TASKS: Dict[str, Callable[[DictConfig, RunContext], Dict[str, Any]]] = {
    "train": train, "resume": resume, "finetune": finetune, "infer": infer, "sample": sample_task,
    "inspect": inspect_task, "diff": diff_task, "export": export_task}
# Tasks that train (and so save checkpoints, honour auto_resume and pre-emption).
TRAINING_TASKS = ("train", "resume", "finetune")
# Tasks that only read files: never started as distributed workers.
READ_ONLY_TASKS = ("inspect", "diff")
