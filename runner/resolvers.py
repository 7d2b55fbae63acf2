"""The config's own resolvers: one run time shared by every torchrun rank, Hydra's files and the log file by rank.

- ``${runner_now:pattern}``: Hydra's ``${now:pattern}``, but one time per process, which
  ``launch.join_torchrun`` replaces with rank 0's (``share_run_time``), so the timestamped run
  directory is ONE directory.
- ``${runner_hydra_subdir:}``: ``.hydra`` on rank 0, nothing elsewhere (only rank 0 writes Hydra's files).
- ``${runner_log_file:}``: ``runner.log`` on rank 0, ``runner.rank<N>.log`` on the others.

Registered on import (``runner/__init__`` imports this module).
"""
from __future__ import annotations

import datetime
import time
from typing import Optional

from omegaconf import OmegaConf

from nn_handler.distributed import env_topology

LOG_NAME = "runner"
_run_time: Optional[float] = None


def share_run_time(seconds: float) -> None:
    """The run's time (rank 0's, under torchrun), used by every ``${runner_now:}`` from now on."""
    global _run_time
    _run_time = float(seconds)


def _now(pattern: str) -> str:
    """Hydra's ``${now:pattern}``, but one time per process, shared by all torchrun ranks."""
    global _run_time
    if _run_time is None:
        _run_time = time.time()
    return datetime.datetime.fromtimestamp(_run_time).strftime(pattern)


def _hydra_subdir() -> Optional[str]:
    return ".hydra" if env_topology().rank == 0 else None


def log_file() -> str:
    """This rank's log file name: ``runner.log`` on rank 0, ``runner.rank<N>.log`` on the others."""
    rank = env_topology().rank
    return f"{LOG_NAME}.log" if rank == 0 else f"{LOG_NAME}.rank{rank}.log"


OmegaConf.register_new_resolver("runner_now", _now, replace=True, use_cache=True)
OmegaConf.register_new_resolver("runner_hydra_subdir", _hydra_subdir, replace=True)
OmegaConf.register_new_resolver("runner_log_file", log_file, replace=True)
