"""What a run leaves behind: metrics.json per job, summary.csv per sweep, the next commands."""
from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("runner")

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.csv"
# A job's outcome as Hydra saw it, in its .hydra/ (SweepSummary.on_job_end).
JOB_STATUS_FILE = "job_status.json"
# Files older than the sweep's start by more than this are a reused sweep directory's leftovers.
FRESH_SLACK_S = 2.0
# summary.csv's own columns; an override key of the same name gets the prefix "override.".
_SUMMARY_COLUMNS = ("job", "status", "error")


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


# metrics.json keys that are bookkeeping, never an objective (runner/launch.py's returned_to_hydra says the same).
NOT_OBJECTIVES = ("task", "epoch", "world_size", "samples", "checkpoint_read", "checkpoint_written", "status",
                  "error", "signal", "exit_code")


def objective_names(record: Dict[str, Any]) -> List[str]:
    """The keys of a task's record that ``objective=`` may name: its metrics (numbers, or None: no value yet)."""
    return [k for k, v in record.items() if k not in NOT_OBJECTIVES and
            (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]


def write_metrics(output_dir: str, record: Dict[str, Any]) -> str:
    path = os.path.join(output_dir, METRICS_FILE)
    with open(path, "w") as fh:
        json.dump({k: _plain_number(v) for k, v in record.items()}, fh, indent=2, allow_nan=False)
        fh.write("\n")
    return path


def _shown_path(path: str, launch_dir: str) -> str:
    rel = os.path.relpath(path, launch_dir)
    return path if rel.startswith("..") else rel


def _override_value(value: str) -> str:
    """``value`` as Hydra's override grammar reads it back unchanged (quoted when it has unusual characters)."""
    if any(c in value for c in " ,=[]{}()'\"\\$:*?"):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def next_commands(checkpoint: str, launch_dir: str, trust: Sequence[str] = (), generative: bool = False,
                  config_flags: Sequence[str] = (), config_overrides: Sequence[str] = (),
                  finetune_choices: Sequence[str] = ()) -> str:
    """The commands that resume, fine-tune and infer from (or, for a ``generative`` model, sample from)
    ``checkpoint``, each working as printed when run from ``launch_dir``: with this run's ``config_flags``
    (``--config-dir``, ``--config-name``...) and ``config_overrides`` (``hydra.searchpath=[...]``), so they
    find the same configs; ``trust``, the user's own modules the checkpoint names (which those commands
    build from the file, so must trust); and for a fine-tune, which builds its optimizer and scheduler from
    the config, ``finetune_choices``: this run's own choices of those groups (``optimizer=sgd``)."""
    arg = shlex.quote(f"checkpoint.path={_override_value(_shown_path(checkpoint, launch_dir))}")
    if trust:
        arg += " " + shlex.quote(f"load.trusted_packages=[{','.join(_override_value(t) for t in trust)}]")
    flags = " ".join(["python -m runner", *(shlex.quote(f) for f in config_flags)])
    runner = " ".join([flags, *(shlex.quote(o) for o in config_overrides)])
    sweep = " ".join([flags, "-m", *(shlex.quote(o) for o in config_overrides)])  # flags before any override
    tune = "".join(f" {shlex.quote(c)}" for c in finetune_choices)
    use = (f"  sample:    {runner} task=sample {arg} seed=0" if generative else
           f"  infer:     {runner} task=infer {arg}")
    return "\n".join([
        f"checkpoint: {checkpoint}",
        "next, from this directory:",
        f"  resume:    {runner} task=resume {arg} train.epochs=5",
        f"  fine-tune: {runner} task=finetune {arg}{tune} optimizer.lr=1e-4",
        use,
        f"  sweep:     {sweep} task=finetune {arg}{tune} optimizer.lr=1e-3,1e-4",
    ])


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
    """Writes ``summary.csv`` at the sweep directory, in the process that runs the sweep.

    Launchers run jobs elsewhere (joblib's workers, submitit's processes), so the rows are read
    from the job directories this sweep wrote (``hydra.sweep.dir/<hydra.sweep.subdir>``, found by
    their ``.hydra/`` files or ``metrics.json``; older leftovers in a reused sweep directory are
    skipped): at the end of the multirun, or at exit when a failed job made the sweeper raise
    (Hydra then skips ``on_multirun_end``). One row per job: its number, status, its overrides
    (one column per key), the keys of its metrics.json and the error. Each job also records what
    Hydra saw of its task function in ``.hydra/job_status.json`` (``on_job_end``, in the job's own
    process): the error of a job that wrote no metrics.json. A failed job makes the command exit 1.
    """

    def __init__(self) -> None:
        self._sweep_dir: Optional[str] = None
        self._hydra_subdir: Optional[str] = None
        self._since = 0.0
        self._done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        subdir = config.hydra.output_subdir
        self._hydra_subdir = None if subdir is None else str(subdir)
        self._since = _file_system_now(self._sweep_dir) - FRESH_SLACK_S
        self._done = False
        atexit.register(self._finish)  # a sweeper that raised on a failed job: the summary all the same

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = self._finish()
        failed = [job for job in jobs if job.status != "completed"]
        if failed:  # a sweeper that tolerated failures (e.g. optuna's max_failure_rate): still an error
            print(f"Error: {len(failed)} of {len(jobs)} sweep jobs did not complete "
                  f"(jobs {', '.join(job.name for job in failed)}); see {os.path.join(str(self._sweep_dir), SUMMARY_FILE)}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """In the job's process: its outcome as Hydra saw it, for the summary."""
        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.output_subdir is None:
            return
        failed = job_return.status != JobStatus.COMPLETED
        error = job_return._return_value if failed else None
        record = {"status": "failed" if failed else "completed",
                  "error": (str(error) or type(error).__name__) if failed else None}
        path = os.path.join(str(hydra_cfg.runtime.output_dir), str(hydra_cfg.output_subdir), JOB_STATUS_FILE)
        if os.path.isdir(os.path.dirname(path)):
            _atomic_json(path, record)

    def _finish(self) -> List["_Job"]:
        """Read every job of this sweep and write summary.csv (once)."""
        if self._done or self._sweep_dir is None:
            return []
        self._done = True
        jobs = [self._read_job(d) for d in self._job_dirs()]
        jobs.sort(key=lambda job: (job.num is None, job.num if job.num is not None else 0, job.name))
        if jobs:
            _write_summary(os.path.join(self._sweep_dir, SUMMARY_FILE), jobs)
        return jobs

    def _fresh(self, path: str) -> bool:
        try:
            return os.path.getmtime(path) >= self._since
        except OSError:
            return False

    def _job_dirs(self) -> List[str]:
        """The directories of this sweep's jobs: a fresh ``.hydra/overrides.yaml`` or ``metrics.json``."""
        assert self._sweep_dir is not None
        found = []
        for root, dirs, _ in os.walk(self._sweep_dir):
            marks = [os.path.join(root, METRICS_FILE)]
            if self._hydra_subdir:
                marks.append(os.path.join(root, self._hydra_subdir, "overrides.yaml"))
            if root != self._sweep_dir and any(self._fresh(p) for p in marks):
                found.append(root)
                dirs[:] = []  # a job's own subdirectories (checkpoints, samples) hold no jobs
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .submitit, .hydra
        return found

    def _read_job(self, job_dir: str) -> "_Job":
        assert self._sweep_dir is not None
        job = _Job(name=os.path.relpath(job_dir, self._sweep_dir))
        hydra_dir = os.path.join(job_dir, self._hydra_subdir) if self._hydra_subdir else None
        if hydra_dir is not None:
            num = _read_yaml(os.path.join(hydra_dir, "hydra.yaml"))
            for key in ("hydra", "job", "num"):  # hydra.job.num
                num = num.get(key) if isinstance(num, dict) else None
            job.num = num if isinstance(num, int) and not isinstance(num, bool) else None
            for override in _read_yaml(os.path.join(hydra_dir, "overrides.yaml")) or []:
                key, _, value = str(override).partition("=")
                job.overrides[key.lstrip("+~")] = value
        if job.num is None and job.name.isdigit():
            job.num = int(job.name)
        outcome = self._read_fresh_json(os.path.join(hydra_dir, JOB_STATUS_FILE)) if hydra_dir else None
        metrics = self._read_fresh_json(os.path.join(job_dir, METRICS_FILE))
        job.metrics = {k: v for k, v in (metrics or {}).items() if k not in ("status", "error")}
        statuses = [str(r["status"]) for r in (metrics, outcome) if r and r.get("status")]
        errors = [str(r["error"]) for r in (metrics, outcome) if r and r.get("error")]
        if not statuses:
            job.status, job.error = "failed", "the job did not finish (no metrics.json)"
        else:
            # Hydra's word (job_status.json) wins over metrics.json's when it says the job failed.
            job.status = next((s for s in statuses if s != "completed"), "completed")
            job.error = errors[0] if errors else ""
        return job

    def _read_fresh_json(self, path: str) -> Optional[Dict[str, Any]]:
        if not self._fresh(path):
            return None
        try:
            with open(path) as fh:
                value = json.load(fh)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


@dataclasses.dataclass
class _Job:
    name: str  # the job's directory, relative to the sweep directory
    num: Optional[int] = None
    status: str = "failed"
    error: str = ""
    overrides: Dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _file_system_now(directory: str) -> float:
    """The time as the sweep directory's file system stamps files (a remote one may differ from ours)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".runner-sweep-start-") as probe:
            return os.fstat(probe.fileno()).st_mtime
    except OSError:
        return time.time()


def _read_yaml(path: str) -> Any:
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None


def _atomic_json(path: str, record: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def _write_summary(path: str, jobs: Sequence[_Job]) -> None:
    """One row per job; unique column names: job, status, the overrides, the metrics, error."""
    override_keys: Dict[str, str] = {}  # key -> column
    metric_keys: List[str] = []
    for job in jobs:
        for key in job.overrides:
            override_keys.setdefault(key, f"override.{key}" if key in _SUMMARY_COLUMNS else key)
    for job in jobs:
        for key in job.metrics:
            if key not in override_keys and key not in metric_keys:  # an overridden key shows its override
                metric_keys.append(key)
    columns = ["job", "status", *override_keys.values(), *metric_keys, "error"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for job in jobs:
            row: Dict[str, Any] = {key: job.metrics[key] for key in metric_keys if key in job.metrics}
            row.update({override_keys[k]: v for k, v in job.overrides.items()})
            row.update(job=job.num if job.num is not None else job.name, status=job.status, error=job.error)
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    os.replace(tmp, path)
    log.info("sweep summary: %s", path)
