"""Sweeps through hydra-submitit-launcher where each submitted job is one multi-rank DDP run (issue 16):
``submitit_local`` with 2 tasks per job stands in for ``hydra/launcher=slurm`` (same launcher code,
local processes instead of sbatch). Real processes, gloo on CPU, every wait bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nn_handler.checkpointing import read_info

pytestmark = pytest.mark.distributed
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is a test dependency "
                                                                     "(the dev extra installs it)")

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_", "SUBMITIT_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_each_submitit_job_with_two_tasks_is_one_two_rank_ddp_run(tmp_path):
    cmd = [sys.executable, "-m", "runner", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.timeout_min=5", "data=synthetic", "data.train.n=64", "model.hidden=[8]", "train.epochs=1",
           "train.progress_bar=false", "optimizer.lr=0.01,0.02", "hydra.sweep.dir=sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2, proc.stderr[-3000:]
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "completed" and record["world_size"] == 2, record
        info = read_info(job / "checkpoints" / "last.pth")
        assert info["world_size"] == 2 and info["progress"]["epoch"] == 1


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (Linux /proc), depth first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("name", ["USR2", "USR1"])
def test_submitits_preemption_signal_saves_records_preempted_then_the_job_is_requeued_and_resumes(tmp_path, name):
    """submitit's signal (USR2 by default, USR1 with SUBMITIT_PREEMPT_SIGNAL=USR1; what SLURM sends before
    the time limit and submitit_local's controller forwards to every task) reaches the training loop:
    the ranks save the pre-emption checkpoint and metrics.json says preempted; then submitit requeues
    the job, which goes on from that checkpoint (auto_resume=true) and finishes the epochs asked; the
    sweep exits 0."""
    signum = getattr(signal, "SIG" + name)
    env = _env()
    if name != "USR2":
        env["SUBMITIT_PREEMPT_SIGNAL"] = name
    cmd = [sys.executable, "-m", "runner", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.timeout_min=5", "data=synthetic", "data.train.n=2048", "data.batch_size=2",
           "model.hidden=[16]", "train.epochs=1", "save.every_n_steps=50", "train.progress_bar=false",
           "auto_resume=true", "hydra.sweep.dir=sweep"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    job = tmp_path / "sweep" / "0"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            ckpts = job / "checkpoints"
            if ckpts.is_dir() and any(p.name.startswith("ckpt-") for p in ckpts.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it could be signalled:\n{proc.communicate()[1][-3000:]}"
        tasks = [pid for pid in _descendants(proc.pid) if "submitit.core._submit" in _cmdline(pid)]
        assert len(tasks) == 2, [(pid, _cmdline(pid)) for pid in _descendants(proc.pid)]
        for pid in tasks:  # as submitit_local's controller does at the time limit (SLURM: --signal=USR2@N)
            os.kill(pid, signum)
        preempted = None
        while time.monotonic() < deadline and proc.poll() is None and preempted is None:
            try:
                record = json.loads((job / "metrics.json").read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("status") == "preempted":
                preempted = record
            time.sleep(0.02)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert preempted is not None, f"metrics.json never said preempted\n{err[-3000:]}"
    assert preempted["signal"] == signum and preempted["exit_code"] == 128 + signum, preempted
    checkpoint = Path(preempted["checkpoint_written"])
    assert checkpoint.name.endswith("-preempt.pth") and checkpoint.is_file()
    assert proc.returncode == 0, err[-4000:]
    final = json.loads((job / "metrics.json").read_text())
    assert final["status"] == "completed" and final["epoch"] == 1 and final["world_size"] == 2, final
    assert final["checkpoint_read"] == str(checkpoint), final  # the requeued job went on from the pre-emption save
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "sweep" / ".submitit").rglob("*_0_log.*"))
    assert "Requeued job" in logs, logs[-3000:]  # submitit itself requeued it (rank 0's task)
