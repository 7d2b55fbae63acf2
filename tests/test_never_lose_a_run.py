"""Step checkpoints, exact mid-epoch resume, pre-emption by real signals, newest valid file, retention, lineage."""
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.checkpointing import CheckpointStore, NoCheckpointFound, file_checksum, find_latest, inspect

sys.path.insert(0, str(Path(__file__).parent))
from preempt_worker import make, train  # noqa: E402

WORKER = str(Path(__file__).with_name("preempt_worker.py"))
EPOCHS = 3


@pytest.fixture(scope="module")
def straight():
    h = make()
    train(h, EPOCHS)
    return h


def assert_same_run(a: NNHandler, b: NNHandler) -> None:
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key]), key
    for key, value in a.ema.module.state_dict().items():
        assert torch.equal(value, b.ema.module.state_dict()[key]), key
    assert a.train_losses == b.train_losses and a.val_losses == b.val_losses
    assert a.epoch == b.epoch and a.global_step == b.global_step


def start_worker(directory: Path, sleep: float = 0.01) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, WORKER, str(directory), str(EPOCHS), str(sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, step: int) -> None:
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return
    raise AssertionError("the worker ended before reaching step %d: %s" % (step, proc.stderr.read()))


def test_resume_from_a_mid_epoch_step_checkpoint_matches_the_uninterrupted_run(straight, tmp_path):
    h = make()
    train(h, EPOCHS, checkpoint_dir=tmp_path, save_every_n_steps=5)
    mid = [p for p in tmp_path.glob("ckpt-e0001-*.pth")]
    assert mid, sorted(os.listdir(tmp_path))
    info = inspect(mid[0])
    assert 0 < info["progress"]["position"]["step_in_epoch"] < 30  # inside the second epoch
    resumed = NNHandler.load(mid[0])
    resumed.train(EPOCHS - resumed.epoch, progress_bar=False)  # the interrupted epoch counts as one
    assert_same_run(straight, resumed)


def test_fast_forward_is_by_index_not_by_iterating(tmp_path, monkeypatch):
    h = make()
    train(h, 1, checkpoint_dir=tmp_path, save_every_n_steps=10)
    resumed = NNHandler.load(tmp_path / "ckpt-e0000-s000000010.pth")
    dataset = resumed.train_loader.dataset
    seen = []
    original = type(dataset).__getitem__
    monkeypatch.setattr(type(dataset), "__getitem__",
                        lambda self, i: (seen.append(i) if self is dataset else None) or original(self, i))
    resumed.train(1, progress_bar=False)
    assert len(seen) == 240 - 20 * 8  # only the batches after the checkpoint were ever fetched


def test_sigterm_mid_epoch_saves_exits_143_and_the_directory_resumes_exactly(straight, tmp_path):
    proc = start_worker(tmp_path)
    wait_for_step(proc, 17)  # inside the second epoch (15 optimizer steps per epoch)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a repeated SIGTERM changes nothing
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    preempt = list(tmp_path.glob("*-preempt.pth"))
    assert len(preempt) == 1
    latest = find_latest(tmp_path)
    assert latest == preempt[0] and os.path.realpath(tmp_path / "last.pth") == str(latest)
    resumed = NNHandler.load(latest)
    assert resumed.resumes_inside_epoch
    resumed.train(EPOCHS - resumed.epoch, progress_bar=False)
    assert_same_run(straight, resumed)


def test_second_ctrl_c_aborts_without_saving(tmp_path):
    proc = start_worker(tmp_path, sleep=1.0)
    wait_for_step(proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode not in (0, 128 + signal.SIGINT)
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert not list(tmp_path.glob("*-preempt.pth"))


def test_first_ctrl_c_saves_and_exits_130(tmp_path):
    proc = start_worker(tmp_path, sleep=0.05)
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert len(list(tmp_path.glob("*-preempt.pth"))) == 1


def test_newest_valid_checkpoint_skips_a_damaged_one_and_orders_by_progress(tmp_path):
    h = make()
    train(h, 2, checkpoint_dir=tmp_path / "run", save_every_n_epochs=1)
    first, second = sorted((tmp_path / "run").glob("ckpt-*.pth"))
    os.utime(first, (time.time() + 100, time.time() + 100))  # file times must not matter
    assert find_latest(tmp_path) == second  # searched recursively
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 1
    second.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {second}"):
        assert find_latest(tmp_path) == first


def test_a_directory_without_a_valid_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoCheckpointFound, match=str(tmp_path)):
            find_latest(tmp_path)


def test_retention_keeps_the_newest_and_never_the_parent(tmp_path):
    h = make()
    train(h, 1, checkpoint_dir=tmp_path / "a", save_every_n_steps=3, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "a").glob("ckpt-*.pth"))
    # 15 optimizer steps per epoch: step 15 ends epoch 0 (taken before its validation, so named e0000).
    assert kept == ["ckpt-e0000-s000000012.pth", "ckpt-e0000-s000000015.pth"]
    parent = tmp_path / "a" / kept[0]
    resumed = NNHandler.load(parent)
    resumed.train(1, progress_bar=False, checkpoint_dir=tmp_path / "a", save_every_n_steps=3, keep_last=1)
    assert parent.exists()  # the file this run continues from is never pruned
    assert len(list((tmp_path / "a").glob("ckpt-*.pth"))) == 2


def test_keep_best_keeps_the_best_by_the_monitored_value(tmp_path):
    h = make()
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1, monitor="val_loss", mode="min")
    train(h, 4, checkpoint_dir=store, save_every_n_epochs=1)
    best_epoch = min(range(4), key=lambda e: h.val_losses[e]) + 1
    names = sorted(p.name for p in tmp_path.glob("ckpt-*.pth"))
    assert f"ckpt-e{best_epoch:04d}" in " ".join(names) and "ckpt-e0004" in " ".join(names)
    assert len(names) == (1 if best_epoch == 4 else 2)


def test_lineage_traces_a_run_back_to_its_first_checkpoint(tmp_path):
    h = make()
    train(h, 1)
    h.save(tmp_path / "first.pth")
    resumed = NNHandler.load(tmp_path / "first.pth")
    resumed.train(1, progress_bar=False)
    resumed.save(tmp_path / "second.pth")
    tuned = NNHandler.load(tmp_path / "second.pth", skip_optimizer=True, skip_scheduler=True)
    tuned.set_optimizer(torch.optim.SGD, lr=1e-3)
    tuned.train(1, progress_bar=False)
    tuned.save(tmp_path / "third.pth")
    chain, path = [], tmp_path / "third.pth"
    while path is not None:
        lineage = inspect(path)["lineage"]
        chain.append((Path(path).name, lineage["run_id"]))
        parent = lineage["parent"]
        if parent:
            assert parent["checksum"] == file_checksum(parent["path"])
        path = parent and parent["path"]
    assert [name for name, _ in chain] == ["third.pth", "second.pth", "first.pth"]
    assert len({run for _, run in chain}) == 3
