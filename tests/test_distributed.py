"""DDP under real torchrun jobs (gloo, CPU): agreement, exact resume, world-size changes, failures."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler, NNHandlerWarning

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).with_name("dist_workers.py"))
ROOT = Path(__file__).resolve().parents[1]


def torchrun(out: Path, scenario: str, *args: str, nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           WORKER, scenario, str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def ranks(out: Path, n: int = 2):
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-rank job that trained 2 epochs and saved."""
    out = tmp_path_factory.mktemp("two")
    ok(torchrun(out, "train", "2", str(out / "ckpt.pt")))
    return out


def test_replicas_agree_and_use_ddp_with_a_distributed_sampler(two_epochs):
    r0, r1 = ranks(two_epochs)
    assert_same_tensors(r0["weights"], r1["weights"])
    assert_same_tensors(r0["ema"], r1["ema"])
    for r in (r0, r1):
        assert r["is_distributed"] and r["world_size"] == 2 and r["model_is_ddp"] and r["device"] == "cpu"
        assert r["sampler"] == "EpochSampler"  # a DistributedSampler subclass
    assert len(r0["train_losses"]) == 2 and r0["train_losses"] == r1["train_losses"]


def test_two_rank_resume_after_two_of_four_epochs_matches_straight_training(two_epochs, tmp_path):
    ok(torchrun(tmp_path / "straight", "train", "4"))
    ok(torchrun(tmp_path / "resumed", "resume", str(two_epochs / "ckpt.pt"), "2"))
    straight, resumed = ranks(tmp_path / "straight"), ranks(tmp_path / "resumed")
    for s, r in zip(straight, resumed):
        assert_same_tensors(s["weights"], r["weights"])
        assert_same_tensors(s["ema"], r["ema"])
        assert_same_tensors(s["optimizer"], r["optimizer"])
    assert straight[0]["train_losses"] == resumed[0]["train_losses"]  # history lives on rank 0
    assert straight[0]["val_losses"] == resumed[0]["val_losses"]
    assert resumed[0]["epoch"] == 4


def test_checkpoint_of_two_ranks_loads_and_trains_in_one_process(two_epochs):
    with pytest.warns(NNHandlerWarning, match="saved by 2 process.*loaded by 1.*data order differs"):
        h = NNHandler.load(two_epochs / "ckpt.pt")
    assert not h.is_distributed and h.epoch == 2 and len(h.train_losses) == 2
    assert_same_tensors(h.module.state_dict(), ranks(two_epochs)[0]["weights"])
    h.train(1, progress_bar=False)
    assert h.epoch == 3


def test_checkpoint_of_two_ranks_loads_in_four(two_epochs, tmp_path):
    proc = torchrun(tmp_path, "resume", str(two_epochs / "ckpt.pt"), "1", nproc=4)
    ok(proc)
    results = ranks(tmp_path, 4)
    assert all(r["epoch"] == 3 and r["world_size"] == 4 for r in results)
    for r in results[1:]:
        assert_same_tensors(results[0]["weights"], r["weights"])
    assert "data order differs" in proc.stderr


def test_single_process_checkpoint_loads_and_trains_in_two_ranks(tmp_path):
    from dist_workers import make
    h = make()
    h.train(1, seed=0, progress_bar=False)
    h.save(tmp_path / "single.pt")
    proc = torchrun(tmp_path / "out", "resume", str(tmp_path / "single.pt"), "1")
    ok(proc)
    r0, r1 = ranks(tmp_path / "out")
    assert r0["epoch"] == 2 and len(r0["train_losses"]) == 2
    assert_same_tensors(r0["weights"], r1["weights"])
    assert "saved by 1 process(es) and is loaded by 2" in proc.stderr


