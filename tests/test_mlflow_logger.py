"""MLflowLogger: the run read back with MLflow's own client after training and after a resume (the same
run, each metric's steps continuing, none repeated), confinement of a restored tracking URI, the
runner's ``logger=mlflow`` (real ``python -m runner`` processes), and the one clear error when the
mlflow package is missing (simulated: ``sys.modules["mlflow"] = None``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from test_loggers import TINY, StepLosses, make, run_cli

from nn_handler import NNHandler
from nn_handler.callbacks import MLflowLogger

ROOT = Path(__file__).resolve().parents[1]


def _client(store: Path):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=store.resolve().as_uri())


def _runs(store: Path) -> list:
    client = _client(store)
    experiment = client.get_experiment_by_name("nn_handler")
    assert experiment is not None, f"no experiment in {store}"
    return client.search_runs([experiment.experiment_id])


def history(store: Path, run_id: str, key: str) -> Dict[int, float]:
    points = _client(store).get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {sorted(steps)}"
    return {m.step: m.value for m in points}


def test_mlflow_run_read_back_after_training_and_a_resume_continues_the_same_run(tmp_path):
    pytest.importorskip("mlflow")
    logs = tmp_path / "logs"
    h = make(MLflowLogger(logs, every_n_steps=3))
    h.train(1, progress_bar=False, seed=0)
    h.save(tmp_path / "run.pt")
    h.train(1, progress_bar=False)  # logged up to step 16, then "crashed" without a checkpoint
    seen = StepLosses()
    r = NNHandler.load(tmp_path / "run.pt")
    r.add_callback(seen)
    r.train(2, progress_bar=False)

    (run,) = _runs(logs / "mlruns")  # one run: the resume reopened it
    run_id = run.info.run_id
    assert [cb.run_id for cb in r.callbacks if isinstance(cb, MLflowLogger)] == [run_id]
    step_loss = history(logs / "mlruns", run_id, "train_loss_step")
    assert sorted(step_loss) == [3, 6, 9, 12, 15, 18, 21, 24]
    for step in (18, 21, 24):  # past what the crashed run logged: the resumed run's values
        assert step_loss[step] == pytest.approx(seen.loss[step], rel=1e-6)
    train_loss = history(logs / "mlruns", run_id, "train_loss")
    assert sorted(train_loss) == [8, 16, 24] and train_loss[24] == pytest.approx(r.train_losses[-1], rel=1e-6)
    assert sorted(history(logs / "mlruns", run_id, "val_accuracy")) == [8, 16, 24]
    assert history(logs / "mlruns", run_id, "epoch") == {8: 1.0, 16: 2.0, 24: 3.0}
    assert sorted(history(logs / "mlruns", run_id, "lr_group0")) == [3, 6, 9, 12, 15, 18, 21, 24]
    run = _client(logs / "mlruns").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["optimizer._target_"] == "Adam"
    assert run.data.metrics["train_loss"] == pytest.approx(r.train_losses[-1], rel=1e-6)  # the final metrics


def test_a_restored_tracking_uri_outside_the_checkpoint_directory_or_a_server_is_not_used(tmp_path):
    pytest.importorskip("mlflow")
    outside = tmp_path / "outside"
    for uri in ("http://tracking.invalid:5000", outside.as_uri()):
        run = tmp_path / ("server" if uri.startswith("http") else "file")
        h = make(MLflowLogger(run / "logs", every_n_steps=0))
        h.callbacks[-1].use_tracking_uri(uri)  # what the file will record
        h.save(run / "ckpt.pt")
        r = NNHandler.load(run / "ckpt.pt")
        with pytest.warns(Warning, match=r"the recorded tracking_uri .* would write outside"):
            r.train(1, progress_bar=False)
        (found,) = _runs(run / "logs" / "mlruns")
        assert sorted(history(run / "logs" / "mlruns", found.info.run_id, "train_loss")) == [8]
    assert not outside.exists()


def test_a_recorded_run_id_that_is_not_one_is_not_restored(tmp_path):
    pytest.importorskip("mlflow")
    logger = MLflowLogger(tmp_path / "logs")
    with pytest.raises(ValueError, match="not an MLflow run id"):
        logger.load_state_dict({"run_id": "../../etc"})
    logger.load_state_dict({"run_id": "0" * 32})
    assert logger.state_dict() == {"run_id": "0" * 32}


def test_without_the_mlflow_package_the_logger_names_it_and_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without mlflow gives `import mlflow`
    with pytest.raises(ImportError, match=r"MLflowLogger needs the mlflow package: pip install 'nn-handler\[mlflow\]'"):
        MLflowLogger("logs")


def test_runner_logger_mlflow_without_the_package_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    code = ("import runpy, sys; sys.modules['mlflow'] = None; sys.argv = ['runner', *sys.argv[1:]]; "
            "runpy.run_module('runner', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "train.epochs=1", "logger=mlflow", "hydra.run.dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "logger=mlflow: MLflowLogger needs the mlflow package: pip install 'nn-handler[mlflow]'" in out
    assert "Traceback" not in out


def test_runner_logger_mlflow_logs_the_run_config_and_an_auto_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    run_cli([*TINY, "logger=mlflow", "logger.every_n_steps=3", "hydra.run.dir=runs/a"], tmp_path)
    store = tmp_path / "runs" / "a" / "logs" / "mlruns"
    (run,) = _runs(store)
    assert run.data.params["logger.name"] == "mlflow" and run.data.params["data.batch_size"] == "64"
    assert sorted(history(store, run.info.run_id, "train_loss_step")) == [3, 6, 9, 12, 15]
    run_cli([*TINY[:2], "train.epochs=3", "auto_resume=true", "logger=mlflow", "hydra.run.dir=runs/a"], tmp_path)
    (again,) = _runs(store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps: List[int] = sorted(history(store, run.info.run_id, "train_loss_step"))
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24]
    assert sorted(history(store, run.info.run_id, "train_loss")) == [8, 16, 24]

