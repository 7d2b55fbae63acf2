"""Sizes and names a file records are bounded (issue 13, red-team findings F1, F2, F6).

Each forgery rewrites a real checkpoint by hand with a valid checksum (``atomic_save``), as
anyone can: a ModelCheckpoint's or SampleGrid's file-name template with a huge format width,
a ModelCheckpoint file name that replaces a user's file, a SampleGrid's ``nrow``/``n``/
``sample_shape``/``steps`` of any size, the runner's recorded ``sample.*`` settings, the
model's recorded ``shape`` and ``runner.target_epoch``. The legitimate paths keep working.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch

from nn_handler import NNHandler
from nn_handler.callbacks import ModelCheckpoint, SampleGrid
from nn_handler.checkpointing import atomic_save
from nn_handler.models import ScoreMLP
from nn_handler.plotting import image_grid
from nn_handler.sde import VPSDE

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)
TESTS = Path(__file__).resolve().parent
NOTES = b"my precious notes\n"
MC = "nn_handler.callbacks.model_checkpoint.ModelCheckpoint"
SG = "nn_handler.callbacks.sample_grid.SampleGrid"


# ---------------------------------------------------------------------------- helpers
def forge(path: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    atomic_save(state, path)
    return path


def load(path: Path, **kwargs: Any):
    """``NNHandler.load`` and the warnings it gave (as text)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(path, device="cpu", **kwargs)
    return h, [str(w.message) for w in caught]


def train(h: NNHandler, epochs: int = 1) -> List[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h.train(epochs, seed=0, progress_bar=False)
    return [str(w.message) for w in caught]


def classifier_with(tmp_path: Path, callback: Dict[str, Any], state: Any = None) -> Path:
    """A classification checkpoint whose callbacks are the one forged ``callback`` spec."""
    path = tmp_path / "run" / "forged.pt"
    path.parent.mkdir(exist_ok=True)
    torch.manual_seed(0)
    hc.classification_handler(val=False, scheduler=False, metric=False).save(path)
    return forge(path, lambda s: s.update(callbacks=[{"spec": {"_target_": MC, **callback}, "state": state or {}}]))


def score_checkpoint(path: Path, shape=(1, 4, 4), callbacks: Any = None) -> Path:
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, device="cpu", model_type="score_based", shape=list(shape), hidden=8, layers=1)
    h.set_sde(VPSDE)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    path.parent.mkdir(parents=True, exist_ok=True)
    h.save(path)
    if callbacks is not None:
        forge(path, lambda s: s.update(callbacks=callbacks))
    return path


def grid_spec(**kwargs: Any) -> Dict[str, Any]:
    return {"spec": {"_target_": SG, "sample_shape": [1, 4, 4], "n": 4, "steps": 2, "every_n_epochs": 1, **kwargs},
            "state": {}}


def names_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------- F2: template format specs
@pytest.mark.parametrize("template", [
    "e{epoch:>10000000}.pt", "e{epoch:010000000d}.pt", "e{loss:.10000000f}.pt", "e{step:999d}.pt",
    "e{epoch:{epoch}}.pt", "e{epoch!r}.pt", "e{epoch!s:>9}.pt", "e{loss:d}.pt", "e{epoch:_>50}.pt",
    "e{epoch.real}.pt", "e{epoch[0]}.pt", "e{0}.pt", "e{}.pt", "e{epoch.pt",
])
def test_a_forged_filename_template_with_a_wide_or_odd_format_falls_back_to_the_default(tmp_path, template):
    path = classifier_with(tmp_path, {"dirpath": str(tmp_path / "run"), "filename": template, "monitor": None,
                                      "save_top_k": 1, "save_last": False})
    h, _ = load(path)
    start = time.monotonic()
    told = train(h)
    assert time.monotonic() - start < 60
    assert (tmp_path / "run" / "epoch001.pt").is_file()  # the default name
    assert all(len(name) < 40 for name in names_under(tmp_path))
    assert any("filename" in m and template in m for m in told), told


