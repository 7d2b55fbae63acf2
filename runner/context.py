"""Where a task runs: the job's output directory, the launch directory, the command-line overrides and
what a later command needs to compose its config as this run did."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List

# The runner's own primary config directory (``@hydra.main(config_path="conf")``).
OWN_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
OWN_CONFIG_NAME = "config"
# Hydra overrides a later command must repeat to find the same configs (the others, such as
# hydra.run.dir or hydra/launcher, are this run's own business).
CARRIED_HYDRA_KEYS = ("hydra.searchpath",)


@dataclass
class RunContext:
    """What a task needs to know about where it runs (plain data: it travels to workers)."""

    output_dir: str  # Hydra's output directory of this job (absolute)
    launch_dir: str  # where the user launched the command: relative paths resolve against it
    overrides: List[str] = field(default_factory=list)  # the job's command-line overrides
    # The Hydra flags that composed this job's config: --config-path / --config-dir (shown relative to
    # launch_dir when inside it) and a --config-name other than the runner's own, as argv tokens.
    config_flags: List[str] = field(default_factory=list)
    # The Hydra overrides that found its configs (hydra.searchpath=[...]), as given.
    config_overrides: List[str] = field(default_factory=list)

    @classmethod
    def from_hydra(cls) -> "RunContext":
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        launch_dir = hc.runtime.cwd
        return cls(output_dir=os.path.abspath(hc.runtime.output_dir), launch_dir=launch_dir,
                   overrides=list(hc.overrides.task), config_flags=_config_flags(hc, launch_dir),
                   config_overrides=[str(o) for o in hc.overrides.hydra
                                     if _key(str(o)) in CARRIED_HYDRA_KEYS])

    def given(self, key: str) -> bool:
        """Whether the user overrode ``key`` (or a key below it) on the command line."""
        for override in self.overrides:
            name = _key(override)
            if name == key or name.startswith(key + "."):
                return True
        return False

    def choices(self, *groups: str) -> List[str]:
        """The command line's own choices of these config groups (``optimizer=sgd``), as given."""
        return [o for o in self.overrides if not o.startswith("~") and "=" in o and _key(o) in groups]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _shown(path: str, launch_dir: str) -> str:
    rel = os.path.relpath(path, launch_dir)
    return path if rel.startswith("..") else rel


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _config_flags(hc: Any, launch_dir: str) -> List[str]:
    """``--config-path`` (when not the runner's own), ``--config-dir`` and ``--config-name`` of this job."""
    flags: List[str] = []
    for source in hc.runtime.config_sources:
        provider, schema, path = str(source.provider), str(source.schema), str(source.path)
        if provider == "main" and schema == "file" and not _same_dir(path, OWN_CONFIG_DIR):
            flags += ["--config-path", os.path.abspath(path)]  # Hydra reads a relative one against runner/
        elif provider == "main" and schema == "pkg" and path != "runner.conf":
            flags += ["--config-path", f"pkg://{path}"]
        elif provider == "command-line" and schema == "file":
            flags += ["--config-dir", _shown(os.path.abspath(os.path.join(launch_dir, path)), launch_dir)]
    name = hc.job.config_name
    if name and name != OWN_CONFIG_NAME:
        flags += ["--config-name", str(name)]
    return flags
