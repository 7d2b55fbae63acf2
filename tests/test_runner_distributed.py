"""The runner under real multi-process launches on CPU (gloo): torchrun, and its own elastic launch."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.distributed

TINY = ["data=synthetic", "model.hidden=[16]", "train.epochs=2"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")


def run(cmd, cwd, timeout=240, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(args, cwd, **kw):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "runner", *args], cwd, **kw)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_torchrun_with_two_ranks_shares_one_timestamped_directory_and_only_rank_0_writes(tmp_path):
    ok(torchrun(TINY, tmp_path))  # no hydra.run.dir: the default outputs/<date>/<time>
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["epoch"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pth"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # Each rank logs to its own file; rank 0's holds the epoch summaries.
    assert "epoch 2:" in (run_dir / "runner.log").read_text()
    assert (run_dir / "runner.rank1.log").is_file()


def test_self_launch_with_two_workers_composes_with_a_sweep_one_distributed_run_per_job(tmp_path):
    ok(run([sys.executable, "-m", "runner", "-m", *TINY, "train.epochs=1", "launcher.nproc_per_node=2",
            "optimizer.lr=1e-3,1e-2", "hydra.sweep.dir=sweep"], tmp_path))
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["status"], r["world_size"]) for r in rows] == [("0", "completed", "2"), ("1", "completed", "2")]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["world_size"] == 2
        assert (sweep / job / "checkpoints" / "last.pth").is_file()
        assert (sweep / job / "runner.rank1.log").is_file()


def test_a_failure_on_one_rank_ends_the_torchrun_job_promptly_with_a_nonzero_exit(tmp_path):
    module = tmp_path / "mods"
    module.mkdir()
    (module / "rank_one_fails.py").write_text(
        "import os\nfrom nn_handler.datasets import synthetic_classification\n\n"
        "def data(**kwargs):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return synthetic_classification(**kwargs)\n")
    start = time.monotonic()
    proc = torchrun([*TINY, "data.train._target_=rank_one_fails.data", "hydra.run.dir=out"], tmp_path,
                    timeout=120, pythonpath=module)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.monotonic() - start < 90
    record = tmp_path / "out" / "metrics.json"  # rank 0 saw the group fail: a failed record, never "completed"
    assert not record.exists() or json.loads(record.read_text())["status"] == "failed"
