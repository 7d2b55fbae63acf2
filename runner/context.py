"""Where a task runs: the job's output directory, the launch directory and the command-line overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List


@dataclass
class RunContext:
    """What a task needs to know about where it runs (plain data: it travels to workers)."""

    output_dir: str  # Hydra's output directory of this job (absolute)
    launch_dir: str  # where the user launched the command: relative paths resolve against it
    overrides: List[str] = field(default_factory=list)  # the job's command-line overrides

    @classmethod
    def from_hydra(cls) -> "RunContext":
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return cls(output_dir=os.path.abspath(hc.runtime.output_dir), launch_dir=hc.runtime.cwd,
                   overrides=list(hc.overrides.task))

    def given(self, key: str) -> bool:
        """Whether the user overrode ``key`` (or a key below it) on the command line."""
        for override in self.overrides:
            name = override.split("=", 1)[0].lstrip("+~")
            if name == key or name.startswith(key + "."):
                return True
        return False