@pytest.mark.parametrize("where", ["all ranks", "rank 1 only"])
def test_missing_file_fails_on_every_rank_within_seconds(two_epochs, tmp_path, where):
    if where == "all ranks":
        template = str(tmp_path / "nowhere.pt")
    else:
        (tmp_path / "ckpt_0.pt").write_bytes((two_epochs / "ckpt.pt").read_bytes())
        template = str(tmp_path / "ckpt_{rank}.pt")
    started = time.time()
    proc = torchrun(tmp_path / "out", "load_fail", template, timeout=120)
    assert proc.returncode != 0
    assert time.time() - started < 60
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["is_file_not_found"], report
        assert report["elapsed"] < 20
    if where == "rank 1 only":
        assert "rank(s) 1" in reports[0]["message"] and "ckpt_0.pt" in reports[0]["message"]
        assert "ckpt_1.pt" in reports[1]["message"]
    else:
        assert all("nowhere.pt" in r["message"] for r in reports)


@pytest.mark.parametrize("damaged_rank", [0, 1])
def test_a_damaged_copy_on_one_rank_is_refused_on_every_rank(two_epochs, tmp_path, damaged_rank):
    """Per-rank copies (another node's disk, say) are not the same file: each rank verifies all of
    its own copy, so a flipped byte in chunk 0 of rank 1's copy is caught although rank 0 hashes chunk 0
    when the ranks share one file."""
    import zipfile
    data = (two_epochs / "ckpt.pt").read_bytes()
    with zipfile.ZipFile(two_epochs / "ckpt.pt") as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged = bytearray(data)
    damaged[start + 3] ^= 0x01  # inside a tensor's bytes, in the first checksum chunk
    for rank in (0, 1):
        (tmp_path / f"ckpt_{rank}.pt").write_bytes(bytes(damaged) if rank == damaged_rank else data)
    for which in ("load", "init"):
        out = tmp_path / f"out-{which}"
        proc = torchrun(out, "load_fail" if which == "load" else "init_fail", str(tmp_path / "ckpt_{rank}.pt"),
                        timeout=120)
        assert proc.returncode != 0, proc.stderr[-2000:]
        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        bad = reports[damaged_rank]
        assert bad["type"] == "CorruptCheckpointError", bad
        assert f"rank {damaged_rank}'s copy" in bad["message"] and f"ckpt_{damaged_rank}.pt" in bad["message"]
        other = reports[1 - damaged_rank]
        assert f"rank(s) {damaged_rank}" in other["message"], other


def test_save_error_on_rank_zero_is_raised_on_every_rank(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    proc = torchrun(tmp_path / "out", "save_fail", str(blocker / "ckpt.pt"), timeout=120)
    assert proc.returncode != 0
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(str(blocker) in r["message"] for r in reports), reports
    assert "rank(s) 0" in reports[1]["message"]


def test_predict_gathers_in_dataset_order_and_validation_is_exact(tmp_path):
    ok(torchrun(tmp_path, "predict"))
    for r in ranks(tmp_path):
        assert r["tensor"].shape == (11, 3) and r["dataset"].shape == (13, 3)
        torch.testing.assert_close(r["tensor"], r["expected"])
        torch.testing.assert_close(r["dataset"], r["expected_dataset"])
        assert abs(r["val_loss"] - r["expected_val_loss"]) < 1e-6


def test_iterable_dataset_with_accumulation_keeps_replicas_in_sync(tmp_path):
    """With no known epoch length the last, short accumulation group must still be all-reduced."""
    ok(torchrun(tmp_path, "iterable"))
    r0, r1 = ranks(tmp_path)
    assert_same_tensors(r0["weights"], r1["weights"])


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    out, ckpts = tmp_path / "out", tmp_path / "ckpts"
    proc = torchrun(out, "signal_one_rank", str(ckpts))
    assert proc.returncode != 0, "the job should have stopped on the signal"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["signal"] == 15 for r in reports), reports  # rank 0 stops too, on rank 1's signal
    assert reports[0]["global_step"] == reports[1]["global_step"] >= 3
    assert reports[0]["path"] == reports[1]["path"] and Path(reports[0]["path"]).is_file()
    saved = NNHandler.load(reports[0]["path"], device="cpu")
    assert saved.global_step == reports[0]["global_step"] and saved.epoch == 0  # stopped inside epoch 1
