"""The task registry: ``task=NAME`` to its function, and ``run``, which dispatches (auto_resume first).

Each task is a load policy over NNHandler, in its own module: what to build, what to restore,
then train or predict.

- train:    a fresh handler from the config (``train.py``, with auto_resume's ``continue_run``).
- resume:   ``NNHandler.load`` with the load flags; the model must be the recorded one.
- finetune: ``NNHandler.load`` into the configured (or recorded) model; optimizer and
            scheduler from the config (the task skips the saved ones by default).
- infer:    ``NNHandler.initialize_from_checkpoint``; predictions and, with targets, metrics.
- sample, inspect, diff, export: a trained model's samples, what a file records, what two
            differ in, the weights as safetensors.
- convert:  a sharded checkpoint consolidated into one file, or one file sharded (``NNHandler.convert``).

``build.py`` turns the config into components, ``checkpoints.py`` finds the file to read and
``fit.py`` trains, saves and reports.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict

from omegaconf import DictConfig

from nn_handler.distributed import env_topology

from .. import reporting
from ..context import RunContext
from ..errors import RunnerError, one_line, user_errors
from .checkpoints import own_checkpoint
from .convert import convert_task
from .export import export_task
from .finetune import finetune_task
from .infer import infer_task
from .inspect import diff_task, inspect_task
from .resume import resume_task
from .sample import sample_task
from .train import continue_run, train_task

TASKS: Dict[str, Callable[[DictConfig, RunContext], Dict[str, Any]]] = {
    "train": train_task, "resume": resume_task, "finetune": finetune_task, "infer": infer_task,
    "sample": sample_task, "inspect": inspect_task, "diff": diff_task, "export": export_task,
    "convert": convert_task}
# Tasks that train (and so save checkpoints, honour auto_resume and pre-emption).
TRAINING_TASKS = ("train", "resume", "finetune")
# Tasks that only read files: never started as distributed workers.
READ_ONLY_TASKS = ("inspect", "diff")

__all__ = ["TASKS", "TRAINING_TASKS", "READ_ONLY_TASKS", "run", "continue_run", "train_task", "resume_task",
           "finetune_task", "infer_task", "sample_task", "inspect_task", "diff_task", "export_task", "convert_task",
           "record_failure",
           "record_launch_failure"]


log = logging.getLogger("runner")


def run(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """The task ``cfg.task`` names (auto_resume of a training task: the run's own checkpoint first).

    A task that fails leaves its record: metrics.json with ``status: "failed"`` and the error in
    one line (with how far training got, when it trained), and the error in the run's log file.
    """
    try:
        task = TASKS.get(str(cfg.task))
        if task is None:
            raise RunnerError(f"task={cfg.task!r} is not a task: choose one of {', '.join(TASKS)}")
        with user_errors():
            if bool(cfg.auto_resume) and str(cfg.task) in TRAINING_TASKS:
                found = own_checkpoint(ctx)
                if found is not None:
                    return continue_run(cfg, ctx, found)
            return task(cfg, ctx)
    except Exception as exc:  # a pre-emption is a SystemExit: it writes its own record
        record_failure(cfg, ctx, exc)
        raise


def record_failure(cfg: DictConfig, ctx: RunContext, exc: BaseException, keep_failed: bool = False) -> None:
    """The failed run's metrics.json (rank 0) and its error in the log file (the console hears it
    from Hydra, once: ``file_only``). ``keep_failed``: leave a failed record already there (a
    self-launch's rank 0 wrote it). Never raises: the original error is what the user must see."""
    if getattr(exc, "runner_recorded", False):  # told and recorded already (a self-launch's rank 0, tasks.run)
        return
    try:
        exc.runner_recorded = True  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (an exception type without attributes)
        pass
    error = one_line(exc)
    # RunnerError is the user's mistake, told in one line; anything else keeps its traceback in the file.
    log.error("%s failed: %s", cfg.get("task"), error, exc_info=not isinstance(exc, RunnerError),
              extra={"file_only": True})
    if env_topology().rank != 0 or (keep_failed and _failed_record_exists(ctx.output_dir)):
        return
    if str(cfg.get("task")) in READ_ONLY_TASKS:  # inspect/diff write nothing, not even a failure record
        return
    record: Dict[str, Any] = {"task": str(cfg.get("task")), **(getattr(exc, "runner_progress", None) or {}),
                              "status": "failed", "error": error}
    try:
        reporting.write_metrics(ctx.output_dir, record)
    except Exception as write_error:  # noqa: BLE001 (a full disk, a vanished directory)
        log.warning("could not write the failed run's %s: %s", reporting.METRICS_FILE, write_error)


def record_launch_failure(cfg: DictConfig, exc: BaseException) -> None:
    """A failure outside ``run`` (before a task starts: a bad ``launcher.*`` setting, the process group, the
    logging set-up; or after it: an ``objective`` its record lacks), recorded as a task's failure is, once,
    in the job's directory. Never raises."""
    if getattr(exc, "runner_recorded", False):
        return
    try:
        ctx = RunContext.from_hydra()
    except Exception as ctx_error:  # noqa: BLE001 (no Hydra job here: nothing to write into)
        log.debug("no record of the failure: %s", ctx_error)
        return
    record_failure(cfg, ctx, exc)


def _failed_record_exists(output_dir: str) -> bool:
    try:
        with open(os.path.join(output_dir, reporting.METRICS_FILE)) as fh:
            return json.load(fh).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return False
