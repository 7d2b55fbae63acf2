"""The training loop's Stateful parts (Progress, TrainSettings), its typed setting errors, its
explicit context (the loop saves only through ``ctx.save``), and the package's import rule."""
from __future__ import annotations

import ast
import pathlib
import warnings

import helpers_core as hc
import pytest
import torch

import nn_handler
from nn_handler import NNHandler, SettingError
from nn_handler.train import LoopContext, Progress, TrainSettings, run
from nn_handler.train.progress import Averages, Position


def _sums(total: float, count: int, accuracy: float) -> Averages:
    sums = Averages(torch.device("cpu"), ["accuracy"])
    sums.add(torch.tensor(total / count), count)
    sums.metrics["accuracy"] = accuracy
    return sums


# ---------------------------------------------------------------------------- Progress
def test_progress_outside_an_epoch_saves_counters_only_and_a_load_leaves_no_resume():
    p = Progress()
    p.epoch, p.global_step, p.data_seed = 2, 12, 7
    assert p.rank_state() is None
    assert p.state_dict() == {"epoch": 2, "global_step": 12, "data_seed": 7}
    p.position = Position(2, 0, _sums(1.0, 1, 0.0))  # an epoch begun, no optimizer step yet: nothing to resume
    assert p.rank_state() is None and "position" not in p.state_dict()

    q = Progress()
    q.resume = {"epoch": 0, "step_in_epoch": 1, "partial": None}
    q.load_state_dict(p.state_dict())
    assert (q.epoch, q.global_step, q.data_seed) == (2, 12, 7)
    assert q.resume is None and not q.resumes_inside_epoch


def test_progress_round_trips_a_mid_epoch_position_with_this_ranks_sums():
    p = Progress()
    p.epoch, p.global_step, p.data_seed = 3, 17, 5
    p.position = Position(3, 4, _sums(6.0, 48, 30.0))
    mine = p.rank_state()
    assert mine["count"] == 48 and mine["total"].item() == pytest.approx(6.0) and mine["metrics"] == {"accuracy": 30.0}
    state = p.state_dict()
    assert set(state) == {"epoch", "global_step", "data_seed", "position"}
    assert state["position"]["epoch"] == 3 and state["position"]["step_in_epoch"] == 4
    assert len(state["position"]["partial"]) == 1

    q = Progress()
    q.load_state_dict(state)
    assert (q.epoch, q.global_step, q.data_seed) == (3, 17, 5)
    assert q.resumes_inside_epoch and q.position is None
    assert q.resume["epoch"] == 3 and q.resume["step_in_epoch"] == 4
    restored = Averages(torch.device("cpu"), ["accuracy"])
    restored.load_state_dict(q.resume["partial"])
    assert restored.state_dict()["count"] == 48 and restored.metrics == {"accuracy": 30.0}
    assert torch.equal(restored.state_dict()["total"], mine["total"])


def test_progress_keeps_every_ranks_partial_and_a_load_takes_its_own_rank_or_zeros():
    p = Progress()
    p.epoch = 1
    p.position = Position(1, 2, _sums(1.0, 8, 4.0))
    partials = [_sums(1.0, 8, 4.0).state_dict(), _sums(3.0, 10, 5.0).state_dict()]
    state = p.state_dict(partials)
    assert [r["count"] for r in state["position"]["partial"]] == [8, 10]

    q = Progress()
    q.load_state_dict(state, rank=1)
    assert q.resume["partial"]["count"] == 10 and q.resume["partial"]["metrics"] == {"accuracy": 5.0}
    q.load_state_dict(state, rank=2)  # more ranks load than saved: that rank's share starts from zero
    assert q.resume["partial"]["count"] == 0 and q.resume["partial"]["total"].item() == 0.0


def test_handler_epoch_and_global_step_are_its_progress_and_a_mid_epoch_checkpoint_resumes_inside(tmp_path):
    h = hc.classification_handler()
    h.epoch, h.global_step = 4, 9
    assert (h._progress.epoch, h._progress.global_step) == (4, 9)
    h.epoch, h.global_step = 0, 0
    # 6 batches an epoch: step 2 is inside epoch 0; the epoch's own checkpoint comes after its end.
    h.train(1, seed=0, progress_bar=False, checkpoint_dir=tmp_path, save_every_n_steps=2, save_every_n_epochs=1)
    assert h.epoch == 1 and h.global_step == 6 and h._progress.position is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inside = NNHandler.load(tmp_path / "ckpt-e0000-s000000002.pth")
        after = NNHandler.load(tmp_path / "ckpt-e0001-s000000006.pth")
    assert inside.resumes_inside_epoch and inside.epoch == 0 and inside.global_step == 2
    assert inside._progress.resume["step_in_epoch"] == 2
    assert not after.resumes_inside_epoch and after.epoch == 1 and after.global_step == 6
    assert inside._progress.data_seed == after._progress.data_seed == 0


