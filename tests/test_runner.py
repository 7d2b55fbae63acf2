"""The runner's CLI, driven as a user drives it: real ``python -m runner`` processes.

Each run writes under a temporary directory (``hydra.run.dir`` / ``hydra.sweep.dir``, or
the default ``outputs/`` of a temporary working directory). Tiny settings keep it fast:
synthetic data, a small MLP, one or two epochs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

TINY = ["data=synthetic", "model.hidden=[16]", "train.epochs=2"]


def run_cli(args, cwd, timeout=180, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run: (launch directory, run directory)."""
    base = tmp_path_factory.mktemp("runner")
    ok(run_cli([*TINY, "hydra.run.dir=runs/train"], cwd=base))
    return base, base / "runs" / "train"


def test_configs_ship_inside_the_package():
    conf = resources.files("runner") / "conf"
    for name in ("config.yaml", "task/train.yaml", "task/resume.yaml", "task/finetune.yaml", "task/infer.yaml",
                 "model/mlp.yaml", "data/digits.yaml", "data/synthetic.yaml", "optimizer/adam.yaml",
                 "scheduler/none.yaml"):
        assert (conf / name).is_file(), name


def test_default_run_trains_an_mlp_on_digits_above_90_percent_and_prints_the_next_commands(tmp_path):
    proc = ok(run_cli(["hydra.run.dir=out"], cwd=tmp_path))
    record = metrics(tmp_path / "out")
    assert record["task"] == "train" and record["epoch"] == 10
    assert record["val_accuracy"] > 0.9
    assert (tmp_path / "out" / "checkpoints" / "last.pth").is_file()
    for task in ("resume", "finetune", "infer"):
        assert f"python -m runner task={task} checkpoint.path=out/checkpoints/last.pth" in proc.stdout


def test_train_writes_checkpoint_metrics_hydra_files_and_epoch_lines_in_the_log(trained):
    _, run_dir = trained
    record = metrics(run_dir)
    assert record["task"] == "train" and record["epoch"] == 2 and record["world_size"] == 1
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert isinstance(record[key], float), key
    assert record["checkpoint_read"] is None
    assert record["checkpoint_written"] == str(run_dir / "checkpoints" / "last.pth")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    log = (run_dir / "runner.log").read_text()
    assert "epoch 1:" in log and "epoch 2:" in log


def test_resume_from_a_path_relative_to_the_launch_directory_continues_the_epoch_numbering(trained):
    base, _ = trained
    ok(run_cli(["task=resume", "checkpoint.path=runs/train/checkpoints/last.pth", "train.epochs=1",
                "hydra.run.dir=runs/resume"], cwd=base))
    record = metrics(base / "runs" / "resume")
    assert record["task"] == "resume" and record["epoch"] == 3
    assert record["checkpoint_read"] == str(base / "runs" / "train" / "checkpoints" / "last.pth")


def test_resume_accepts_a_run_directory_and_the_same_model_given_explicitly(trained):
    base, _ = trained
    ok(run_cli(["task=resume", "checkpoint.path=runs/train", "model=mlp", "model.hidden=[16]", "train.epochs=1",
                "hydra.run.dir=runs/resume_dir"], cwd=base))
    assert metrics(base / "runs" / "resume_dir")["epoch"] == 3


def test_resume_refuses_a_different_architecture_listing_the_differences(trained):
    base, _ = trained
    proc = run_cli(["task=resume", "checkpoint.path=runs/train", "model=mlp", "model.hidden=[32]",
                    "hydra.run.dir=runs/bad_resume"], cwd=base)
    assert proc.returncode != 0
    assert "hidden: checkpoint [16] vs config [32]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_with_a_new_learning_rate_keeps_the_optimizer_state(trained):
    """``optimizer.lr=...`` on a resume changes the restored Adam in place: its moments and step counts go on."""
    from nn_handler import NNHandler
    from nn_handler.checkpointing import read_info

    base, run = trained
    proc = ok(run_cli(["task=resume", "checkpoint.path=runs/train", "train.epochs=1", "optimizer.lr=0.0005",
                       "hydra.run.dir=runs/new_lr"], cwd=base))
    assert "resume: optimizer state restored, with lr=0.0005 from the config" in proc.stderr + proc.stdout
    before, after = (read_info(d / "checkpoints" / "last.pth") for d in (run, base / "runs" / "new_lr"))
    assert after["optimizer"]["lr"] == 0.0005 and before["optimizer"]["lr"] != 0.0005
    h = NNHandler.load(base / "runs" / "new_lr" / "checkpoints" / "last.pth")
    assert all(group["lr"] == 0.0005 for group in h.optimizer.param_groups)
    steps = {int(state["step"]) for state in h.optimizer.state_dict()["state"].values()}
    assert steps == {after["progress"]["global_step"]} and after["progress"]["global_step"] > before["progress"]["global_step"]