def test_short_number_formats_in_a_restored_template_are_honoured(tmp_path):
    template = "e{epoch:03d}-s{step:4}-{loss:.3f}-{epoch:.1e}.pt"
    path = classifier_with(tmp_path, {"dirpath": str(tmp_path / "run"), "filename": template, "monitor": None,
                                      "save_top_k": 1, "save_last": False})
    h, _ = load(path)
    told = train(h)
    (written,) = [p for p in (tmp_path / "run").glob("e001-*.pt")]
    assert written.name.startswith("e001-s") and not any("filename" in m for m in told), told


@pytest.mark.parametrize("template,problem", [
    ("{epoch:03d}{val_loss:.4f}{lr:g}{step:d}{epoch}", None),
    ("{epoch:>1000000000}", "format spec"), ("{epoch:{x}}", "format spec"), ("{epoch!a}", "conversion"),
    ("{loss:05d}", "format spec"), ("{a.b}", "not allowed"), ("{", "not a valid"),
])
def test_field_problem(template, problem):
    from nn_handler.callbacks.model_checkpoint import field_problem

    found = field_problem(template, ("epoch", "step"))
    assert (found is None) if problem is None else (problem in found), found


@pytest.mark.parametrize("filename", ["s{epoch:>10000000}.png", "s{epoch!r}.png", "s{epoch:{epoch}}.png",
                                      "s{step}.png", "notes.txt", "s{epoch}.png\\..\\x.png"])
