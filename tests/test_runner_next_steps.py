"""The "next steps" commands a training run prints, run verbatim as a user copies them.

Four runs, each trained once (shortened with overrides) and reused: the default config, the score-based
``experiment=digits_score``, a user's ``--config-dir`` package whose model is a factory function
(``mypkg.models.build``) and whose data is its own function, and the same package reached as a user may
configure it otherwise: their own primary config (``--config-name``) whose groups live in a directory found
through ``hydra.searchpath``, with an optimizer group of theirs chosen on the command line. Each printed command is split with
``shlex`` and run from the same directory, with the virtual environment first on PATH (as after
``source .venv/bin/activate``) and, for the user's package, PYTHONPATH naming it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

COMMAND = re.compile(r"^\s+(resume|fine-tune|infer|sample|sweep):\s+(python -m runner .*)$", re.M)
TIMEOUT = 240


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT",
                        "PYTHONPATH")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` is this venv's
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{shlex.join(proc.args)}: exit {proc.returncode}\nstdout:\n{proc.stdout}\n" \
                                 f"stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


class Case:
    """One training run, then each command it printed, run verbatim from the same directory: the results."""

    def __init__(self, cwd: Path, args: List[str], env: Dict[str, str], extra: Optional[Dict[str, List[str]]] = None):
        self.cwd, self.args, self.env = cwd, args, env
        self.extra = extra or {}  # more commands (not printed ones): name -> argv after `python -m runner`
        self.results: Dict[str, subprocess.CompletedProcess] = {}
        self.commands: Dict[str, str] = {}
        self.run_dir = cwd / "runs" / "train"
        self.epoch = -1

    def _run(self, argv: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT)

    def train(self) -> None:
        self.proc = self._run([sys.executable, "-m", "runner", *self.args, "hydra.run.dir=runs/train"])
        self.commands = dict(COMMAND.findall(self.proc.stdout))
        if self.proc.returncode == 0:
            self.epoch = _metrics(self.run_dir)["epoch"]

    def step(self, names: Sequence[str]) -> None:
        """The printed command called one of ``names`` (e.g. infer or sample), if this run printed one."""
        for name in names:
            if name in self.commands:
                self.results[name] = self._run(shlex.split(self.commands[name]))

    def run_extra(self) -> None:
        for name, argv in self.extra.items():
            self.results[name] = self._run([sys.executable, "-m", "runner", *argv])

    def result(self, name: str) -> subprocess.CompletedProcess:
        ok(self.proc)
        assert name in self.results, f"no {name!r} command in:\n{self.proc.stdout}"
        return self.results[name]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _run_dirs(proc: subprocess.CompletedProcess) -> List[Path]:
    """The run directories of a training command, from the ``checkpoint: <run dir>/checkpoints/last.pth`` it prints."""
    return [Path(p).parent.parent for p in re.findall(r"^checkpoint: (.*)$", proc.stdout, re.M)]


def _printed_line(proc: subprocess.CompletedProcess, key: str) -> Path:
    found = re.findall(rf"^{key}: (.*)$", proc.stdout, re.M)
    assert len(found) == 1, proc.stdout
    return Path(found[0])


def _check_training(case: Case, name: str, task: str, epochs: int, jobs: int = 1) -> subprocess.CompletedProcess:
    proc = ok(case.result(name))
    dirs = _run_dirs(proc)
    assert len(dirs) == jobs and len(set(dirs)) == jobs, proc.stdout
    for run_dir in dirs:
        record = _metrics(run_dir)
        assert record["task"] == task and record["status"] == "completed"
        assert record["epoch"] == case.epoch + epochs  # resume continues the epoch numbering
        assert record["checkpoint_read"] == str(case.run_dir / "checkpoints" / "last.pth")
        assert isinstance(record["train_loss"], float)
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Case]:
    """The three cases, side by side: the three trainings at once, then each round of printed commands at once
    (one command per case at a time: within a case they run one after the other, as a user would, so that
    each gets its own timestamped run directory)."""
    root = tmp_path_factory.mktemp("next-user")
    cases: Dict[str, Case] = {
        "default": Case(tmp_path_factory.mktemp("next-default"),
                        ["data=synthetic", "model.hidden=[8]", "train.epochs=1"], _env()),
        "score": Case(tmp_path_factory.mktemp("next-score"),
                      ["experiment=digits_score", "train.epochs=1", "sample.n=4", "sample.steps=5"], _env(),
                      extra={"infer": ["task=infer", "checkpoint.path=runs/train", "hydra.run.dir=runs/infer"]}),
        "user": Case(_user_package(root), ["--config-dir", "conf", "model=mine", "data=mine", "train.epochs=1",
                                           "+metrics.acc=nn_handler.metrics.accuracy"],  # a metric the config lacks
                     _env({"PYTHONPATH": str(root / "src")}),
                     extra={"untrusted": ["task=resume", "checkpoint.path=runs/train", "train.epochs=1",
                                          "hydra.run.dir=runs/untrusted"]}),
        "searchpath": Case(_searchpath_user(tmp_path_factory.mktemp("next-searchpath")),
                           ["--config-dir", "conf", "--config-name", "myexp", "hydra.searchpath=[file://shared]",
                            "optimizer=mine"], _env({"PYTHONPATH": str(root / "src")})),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        list(pool.map(Case.train, cases.values()))
        for names in (["resume"], ["fine-tune"], ["infer", "sample"], ["sweep"]):
            list(pool.map(lambda case: case.step(names), cases.values()))
        list(pool.map(Case.run_extra, cases.values()))
    return cases


# ---------------------------------------------------------------------------- (a) the default config
def test_default_run_prints_resume_finetune_infer_and_sweep(runs):
    case = runs["default"]
    ok(case.proc)
    assert sorted(case.commands) == ["fine-tune", "infer", "resume", "sweep"]
    for command in case.commands.values():
        assert "--config-dir" not in command and "trusted_packages" not in command
        assert "checkpoint.path=runs/train/checkpoints/last.pth" in command


def test_default_run_printed_resume_continues_the_epochs(runs):
    _check_training(runs["default"], "resume", "resume", 5)


def test_default_run_printed_finetune_trains(runs):
    _check_training(runs["default"], "fine-tune", "finetune", 10)


def test_default_run_printed_infer_writes_predictions(runs):
    out = _printed_line(ok(runs["default"].result("infer")), "predictions")
    assert torch.load(out, weights_only=True).shape == (128, 10)  # the recorded synthetic val set
    record = _metrics(out.parent)
    assert record["task"] == "infer" and 0.0 <= record["accuracy"] <= 1.0


def test_default_run_printed_sweep_runs_both_jobs(runs):
    _check_training(runs["default"], "sweep", "finetune", 10, jobs=2)


# ---------------------------------------------------------------------------- (b) experiment=digits_score
def test_score_run_points_at_sample_not_infer(runs):
    case = runs["score"]
    ok(case.proc)
    assert sorted(case.commands) == ["fine-tune", "resume", "sample", "sweep"]
    assert "task=infer" not in case.proc.stdout


def test_score_run_printed_resume_keeps_the_score_matching_loss(runs):
    from nn_handler.checkpointing import read_info

    proc = _check_training(runs["score"], "resume", "resume", 5)
    info = read_info(_run_dirs(proc)[0] / "checkpoints" / "last.pth")
    assert info["loss_fn"] is None and info["model"]["model_type"] == "score_based"  # not the config's CrossEntropyLoss
    assert "CrossEntropyLoss" not in proc.stderr  # nor told as drift: the config's default is nobody's choice
    assert "task=sample" in proc.stdout  # its own next steps too


def test_score_run_printed_finetune_trains(runs):
    from nn_handler.checkpointing import read_info

    proc = _check_training(runs["score"], "fine-tune", "finetune", 10)
    assert read_info(_run_dirs(proc)[0] / "checkpoints" / "last.pth")["loss_fn"] is None


def test_score_run_printed_sample_writes_samples(runs):
    proc = ok(runs["score"].result("sample"))
    samples = torch.load(_printed_line(proc, "samples"), weights_only=True)
    assert samples.shape == (64, 1, 8, 8) and torch.isfinite(samples).all()
    assert _printed_line(proc, "picture").is_file()


def test_score_run_printed_sweep_runs_both_jobs(runs):
    _check_training(runs["score"], "sweep", "finetune", 10, jobs=2)


def test_infer_on_a_score_model_points_at_task_sample(runs):
    proc = runs["score"].result("infer")
    assert proc.returncode != 0 and "task=sample" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- (c) a user's --config-dir package
MODELS = '''
from torch import nn


def build(width: int = 8) -> nn.Module:
    """A factory function: the usual way to get a library model (timm.create_model, torchvision.models.resnet18)."""
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))
'''
DATA = '''
import torch
from torch.utils.data import TensorDataset


def build(split: str = "train", n: int = 96) -> TensorDataset:
    """Three Gaussian blobs in 4-D, a different draw per split."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 4).float()
    return TensorDataset(x, y)
