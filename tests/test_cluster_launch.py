"""Cluster launches that hold (issue 16), with real processes, real signals and gloo on CPU:

- SIGUSR1 pre-empts under torchrun (with the README's ``--signals-to-handle``) and under the
  runner's own ``launcher.nproc_per_node`` launch: preempt checkpoint, metrics.json, exit code;
- ``python -m runner`` starts from srun's SLURM variables alone (loopback rendezvous);
- a process group that cannot form fails the attempt within NN_HANDLER_PG_TIMEOUT seconds;
- a script that loads a checkpoint under torchrun and closes the group exits 0, every time.

Every wait is bounded: a run that hangs fails its test (subprocess timeouts, deadlines).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nn_handler import distributed as ndist

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Many tiny batches: the run is still in its first epoch when it is signalled, and never ends on its own.
SLOW = ["data=synthetic", "data.train.n=4096", "data.batch_size=2", "model.hidden=[16]", "train.epochs=50",
        "save.every_n_steps=100", "train.progress_bar=false"]
TINY = ["data=synthetic", "data.train.n=64", "model.hidden=[8]", "train.epochs=1", "train.progress_bar=false"]
FORWARD = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # the flag the README gives


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "HYDRA_FULL_ERROR", ndist.PG_TIMEOUT_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _finish(proc: subprocess.Popen, timeout: float):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return out, err


def _signal_mid_training(cmd: list, cwd: Path, run_dir: Path, signum: int):
    """Start ``cmd``, wait for its first step checkpoint, send ``signum`` to the launcher process only."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any(p.name.startswith("ckpt-") for p in ckpts.iterdir()):
                break
            time.sleep(0.05)
        else:
            if proc.poll() is None:
                pytest.fail("no step checkpoint within 120 s")
        assert proc.poll() is None, f"the run ended before it could be signalled:\n{proc.communicate()[1][-3000:]}"
        signalled = time.monotonic()
        proc.send_signal(signum)
        out, err = _finish(proc, 90)
        took = time.monotonic() - signalled
        _no_process_left(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, err, took


def _session(session: int) -> list:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _no_process_left(session: int) -> None:
    """No process of the launcher's session (its workers) outlives it (a few seconds' grace)."""
    deadline = time.monotonic() + 5
    while (left := _session(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the launcher exited: {left}"


def _assert_preempted(run_dir: Path, signum: int) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "preempted", record
    assert record["signal"] == signum and record["exit_code"] == 128 + signum, record
    assert record["world_size"] == 2, record
    preempt = Path(record["checkpoint_written"])
    assert preempt.name.endswith("-preempt.pth") and preempt.is_file(), record
    assert (run_dir / "checkpoints" / "last.pth").resolve() == preempt.resolve()
    return record


# ---------------------------------------------------------------------------- signals
def test_torchrun_with_the_readme_flag_forwards_sigusr1_and_the_workers_save_a_preempt_checkpoint(tmp_path):
    cmd = _torchrun(FORWARD, "-m", "runner", *SLOW, "hydra.run.dir=run")
    code, err, took = _signal_mid_training(cmd, tmp_path, tmp_path / "run", signal.SIGUSR1)
    _assert_preempted(tmp_path / "run", signal.SIGUSR1)
    # torchrun itself ends on the SignalException it raised for the forwarded signal: exit 1.
    assert code == 1, (code, err[-3000:])
    assert "got signal: 10" in err or "SIGUSR1" in err, err[-3000:]
    assert took < 60


def test_self_launch_forwards_sigusr1_and_exits_138_with_a_preempt_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "runner", *SLOW, "launcher.nproc_per_node=2", "hydra.run.dir=run"]
    proc_code, err, took = _signal_mid_training(cmd, tmp_path, tmp_path / "run", signal.SIGUSR1)
    assert proc_code == 138, (proc_code, err[-3000:])
    _assert_preempted(tmp_path / "run", signal.SIGUSR1)
    assert "exit code 138" in err
    assert took < 60


def test_the_self_launch_hands_sigusr1_to_its_agent():
    """What makes the test above pass: the launch config's signal list (torch's default lacks SIGUSR1)."""
    from torch.distributed.launcher.api import LaunchConfig

    from runner import launch

    assert "SIGUSR1" not in LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2).signals_to_handle
    assert set(launch.FORWARDED_SIGNALS.split(",")) >= {"SIGTERM", "SIGINT", "SIGUSR1"}


# ---------------------------------------------------------------------------- srun
def _slurm_env(rank: int, port: int, **extra: str) -> dict:
    return _env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID="4242", MASTER_PORT=str(port), **extra)


