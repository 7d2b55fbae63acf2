"""``python -m runner``: compose the config, launch (torchrun-aware), dispatch the task."""
from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from runner import launch
from runner.schema import register

register()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    """The task's record, or its ``objective`` metric as a float (what a sweeper optimises)."""
    return launch.returned_to_hydra(cfg, launch.run(cfg))


if __name__ == "__main__":
    launch.join_torchrun()
    try:
        main()
    finally:
        launch.leave()
