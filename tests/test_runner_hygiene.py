"""The runner's manners, as a user meets them in real ``python -m runner`` processes: monitors checked
before training, a failed run's record (metrics.json and runner.log; also for a failure in the launch
before the task starts, and for an objective the task's record lacks), logging set once (``hydra.verbose``
makes the runner verbose, not matplotlib), no carriage returns in redirected output, files with the
umask's permissions, and the pictures a run leaves. The library's own monitor checks come first."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import helpers_core as hc
import helpers_generative as hg
import pytest

from nn_handler import NNHandler, SettingError
from nn_handler.callbacks import EarlyStopping, ModelCheckpoint
from nn_handler.checkpointing import CheckpointStore

TINY = ["data=synthetic", "model.hidden=[16]", "train.epochs=2"]
one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)


def run_cli(args, cwd, timeout=120, umask=0o022):
    """``python -m runner ARGS`` with its output redirected (pipes, as a log file is), under ``umask``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=lambda: os.umask(umask))


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def mode(path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


# ---------------------------------------------------------------------------- the library's monitor checks
@pytest.mark.parametrize("make, match", [
    (lambda: ModelCheckpoint(dirpath="unused", monitor="val_acc"), "ModelCheckpoint: monitor='val_acc'"),
    (lambda: EarlyStopping(monitor="val_acc"), "EarlyStopping: monitor='val_acc'"),
])
def test_a_callback_monitor_the_run_never_logs_is_refused_before_any_epoch(make, match, tmp_path):
    h = hc.classification_handler()
    h.add_callback(make())
    with pytest.raises(SettingError, match=match + ".*val_accuracy") as info:
        h.train(2, seed=0, progress_bar=False)
    assert info.value.name == "monitor" and "val_loss" in str(info.value) and h.epoch == 0


def test_val_monitors_need_validation_data_and_train_names_are_accepted(tmp_path):
    h = hc.classification_handler(val=False)
    h.add_callback(EarlyStopping(monitor="val_loss"))
    with pytest.raises(SettingError, match="need validation data"):
        h.train(1, seed=0, progress_bar=False)
    h = hc.classification_handler(val=False)
    cb = ModelCheckpoint(dirpath=str(tmp_path), monitor="train_accuracy", mode="max", save_last=False)
    h.add_callback(cb)
    h.train(2, seed=0, progress_bar=False)  # train_<metric> names the epoch's <metric>
    assert cb.best_model_score == pytest.approx(max(h.train_metrics_history["accuracy"]))


def test_the_store_checks_its_monitor_against_the_history_the_run_records(tmp_path):
    h = hc.classification_handler(val=False)
    with pytest.raises(ValueError, match="'val_acc'.*validation data.*train_accuracy"):
        CheckpointStore(tmp_path, keep_best=1, monitor="val_acc").check_monitor(h)
    CheckpointStore(tmp_path, keep_best=1, monitor="train_accuracy").check_monitor(h)


# ---------------------------------------------------------------------------- a misspelled save.monitor, a failed run
@pytest.fixture(scope="module")
def misspelled_monitor(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor")
    return run_cli([*TINY, "save.monitor=val_acc", "save.keep_best=1", "hydra.run.dir=out"], cwd=base), base / "out"


def test_a_misspelled_save_monitor_is_one_line_naming_the_key_and_the_valid_names(misspelled_monitor):
    proc, run_dir = misspelled_monitor
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "is not a value this run records" in line]
    assert len(errors) == 1, proc.stderr
    for name in ("save.monitor=val_acc", "val_loss", "val_accuracy", "train_loss", "train_accuracy"):
        assert name in errors[0]
    assert not (run_dir / "checkpoints").exists()
    assert "epoch 1:" not in (run_dir / "runner.log").read_text()  # refused before any training


def test_a_failed_run_writes_metrics_json_and_its_error_into_runner_log(misspelled_monitor):
    proc, run_dir = misspelled_monitor
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and record["task"] == "train"
    assert "save.monitor=val_acc" in record["error"] and "\n" not in record["error"]
    log = (run_dir / "runner.log").read_text()
    assert "save.monitor=val_acc" in log and "ERROR" in log
    assert (proc.stdout + proc.stderr).count("is not a value this run records") == 1  # told once, by Hydra


def test_a_run_that_crashes_while_training_records_how_far_it_got_and_the_traceback(tmp_path):
    # 16 inputs for the synthetic data's 64 features: the first forward pass fails inside h.train.
    proc = run_cli([*TINY, "model.in_features=16", "hydra.run.dir=out"], cwd=tmp_path)
    assert proc.returncode != 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["epoch"] == 0 and record["checkpoint_written"] is None
    assert record["error"].startswith("RuntimeError: ") and "\n" not in record["error"]
    log = (tmp_path / "out" / "runner.log").read_text()
    assert "train failed: RuntimeError" in log and "Traceback" in log


# ---------------------------------------------------------------------------- failures outside the task itself
@pytest.mark.parametrize("override, message", [
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node must be >= 1, got 0"),  # the launch, before any task
    ("objective=val_acc", "objective=val_acc is not a metric of task=train"),  # checked before training
])
def test_a_failure_before_the_task_starts_leaves_a_failed_record_and_one_message(override, message, tmp_path):
    proc = run_cli([*TINY, override, "hydra.run.dir=out"], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (proc.stdout + proc.stderr).count(message) == 1, proc.stderr
    run_dir = tmp_path / "out"
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["task"] == "train" and record["status"] == "failed" and message in record["error"]
    assert message in (run_dir / "runner.log").read_text()
    assert not (run_dir / "checkpoints").exists()  # nothing trained


def test_an_objective_the_finished_task_lacks_fails_it_and_its_record_keeps_the_figures(verbose_run):
    _, run_dir = verbose_run
    proc = run_cli(["task=infer", "checkpoint.path=out/checkpoints/last.pth", "objective=val_acc",
                    "hydra.run.dir=infer-objective"], cwd=run_dir.parent)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "objective=val_acc is not a metric of task=infer: choose one of" in proc.stderr
    assert "checkpoint_written" not in proc.stderr and "samples" not in proc.stderr  # bookkeeping is no objective
    record = json.loads((run_dir.parent / "infer-objective" / "metrics.json").read_text())
    assert record["status"] == "failed" and "objective=val_acc" in record["error"]
    assert record["task"] == "infer" and isinstance(record["loss"], float) and 0 <= record["accuracy"] <= 1


# ---------------------------------------------------------------------------- logging, output and file modes
@pytest.fixture(scope="module")
def verbose_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("verbose")
    proc = ok(run_cli([*TINY, "train.epochs=1", "hydra.verbose=true", "hydra.run.dir=out"], cwd=base))
    return proc, base / "out"


def test_hydra_verbose_shows_the_runners_debug_lines_and_no_matplotlib_font_lines(verbose_run):
    proc, run_dir = verbose_run
    output = proc.stdout + proc.stderr
    assert "[runner][DEBUG]" in output and "task=train" in output
    assert "matplotlib" not in output and "findfont" not in output
    assert "[runner][DEBUG]" in (run_dir / "runner.log").read_text()


def test_redirected_output_and_the_log_hold_no_carriage_returns(verbose_run):
    proc, run_dir = verbose_run
    for text in (proc.stdout, proc.stderr, (run_dir / "runner.log").read_text()):
        assert "\r" not in text


def test_pngs_and_json_are_written_with_the_umask_permissions(verbose_run):
    _, run_dir = verbose_run
    for name in ("losses.png", "metrics.png", "metrics.json", "runner.log", ".hydra/config.yaml"):
        assert mode(run_dir / name) == 0o644, name
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_sweeps_csv_and_its_jobs_files_get_the_umask_permissions(tmp_path):
    ok(run_cli(["-m", *TINY, "train.epochs=1", "seed=0", "hydra.sweep.dir=sweep"], cwd=tmp_path))
    assert mode(tmp_path / "sweep" / "summary.csv") == 0o644
    for name in ("losses.png", "metrics.json"):
        assert mode(tmp_path / "sweep" / "0" / name) == 0o644


# ---------------------------------------------------------------------------- a score model's run and samples
@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("score")
    ok(run_cli(["experiment=digits_score", "train.epochs=2", "train.validate_every=1", "model.hidden=32",
                "model.layers=1", "sample.every_n_epochs=0", "hydra.run.dir=runs/score"], cwd=base))
    return base, base / "runs" / "score"


def test_a_score_models_run_leaves_its_loss_picture_and_no_empty_metrics_picture(score_run):
    _, run_dir = score_run
    assert mode(run_dir / "losses.png") == 0o644
    assert not (run_dir / "metrics.png").exists()  # no metrics: nothing to plot but the losses


def test_the_sampling_progress_bar_writes_no_carriage_returns_into_a_redirected_log(score_run):
    base, _ = score_run
    proc = ok(run_cli(["task=sample", "checkpoint.path=runs/score", "sample.n=4", "sample.steps=200", "seed=0",
                       "hydra.run.dir=runs/sample"], cwd=base))
    assert "\r" not in proc.stderr and "\r" not in proc.stdout and "sampling" not in proc.stderr
    assert mode(base / "runs" / "sample" / "samples.png") == 0o644


def test_a_resumed_run_records_where_it_started_for_its_pictures(verbose_run):
    from nn_handler.plotting import losses_figure

    _, run_dir = verbose_run
    base = run_dir.parent
    (run_dir / "checkpoints" / "junk.pth").write_bytes(b"not a checkpoint")  # skipped, with one warning
    proc = ok(run_cli(["task=resume", "checkpoint.path=out", "train.epochs=2", "hydra.run.dir=resumed"], cwd=base))
    assert (proc.stdout + proc.stderr).count("junk.pth") == 1  # a warning is printed once
    assert (base / "resumed" / "runner.log").read_text().count("junk.pth") == 1
    h = NNHandler.load(base / "resumed" / "checkpoints" / "last.pth")
    assert h.metadata["training_starts"] == [{"epoch": 1, "label": "resumed"}] and len(h.train_losses) == 3
    ax = losses_figure(h).axes[0]
    assert any(list(line.get_xdata()) == [1.5, 1.5] for line in ax.lines)
    assert mode(base / "resumed" / "losses.png") == 0o644
