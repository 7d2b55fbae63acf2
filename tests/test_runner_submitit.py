"""Sweeps through hydra-submitit-launcher where each submitted job is one multi-rank DDP run (issue 16):
``submitit_local`` with 2 tasks per job stands in for ``hydra/launcher=slurm`` (same launcher code,
local processes instead of sbatch). Real processes, gloo on CPU, every wait bounded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
