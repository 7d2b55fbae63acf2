"""CSVLogger and TensorBoardLogger: logs read back after training, after a resume (steps continue,
none repeated, one header), rank 0 only under torchrun, confinement of a restored dirpath, and the
runner's ``logger=`` group (real ``python -m runner`` processes).

Run as a script (``torchrun ... tests/test_loggers.py OUT``) it is the worker of the two-rank test.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.callbacks import Callback, CSVLogger, MLflowLogger, TensorBoardLogger
from nn_handler.metrics import accuracy
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 8, "num_classes": 3}
STEPS_PER_EPOCH = 8  # 64 samples, batches of 8
ROOT = Path(__file__).resolve().parents[1]


def _has(package: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(package) is not None


def make(*callbacks: Callback) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, device="cpu", in_features=8, out_features=3, hidden=[8])
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.set_train_loader(DATA, batch_size=8, shuffle=True)
    h.set_val_loader({**DATA, "n": 16, "sample_seed": 1}, batch_size=8)
    for cb in callbacks:
        h.add_callback(cb)
    return h


class StepLosses(Callback):
    """What the loop gave each optimizer step (to compare the logged values with); not recorded."""

    recorded = False

    def __init__(self):
        self.loss: Dict[int, float] = {}
        self.lr: Dict[int, float] = {}

    def on_batch_end(self, handler: Any, batch: int, logs: Dict[str, Any]) -> None:
        self.loss[logs["global_step"]] = float(logs["loss"])
        self.lr[logs["global_step"]] = handler.optimizer.param_groups[0]["lr"]


def read_csv(path: Path) -> List[Dict[str, str]]:
    text = path.read_text()
    assert text.count("step,epoch") == 1, "one header"
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def steps_of(rows: List[Dict[str, str]]) -> List[int]:
    return [int(r["step"]) for r in rows]


def epoch_rows(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    return [r for r in rows if r.get("train_loss")]


def test_csv_log_has_a_row_per_logged_step_and_epoch_values_and_hparams(tmp_path):
    seen = StepLosses()
    h = make(CSVLogger(tmp_path / "logs", every_n_steps=3), seen)
    h.train(2, progress_bar=False, seed=0)
    rows = read_csv(tmp_path / "logs" / "metrics.csv")
    assert steps_of(rows) == [3, 6, 8, 9, 12, 15, 16]  # step rows every 3, epoch rows at 8 and 16, none twice
    for row in rows:
        if row["train_loss_step"]:
            step = int(row["step"])
            assert float(row["train_loss_step"]) == pytest.approx(seen.loss[step], rel=1e-6)
            assert float(row["lr_group0"]) == pytest.approx(seen.lr[step])
    ends = epoch_rows(rows)
    assert [int(r["epoch"]) for r in ends] == [1, 2]
    assert [float(r["train_loss"]) for r in ends] == pytest.approx(h.train_losses)
    assert [float(r["val_loss"]) for r in ends] == pytest.approx(h.val_losses)
    assert [float(r["val_accuracy"]) for r in ends] == pytest.approx(h.val_metrics_history["accuracy"])
    assert [float(r["lr"]) for r in ends] == pytest.approx([5e-3, 2.5e-3])
    hp = json.loads((tmp_path / "logs" / "hparams.json").read_text())
    assert hp["hparams"]["optimizer.lr"] == 1e-2
    assert hp["metrics"]["train_loss"] == pytest.approx(h.train_losses[-1])
    assert hp["global_step"] == 16


def test_csv_resume_drops_rows_logged_after_the_checkpoint_and_continues_under_one_header(tmp_path):
    h = make(CSVLogger(tmp_path / "logs", every_n_steps=3))
    h.train(1, progress_bar=False, seed=0)
    h.save(tmp_path / "run.pt")
    h.train(1, progress_bar=False)  # logged up to step 16, then "crashed" without a checkpoint
    assert steps_of(read_csv(tmp_path / "logs" / "metrics.csv"))[-1] == 16
    seen = StepLosses()
    r = NNHandler.load(tmp_path / "run.pt")
    r.add_callback(seen)
    r.train(2, progress_bar=False)
    rows = read_csv(tmp_path / "logs" / "metrics.csv")
    assert steps_of(rows) == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
    assert [float(row["train_loss"]) for row in epoch_rows(rows)] == pytest.approx(r.train_losses)
    for row in rows:  # the rows after step 8 are the resumed run's, not the crashed one's
        if int(row["step"]) > 8 and row["train_loss_step"]:
            assert float(row["train_loss_step"]) == pytest.approx(seen.loss[int(row["step"])], rel=1e-6)


def test_a_logger_restored_with_a_dirpath_outside_the_checkpoint_directory_writes_inside_it(tmp_path):
    outside = tmp_path / "outside"
    h = make(CSVLogger(outside, every_n_steps=4))
    h.train(1, progress_bar=False, seed=0)
    (tmp_path / "run").mkdir()
    h.save(tmp_path / "run" / "ckpt.pt")
    before = (outside / "metrics.csv").read_text()
    r = NNHandler.load(tmp_path / "run" / "ckpt.pt")
    with pytest.warns(Warning, match="outside"):
        r.train(1, progress_bar=False)
    assert (outside / "metrics.csv").read_text() == before
    assert steps_of(read_csv(tmp_path / "run" / "logs" / "metrics.csv")) == [12, 16]


class CountingLoss:
    """A stand-in for the step's loss tensor that counts conversions to a number (a device sync)."""

    calls = 0

    def __float__(self) -> float:
        CountingLoss.calls += 1
        return 0.5


