"""Training a set-up handler for a task: the checkpoint store, the run's metadata, ``h.train``, the
pre-emption record, the final save, metrics.json and the printed next commands."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig

from nn_handler import NNHandler, Preempted, SettingError
from nn_handler.callbacks import CSVLogger, MLflowLogger, SampleGrid, TensorBoardLogger
from nn_handler.checkpointing import CheckpointStore
from nn_handler.distributed import env_topology
from nn_handler.plotting import record_start

from .. import reporting
from ..callbacks import EpochProgressBar
from ..context import RunContext
from ..drift import run_config_of
from ..errors import RunnerError
from .build import is_generative, sample_shape, trust_to_carry
from .checkpoints import CHECKPOINT_DIR, LAST

log = logging.getLogger("runner")

SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
# The groups a fine-tune builds from its config rather than from the checkpoint (task=finetune skips the
# saved optimizer and scheduler): a printed fine-tune command repeats this run's own choices of them.
FINETUNE_BUILDS = ("optimizer", "scheduler")


def _store(cfg: DictConfig, directory: str) -> CheckpointStore:
    save = cfg.save
    try:
        return CheckpointStore(directory, keep_last=save.keep_last, keep_best=save.keep_best, monitor=save.monitor,
                               mode=str(save.mode), sharded=save.sharded)
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


def _sample_grid(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> Optional[SampleGrid]:
    """``sample.every_n_epochs``: a SampleGrid writing into this run's ``samples/`` (a restored one is moved here)."""
    every = int(cfg.sample.every_n_epochs or 0)
    if every <= 0 or not is_generative(h):
        return None
    directory = os.path.join(ctx.output_dir, SAMPLES_DIR)
    for cb in h.callbacks:
        if isinstance(cb, SampleGrid):
            cb.relocate(directory)
            return cb
    value_range = list(cfg.sample.value_range) if cfg.sample.value_range else None
    grid = SampleGrid(sample_shape(h, cfg), every_n_epochs=every, n=int(cfg.sample.n), steps=int(cfg.sample.steps),
                      corrector_steps=int(cfg.sample.corrector_steps), seed=cfg.sample.seed, dirpath=directory,
                      value_range=value_range)
    h.add_callback(grid)
    return grid


def _loggers(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> None:
    """``logger=csv|tensorboard|mlflow``: that logger writing into this run's ``logs/``, unless one of its kind was
    restored from the checkpoint; restored loggers are moved here (same run directory: the same log goes on)."""
    name = str(cfg.logger.name)
    if name != "none" and name not in LOGGERS:
        raise RunnerError(f"logger.name must be one of none, {', '.join(LOGGERS)}; got {name!r}")
    directory = os.path.join(ctx.output_dir, LOGS_DIR)
    restored = [cb for cb in h.callbacks if isinstance(cb, tuple(LOGGERS.values()))]
    uri = cfg.logger.get("tracking_uri")
    for cb in restored:
        cb.relocate(directory)
        if isinstance(cb, MLflowLogger) and uri:  # the command's tracking URI, not only the file's
            cb.use_tracking_uri(str(uri))
    if name != "none" and not any(isinstance(cb, LOGGERS[name]) for cb in restored):
        options = {"tracking_uri": None if uri is None else str(uri),
                   "experiment_name": str(cfg.logger.get("experiment_name") or "nn_handler")} if name == "mlflow" else {}
        try:
            h.add_callback(LOGGERS[name](dirpath=directory, every_n_steps=int(cfg.logger.every_n_steps), **options))
        except (ImportError, ValueError) as exc:
            raise RunnerError(f"logger={name}: {exc}") from None


def _check_objective(h: NNHandler, cfg: DictConfig) -> None:
    """``objective=<metric>`` names a value this run's metrics.json will hold (``val_*``: with validation
    data), checked before any work: a sweep of misspelled trials would otherwise train them all for nothing."""
    name = cfg.get("objective")
    if name is None:
        return
    names = [k for k in reporting.objective_names(reporting.training_metrics(h, str(cfg.task), None, None))
             if h.val_loader is not None or not k.startswith("val_")]
    if name not in names:
        hint = " (val_* values need validation data)" if str(name).startswith("val_") and h.val_loader is None else ""
        raise RunnerError(f"objective={name} is not a metric of task={cfg.task}{hint}: choose one of "
                          f"{', '.join(names)}")


def fit_and_save(h: NNHandler, cfg: DictConfig, ctx: RunContext, checkpoint_read: Optional[str],
                 run_config: Optional[Dict[str, Any]] = None, epochs: Optional[int] = None,
                 seed: Any = "config") -> Dict[str, Any]:
    """Train ``h`` for ``epochs`` (``train.epochs``), save its checkpoint, write metrics.json; the task's record."""
    t = cfg.train
    epochs = int(t.epochs) if epochs is None else int(epochs)
    seed = cfg.seed if seed == "config" else seed
    # Every checkpoint this run writes (last.pth, periodic ones, a callback's) records the resolved
    # run config (the handler itself records the lineage: run id and parent file) and the epoch
    # the run trains up to (auto_resume of a requeued resume/finetune continues to it).
    h.metadata["run_config"] = run_config if run_config is not None else run_config_of(cfg)
    h.metadata["runner"] = {"task": str(cfg.task), "target_epoch": h.epoch + epochs}
    record_start(h, {"resume": "resumed", "finetune": "fine-tuned"}.get(str(cfg.task), "continued"))  # for the plots
    ckpt_dir = os.path.join(ctx.output_dir, CHECKPOINT_DIR)
    store = _store(cfg, ckpt_dir)
    try:  # before any work: a misspelled monitor would otherwise rank (and prune) by a value that never exists
        store.check_monitor(h)
    except ValueError as exc:
        raise RunnerError(f"save.monitor={cfg.save.monitor}: {exc}") from None
    _check_objective(h, cfg)
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
    _loggers(h, cfg, ctx)
    log.info("%s: %s on %s, world size %d, from epoch %d, %d epoch(s)", cfg.task, type(h.module).__name__,
             h.device, h.world_size, h.epoch, epochs)
    try:
        h.train(epochs, validate_every=t.validate_every, gradient_accumulation_steps=t.gradient_accumulation_steps,
                use_amp=t.use_amp, gradient_clipping_norm=t.gradient_clipping_norm, ema_decay=t.ema_decay,
                seed=seed, progress_bar=False, checkpoint_dir=store, save_every_n_steps=every_n_steps,
                save_every_n_epochs=every_n_epochs, handle_signals=True, async_save=bool(cfg.save["async"]))
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
    except SettingError as exc:  # the library's validation of train.* settings (and of restored callbacks' monitors)
        raise RunnerError(f"train: {exc}" if exc.name != "monitor" else str(exc)) from None
    except Exception as exc:  # the failed run's metrics.json (tasks.run writes it) says how far it got
        try:
            exc.runner_progress = reporting.training_metrics(h, str(cfg.task), checkpoint_read, None)
        except Exception:  # noqa: BLE001 (an exception type without attributes: the error alone is recorded)
            pass
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
        print(reporting.next_commands(last, ctx.launch_dir, trust=trust_to_carry(cfg), generative=is_generative(h),
                                      config_flags=ctx.config_flags, config_overrides=ctx.config_overrides,
                                      finetune_choices=ctx.choices(*FINETUNE_BUILDS)), flush=True)
    return record
