"""inspect() and diff(): what a checkpoint records, read without building anything."""
import json

import pytest
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


# ---------------------------------------------------------------------------- safetensors files
def _export(tmp_path):
    h = _run(tmp_path / "a.pt")
    return h, h.export(tmp_path / "model.safetensors")


def _flip_data_byte(path):
    """Change one byte of the tensor data (not the header): only a read of the data could notice."""
    import struct
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_inspect_and_read_info_of_an_export_show_its_spec_and_tensors_from_the_header_alone(tmp_path):
    from nn_handler.checkpointing import CorruptCheckpointError, read_info
    h, path = _export(tmp_path)
    _flip_data_byte(path)  # the header is intact: inspect and read_info read nothing else
    report = inspect(path)
    json.dumps(report)
    assert report["kind"] == "export" and report["format_version"] == 1 and report["weights"] == "ema"
    assert "error" not in report and not report["integrity"].get("damaged") and report["problems"] == []
    assert report["model"] == {"target": "nn_handler.models.MLP", "model_type": "classification",
                               "kwargs": {"in_features": 8, "out_features": 3, "hidden": [16]}}
    assert report["versions"]["torch"] == str(torch.__version__)
    weights = h.ema.module.state_dict()
    assert {row["name"]: (row["shape"], row["dtype"]) for row in report["tensors"]} == {
        k: (list(v.shape), "float32") for k, v in weights.items()}
    assert report["parameters"] == sum(v.numel() for v in weights.values())
    assert report["tensor_bytes"] == 4 * report["parameters"] and report["tensor_count"] == len(weights)
    info = read_info(path)
    assert info["kind"] == "export" and info["model"] == report["model"] and info["weights"] == "ema"
    assert [row["name"] for row in info["tensors"]] == [row["name"] for row in report["tensors"]]
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in the exported tensors"):
        NNHandler.initialize_from_checkpoint(path)  # loading does read (and check) the data


def test_inspect_of_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    from nn_handler.checkpointing import read_info
    save_file({"encoder.weight": torch.zeros(4, 3, dtype=torch.float16), "step": torch.tensor([7])},
              str(tmp_path / "plain.safetensors"), metadata={"format": "pt", "source": "elsewhere"})
    for report in (inspect(tmp_path / "plain.safetensors"), read_info(tmp_path / "plain.safetensors")):
        assert report["kind"] == "safetensors" and report["model"] is None and report["format_version"] is None
        assert report["metadata"] == {"format": "pt", "source": "elsewhere"}
        assert report["parameters"] == 13 and report["tensor_bytes"] == 12 * 2 + 8
        assert {r["name"]: (r["shape"], r["dtype"]) for r in report["tensors"]} == {
            "encoder.weight": ([4, 3], "float16"), "step": ([1], "int64")}
    assert "no checksum" in inspect(tmp_path / "plain.safetensors")["integrity"]["reason"]


def _hostile(tmp_path, name, header: bytes, length=None, data=b""):
    import struct
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize("name, length, header, data, message", [
    ("huge_length", 1 << 60, b'{"a":', b"", "claims 1152921504606846976 bytes but the file holds only"),
    ("not_json", None, b"{not json", b"", "not valid JSON"),
    ("outside", None, b'{"w":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}', b"\0" * 16,
     "outside the 16 bytes the file holds"),
    ("wrong_size", None, b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}', b"\0" * 16, "needs 16 bytes"),
    ("bad_record", None, b'{"__metadata__":{"format":"nn_handler.export","nn_handler":"{oops"}}', b"",
     "'nn_handler' metadata is not valid JSON"),
])
def test_a_truncated_or_forged_safetensors_header_is_refused_with_a_clear_error(tmp_path, name, length, header,
                                                                                 data, message):
    from nn_handler.checkpointing import CorruptCheckpointError, read_info
    path = _hostile(tmp_path, name + ".safetensors", header, length, data)
    report = inspect(path)
    assert report["integrity"]["damaged"] is True and message in report["error"] and str(path) in report["error"]
    with pytest.raises(CorruptCheckpointError, match=message):
        read_info(path)


def test_a_truncated_export_is_refused(tmp_path):
    from nn_handler.checkpointing import CorruptCheckpointError, read_info
    _, path = _export(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    assert "outside the" in inspect(cut)["error"]
    with pytest.raises(CorruptCheckpointError, match="truncated or forged"):
        read_info(cut)


def test_runner_task_inspect_of_an_export_and_of_a_damaged_one(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    _, path = _export(tmp_path)
    bad = _hostile(tmp_path, "bad.safetensors", b'{"a":', 1 << 40)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    root = Path(__file__).resolve().parents[1]

    def cli(target):
        return subprocess.run([sys.executable, "-m", "runner", "task=inspect", f"checkpoint.path={target}",
                               "hydra.run.dir=out"], cwd=tmp_path, env={**env, "PYTHONPATH": str(root)},
                              capture_output=True, text=True, timeout=120)

    good = cli(path)
    assert good.returncode == 0, good.stdout + good.stderr[-4000:]
    assert "kind: nn_handler export (format version 1, ema weights)" in good.stdout
    assert "model: nn_handler.models.MLP (classification)" in good.stdout and "net.0.weight" in good.stdout
    refused = cli(bad)
    assert refused.returncode != 0
    assert "claims 1099511627776 bytes but the file holds only" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
