"""Elastic restarts (issue 16): ``torchrun --max-restarts=2 -m runner ... auto_resume=true hydra.run.dir=DIR``.

One worker is killed with SIGKILL once, after the first epoch checkpoint exists; torchrun restarts
the ranks, they form a new group (in a rendezvous store of their own attempt:
``nn_handler.distributed.attempt_store``), go on from the newest checkpoint and finish the epochs
asked, with final weights equal to those of an uninterrupted run with the same seed.

Real torchrun, real runner CLI, gloo on CPU; every wait is bounded and fails the test on time-out.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 6
# 32 steps per rank and epoch, a checkpoint per epoch: a second or two of training after the first.
ARGS = ["data=synthetic", "data.train.n=512", "data.batch_size=8", "model.hidden=[16]", f"train.epochs={EPOCHS}",
        "save.every_n_epochs=1", "train.progress_bar=false", "auto_resume=true"]
START_S, RUN_S = 120, 240


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_", "SUBMITIT_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "HYDRA_FULL_ERROR", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env["OMP_NUM_THREADS"] = "1"
    env["NN_HANDLER_PG_TIMEOUT"] = "60"  # a group that does not form fails its attempt (torchrun restarts it)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _torchrun(run_dir: str, *extra: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
            "-m", "runner", *ARGS, f"hydra.run.dir={run_dir}"]


def _start(cmd: list, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _children(pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _model_state(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    return torch.load(record["checkpoint_written"], map_location="cpu", weights_only=True)["model_state_dict"]


def test_kill_9_of_one_worker_restarts_and_finishes_identical_to_an_uninterrupted_run(tmp_path):
    # The uninterrupted run goes alongside (the two share the cores; only the weights are compared).
    straight_log, cut_log = tmp_path / "straight.log", tmp_path / "cut.log"
    straight = _start(_torchrun("straight"), tmp_path, straight_log)
    cut = _start(_torchrun("cut", "--max-restarts=2"), tmp_path, cut_log)
    try:
        ckpts = tmp_path / "cut" / "checkpoints"
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and cut.poll() is None:
            if ckpts.is_dir() and any(p.name.startswith("ckpt-e0001-") for p in ckpts.iterdir()):
                break
            time.sleep(0.02)
        assert cut.poll() is None, f"the run ended before a worker could be killed:\n{cut_log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint after {START_S} s:\n{cut_log.read_text()[-3000:]}"
        workers = _children(cut.pid)  # torchrun's agent is the process started; its children are the ranks
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # one worker, never the agent
        killed_at = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("ckpt-"))
        assert _wait(cut, RUN_S, cut_log) == 0, cut_log.read_text()[-4000:]
        assert _wait(straight, RUN_S, straight_log) == 0, straight_log.read_text()[-4000:]
    finally:
        for proc in (straight, cut):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    record = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["epoch"] == EPOCHS and record["world_size"] == 2, record
    # The restarted ranks went on from the killed attempt's newest checkpoint (auto_resume: a fresh start
    # reads none), at least as new as those there at the kill, and before the last epoch (the kill cut it short).
    resumed_from = Path(record["checkpoint_read"] or "")
    assert resumed_from.name.startswith("ckpt-e") and resumed_from.parent.resolve() == ckpts.resolve(), record
    epoch_of = lambda name: int(name[len("ckpt-e"):][:4])  # noqa: E731
    assert max(map(epoch_of, killed_at)) <= epoch_of(resumed_from.name) < EPOCHS, (record, killed_at)
    a, b = _model_state(tmp_path / "straight"), _model_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