def test_only_logged_steps_convert_the_loss_to_a_number(tmp_path):
    h = make()
    logger = CSVLogger(tmp_path, every_n_steps=5)
    logger.on_train_begin(h)
    CountingLoss.calls = 0
    for step in range(1, 21):
        logger.on_batch_end(h, step - 1, {"loss": CountingLoss(), "batch_size": 8, "global_step": step})
    assert CountingLoss.calls == 4
    assert steps_of(read_csv(tmp_path / "metrics.csv")) == [5, 10, 15, 20]


def scalars(directory: Path, tag: str) -> Dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory))
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {e.step: e.value for e in events}


def hparams_of(directory: Path) -> Dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(directory))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in info.hparams.items()}


def test_tensorboard_events_read_back_after_training_and_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    h = make(TensorBoardLogger(logs, every_n_steps=3))
    h.train(1, progress_bar=False, seed=0)
    h.save(tmp_path / "run.pt")
    h.train(1, progress_bar=False)  # logged past the checkpoint, then "crashed"
    seen = StepLosses()
    r = NNHandler.load(tmp_path / "run.pt")
    r.add_callback(seen)
    r.train(2, progress_bar=False)
    step_loss = scalars(logs, "train/loss_step")
    assert sorted(step_loss) == [3, 6, 9, 12, 15, 18, 21, 24]
    for step in (9, 12, 15, 18, 21, 24):  # the resumed run's values, the crashed run's purged
        assert step_loss[step] == pytest.approx(seen.loss[step], rel=1e-5)
    train_loss = scalars(logs, "train/loss")
    assert sorted(train_loss) == [8, 16, 24]
    assert [train_loss[s] for s in (8, 16, 24)] == pytest.approx(r.train_losses, rel=1e-5)
    assert sorted(scalars(logs, "val/accuracy")) == [8, 16, 24]
    assert sorted(scalars(logs, "lr/group0")) == [3, 6, 9, 12, 15, 18, 21, 24]
    hp = hparams_of(logs / "hparams")
    assert hp["optimizer.lr"] == pytest.approx(1e-2)
    assert scalars(logs / "hparams", "hparam/train_loss")[24] == pytest.approx(r.train_losses[-1], rel=1e-5)


