"""inspect() and diff(): what a checkpoint records, read without building anything."""
import json

import torch

from nn_handler import NNHandler
from nn_handler.checkpointing import diff, inspect
from nn_handler.metrics import accuracy
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 8, "num_classes": 3}


def _run(path, lr=1e-3, hidden=(16,)):
    torch.manual_seed(0)
    h = NNHandler(MLP, in_features=8, out_features=3, hidden=list(hidden))
    h.set_optimizer(torch.optim.Adam, lr=lr)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.set_train_loader(DATA, batch_size=16, shuffle=True)
    h.metadata["run_config"] = {"optimizer": {"lr": lr}, "data": {"batch_size": 16}}
    h.train(2, ema_decay=0.9, progress_bar=False)
    h.save(path)
    return h


def test_inspect_reports_a_handler_file_field_by_field(tmp_path):
    h = _run(tmp_path / "a.pt")
    report = inspect(tmp_path / "a.pt")
    json.dumps(report)  # plain data all the way down
    assert report["kind"] == "handler" and report["format_version"] == 1
    assert report["integrity"]["verified"] is True and report["integrity"]["checksum"].startswith("crc32c:")
    assert report["versions"]["torch"] == str(torch.__version__)
    assert report["model"] == {"target": "nn_handler.models.MLP", "model_type": "classification",
                               "kwargs": {"in_features": 8, "out_features": 3, "hidden": [16]}}
    assert report["parameters"] == sum(p.numel() for p in h.module.parameters())
    assert [row["name"] for row in report["tensors"]] == list(h.module.state_dict())
    assert report["tensors"][0]["shape"] == [16, 8] and report["tensors"][0]["dtype"] == "float32"
    assert report["optimizer"]["target"] == "torch.optim.adam.Adam"
    assert report["optimizer"]["param_groups"][0]["lr"] == 2.5e-4  # the scheduler halved it twice
    assert report["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3
    assert report["scheduler"]["target"].endswith("StepLR") and report["scheduler"]["kwargs"]["gamma"] == 0.5
    assert report["progress"] == {"epoch": 2, "global_step": 8}
    assert report["history"]["epochs"] == 2 and report["history"]["last"]["train_losses"] == h.train_losses[-1]
    assert report["history"]["last_metrics"]["train_accuracy"] == h.train_metrics_history["accuracy"][-1]
    assert report["ema"] == {"decay": 0.9, "num_updates": 8}
    assert report["data"]["train"]["dataset"]["_target_"] == DATA["_target_"]
    assert report["run_config"] == {"optimizer": {"lr": 1e-3}, "data": {"batch_size": 16}}
    assert report["world_size"] == 1 and report["created"]


def test_metadata_survives_save_and_load(tmp_path):
    _run(tmp_path / "a.pt")
    assert NNHandler.load(tmp_path / "a.pt").metadata["run_config"]["optimizer"]["lr"] == 1e-3


def test_inspect_of_a_bare_state_dict_and_of_a_foreign_dict(tmp_path):
    model = MLP(in_features=4, out_features=2, hidden=[8])
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 7}, tmp_path / "foreign.pt")
    for name in ("bare.pt", "foreign.pt"):
        report = inspect(tmp_path / name)
        assert report["kind"] == "weights"
        assert report["integrity"]["verified"] is False and "no checksum" in report["integrity"]["reason"]
        assert report["parameters"] == sum(p.numel() for p in model.parameters())
        assert report["tensor_count"] == 4
    assert inspect(tmp_path / "foreign.pt")["other_keys"] == ["epoch"]


def test_many_tensors_are_summarised_by_module(tmp_path):
    h = NNHandler(MLP, in_features=4, out_features=2, hidden=[4] * 30)
    h.save(tmp_path / "deep.pt")
    report = inspect(tmp_path / "deep.pt")
    assert report["tensors"] is None and report["tensor_count"] == 62
    assert sum(g["tensors"] for g in report["tensor_groups"]) == 62


def test_inspect_reports_damage_instead_of_raising(tmp_path):
    _run(tmp_path / "a.pt")
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    report = inspect(tmp_path / "bad.pt")
    assert report["integrity"]["damaged"] is True and "checksum mismatch" in report["integrity"]["reason"]
    (tmp_path / "junk.pt").write_text("hello")
    assert "not a PyTorch checkpoint" in inspect(tmp_path / "junk.pt")["error"]


def test_diff_of_two_sweep_jobs_shows_the_learning_rate(tmp_path):
    _run(tmp_path / "a.pt", lr=1e-3)
    _run(tmp_path / "b.pt", lr=1e-4)
    d = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert d["hyperparameters"]["optimizer.lr"] == (1e-3, 1e-4)
    assert d["hyperparameters"]["optimizer.param_groups.0.initial_lr"] == (1e-3, 1e-4)
    assert d["config"] == {"optimizer.lr": (1e-3, 1e-4)}
    assert d["model_kwargs"] == {} and d["only_in_a"] == [] and d["only_in_b"] == []
    assert d["values"] and all(row["max_abs_diff"] > 0 for row in d["values"])


def test_diff_of_a_model_and_a_wider_one_shows_the_extra_keys(tmp_path):
    _run(tmp_path / "a.pt", hidden=(16,))
    _run(tmp_path / "b.pt", hidden=(16, 16))
    d = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert d["model_kwargs"] == {"hidden": ([16], [16, 16])}
    assert d["only_in_b"] == ["net.4.bias", "net.4.weight"]
    assert {"name": "net.2.weight", "a": [[3, 16], "torch.float32"], "b": [[16, 16], "torch.float32"]} \
        in d["shape_or_dtype"]


def test_diff_of_identical_files_finds_nothing(tmp_path):
    _run(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    d = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert d["values"] == [] and d["hyperparameters"] == {} and d["identical_tensors"] == 4