def test_a_forged_sample_grid_filename_falls_back_to_the_default(tmp_path, filename):
    path = score_checkpoint(tmp_path / "run" / "g.pt", callbacks=[grid_spec(filename=filename,
                                                                             dirpath=str(tmp_path / "run"))])
    (tmp_path / "run" / "notes.txt").write_bytes(NOTES)
    h, _ = load(path)
    (grid,) = [cb for cb in h.callbacks if isinstance(cb, SampleGrid)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = grid.write(h)
    assert Path(written).name == "samples_epoch000.png" and Path(written).is_file()
    assert (tmp_path / "run" / "notes.txt").read_bytes() == NOTES
    assert any(repr(filename) in str(w.message) for w in caught)
    assert all(len(name) < 40 for name in names_under(tmp_path))


def test_a_restored_sample_grid_keeps_its_own_plain_filename(tmp_path):
    path = score_checkpoint(tmp_path / "run" / "g.pt", callbacks=[grid_spec(filename="pic{epoch:02d}.png",
                                                                             dirpath=str(tmp_path / "run" / "s"))])
    h, _ = load(path)
    (grid,) = [cb for cb in h.callbacks if isinstance(cb, SampleGrid)]
    assert Path(grid.write(h)) == tmp_path / "run" / "s" / "pic00.png"


# ---------------------------------------------------------------------------- F6: no file replaced
def test_a_restored_last_filename_never_replaces_a_users_file(tmp_path):
    """The red team's case: ``last_filename="notes.txt"`` in a folder under the checkpoint's."""
    sub = tmp_path / "run" / "sub"
    sub.mkdir(parents=True)
    (sub / "notes.txt").write_bytes(NOTES)
    path = classifier_with(tmp_path, {"dirpath": str(sub), "monitor": None, "save_top_k": 0, "save_last": True,
                                      "last_filename": "notes.txt"})
    h, _ = load(path)
    told = train(h, epochs=2)
    assert (sub / "notes.txt").read_bytes() == NOTES
    assert (sub / "last.pt").is_file() and NNHandler.load(sub / "last.pt", device="cpu").epoch == 2
    assert sum("notes.txt" in m for m in told) == 1, told


def test_a_checkpoint_name_that_is_a_users_other_file_is_not_replaced(tmp_path):
    """Names with a checkpoint suffix, but files without this project's trailer (a plain
    ``torch.save``, a text file, a link, a folder), are left alone; one warning each."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"mine": torch.ones(2)}, run / "notes.pt")
    (run / "keep1.pt").write_bytes(NOTES)
    (tmp_path / "target.txt").write_bytes(NOTES)
    (run / "keep2.pt").symlink_to(tmp_path / "target.txt")
    (run / "keep3.pt").mkdir()
    before = {p: (run / p).read_bytes() for p in ("notes.pt", "keep1.pt")}
    path = classifier_with(tmp_path, {"dirpath": str(run), "filename": "keep{epoch}.pt", "monitor": None,
                                      "save_top_k": -1, "save_last": True, "last_filename": "notes.pt"})
    h, _ = load(path)
    told = train(h, epochs=4)
    assert {p: (run / p).read_bytes() for p in before} == before
    assert (tmp_path / "target.txt").read_bytes() == NOTES and (run / "keep2.pt").is_symlink()
    assert (run / "keep3.pt").is_dir()
    assert (run / "keep4.pt").is_file() and (run / "last.pt").is_file()  # its own files are written
    for name in ("notes.pt", "keep1.pt", "keep2.pt", "keep3.pt"):
        assert sum(f"{run / name}:" in m for m in told) == 1, (name, told)
    cb = next(c for c in h.callbacks if isinstance(c, ModelCheckpoint))
    assert sorted(Path(p).name for p in cb.best_k_models) == ["keep4.pt"]


def test_a_restored_callback_replaces_its_own_checkpoints(tmp_path):
    run = tmp_path / "run"
    path = classifier_with(tmp_path, {"dirpath": str(run), "filename": "e{epoch}.pt", "monitor": None,
                                      "save_top_k": 1, "save_last": True, "last_filename": "final.ckpt"})
    h, _ = load(path)
    train(h)
    h, _ = load(run / "final.ckpt")
    told = train(h)
    assert NNHandler.load(run / "final.ckpt", device="cpu").epoch == 2 and (run / "e2.pt").is_file()
    assert not (run / "e1.pt").exists() and not any("not writing" in m for m in told), told


# ---------------------------------------------------------------------------- F1: SampleGrid sizes
@pytest.mark.parametrize("settings,named", [
    ({"nrow": 25_000_000}, "nrow"), ({"nrow": 5}, "nrow"), ({"nrow": 0}, "nrow"), ({"n": 10 ** 9}, "n "),
    ({"n": 64, "sample_shape": [4096, 4096]}, "prod(sample_shape)"), ({"sample_shape": [0]}, "sample_shape"),
    ({"sample_shape": [2 ** 40, 2 ** 40]}, "sample_shape"), ({"sample_shape": "abc"}, "sample_shape"),
    ({"sample_shape": [1] * 9}, "sample_shape"), ({"steps": 2 ** 28}, "steps"),
    ({"corrector_steps": 2 ** 28}, "corrector_steps"), ({"corrector_steps": -1}, "corrector_steps"),
    ({"steps": float("inf")}, "steps"), ({"steps": True}, "steps"), ({"value_range": [0.0] * 1000}, "value_range"),
])
def test_a_forged_sample_grid_size_is_refused_when_loaded(tmp_path, settings, named):
    path = score_checkpoint(tmp_path / "run" / "g.pt", callbacks=[grid_spec(**settings)])
    start = time.monotonic()
    h, told = load(path)
    assert time.monotonic() - start < 30
    assert not any(isinstance(cb, SampleGrid) for cb in h.callbacks)
    assert any("callback[0]" in m and named in m and str(path) in m for m in told), told
    with pytest.raises(ValueError, match=re.escape(named.strip())):
        SampleGrid(**{"sample_shape": [1, 4, 4], "n": 4, "steps": 2, **settings})


def test_sample_grid_within_its_bounds_draws_its_picture(tmp_path):
    path = score_checkpoint(tmp_path / "run" / "g.pt",
                            callbacks=[grid_spec(n=4, nrow=4, steps=3, dirpath=str(tmp_path / "run"))])
    h, _ = load(path)
    (grid,) = [cb for cb in h.callbacks if isinstance(cb, SampleGrid)]
    assert grid.nrow == 4 and Path(grid.write(h)).is_file()
    SampleGrid([3, 64, 64], n=4096 // 4, steps=100_000, corrector_steps=100_000, nrow=1)  # at the bounds


def test_image_grid_clamps_nrow_to_the_number_of_samples():
    images = torch.rand(4, 1, 4, 4)
    assert torch.equal(image_grid(images, nrow=2_000_000), image_grid(images, nrow=4))
    assert image_grid(images, nrow=2).shape == (11, 11, 1)
    with pytest.raises(ValueError, match="nrow"):
        image_grid(images, nrow=-3)


def test_memory_stays_bounded_for_a_huge_nrow(tmp_path):
    """In a process held to 3 GiB of address space: ``save_samples_png`` with ``nrow=25_000_000``
    (6.8 GB before) and the red team's forged SampleGrid load, then the write of a legal one."""
    path = score_checkpoint(tmp_path / "g.pt", callbacks=[grid_spec(nrow=25_000_000, dirpath=str(tmp_path))])
    script = textwrap.dedent(f"""
        import resource, warnings, torch
        from nn_handler import NNHandler
        from nn_handler.plotting import save_samples_png
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        save_samples_png(torch.rand(4, 1, 4, 4), {str(tmp_path / 'a.png')!r}, nrow=25_000_000)
        h = NNHandler.load({str(path)!r}, device="cpu")
        assert not h.callbacks, h.callbacks
        print("grew_mib", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grew = int(proc.stdout.split("grew_mib")[1])
    assert grew < 200, grew
    assert (tmp_path / "a.png").is_file()


# ---------------------------------------------------------------------------- the runner: task=sample
@pytest.fixture(scope="module")
def compose_cfg():
    from hydra import compose, initialize_config_dir

    from runner.schema import register

    register()

    def make(overrides: List[str]):
        with initialize_config_dir(str(TESTS.parent / "runner" / "conf"), version_base=None):
            return compose("config", overrides=overrides)
    return make


@pytest.fixture(autouse=True)
def no_endless_sampling(monkeypatch):
    """A step count or size beyond any bound fails the test at once instead of sampling for hours
    (or allocating gigabytes) without the bounds."""
    real = NNHandler.sample

    def sample(self, shape, steps=500, *args, **kwargs):
        assert steps <= 100_000, f"sampling {steps} steps"
        assert all(isinstance(d, int) for d in shape) and math.prod(shape) <= 2 ** 28, f"sampling {shape}"
        assert kwargs.get("corrector_steps", 0) <= 100_000, f"sampling {kwargs['corrector_steps']} corrector steps"
        return real(self, shape, steps, *args, **kwargs)
    monkeypatch.setattr(NNHandler, "sample", sample)


def run_sample(compose_cfg, tmp_path: Path, checkpoint: Path, *given: str):
    from runner import tasks
    from runner.context import RunContext

    overrides = ["task=sample", f"checkpoint.path={checkpoint}", *given]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tasks.sample_task(compose_cfg(overrides), RunContext(str(out), str(tmp_path), overrides))


def points_checkpoint(tmp_path: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    return forge(score_checkpoint(tmp_path / "score.pt", shape=[2]), edit)


@pytest.mark.parametrize("key,value", [("steps", 2 ** 28), ("corrector_steps", 2 ** 28), ("steps", 0),
                                       ("steps", "many"), ("corrector_steps", -4), ("steps", float("nan")),
                                       ("value_range", "x" * 10 ** 5), ("value_range", [0, float("inf")])])
def test_task_sample_refuses_a_recorded_setting_beyond_its_bound(compose_cfg, tmp_path, key, value):
    from runner.errors import RunnerError

    path = points_checkpoint(tmp_path, lambda s: s.update(metadata={"run_config": {"sample": {key: value}}}))
    start = time.monotonic()
    with pytest.raises(RunnerError, match=rf"sample\.{key}=.*give sample\.{key}=\.\.\. on the command line") as info:
        run_sample(compose_cfg, tmp_path, path, "sample.n=4")
    assert str(path) in str(info.value) and time.monotonic() - start < 30
    given = {"steps": "sample.steps=3", "corrector_steps": "sample.corrector_steps=1",
             "value_range": "sample.value_range=[-2,2]"}[key]
    record = run_sample(compose_cfg, tmp_path, path, "sample.n=4", "sample.steps=3", given)  # the user's choice
    assert record["shape"] == [4, 2]


def test_task_sample_uses_sane_recorded_settings(compose_cfg, tmp_path):
    path = points_checkpoint(tmp_path, lambda s: s.update(
        metadata={"run_config": {"sample": {"steps": 3, "corrector_steps": 1, "value_range": [-1, 1]}}}))
    record = run_sample(compose_cfg, tmp_path, path, "sample.n=4")
    assert record["steps"] == 3 and record["shape"] == [4, 2]
    assert torch.load(tmp_path / "out" / "samples.pt", weights_only=True).shape == (4, 2)


def identity_model(shape: Any) -> Callable[[Dict[str, Any]], None]:
    def edit(state: Dict[str, Any]) -> None:
        state["model"] = {"spec": {"_target_": "torch.nn.modules.linear.Identity", "shape": shape},
                          "model_type": "score_based"}
        state["model_state_dict"] = {}
        state["optimizer"] = None
        state["metadata"] = {"run_config": {"sample": {"steps": 2}}}
    return edit


@pytest.mark.parametrize("shape", [[4096, 4096], [2 ** 20, 2 ** 20, 2 ** 20], [0, 2], [True, 2], ["a"], [1] * 9,
                                   "abc", {"a": 1}])
def test_task_sample_never_takes_a_huge_or_odd_shape_from_the_recorded_model(compose_cfg, tmp_path, shape):
    from runner.errors import RunnerError

    path = points_checkpoint(tmp_path, identity_model(shape))
    start = time.monotonic()
    with pytest.raises(RunnerError, match=r"sample\.shape"):
        run_sample(compose_cfg, tmp_path, path)
    assert time.monotonic() - start < 30


def test_task_sample_takes_a_small_recorded_model_shape(compose_cfg, tmp_path):
    path = points_checkpoint(tmp_path, lambda s: s.update(metadata={"run_config": {"sample": {"steps": 2}}}))
    assert run_sample(compose_cfg, tmp_path, path, "sample.n=3")["shape"] == [3, 2]  # ScoreMLP's shape=[2]


# ---------------------------------------------------------------------------- the runner: auto_resume target
@pytest.mark.parametrize("target,expected", [(10 ** 12, None), ("junk", None), (-5, None), (True, None),
                                             (2.5, None), (7, 7 - 1)])
def test_auto_resume_ignores_an_insane_recorded_target_epoch(compose_cfg, tmp_path, monkeypatch, caplog,
                                                            target, expected):
    from runner import tasks
    from runner.context import RunContext
    from runner.tasks import train as train_module

    torch.manual_seed(0)
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    h.train(1, seed=0, progress_bar=False)
    h.metadata["runner"] = {"task": "resume", "target_epoch": target}
    path = tmp_path / "out" / "checkpoints" / "last.pth"
    path.parent.mkdir(parents=True)
    h.save(path)
    seen: Dict[str, Any] = {}
    monkeypatch.setattr(train_module, "fit_and_save", lambda h, cfg, ctx, **kw: seen.update(kw))
    overrides = ["task=resume", "auto_resume=true", "train.epochs=3", f"checkpoint.path={path}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tasks.continue_run(compose_cfg(overrides), RunContext(str(tmp_path / "out"), str(tmp_path), overrides), str(path))
    assert seen["epochs"] == (3 - 1 if expected is None else expected)  # None: up to train.epochs
    if expected is None:
        assert "ignoring the target epoch" in caplog.text and str(path) in caplog.text