# ---------------------------------------------------------------------------- TrainSettings
def test_train_settings_round_trip_in_place_with_defaults_for_what_the_state_leaves_out():
    saved = TrainSettings().updated(validate_every=2, gradient_accumulation_steps=3, ema_decay=0.9,
                                    gradient_clipping_norm=1.5, validate_with_ema=True)
    assert saved.state_dict() == saved.to_dict()
    target = TrainSettings().updated(use_amp=True)
    same_object = target
    target.load_state_dict({**saved.state_dict(), "use_amp": None, "unknown": 1})
    assert target is same_object and target == saved  # use_amp None: the default (False), not the old True
    partial = TrainSettings().updated(validate_every=5)
    partial.load_state_dict({"ema_decay": 0.5})
    assert partial == TrainSettings(ema_decay=0.5)


# ---------------------------------------------------------------------------- SettingError
@pytest.mark.parametrize("name, value, message", [
    ("validate_every", 0, "validate_every must be >= 1, got 0"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be >= 1, got 0"),
    ("gradient_clipping_norm", -1.0, "gradient_clipping_norm must be >= 0, got -1.0"),
    ("ema_decay", 1.5, "ema_decay must be in [0, 1), got 1.5 (0 turns EMA off)"),
])
def test_a_bad_setting_raises_a_setting_error_naming_it(name, value, message):
    with pytest.raises(SettingError) as caught:
        TrainSettings().updated(**{name: value})
    assert caught.value.name == name and str(caught.value) == message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(SettingError) as caught:
        TrainSettings().load_state_dict({name: value})
    assert caught.value.name == name


def test_train_raises_setting_errors_for_its_settings_and_epochs():
    h = hc.classification_handler()
    with pytest.raises(SettingError) as caught:
        h.train(epochs=-1, progress_bar=False)
    assert caught.value.name == "epochs" and str(caught.value) == "epochs must be >= 0, got -1"
    with pytest.raises(SettingError) as caught:
        h.train(epochs=1, validate_every=0, progress_bar=False)
    assert caught.value.name == "validate_every" and h.epoch == 0
    assert nn_handler.SettingError is SettingError


# ---------------------------------------------------------------------------- the loop over its context
def test_the_loop_saves_only_through_the_context_save_callable():
    h = hc.classification_handler(val=False)
    saved = []

    def save(tag: str = "") -> str:
        saved.append((tag, h.epoch, h.global_step, h._progress.rank_state() is not None))
        return f"fake-{len(saved)}"

    h._progress.data_seed = 0  # what train() draws (or takes from seed=) before it runs the loop
    ctx = h._loop_context(save)
    assert isinstance(ctx, LoopContext) and ctx.progress is h._progress and ctx.save is save
    run(ctx, 2, progress_bar=False, every_n_steps=4, every_n_epochs=1)
    # 6 batches an epoch: step saves at steps 4 and 8 and at step 12, the last of epoch 1 (so still inside it),
    # and a save after each epoch's end.
    assert saved == [("", 0, 4, True), ("", 1, 6, False), ("", 1, 8, True), ("", 1, 12, True), ("", 2, 12, False)]
    assert h.epoch == 2 and len(h.train_losses) == 2


def test_the_checks_before_training_keep_their_messages_and_change_nothing():
    h = NNHandler(hc.MLP, device="cpu", **hc.MODEL_KWARGS)
    with pytest.raises(RuntimeError, match=r"^no training data: call h\.set_train_loader"):
        h.train(1, progress_bar=False, ema_decay=0.9)
    assert h.ema is None
    h.set_train_loader(hc.TRAIN_DATA, batch_size=16)
    with pytest.raises(RuntimeError, match=r"^no optimizer is set: set it with h\.set_optimizer"):
        h.train(1, progress_bar=False)
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"^no loss_fn is set: set it with h\.set_loss_fn"):
        h.train(1, progress_bar=False)


# ---------------------------------------------------------------------------- the package's import rule
def _runtime_imports(tree: ast.Module):
    """Modules a file imports when it runs (not under ``if TYPE_CHECKING``), relative ones resolved."""
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                yield from (a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = "nn_handler.train".split(".")[: 2 - sub.level + 1] if sub.level else []
                module = ".".join(base + ([sub.module] if sub.module else []))
                yield module
                yield from (f"{module}.{a.name}" for a in sub.names)


def test_the_train_package_never_imports_the_handler_or_checkpointing_when_it_runs():
    root = pathlib.Path(nn_handler.__file__).parent / "train"
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "settings.py", "progress.py", "preemption.py", "step.py",
                                       "evaluate.py", "loop.py"}
    for path in files:
        imported = set(_runtime_imports(ast.parse(path.read_text())))
        assert imported, path
        bad = sorted(m for m in imported if m == "nn_handler.handler" or m.startswith("nn_handler.checkpointing")
                     or m.startswith("nn_handler.handler."))
        assert not bad, f"{path.name} imports {bad} at run time"
    assert not (pathlib.Path(nn_handler.__file__).parent / "training.py").exists()
