"""``python -m runner``: compose the config, launch (torchrun-aware), dispatch the task."""
from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from runner import launch, tasks
from runner.schema import register

register()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    """The task's record, or its ``objective`` metric as a float (what a sweeper optimises).

    A failure before the task starts (``launcher.*``, the process group) or after it (an ``objective``
    the record lacks) leaves the job's metrics.json with ``status: "failed"`` and the error, as a
    task's own failure does (``tasks.record_launch_failure``: once, whoever raised it)."""
    try:
        record = launch.run(cfg)
        try:
            return launch.returned_to_hydra(cfg, record)
        except Exception as exc:  # the task finished: its figures stay in the failed record
            exc.runner_progress = {k: v for k, v in (record or {}).items() if k not in ("status", "error")}
            raise
    except Exception as exc:  # a pre-emption is a SystemExit: it writes its own record
        tasks.record_launch_failure(cfg, exc)
        raise


if __name__ == "__main__":
    launch.join_torchrun()
    try:
        main()
    finally:
        launch.leave()
