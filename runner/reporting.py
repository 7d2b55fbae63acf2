"""What a run leaves behind: metrics.json per job, summary.csv per sweep, the next commands."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("runner")

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.csv"


def _plain_number(value: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN); tensors and numpy scalars become floats."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def training_metrics(h: Any, task: str, checkpoint_read: Optional[str], checkpoint_written: Optional[str],
                     **extra: Any) -> Dict[str, Any]:
    """The metrics.json of a task that trained: last losses and metrics of the handler's history."""
    def last(values: List[float]) -> Optional[float]:
        return _plain_number(values[-1]) if values else None

    record: Dict[str, Any] = {"task": task, "epoch": h.epoch, "train_loss": last(h.train_losses),
                              "val_loss": last(h.val_losses)}
    for name in h.metrics:
        record[f"train_{name}"] = last(h.train_metrics_history.get(name, []))
        record[f"val_{name}"] = last(h.val_metrics_history.get(name, []))
    record.update(world_size=h.world_size, checkpoint_read=checkpoint_read, checkpoint_written=checkpoint_written)
    record.update(extra)
    return record


def write_metrics(output_dir: str, record: Dict[str, Any]) -> str:
    path = os.path.join(output_dir, METRICS_FILE)
    with open(path, "w") as fh:
        json.dump({k: _plain_number(v) for k, v in record.items()}, fh, indent=2, allow_nan=False)
        fh.write("\n")
    return path


def _shown_path(path: str, launch_dir: str) -> str:
    rel = os.path.relpath(path, launch_dir)
    return path if rel.startswith("..") else rel


def next_commands(checkpoint: str, launch_dir: str, trust: Sequence[str] = ()) -> str:
    """The commands that resume, fine-tune and infer from ``checkpoint``, run from ``launch_dir``;
    ``trust``: the user's own modules the checkpoint names, which those commands must trust."""
    value = _shown_path(checkpoint, launch_dir)
    # Hydra's override grammar and the shell both need quoting for unusual characters.
    if any(c in value for c in " ,=[]{}()'\"\\$:*?"):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    arg = shlex.quote(f"checkpoint.path={value}")
    if trust:
        arg += " " + shlex.quote(f"load.trusted_packages=[{','.join(trust)}]")
    return "\n".join([
        f"checkpoint: {checkpoint}",
        "next, from this directory:",
        f"  resume:    python -m runner task=resume {arg} train.epochs=5",
        f"  fine-tune: python -m runner task=finetune {arg} optimizer.lr=1e-4",
        f"  infer:     python -m runner task=infer {arg}",
        f"  sweep:     python -m runner -m task=finetune {arg} optimizer.lr=1e-3,1e-4",
    ])


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


class OutputDirCheck(HydraCallback):
    """Before Hydra creates the run (or sweep) directory: one clear line, not a traceback, when it
    cannot be created or written (a path through a file, a read-only or full file system)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, key: str) -> None:
        try:
            os.makedirs(directory, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".runner-write-check-")
            probe.close()
        except OSError as exc:
            print(f"Error: {key}={directory} cannot be used as the output directory: "
                  f"{exc.strerror or exc} ({exc.filename or directory})", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


class SweepSummary(HydraCallback):
    """Writes ``summary.csv`` at the sweep directory after every job of a multirun.

    One row per job: its number, status, its overrides (one column per key) and the keys
    of its metrics.json; a failed job gets its row with the error. The file is rewritten
    after each job, so it is complete even when a failure ends the sweep.
    """

    def __init__(self) -> None:
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.override_keys: List[str] = []
        self.metric_keys: List[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN or os.environ.get("RANK", "0") != "0":
            return
        row: Dict[str, Any] = {"job": int(hydra_cfg.job.num)}
        failed = job_return.status != JobStatus.COMPLETED
        row["status"] = "failed" if failed else "completed"
        for override in job_return.overrides or []:
            key = _override_key(override)
            row[key] = override.split("=", 1)[1] if "=" in override else ""
            if key not in self.override_keys:
                self.override_keys.append(key)
        metrics_path = os.path.join(str(hydra_cfg.runtime.output_dir), METRICS_FILE)
        if os.path.isfile(metrics_path):
            with open(metrics_path) as fh:
                metrics = json.load(fh)
            for key, value in metrics.items():
                row[key] = value
                if key not in self.metric_keys:
                    self.metric_keys.append(key)
        row["error"] = str(job_return._return_value) if failed else ""
        self.rows[row["job"]] = row
        self._write(os.path.join(str(hydra_cfg.sweep.dir), SUMMARY_FILE))

    def _write(self, path: str) -> None:
        metric_keys = [k for k in self.metric_keys if k not in self.override_keys]
        columns = ["job", "status", *self.override_keys, *metric_keys, "error"]
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="")
            writer.writeheader()
            for job in sorted(self.rows):
                writer.writerow({k: ("" if v is None else v) for k, v in self.rows[job].items() if k in columns})
        os.replace(tmp, path)
        log.info("sweep summary: %s", path)
