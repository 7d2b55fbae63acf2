"""Never lose a run, from the CLI: step checkpoints, SIGTERM mid-epoch (exit 143), resume from the
run DIRECTORY matching an uninterrupted run bit for bit (1 process and 2 ranks under torchrun),
auto_resume by re-running the same command, a corrupted newest checkpoint skipped, retention
counts, and lineage across train -> resume -> finetune seen through task=inspect.

Real processes and real signals. The training is made slow enough to be stopped inside an epoch
by its shape alone (many tiny batches: ~1,000 optimizer steps per epoch), not by any sleep.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_runner import metrics, ok, run_cli

# ~1,000 steps of batch 2 per epoch (a second or two), a step checkpoint every 200 steps.
SLOW = ["data=synthetic", "data.train.n=2048", "data.batch_size=2", "model.hidden=[32]", "train.epochs=2",
        "save.every_n_steps=200", "train.progress_bar=false", "train.ema_decay=0.99"]
TINY = ["data=synthetic", "model.hidden=[16]", "train.progress_bar=false"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _command(args, nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", "runner", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "runner", *args]


def run(args, cwd, nproc=1, timeout=240):
    return subprocess.run(_command(args, nproc), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def sigterm_mid_epoch(args, cwd, run_dir: Path, nproc=1, signum=signal.SIGTERM) -> subprocess.Popen:
    """Start a training run, wait for a step checkpoint inside its second epoch, signal it (SIGTERM)."""
    proc = subprocess.Popen(_command(args, nproc), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name.startswith("ckpt-e0001-") for p in ckpts.iterdir()):
            break  # training is under way, inside epoch 2
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.communicate()}"
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    return proc


def final_weights(run_dir: Path):
    path = metrics(run_dir)["checkpoint_written"]
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    for name in ("model_state_dict",):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), key


def test_sigterm_mid_epoch_exits_143_and_resume_from_the_directory_matches_the_uninterrupted_run(tmp_path):
    ok(run(SLOW + ["hydra.run.dir=straight"], tmp_path))
    proc = sigterm_mid_epoch(SLOW + ["hydra.run.dir=cut"], tmp_path, tmp_path / "cut")
    assert proc.returncode == 143, proc.stderr[-3000:]
    record = metrics(tmp_path / "cut")
    assert record["status"] == "preempted" and record["exit_code"] == 143 and record["signal"] == signal.SIGTERM
    preempt = Path(record["checkpoint_written"])
    assert preempt.name.endswith("-preempt.pth") and preempt.is_file()
    assert (tmp_path / "cut" / "checkpoints" / "last.pth").resolve() == preempt.resolve()
    done = record["epoch"]  # completed epochs; the interrupted one is finished first and counts as one
    assert done < 2
    ok(run(["task=resume", "checkpoint.path=cut", f"train.epochs={2 - done}", "train.progress_bar=false",
            "hydra.run.dir=resumed"], tmp_path))
    resumed = metrics(tmp_path / "resumed")
    assert resumed["checkpoint_read"] == str(preempt) and resumed["epoch"] == 2
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))


def test_torchrun_two_ranks_sigterm_then_auto_resume_by_rerunning_the_same_command(tmp_path):
    slow = [a.replace("data.train.n=2048", "data.train.n=4096") for a in SLOW]  # each rank gets half
    args = slow + ["save.keep_last=2", "auto_resume=true", "hydra.run.dir=cut"]
    ok(run(slow + ["hydra.run.dir=straight"], tmp_path, nproc=2))
    proc = sigterm_mid_epoch(args, tmp_path, tmp_path / "cut", nproc=2)
    assert proc.returncode != 0  # torchrun's own code; the workers exit 143
    record = metrics(tmp_path / "cut")
    assert record["status"] == "preempted" and record["world_size"] == 2
    preempt = Path(record["checkpoint_written"])
    assert preempt.name.endswith("-preempt.pth") and preempt.is_file()
    ok(run(args, tmp_path, nproc=2))  # the requeued job: the same command
    again = metrics(tmp_path / "cut")
    assert again["status"] == "completed" and again["epoch"] == 2 and again["checkpoint_read"] == str(preempt)
    assert preempt.is_file()  # the parent of the continued run is never pruned (keep_last=2)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut"))


def test_retention_corrupted_newest_skipped_and_an_empty_directory_named(tmp_path):
    ok(run_cli(TINY + ["train.epochs=2", "save.every_n_steps=2", "save.keep_last=3", "hydra.run.dir=r"],
               cwd=tmp_path))
    ckpts = tmp_path / "r" / "checkpoints"
    files = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("ckpt-"))
    assert len(files) == 3, files  # 8 step saves + 1 final, newest 3 kept
    newest = ckpts / files[-1]
    assert os.readlink(ckpts / "last.pth") == newest.name
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a bit flip in the middle: the checksum no longer matches
    newest.write_bytes(bytes(data))
    proc = ok(run_cli(["task=resume", "checkpoint.path=r", "train.epochs=1", "train.progress_bar=false",
                       "hydra.run.dir=r2"], cwd=tmp_path))
    assert newest.name in proc.stderr + proc.stdout  # the warning names the skipped file
    assert metrics(tmp_path / "r2")["checkpoint_read"] == str(ckpts / files[-2])
    (tmp_path / "empty").mkdir()
    proc = run_cli(["task=resume", "checkpoint.path=empty", "hydra.run.dir=r3"], cwd=tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "empty") in proc.stderr and "Traceback" not in proc.stderr


def test_lineage_across_train_resume_and_finetune_via_task_inspect(tmp_path):
    ok(run_cli(TINY + ["train.epochs=1", "hydra.run.dir=train"], cwd=tmp_path))
    ok(run_cli(["task=resume", "checkpoint.path=train", "train.epochs=1", "save.every_n_epochs=1",
                "save.keep_last=1", "hydra.run.dir=resume"], cwd=tmp_path))
    ok(run_cli(["task=finetune", "checkpoint.path=resume", "train.epochs=1", "optimizer.lr=1e-4",
                "hydra.run.dir=finetune"], cwd=tmp_path))

    def inspect(run_dir):
        proc = ok(run_cli(["task=inspect", f"checkpoint.path={run_dir}", "inspect.format=json"], cwd=tmp_path))
        return json.loads(proc.stdout)["lineage"]

    first, second, third = inspect("train"), inspect("resume"), inspect("finetune")
    assert first["parent"] is None
    assert second["parent"]["path"] == str((tmp_path / "train" / "checkpoints" / "last.pth").resolve())
    assert second["parent"]["run_id"] == first["run_id"]
    assert third["parent"]["path"] == metrics(tmp_path / "resume")["checkpoint_written"]
    assert third["parent"]["run_id"] == second["run_id"]
    assert len({first["run_id"], second["run_id"], third["run_id"]}) == 3


def test_sigusr1_from_a_scheduler_saves_and_exits_138(tmp_path):
    """SLURM's --signal=USR1@N: the run saves mid-epoch and exits 128 + 10; the directory resumes."""
    proc = sigterm_mid_epoch(SLOW + ["hydra.run.dir=cut"], tmp_path, tmp_path / "cut", signum=signal.SIGUSR1)
    assert proc.returncode == 138, proc.stderr[-3000:]
    record = metrics(tmp_path / "cut")
    assert record["status"] == "preempted" and record["signal"] == signal.SIGUSR1
    preempt = Path(record["checkpoint_written"])
    assert preempt.name.endswith("-preempt.pth") and preempt.is_file()
    ok(run(["task=resume", "checkpoint.path=cut", "train.epochs=1", "train.progress_bar=false",
            "hydra.run.dir=resumed"], tmp_path))
    assert metrics(tmp_path / "resumed")["checkpoint_read"] == str(preempt)


def test_keep_best_from_the_cli_keeps_the_best_epoch_besides_the_newest(tmp_path):
    # lr 0.3: validation loss falls after epoch 2 and rises again at epoch 3 (seeded, deterministic)
    ok(run_cli(TINY + ["train.epochs=3", "optimizer.lr=0.3", "save.every_n_epochs=1", "save.keep_last=1",
                       "save.keep_best=1", "save.monitor=val_loss", "hydra.run.dir=r"], cwd=tmp_path))
    ckpts = tmp_path / "r" / "checkpoints"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("ckpt-"))
    from nn_handler import NNHandler
    losses = NNHandler.load(ckpts / "last.pth", device="cpu").val_losses
    assert len(losses) == 3
    best = min(range(3), key=losses.__getitem__) + 1
    assert best != 3, losses  # otherwise this run cannot tell "best" from "newest"
    assert [name[:10] for name in kept] == sorted({f"ckpt-e{best:04d}", "ckpt-e0003"}), (kept, losses)