def test_finetune_sweep_over_two_learning_rates_writes_one_summary_row_per_job(trained):
    base, _ = trained
    ok(run_cli(["-m", "task=finetune", "checkpoint.path=runs/train/checkpoints/last.pth", "train.epochs=1",
                "optimizer.lr=1e-3,1e-4", "hydra.sweep.dir=sweeps/ft"], cwd=base))
    sweep = base / "sweeps" / "ft"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [r["optimizer.lr"] for r in rows] == ["0.001", "0.0001"]
    assert all(r["status"] == "completed" and r["task"] == "finetune" for r in rows)
    for job in ("0", "1"):
        record = metrics(sweep / job)
        assert record["task"] == "finetune" and record["epoch"] == 3
        assert rows[int(job)]["val_loss"] == str(record["val_loss"])
    # The finetune took its optimizer from the config, not from the checkpoint.
    state = torch.load(sweep / "1" / "checkpoints" / "last.pth", weights_only=True)
    assert state["optimizer"]["state"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_a_failed_sweep_job_gets_its_row_and_the_command_exits_nonzero(trained):
    base, _ = trained
    proc = run_cli(["-m", "task=finetune", "checkpoint.path=runs/train", "train.epochs=1", "optimizer.lr=1e-3,-1",
                    "hydra.sweep.dir=sweeps/fail"], cwd=base)
    assert proc.returncode != 0
    rows = list(csv.DictReader((base / "sweeps" / "fail" / "summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed")]
    assert "Invalid learning rate" in rows[1]["error"]
    assert rows[0]["val_loss"]


def test_infer_writes_predictions_in_dataset_order_and_metrics(trained):
    base, _ = trained
    ok(run_cli(["task=infer", "checkpoint.path=runs/train/checkpoints/last.pth", "hydra.run.dir=runs/infer"],
               cwd=base))
    out = base / "runs" / "infer"
    predictions = torch.load(out / "predictions.pt", weights_only=True)
    assert predictions.shape == (128, 10)  # data.val of the synthetic config, recorded in the checkpoint
    record = metrics(out)
    assert record["task"] == "infer" and record["epoch"] == 2
    assert isinstance(record["loss"], float) and 0.0 <= record["accuracy"] <= 1.0
    assert record["checkpoint_read"] == str(base / "runs" / "train" / "checkpoints" / "last.pth")


def test_a_user_config_dir_adds_model_and_data_groups_with_only_targets_and_kwargs(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "data").mkdir()
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        "_target_: nn_handler.models.MLP\nin_features: 8\nout_features: 3\nhidden: [8]\n")
    (tmp_path / "conf" / "data" / "mine.yaml").write_text(
        "train:\n  _target_: nn_handler.datasets.synthetic_classification\n  n: 64\n  in_features: 8\n"
        "  num_classes: 3\nbatch_size: 16\n")
    ok(run_cli(["--config-dir", "conf", "model=mine", "data=mine", "train.epochs=1", "hydra.run.dir=out"],
               cwd=tmp_path))
    record = metrics(tmp_path / "out")
    assert record["epoch"] == 1 and record["val_loss"] is None


# ---------------------------------------------------------------------------- errors users will make
def assert_clean_error(proc, *fragments):
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_checkpoint_path_names_the_key(tmp_path):
    assert_clean_error(run_cli(["task=resume", "hydra.run.dir=out"], cwd=tmp_path), "checkpoint.path")


def test_a_checkpoint_path_that_does_not_exist_names_the_path(tmp_path):
    proc = run_cli(["task=infer", "checkpoint.path=nowhere/last.pth", "hydra.run.dir=out"], cwd=tmp_path)
    assert_clean_error(proc, "checkpoint.path=nowhere/last.pth", str(tmp_path / "nowhere" / "last.pth"))


def test_a_target_that_does_not_import_names_the_target(tmp_path):
    proc = run_cli([*TINY, "model._target_=nn_handler.models.NoSuchNet", "hydra.run.dir=out"], cwd=tmp_path)
    assert_clean_error(proc, "model._target_", "nn_handler.models.NoSuchNet")


def test_a_misspelled_key_fails_before_any_work_naming_the_key(tmp_path):
    proc = run_cli([*TINY, "train.epoch=3", "hydra.run.dir=out"], cwd=tmp_path)
    assert_clean_error(proc, "train.epoch")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_train_setting_out_of_range_is_one_line_naming_it(tmp_path):
    """The library's SettingError (a typed error, not told by its text) becomes ``train: ...``."""
    proc = run_cli([*TINY, "train.validate_every=0", "hydra.run.dir=out"], cwd=tmp_path)
    assert_clean_error(proc, "train: validate_every must be >= 1")


def test_a_key_mismatch_under_strict_loading_names_the_keys(trained):
    base, _ = trained
    # dropout inserts a layer, so the last Linear's keys move from net.2 to net.3.
    proc = run_cli(["task=finetune", "checkpoint.path=runs/train", "+model.dropout=0.1", "load.strict=true",
                    "hydra.run.dir=runs/strict"], cwd=base)
    assert_clean_error(proc, "net.3.weight", "net.2.weight", "strict")


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    proc = run_cli(["task=resume", "hydra.run.dir=out"], cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