def test_runner_starts_from_srun_variables_alone_ranks_share_one_run_directory(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "runner", *TINY], cwd=tmp_path, env=_slurm_env(rank, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank in (0, 1)]
    try:
        results = [_finish(p, 120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, f"exit {p.returncode}:\n{err[-3000:]}"
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # the timestamped directory: both ranks took rank 0's clock
    record = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "completed"
    assert (run_dirs[0] / "runner.log").is_file() and (run_dirs[0] / "runner.rank1.log").is_file()


def test_rendezvous_from_slurm_variables_with_master_overrides(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so what rendezvous_env sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05,09],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    info = ndist.env_topology()
    assert (info.enabled, info.rank, info.local_rank, info.world_size) == (True, 5, 1, 8)
    ndist.rendezvous_env(info)
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == \
        ["5", "8", "1", "gpu03", str(15000 + 123456 % 20000)]
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29999")
    ndist.rendezvous_env(info)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.7", "29999")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        ndist.rendezvous_env(info)


# ---------------------------------------------------------------------------- bounded formation
def test_formation_timeout_default_and_parsing(monkeypatch):
    monkeypatch.delenv(ndist.PG_TIMEOUT_ENV, raising=False)
    assert ndist.formation_timeout() == 300
    for raw, value in (("7.5", 7.5), ("0", None), ("none", None)):
        monkeypatch.setenv(ndist.PG_TIMEOUT_ENV, raw)
        assert ndist.formation_timeout() == value
    for raw in ("-1", "soon", "nan"):
        monkeypatch.setenv(ndist.PG_TIMEOUT_ENV, raw)
        with pytest.raises(ValueError, match=ndist.PG_TIMEOUT_ENV):
            ndist.formation_timeout()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_group_that_cannot_form_fails_the_attempt_within_the_bound(tmp_path, rank):
    """Rank 0 waits for a peer that never comes; rank 1 for a rendezvous nobody serves. Without
    the bound each would wait 30 minutes (the collective timeout)."""
    env = _env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), **{ndist.PG_TIMEOUT_ENV: "3"})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runner", *TINY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=90)
    took = time.monotonic() - started
    assert proc.returncode == ndist.FORMATION_EXIT_CODE, (proc.returncode, proc.stderr[-3000:])
    assert "did not form within 3 s" in proc.stderr and ndist.PG_TIMEOUT_ENV in proc.stderr
    assert took < 60


# ---------------------------------------------------------------------------- clean exit
# The abort (SIGABRT, "terminate called without an active exception") came from a gloo worker thread
# asking for the GIL to drop a finished work's tensors once the interpreter was finalizing (see
# nn_handler.distributed.drain_collective_threads); measured in 3 of 60 runs under load before the fix.
RUNS = 3


def test_a_load_script_under_torchrun_exits_0_every_time(tmp_path):
    from nn_handler import NNHandler
    from nn_handler.models import MLP

    h = NNHandler(MLP, device="cpu", in_features=8, out_features=3, hidden=[16], use_distributed=False)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    path = tmp_path / "model.pth"
    h.save(path)
    codes = []
    for attempt in range(RUNS):
        proc = subprocess.run(_torchrun(str(HERE / "cluster_load_script.py"), str(path)), cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=90)
        codes.append(proc.returncode)
        assert proc.returncode == 0, f"run {attempt}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert proc.stdout.count("LOADED") == 2, proc.stdout
        assert "terminate called" not in proc.stderr
    assert codes == [0] * RUNS


def test_the_exit_drain_waits_for_another_thread_that_is_still_running():
    """What keeps the abort away: before the interpreter finalizes, the library releases the GIL until
    every other thread is idle (a gloo worker still dropping its last work's tensors, here a busy thread)."""
    import threading

    done = threading.Event()

    def busy():
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        done.set()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    waited = ndist.drain_collective_threads(max_s=20.0)
    assert done.is_set(), f"returned after {waited:.3f} s with the other thread still running"
    worker.join(timeout=20)
    # With nothing running it returns at once (a few polls), far below the bound.
    assert ndist.drain_collective_threads(max_s=20.0) < 20.0


def test_restarted_ranks_form_their_group_although_the_agents_store_holds_the_dead_attempts_addresses(tmp_path):
    """torchrun --max-restarts=1: rank 1 dies after forming the group; in the second attempt rank 1 joins
    3 s late. The plain env:// rendezvous then gives rank 0 the dead rank's address from the agent's
    store ("Connection refused", the attempt fails: measured 1 of 1 with tests/cluster_restart_script.py
    torch); nn_handler.distributed forms each attempt's group under its own prefix and succeeds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(HERE / "cluster_restart_script.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(**{ndist.PG_TIMEOUT_ENV: "60"}), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # (both ranks write to the one stdout pipe: their lines may run together, so each record is found by pattern)
    assert sorted(re.findall(r"FORMED attempt=\d+ rank=\d+ sum=\d+", proc.stdout)) == [
        "FORMED attempt=1 rank=0 sum=2", "FORMED attempt=1 rank=1 sum=2"], proc.stdout
