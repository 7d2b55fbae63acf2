"""task=inspect and task=diff: print what a checkpoint records, or what differs between two (read-only: nothing is built)."""
from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler.checkpointing import diff as diff_checkpoints
from nn_handler.checkpointing import inspect as inspect_checkpoint
from nn_handler.distributed import env_topology

from .. import inspection
from ..context import RunContext
from ..errors import RunnerError
from .checkpoints import checkpoint_path, resolve_checkpoint


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
