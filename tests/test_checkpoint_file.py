"""CheckpointFile: one open, one checksum, a header without tensor data, the state on demand."""
from __future__ import annotations

import os

import pytest
import torch
from checkpoint_reads import covered_bytes, watch
from helpers_core import assert_same, classification_handler

from nn_handler import NNHandler
from nn_handler.checkpointing import CheckpointFile, CorruptCheckpointError, find_latest, inspect, read_info
from nn_handler.checkpointing.store import open_latest
from nn_handler.models import MLP

WIDE = {"in_features": 6, "out_features": 3, "hidden": [512, 512]}  # ~1.1 MB of weights, ~3 MB with Adam's moments


def _saved(tmp_path, name="run.pth", epochs=1):
    h = classification_handler()
    h.train(epochs, progress_bar=False)
    path = tmp_path / name
    h.save(path)
    return h, str(path)


def _wide(tmp_path, name="wide.pth"):
    h = NNHandler(MLP, device="cpu", **WIDE)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    x = torch.randn(8, 6)
    torch.nn.functional.cross_entropy(h.module(x), torch.zeros(8, dtype=torch.long)).backward()
    h.optimizer.step()
    path = str(tmp_path / name)
    h.save(path)
    return h, path


def test_load_opens_the_file_once_and_checksums_each_byte_once(tmp_path):
    saved, path = _wide(tmp_path)
    covered = covered_bytes(path)
    with watch(path) as counts:
        h = NNHandler.load(path, device="cpu")
    assert counts["opens"] == 1, counts
    # Every covered byte once (plus the few bytes of the checksum record and its table), never twice.
    assert covered <= counts["hashed"] < covered + 64 * 1024, (counts, covered)
    assert_same(saved.module.state_dict(), h.module.state_dict())
    assert h.metadata["lineage"]["parent"]["checksum"] == CheckpointFile.open(path).checksum


def test_verify_then_state_hashes_once_and_a_header_reads_no_tensor_data(tmp_path):
    saved, path = _wide(tmp_path)
    covered = covered_bytes(path)
    with watch(path) as counts:
        with CheckpointFile.open(path) as ckpt:
            header = ckpt.header()
            assert counts["hashed"] < 1024  # the header needs no checksum pass and no tensor data
            assert header["kind"] == "handler" and header["model"]["kwargs"]["hidden"] == [512, 512]
            ckpt.verify()
            ckpt.verify()  # once is enough
            assert ckpt.verified
            h = NNHandler.load(ckpt)
            info = read_info(ckpt)
    assert counts["opens"] == 1, counts
    assert covered <= counts["hashed"] < covered + 64 * 1024, (counts, covered)
    assert info["parameters"] == sum(p.numel() for p in saved.module.parameters())
    assert_same(saved.optimizer.state_dict(), h.optimizer.state_dict())


def test_an_open_file_keeps_reading_the_file_it_opened_when_the_path_is_replaced(tmp_path):
    first, path = _saved(tmp_path, epochs=1)
    ckpt = CheckpointFile.open(path)
    second = classification_handler()
    second.train(2, progress_bar=False)
    second.save(path)  # atomically replaces the path: a new inode
    h = NNHandler.load(ckpt)
    ckpt.close()
    assert h.epoch == 1
    assert_same(first.module.state_dict(), h.module.state_dict())
    assert NNHandler.load(path).epoch == 2


def test_a_damaged_file_is_refused_by_verify_and_by_state(tmp_path):
    _, path = _wide(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # flip a byte inside the tensor data
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with CheckpointFile.open(path) as ckpt:
        assert ckpt.header()["kind"] == "handler"  # the plain records are intact and readable
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as info:
            ckpt.verify()
        assert info.value.path == path and not ckpt.verified
    with CheckpointFile.open(path) as ckpt, pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        ckpt.state("cpu")
    assert inspect(path)["integrity"]["damaged"] is True


def test_a_closed_file_says_so(tmp_path):
    _, path = _saved(tmp_path)
    ckpt = CheckpointFile.open(path)
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.verify()


def test_the_store_opens_each_candidate_once_and_hashes_only_the_one_it_picks(tmp_path):
    h = classification_handler()
    store_dir = tmp_path / "ckpts"
    h.train(2, progress_bar=False, checkpoint_dir=store_dir, save_every_n_epochs=1)
    files = sorted(str(p) for p in store_dir.iterdir() if p.name.startswith("ckpt-"))
    assert len(files) == 2
    newest = files[-1]
    covered = covered_bytes(newest)
    with watch(files[0]) as old, watch(newest) as new:
        with open_latest(store_dir) as ckpt:
            assert ckpt.path == newest and ckpt.verified
            loaded = NNHandler.load(ckpt)
    assert old["opens"] == 1 and new["opens"] == 1, (old, new)  # the older one: ranked by its header
    # Exactly one file's bytes were hashed (the newest: it is the verified one), once.
    assert covered <= new["hashed"] < covered + 64 * 1024, new
    assert loaded.epoch == 2
    assert str(find_latest(store_dir)) == newest


def _runner(args, cwd, wrap=None, timeout=240):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = [sys.executable, os.path.join(here, "checkpoint_reads.py"), wrap, "--"] if wrap else [sys.executable, "-m", "runner"]
    proc = subprocess.run([*prefix, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _reads(proc) -> dict:
    import json
    lines = [line for line in proc.stderr.splitlines() if line.startswith("READS ")]
    assert len(lines) == 1, proc.stderr
    return json.loads(lines[0][len("READS "):])


def test_runner_resume_from_a_directory_opens_and_checksums_its_checkpoint_once(tmp_path):
    tiny = ["data=synthetic", "model.hidden=[256,256]", "train.epochs=1"]
    _runner([*tiny, "hydra.run.dir=runs/first"], tmp_path)
    last = os.path.realpath(tmp_path / "runs" / "first" / "checkpoints" / "last.pth")
    covered = covered_bytes(last)
    proc = _runner(["task=resume", "checkpoint.path=runs/first", "train.epochs=1", "hydra.run.dir=runs/second"],
                   tmp_path, wrap=last)
    counts = _reads(proc)
    assert counts["opens"] == 1, counts
    assert covered <= counts["hashed"] < covered + 64 * 1024, (counts, covered)
    second = read_info(str(tmp_path / "runs" / "second" / "checkpoints" / "last.pth"))
    assert second["progress"]["epoch"] == 2 and second["metadata"]["lineage"]["parent"]["path"] == last