'''


def _user_package(root: Path) -> Path:
    """``root/src/mypkg`` (a factory-function model and a data function) and ``root/work/conf``: the launch directory."""
    package = root / "src" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODELS)
    (package / "data.py").write_text(DATA)
    work = root / "work"
    (work / "conf" / "model").mkdir(parents=True)
    (work / "conf" / "data").mkdir()
    (work / "conf" / "model" / "mine.yaml").write_text("_target_: mypkg.models.build\nwidth: 8\n")
    (work / "conf" / "data" / "mine.yaml").write_text(
        "train: {_target_: mypkg.data.build, split: train}\nval: {_target_: mypkg.data.build, split: val, n: 48}\n"
        "batch_size: 16\n")
    return work


def test_user_run_commands_carry_the_config_dir_and_the_trust_they_need(runs):
    case = runs["user"]
    ok(case.proc)
    assert sorted(case.commands) == ["fine-tune", "infer", "resume", "sweep"]
    for command in case.commands.values():
        assert command.startswith("python -m runner --config-dir conf ")
        assert "'load.trusted_packages=[mypkg.data,mypkg.models]'" in command


def test_user_run_records_the_factory_model(runs):
    from nn_handler.checkpointing import read_info

    ok(runs["user"].proc)
    model = read_info(runs["user"].run_dir / "checkpoints" / "last.pth")["model"]
    assert model["target"] == "mypkg.models.build" and model["kwargs"] == {"width": 8}


def test_user_run_printed_resume_continues_the_epochs_with_the_recorded_metrics(runs):
    proc = _check_training(runs["user"], "resume", "resume", 5)
    assert isinstance(_metrics(_run_dirs(proc)[0])["val_acc"], float)  # the run's own metric, not only the config's


def test_user_run_printed_finetune_trains_with_the_recorded_metrics(runs):
    proc = _check_training(runs["user"], "fine-tune", "finetune", 10)
    assert isinstance(_metrics(_run_dirs(proc)[0])["val_acc"], float)


def test_user_run_printed_infer_writes_predictions(runs):
    out = _printed_line(ok(runs["user"].result("infer")), "predictions")
    assert torch.load(out, weights_only=True).shape == (48, 3)  # the user's val set, rebuilt from the file
    assert 0.0 <= _metrics(out.parent)["accuracy"] <= 1.0


def test_user_run_printed_sweep_runs_both_jobs(runs):
    _check_training(runs["user"], "sweep", "finetune", 10, jobs=2)


def test_user_run_resume_without_the_trust_says_what_to_pass(runs):
    proc = runs["user"].result("untrusted")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "mypkg.models.build" in proc.stderr and "load.trusted_packages=[mypkg]" in proc.stderr
    assert "bare state_dict" not in proc.stderr


# ---------------------------------------------------------------------------- (d) --config-name, hydra.searchpath
MYEXP = """defaults:
  - config  # the runner's own primary config, then the user's choices over it
  - override model: mine
  - override data: mine
  - _self_
train:
  epochs: 1
"""


def _searchpath_user(base: Path) -> Path:
    """``base/conf/myexp.yaml`` (a primary config of the user's, by --config-dir) naming groups that live only in
    ``base/shared`` (reached through hydra.searchpath): the model, the data and an SGD optimizer."""
    (base / "conf").mkdir()
    (base / "conf" / "myexp.yaml").write_text(MYEXP)
    for group, text in (("model", "_target_: mypkg.models.build\nwidth: 8\n"),
                        ("data", "train: {_target_: mypkg.data.build, split: train}\n"
                                 "val: {_target_: mypkg.data.build, split: val, n: 48}\nbatch_size: 16\n"),
                        ("optimizer", "_target_: torch.optim.SGD\nlr: 0.05\nmomentum: 0.9\n")):
        (base / "shared" / group).mkdir(parents=True)
        (base / "shared" / group / "mine.yaml").write_text(text)
    return base


def _optimizer_of(run_dir: Path) -> dict:
    from nn_handler.checkpointing import read_info

    return read_info(run_dir / "checkpoints" / "last.pth")["optimizer"]


def test_searchpath_run_commands_carry_the_config_name_the_searchpath_and_the_optimizer_choice(runs):
    case = runs["searchpath"]
    ok(case.proc)
    assert sorted(case.commands) == ["fine-tune", "infer", "resume", "sweep"]
    assert not (case.cwd / "conf" / "model").exists()  # model=mine, data=mine and optimizer=mine: only via the searchpath
    for name, command in case.commands.items():
        assert command.startswith("python -m runner --config-dir conf --config-name myexp "), command
        assert "'hydra.searchpath=[file://shared]'" in command
        assert ("optimizer=mine" in command) == (name in ("fine-tune", "sweep"))  # the groups a fine-tune builds
    assert _optimizer_of(case.run_dir)["_target_"] == "torch.optim.sgd.SGD"


def test_searchpath_run_printed_resume_continues_the_epochs(runs):
    proc = _check_training(runs["searchpath"], "resume", "resume", 5)
    assert _optimizer_of(_run_dirs(proc)[0])["lr"] == 0.05  # the restored optimizer, untouched


def test_searchpath_run_printed_finetune_uses_the_runs_optimizer_at_the_lower_rate(runs):
    proc = _check_training(runs["searchpath"], "fine-tune", "finetune", 1)  # myexp.yaml's train.epochs
    optimizer = _optimizer_of(_run_dirs(proc)[0])
    assert optimizer["_target_"] == "torch.optim.sgd.SGD" and optimizer["momentum"] == 0.9 and optimizer["lr"] == 1e-4


def test_searchpath_run_printed_infer_writes_predictions(runs):
    out = _printed_line(ok(runs["searchpath"].result("infer")), "predictions")
    assert torch.load(out, weights_only=True).shape == (48, 3)


def test_searchpath_run_printed_sweep_runs_both_jobs(runs):
    proc = _check_training(runs["searchpath"], "sweep", "finetune", 1, jobs=2)
    assert sorted(_optimizer_of(d)["lr"] for d in _run_dirs(proc)) == [1e-4, 1e-3]


# ---------------------------------------------------------------------------- (e) --config-path
def test_a_run_from_its_own_config_path_prints_commands_that_find_it(tmp_path):
    """``--config-path DIR --config-name full``: a whole config directory of the user's (here a copy of the
    runner's, its primary config renamed) in place of the runner's; the printed infer finds it, as printed."""
    import shutil

    import runner

    conf = tmp_path / "myconf"
    shutil.copytree(Path(runner.__file__).parent / "conf", conf)
    (conf / "config.yaml").rename(conf / "full.yaml")  # only in this directory: no command finds it without the flag
    case = Case(tmp_path, ["--config-path", str(conf), "--config-name", "full", "data=synthetic", "model.hidden=[8]",
                           "train.epochs=1"], _env())
    case.train()
    ok(case.proc)
    assert case.commands["infer"].startswith(f"python -m runner --config-path {conf} --config-name full task=infer ")
    case.step(["infer"])
    out = _printed_line(ok(case.result("infer")), "predictions")
    assert torch.load(out, weights_only=True).shape == (128, 10)
