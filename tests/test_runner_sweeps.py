"""Sweeps (``python -m runner -m``) under Hydra's launcher and sweeper plugins, as a user runs them.

The summary is written by the process that runs the sweep, from each job's directory, so every
launcher gives one row per job, the failed ones included, and the command exits non-zero when a
job failed; ``objective=<metric>`` makes each job return that metric, so Optuna can optimise it.
Real subprocesses with tiny runs (synthetic data, an 8-unit MLP, one epoch); the in-process tests
below them check the summary's rules on hand-made job directories.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml
from omegaconf import OmegaConf

from runner import launch, reporting
from runner.errors import RunnerError

TINY = ["data=synthetic", "model.hidden=[8]", "train.epochs=1"]
# Adam refuses a negative learning rate: the third job fails, the first two complete.
THREE_JOBS_ONE_FAILING = ["optimizer.lr=0.01,0.001,-1"]


def run_cli(args: List[str], cwd: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def summary(sweep_dir: Path) -> tuple[List[str], List[Dict[str, str]]]:
    with (sweep_dir / "summary.csv").open(newline="") as fh:
        header = next(csv.reader(fh))
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open(newline="")))
    return header, rows


def check_three_jobs_one_failed(proc: subprocess.CompletedProcess, sweep_dir: Path) -> None:
    assert proc.returncode != 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    header, rows = summary(sweep_dir)
    assert len(header) == len(set(header)), header
    assert [(r["job"], r["optimizer.lr"], r["status"]) for r in rows] == [
        ("0", "0.01", "completed"), ("1", "0.001", "completed"), ("2", "-1", "failed")]
    for row in rows[:2]:  # each from its own metrics.json, written by another process
        record = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        assert row["val_loss"] == str(record["val_loss"]) and row["error"] == ""
    assert "Invalid learning rate" in rows[2]["error"]


def test_a_joblib_sweep_summarises_every_job_including_the_failed_one_and_exits_nonzero(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, *THREE_JOBS_ONE_FAILING,
                    "hydra.sweep.dir=sweep"], cwd=tmp_path)
    check_three_jobs_one_failed(proc, tmp_path / "sweep")


def test_a_joblib_sweep_in_the_default_timestamped_directory_keeps_its_jobs_in_it(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "optimizer.lr=0.01,0.001"],
                   cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    sweeps = sorted((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    assert [r["job"] for r in summary(sweeps[0])[1]] == ["0", "1"]


def test_a_submitit_local_sweep_summarises_every_job_including_the_failed_one_and_exits_nonzero(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=3",
                    "hydra.launcher.cpus_per_task=1", *TINY, *THREE_JOBS_ONE_FAILING, "hydra.sweep.dir=sweep"],
                   cwd=tmp_path)
    check_three_jobs_one_failed(proc, tmp_path / "sweep")


def test_an_optuna_sweep_minimises_the_objective_and_writes_its_results(tmp_path):
    proc = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3",
                    "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=0",
                    "optimizer.lr=interval(0.0001,0.01)", "objective=val_loss", *TINY, "hydra.sweep.dir=sweep"],
                   cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    sweep = tmp_path / "sweep"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    header, rows = summary(sweep)
    assert len(header) == len(set(header)) and header.count("status") == 1, header
    assert [r["job"] for r in rows] == ["0", "1", "2"] and all(r["status"] == "completed" for r in rows)
    losses = [float(r["val_loss"]) for r in rows]
    assert results["best_value"] == pytest.approx(min(losses))
    assert 1e-4 <= results["best_params"]["optimizer.lr"] <= 1e-2


def test_an_unknown_objective_is_one_line_naming_the_key_and_the_valid_names(tmp_path):
    proc = run_cli([*TINY, "objective=val_acc", "hydra.run.dir=out"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "objective=val_acc is not a metric" in proc.stderr and "val_accuracy" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- in process
def _cfg(**objective):
    return OmegaConf.create({"task": "train", "objective": None, **objective})


def test_the_objective_is_the_metric_as_a_float_nan_when_it_has_no_value_and_the_record_without_it():
    record = {"task": "train", "epoch": 1, "train_loss": 0.5, "val_loss": None, "val_accuracy": 1, "world_size": 1}
    assert launch.returned_to_hydra(_cfg(), record) is record
    assert launch.returned_to_hydra(_cfg(objective="train_loss"), record) == 0.5
    value = launch.returned_to_hydra(_cfg(objective="val_accuracy"), record)
    assert isinstance(value, float) and value == 1.0
    assert math.isnan(launch.returned_to_hydra(_cfg(objective="val_loss"), record))
    for name in ("task", "epoch", "val_acc"):
        with pytest.raises(RunnerError, match=f"objective={name} is not a metric.*train_loss, val_loss, val_accuracy"):
            launch.returned_to_hydra(_cfg(objective=name), record)


def _job(sweep: Path, name: str, overrides: List[str], metrics: Dict | None = None, status: Dict | None = None,
         num: int | None = None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (job / ".hydra" / reporting.JOB_STATUS_FILE).write_text(json.dumps(status))
    return job


def _age(path: Path, seconds: float) -> None:
    for p in [path, *path.rglob("*")]:
        t = time.time() - seconds
        os.utime(p, (t, t))


def _summarise(sweep: Path) -> reporting.SweepSummary:
    cb = reporting.SweepSummary()
    cb.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "output_subdir": ".hydra"}}))
    return cb


def test_the_summary_reads_this_sweeps_jobs_only_with_unique_columns_and_a_row_for_a_job_that_wrote_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    _age(_job(sweep, "3", ["optimizer.lr=1"], {"val_loss": 9.0, "status": "completed"}, num=3), 3600)  # leftover
    reused = _job(sweep, "1", ["optimizer.lr=2"], {"val_loss": 8.0, "status": "completed"}, num=1)
    _age(reused / "metrics.json", 3600)  # the earlier sweep's metrics.json, not this job's
    cb = _summarise(sweep)
    for path in [reused / ".hydra" / "overrides.yaml", reused / ".hydra" / "hydra.yaml"]:
        os.utime(path)  # rewritten by this sweep's job 1
    _job(sweep, "0", ["optimizer.lr=0.1", "+job=x"], {"val_loss": 0.5, "status": "completed", "error": None},
         {"status": "completed", "error": None}, num=0)
    _job(sweep, "2", ["optimizer.lr=-1"], {"val_loss": None, "status": "failed", "error": "bad lr"}, num=2)
    with pytest.raises(SystemExit) as exc:
        cb.on_multirun_end(config=None)
    assert exc.value.code == 1
    header, rows = summary(sweep)
    assert header == ["job", "status", "optimizer.lr", "override.job", "val_loss", "error"]
    assert [(r["job"], r["status"], r["optimizer.lr"], r["val_loss"], r["error"]) for r in rows] == [
        ("0", "completed", "0.1", "0.5", ""),
        ("1", "failed", "2", "", "the job did not finish (no metrics.json)"),
        ("2", "failed", "-1", "", "bad lr")]
    assert rows[0]["override.job"] == "x"


def test_hydras_word_that_a_job_failed_wins_and_a_complete_sweep_exits_cleanly(tmp_path):
    sweep = tmp_path / "sweep"
    cb = _summarise(sweep)
    _job(sweep, "0", ["seed=1"], {"val_loss": 0.5, "status": "completed"}, num=0)
    cb.on_multirun_end(config=None)  # no SystemExit: every job completed
    assert [r["status"] for r in summary(sweep)[1]] == ["completed"]
    cb = _summarise(sweep)
    os.utime(sweep / "0" / ".hydra" / "overrides.yaml")
    (sweep / "0" / ".hydra" / reporting.JOB_STATUS_FILE).write_text(
        json.dumps({"status": "failed", "error": "objective=x is not a metric"}))
    os.utime(sweep / "0" / "metrics.json")
    with pytest.raises(SystemExit):
        cb.on_multirun_end(config=None)
    assert [(r["status"], r["error"]) for r in summary(sweep)[1]] == [("failed", "objective=x is not a metric")]
