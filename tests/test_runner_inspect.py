"""``task=inspect``, ``task=diff`` and config drift on resume, driven through the real CLI.

The checkpoints come from a few tiny runs shared by the module (synthetic data, a small MLP,
one epoch); the read-only commands run side by side to keep the module quick.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_runner import assert_clean_error, metrics, ok, run_cli

from nn_handler.checkpointing import inspect
from nn_handler.models import MLP
from runner.inspection import format_diff, format_inspect

TINY = ["data=synthetic", "model.hidden=[16]", "train.epochs=1", "train.progress_bar=false"]
CKPT = "checkpoints/last.pth"


def run_all(commands, cwd):
    """``{name: args}`` run side by side as ``python -m runner`` processes: ``{name: CompletedProcess}``."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    procs = {name: subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A launch directory with: a trained run, a wider one, a fine-tuning sweep over two learning
    rates, a bare state_dict, a file written by another tool and a damaged copy."""
    base = tmp_path_factory.mktemp("inspect")
    for proc in run_all({"train": [*TINY, "hydra.run.dir=runs/train"],
                         "wide": [*TINY, "model.hidden=[16,16]", "hydra.run.dir=runs/wide"]}, base).values():
        ok(proc)
    ok(run_cli(["-m", "task=finetune", "checkpoint.path=runs/train", "train.epochs=1", "train.progress_bar=false",
                "optimizer.lr=1e-3,1e-4", "hydra.sweep.dir=sweeps/ft"], cwd=base))
    model = MLP(in_features=4, out_features=2, hidden=[8])
    torch.save(model.state_dict(), base / "bare.pt")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 7, "optimizer": "sgd"}, base / "foreign.pt")
    data = bytearray((base / "runs" / "train" / CKPT).read_bytes())
    data[_middle_of_largest_tensor(base / "runs" / "train" / CKPT)] ^= 0x10  # damage the weights, not the layout
    (base / "damaged.pth").write_bytes(bytes(data))
    return base


@pytest.fixture(scope="module")
def cli(base):
    """The read-only commands, run once."""
    return run_all({
        "text": ["task=inspect", "checkpoint.path=runs/train"],
        "json": ["task=inspect", "checkpoint.path=runs/train", "inspect.format=json"],
        "bare": ["task=inspect", "checkpoint.path=bare.pt", "inspect.format=json"],
        "damaged": ["task=inspect", "checkpoint.path=damaged.pth"],
        "diff_lr": ["task=diff", "checkpoint.path=sweeps/ft/0", "diff.other=sweeps/ft/1"],
        "diff_wide": ["task=diff", "checkpoint.path=runs/train", "diff.other=runs/wide", "diff.format=json"],
        "diff_no_other": ["task=diff", "checkpoint.path=runs/train"],
    }, base)


def lines_of(text):
    return [line.rstrip() for line in text.splitlines()]


# ---------------------------------------------------------------------------- inspect
def test_inspect_prints_a_readable_summary_of_a_runner_checkpoint(base, cli):
    proc = ok(cli["text"])
    lines = lines_of(proc.stdout)
    path = base / "runs" / "train" / CKPT
    assert lines[0].startswith(f"checkpoint: {path} (")
    assert lines[1].startswith("integrity: checksum verified (crc32c:")
    assert "kind: nn_handler checkpoint, format version 1" in lines
    assert f"versions: nn_handler={inspect(path)['versions']['nn_handler']}, torch={torch.__version__}" in lines
    assert any(line.startswith("created: 20") for line in lines)
    assert "world size: 1" in lines
    assert "model: nn_handler.models.MLP (classification)" in lines
    assert "  kwargs: in_features=64, out_features=10, hidden=[16], dropout=0.0" in lines
    assert f"  parameters: {64 * 16 + 16 + 16 * 10 + 10:,}" in lines
    assert lines_of(proc.stdout)[lines.index("tensors (4, 4.7 KiB)") + 1].split() == \
        ["name", "shape", "dtype", "numel", "size"]
    assert "  net.0.weight  16x64  float32  1,024  4.0 KiB" in lines
    assert "optimizer: torch.optim.adam.Adam" in lines and "  kwargs: lr=0.001" in lines
    assert any(line.startswith("  param group 0 (4 tensors): lr=0.001, betas=[0.9, 0.999]") for line in lines)
    assert "scheduler: none" in lines
    assert "loss: torch.nn.modules.loss.CrossEntropyLoss()" in lines
    assert "progress: epoch 1, global step 8" in lines
    assert any(line.startswith("history (1 epochs), last values: train_losses=") and "val_accuracy=" in line
               for line in lines)
    assert {"callbacks: none", "ema: none", "sde: none", "sampler: none"} <= set(lines)
    assert any(line.startswith("  train: nn_handler.datasets.synthetic_classification(n=512,")
               and "loader: batch_size=64" in line for line in lines)
    assert any(line.startswith("lineage: run ") for line in lines)
    assert "  continues from: nothing (a fresh run)" in lines
    config = lines[lines.index("run config (resolved)") + 1:]
    assert "  task: train" in config and "    lr: 0.001" in config and "    epochs: 1" in config
    # quick and quiet: no run directory, no .hydra/, no log file where it was launched
    assert sorted(p.name for p in base.iterdir()) == ["bare.pt", "damaged.pth", "foreign.pt", "runs", "sweeps"]
    assert "Traceback" not in proc.stderr


def test_inspect_json_is_exactly_the_report_and_holds_the_resolved_run_config(base, cli):
    report = json.loads(ok(cli["json"]).stdout)
    expected = json.loads(json.dumps(inspect(base / "runs" / "train" / CKPT)))
    assert report == expected
    assert report["kind"] == "handler" and report["integrity"]["verified"] is True
    assert report["model"]["kwargs"] == {"in_features": 64, "out_features": 10, "hidden": [16], "dropout": 0.0}
    assert report["progress"] == {"epoch": 1, "global_step": 8}
    config = report["run_config"]
    assert config["task"] == "train" and config["optimizer"] == {"_target_": "torch.optim.Adam", "lr": 0.001}
    assert config["data"]["batch_size"] == 64 and config["train"]["epochs"] == 1
    assert config["model"]["hidden"] == [16] and "hydra" not in config
    assert report["lineage"]["parent"] is None


def test_inspect_of_a_bare_state_dict_and_of_a_file_from_another_tool(base, cli):
    report = json.loads(ok(cli["bare"]).stdout)
    assert report["kind"] == "weights" and report["integrity"]["verified"] is False
    assert "no checksum" in report["integrity"]["reason"]
    assert report["parameters"] == 4 * 8 + 8 + 8 * 2 + 2 and report["tensor_count"] == 4
    assert [(t["name"], t["shape"], t["dtype"]) for t in report["tensors"]] == [
        ("net.0.weight", [8, 4], "float32"), ("net.0.bias", [8], "float32"),
        ("net.2.weight", [2, 8], "float32"), ("net.2.bias", [2], "float32")]
    # the text of a file written by another tool (the CLI prints exactly format_inspect of the report)
    lines = lines_of(format_inspect(inspect(base / "foreign.pt")))
    assert lines[1] == "integrity: not verified: the file carries no checksum (not written by nn_handler)"
    assert lines[2] == "kind: model weights only (a dict with model_state_dict; other keys: epoch, optimizer)"
    assert "parameters: 58" in lines and "  net.2.weight  2x8    float32  16     64 B" in lines
    # the text of the bare file, from the same report
    bare = lines_of(format_inspect(inspect(base / "bare.pt")))
    assert bare[2] == "kind: model weights only (a bare state_dict)" and "parameters: 58" in bare


def _middle_of_largest_tensor(path) -> int:
    """The offset of the middle byte of the largest tensor record in a torch zip."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as zf:
        # the largest tensor's bytes (not the pickle, which grows with the recorded run config)
        info = max((i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")),
                   key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_inspect_of_a_damaged_file_reports_the_damage_instead_of_crashing(base, cli):
    proc = cli["damaged"]
    assert_clean_error(proc, "damaged.pth", "cannot be trusted", "checksum mismatch")
    lines = lines_of(proc.stdout)
    assert lines[1].startswith("integrity: DAMAGED: checksum mismatch")
    assert "model: nn_handler.models.MLP (classification)" in lines  # what could be read is still shown
    # a file that is not a checkpoint at all
    (base / "junk.pt").write_text("hello")
    try:
        text = format_inspect(inspect(base / "junk.pt"))
    finally:
        (base / "junk.pt").unlink()
    assert "ERROR: not a PyTorch checkpoint" in text


def test_many_tensors_are_shown_grouped_by_module(tmp_path):
    from nn_handler import NNHandler

    NNHandler(MLP, in_features=4, out_features=2, hidden=[4] * 30).save(tmp_path / "deep.pt")
    lines = lines_of(format_inspect(inspect(tmp_path / "deep.pt")))
    header = next(i for i, line in enumerate(lines) if line.startswith("tensors (62, "))
    assert lines[header].endswith(": grouped by module")
    assert lines[header + 1].split() == ["module", "tensors", "numel", "size", "dtypes"]
    assert lines[header + 2].split()[:2] == ["net", "62"]


# ---------------------------------------------------------------------------- diff
def test_diff_of_two_finetune_jobs_of_a_sweep_shows_the_learning_rate(base, cli):
    lines = lines_of(ok(cli["diff_lr"]).stdout)
    assert lines[0] == f"a: {base / 'sweeps' / 'ft' / '0' / CKPT}"
    assert lines[1] == f"b: {base / 'sweeps' / 'ft' / '1' / CKPT}"
    config = lines.index("config (1)")
    assert lines[config + 1].split() == ["optimizer.lr", "0.001", "->", "0.0001"]
    hyper = next(i for i, line in enumerate(lines) if line.startswith("hyperparameters ("))
    assert ["optimizer.lr", "0.001", "->", "0.0001"] in [line.split() for line in lines[hyper + 1:hyper + 4]]
    assert not any(line.startswith(("model kwargs", "tensors only in", "shape or dtype")) for line in lines)
    values = next(i for i, line in enumerate(lines) if line.startswith("largest absolute differences"))
    assert "(4 differ, 0 identical; top 4)" in lines[values]
    assert all(float(line.split()[1]) > 0 for line in lines[values + 1:values + 5])


def test_diff_of_a_model_and_a_wider_one_shows_the_extra_keys(cli):
    d = json.loads(ok(cli["diff_wide"]).stdout)
    assert d["model_kwargs"] == {"hidden": [[16], [16, 16]]}
    assert d["config"]["model.hidden"] == [[16], [16, 16]]
    assert d["only_in_a"] == [] and d["only_in_b"] == ["net.4.bias", "net.4.weight"]
    assert {"name": "net.2.weight", "a": [[10, 16], "torch.float32"], "b": [[16, 16], "torch.float32"]} \
        in d["shape_or_dtype"]
    text = lines_of(format_diff({**d, "kind": tuple(d["kind"])}))
    assert "tensors only in b (2): net.4.bias, net.4.weight" in text
    assert ["net.2.weight", "10x16", "float32", "->", "16x16", "float32"] in [line.split() for line in text]


def test_diff_needs_the_other_checkpoint(cli):
    assert_clean_error(cli["diff_no_other"], "diff.other")


# ---------------------------------------------------------------------------- drift on resume
@pytest.fixture(scope="module")
def resumed(base):
    return run_all({
        "batch": ["task=resume", "checkpoint.path=runs/train", "data.batch_size=32", "train.epochs=1",
                  "train.progress_bar=false", "hydra.run.dir=runs/resume_batch"],
        "hidden": ["task=resume", "checkpoint.path=runs/train", "model=mlp", "model.hidden=[32]",
                   "hydra.run.dir=runs/resume_hidden"],
        "hidden_allowed": ["task=resume", "checkpoint.path=runs/train", "model=mlp", "model.hidden=[32]",
                           "resume.allow_drift=true", "hydra.run.dir=runs/resume_allowed"],
    }, base)


def test_resume_with_a_changed_batch_size_warns_in_one_table_and_goes_on(base, resumed):
    proc = ok(resumed["batch"])
    out = proc.stdout + proc.stderr
    assert "config drift from the checkpoint: 1 risky difference(s); the run goes on" in out
    table = [line.split() for line in out.splitlines()]
    assert ["key", "checkpoint", "now", "why"] in table
    assert ["data.batch_size", "64", "32", "the", "data", "or", "how", "it", "is", "batched"] in table
    assert "config drift from the checkpoint (harmless): checkpoint.path: None -> 'runs/train'" in out
    run_dir = base / "runs" / "resume_batch"
    assert metrics(run_dir)["epoch"] == 2
    # the new checkpoint stores the config it ran with: the new batch size, the recorded rest
    config = inspect(run_dir / CKPT)["run_config"]
    assert config["task"] == "resume" and config["data"]["batch_size"] == 32
    assert config["data"]["train"]["_target_"] == "nn_handler.datasets.synthetic_classification"
    assert config["model"] == {"_target_": "nn_handler.models.MLP", "in_features": 64, "out_features": 10,
                               "hidden": [16], "dropout": 0.0}
    assert config["optimizer"] == {"_target_": "torch.optim.Adam", "lr": 0.001}


def test_resume_with_a_changed_hidden_size_is_refused_naming_the_key(resumed):
    proc = resumed["hidden"]
    assert_clean_error(proc, "model.hidden: checkpoint [16] vs config [32]", "resume.allow_drift=true")


def test_resume_allow_drift_lets_the_changed_model_through_with_the_warning_kept(resumed):
    proc = resumed["hidden_allowed"]
    out = proc.stdout + proc.stderr
    assert "the model differs (resume.allow_drift=true, going on): model.hidden: checkpoint [16] vs config [32]" in out
    assert "needs the architecture of the checkpoint" not in out
    # past the drift check, the weights must still fit the wider layers: the load names them
    assert_clean_error(proc, "shape mismatch", "net.0.weight: checkpoint (16, 64) vs model (32, 64)")
