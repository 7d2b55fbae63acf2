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

``build.py`` turns the config into components, ``checkpoints.py`` finds the file to read and
``fit.py`` trains, saves and reports.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from omegaconf import DictConfig

from ..context import RunContext
from ..errors import RunnerError, user_errors
from .checkpoints import own_checkpoint
from .export import export_task
from .finetune import finetune_task
from .infer import infer_task
from .inspect import diff_task, inspect_task
from .resume import resume_task
from .sample import sample_task
from .train import continue_run, train_task

TASKS: Dict[str, Callable[[DictConfig, RunContext], Dict[str, Any]]] = {
    "train": train_task, "resume": resume_task, "finetune": finetune_task, "infer": infer_task,
    "sample": sample_task, "inspect": inspect_task, "diff": diff_task, "export": export_task}
# Tasks that train (and so save checkpoints, honour auto_resume and pre-emption).
TRAINING_TASKS = ("train", "resume", "finetune")
# Tasks that only read files: never started as distributed workers.
READ_ONLY_TASKS = ("inspect", "diff")

__all__ = ["TASKS", "TRAINING_TASKS", "READ_ONLY_TASKS", "run", "continue_run", "train_task", "resume_task",
           "finetune_task", "infer_task", "sample_task", "inspect_task", "diff_task", "export_task"]


def run(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """The task ``cfg.task`` names (auto_resume of a training task: the run's own checkpoint first)."""
    task = TASKS.get(str(cfg.task))
    if task is None:
        raise RunnerError(f"task={cfg.task!r} is not a task: choose one of {', '.join(TASKS)}")
    with user_errors():
        if bool(cfg.auto_resume) and str(cfg.task) in TRAINING_TASKS:
            found = own_checkpoint(ctx)
            if found is not None:
                return continue_run(cfg, ctx, found)
        return task(cfg, ctx)