# ---------------------------------------------------------------------------- two ranks
def _worker(out: str) -> None:
    """torchrun worker: each rank logs into its own directory; only rank 0's may fill."""
    rank = int(os.environ["RANK"])
    mlflow = [MLflowLogger(os.path.join(out, f"mlflow{rank}"), every_n_steps=2)] if _has("mlflow") else []
    h = make(CSVLogger(os.path.join(out, f"csv{rank}"), every_n_steps=2),
             TensorBoardLogger(os.path.join(out, f"tb{rank}"), every_n_steps=2), *mlflow)
    h.train(2, progress_bar=False, seed=0)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": h.world_size, "global_step": h.global_step, "train_losses": h.train_losses}, f)


@pytest.mark.distributed
def test_only_rank_zero_writes_under_a_two_process_torchrun(tmp_path):
    pytest.importorskip("tensorboard")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 8  # 4 steps per rank per epoch
    rows = read_csv(tmp_path / "csv0" / "metrics.csv")
    assert steps_of(rows) == [2, 4, 6, 8]
    assert [float(r["train_loss"]) for r in epoch_rows(rows)] == pytest.approx(info["train_losses"])
    assert sorted(scalars(tmp_path / "tb0", "train/loss")) == [4, 8]
    assert not (tmp_path / "csv1").exists() and not (tmp_path / "tb1").exists()
    if _has("mlflow"):
        assert not (tmp_path / "mlflow1").exists()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=(tmp_path / "mlflow0" / "mlruns").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("nn_handler").experiment_id])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [4, 8]


# ---------------------------------------------------------------------------- the runner
TINY = ["data=synthetic", "model.hidden=[16]", "train.epochs=2", "train.progress_bar=false"]  # 8 steps per epoch


def run_cli(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def test_runner_logger_csv_and_its_resumes_continue_the_log(tmp_path):
    run = tmp_path / "runs" / "a"
    run_cli([*TINY, "logger=csv", "logger.every_n_steps=3", "hydra.run.dir=runs/a"], tmp_path)
    log = run / "logs" / "metrics.csv"
    assert steps_of(read_csv(log)) == [3, 6, 8, 9, 12, 15, 16]
    hp = json.loads((run / "logs" / "hparams.json").read_text())
    assert hp["hparams"]["logger.name"] == "csv" and hp["hparams"]["data.batch_size"] == 64
    with open(log, "a") as f:  # a row logged after the last checkpoint by a run that then crashed
        f.write("99,3,1.0,0.001" + "," * (len(read_csv(log)[0]) - 4) + "\n")
    run_cli([*TINY[:2], "train.epochs=3", "auto_resume=true", "logger=csv", "hydra.run.dir=runs/a"], tmp_path)
    rows = read_csv(log)
    assert steps_of(rows) == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]
    assert [int(r["epoch"]) for r in epoch_rows(rows)] == [1, 2, 3]
    # task=resume into a new run directory: the restored logger writes there, from the checkpoint's step on
    run_cli(["task=resume", "checkpoint.path=runs/a", "train.epochs=1", "train.progress_bar=false",
             "hydra.run.dir=runs/b"], tmp_path)
    assert steps_of(read_csv(tmp_path / "runs" / "b" / "logs" / "metrics.csv")) == [27, 30, 32]
    assert steps_of(read_csv(log)) == steps_of(rows)


def test_runner_logger_tensorboard_writes_events_with_the_run_config(tmp_path):
    pytest.importorskip("tensorboard")
    run_cli([*TINY, "logger=tensorboard", "logger.every_n_steps=4", "hydra.run.dir=run"], tmp_path)
    logs = tmp_path / "run" / "logs"
    assert sorted(scalars(logs, "train/loss_step")) == [4, 8, 12, 16]
    assert sorted(scalars(logs, "val/accuracy")) == [8, 16]
    hp = hparams_of(logs / "hparams")
    assert hp["logger.name"] == "tensorboard" and hp["optimizer.lr"] == pytest.approx(1e-3)


def test_runner_without_a_logger_writes_no_log(tmp_path):
    run_cli([*TINY[:2], "train.epochs=1", "hydra.run.dir=run"], tmp_path)
    assert not (tmp_path / "run" / "logs").exists()


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    _worker(sys.argv[1])
