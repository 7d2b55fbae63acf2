"""Which checkpoint file a task reads: ``checkpoint.path`` resolved, a directory's newest checkpoint, auto_resume's own."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Dict, Optional, Union

from omegaconf import DictConfig

from nn_handler import distributed
from nn_handler.checkpointing import (
    CheckpointError,
    CheckpointFile,
    NoCheckpointFound,
    SkippedCheckpoints,
    find_latest,
    open_latest,
    read_info,
)
from nn_handler.distributed import env_topology

from ..context import RunContext
from ..errors import RunnerError

log = logging.getLogger("runner")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pth"


def checkpoint_path(cfg: DictConfig, ctx: RunContext) -> str:
    """``checkpoint.path`` resolved against the launch directory; a directory means its last checkpoint."""
    value = cfg.checkpoint.path
    if value in (None, ""):
        raise RunnerError(f"task={cfg.task} needs checkpoint.path=FILE: the checkpoint to load, e.g. "
                          f"checkpoint.path=outputs/<date>/<time>/{CHECKPOINT_DIR}/{LAST} (a run directory works too)")
    return resolve_checkpoint(value, "checkpoint.path", ctx)


def open_checkpoint(cfg: DictConfig, ctx: RunContext) -> CheckpointFile:
    """``checkpoint.path`` opened and verified, once: the task reads its header and its state through
    this one ``CheckpointFile`` (a directory: its newest complete, verified checkpoint, chosen by the
    files' headers, only the chosen one hashed). A damaged or unreadable file is a RunnerError."""
    value = cfg.checkpoint.path
    if value in (None, ""):
        checkpoint_path(cfg, ctx)  # raises the message that says what to give
    path = os.path.normpath(os.path.join(ctx.launch_dir, os.path.expanduser(str(value))))
    if os.path.isdir(path):
        return _newest(path, f"checkpoint.path={value}", open_latest)
    resolve_checkpoint(value, "checkpoint.path", ctx)  # a missing file: the message with the launch directory
    try:
        ckpt = CheckpointFile.open(path, distributed.setup(None))
        try:
            return ckpt.verify()
        except BaseException:
            ckpt.close()
            raise
    except CheckpointError as exc:
        raise RunnerError(f"checkpoint.path={value}: {exc}") from None


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
    return str(_newest(directory, what, find_latest))


def _newest(directory: str, what: str, find: Any) -> Any:
    """``find(directory)`` (``find_latest`` or ``open_latest``), each skipped file told (rank 0), none a RunnerError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = find(directory)
        except NoCheckpointFound:
            found = None
    told = [w.message for w in caught if isinstance(w.message, SkippedCheckpoints)]
    skipped = [line for message in told for line in message.skipped]
    if env_topology().rank == 0:
        for message in told:
            log.warning("%s", message)
    if found is None:
        raise RunnerError(f"{what}: no complete, verified checkpoint in the directory {directory} "
                          f"(searched recursively{'; skipped: ' + '; '.join(skipped) if skipped else ''})")
    if skipped and env_topology().rank == 0:
        log.warning("using %s", getattr(found, "path", found))
    return found


def own_checkpoint(ctx: RunContext) -> Optional[str]:
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


def checkpoint_info(path: Union[str, CheckpointFile], value: Any) -> Dict[str, Any]:
    """``read_info(path)`` (an open CheckpointFile: read through, not checksummed again), a damaged or
    foreign file told as the config's ``checkpoint.path=value``."""
    try:
        return read_info(path)
    except CheckpointError as exc:
        raise RunnerError(f"checkpoint.path={value}: {exc}") from None
