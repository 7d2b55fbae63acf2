"""The callback hooks: each called when and as often as documented, and only on callbacks that define it."""
from __future__ import annotations

import warnings
from collections import Counter as Tally

import helpers_core as hc
import pytest
import torch

from nn_handler import NNHandler, NNHandlerWarning
from nn_handler.callbacks import Callback
from nn_handler.callbacks.base import HOOKS


class Recorder(Callback):
    """Every hook, recorded with what it was given."""

    def __init__(self):
        self.calls = []

    def _note(self, hook, *args):
        self.calls.append((hook, *args))

    def on_train_begin(self, handler):
        self._note("on_train_begin")

    def on_train_end(self, handler):
        self._note("on_train_end")

    def on_epoch_begin(self, handler, epoch):
        self._note("on_epoch_begin", epoch)

    def on_epoch_end(self, handler, epoch, logs):
        self._note("on_epoch_end", epoch, logs["loss"])

    def on_batch_begin(self, handler, batch):
        self._note("on_batch_begin", batch)

    def on_batch_end(self, handler, batch, logs):
        self._note("on_batch_end", batch, logs["global_step"])

    def on_before_optimizer_step(self, handler, optimizer):
        grads = [p.grad for p in handler.module.parameters()]
        self._note("on_before_optimizer_step", optimizer is handler.optimizer, all(g is not None for g in grads))

    def on_after_optimizer_step(self, handler, global_step):
        grads = [p.grad for p in handler.module.parameters()]
        self._note("on_after_optimizer_step", global_step, all(g is None for g in grads))

    def on_validation_begin(self, handler, epoch):
        self._note("on_validation_begin", epoch)

    def on_validation_batch_end(self, handler, batch, logs):
        self._note("on_validation_batch_end", batch, logs["batch_size"])

    def on_validation_end(self, handler, epoch, logs):
        self._note("on_validation_end", epoch, logs["val_loss"])

    def on_save(self, handler, path):
        self._note("on_save", path)

    def on_load(self, handler, path):
        self._note("on_load", path)


def _handler(accumulation: int = 1):
    h = hc.classification_handler(batch_size=16)  # 96 training samples: 6 batches; 48 validation: 2 batches of 32
    rec = Recorder()
    h.add_callback(rec)
    h.train(epochs=2, progress_bar=False, gradient_accumulation_steps=accumulation, seed=0)
    return h, rec


def test_every_hook_is_called_as_documented():
    h, rec = _handler()
    tally = Tally(call[0] for call in rec.calls)
    assert set(tally) == set(HOOKS) - {"on_save", "on_load"}
    assert tally["on_train_begin"] == tally["on_train_end"] == 1
    assert tally["on_epoch_begin"] == tally["on_epoch_end"] == 2
    assert tally["on_batch_begin"] == tally["on_batch_end"] == 12
    assert tally["on_validation_begin"] == tally["on_validation_end"] == 2
    assert [c[1:] for c in rec.calls if c[0] == "on_validation_batch_end"] == [(0, 32), (1, 16)] * 2
    steps = [c for c in rec.calls if c[0] == "on_after_optimizer_step"]
    assert [c[1] for c in steps] == list(range(1, 13)) and all(c[2] for c in steps)  # counted, gradients zeroed
    assert all(c[1] and c[2] for c in rec.calls if c[0] == "on_before_optimizer_step")  # the optimizer, gradients there
    assert [c[2] for c in rec.calls if c[0] == "on_validation_end"] == h.val_losses
    assert [c[2] for c in rec.calls if c[0] == "on_epoch_end"] == h.train_losses
    names = [c[0] for c in rec.calls]
    assert names[0] == "on_train_begin" and names[-1] == "on_train_end"
    first_epoch = names[:names.index("on_epoch_end") + 1]
    assert first_epoch.index("on_validation_end") < first_epoch.index("on_epoch_end")


def test_optimizer_step_hooks_follow_the_accumulation_groups():
    _, rec = _handler(accumulation=4)  # 6 batches an epoch: groups of 4 and 2
    assert Tally(c[0] for c in rec.calls)["on_before_optimizer_step"] == 4
    assert [c[1] for c in rec.calls if c[0] == "on_after_optimizer_step"] == [1, 2, 3, 4]


def test_save_and_load_hooks(tmp_path):
    h, rec = _handler()
    path = str(tmp_path / "run.pth")
    h.save(path)
    assert rec.calls[-1] == ("on_save", path)
    loaded = NNHandler.load(path, trusted_packages=[*hc.TRUST, __name__])
    restored = [cb for cb in loaded.callbacks if isinstance(cb, Recorder)]
    assert len(restored) == 1 and restored[0].calls == [("on_load", path)]


def test_a_hook_is_called_only_on_callbacks_that_define_it(monkeypatch):
    # The base class's (no-op) hooks, made to count: a callback that does not override a hook is never called for it.
    counted = Tally()
    for hook in HOOKS:
        monkeypatch.setattr(Callback, hook, lambda self, *args, _hook=hook: counted.update([_hook]))

    class OnlyAfterStep(Callback):
        def __init__(self):
            self.steps = 0

        def on_after_optimizer_step(self, handler, global_step):
            self.steps += 1

    h = hc.classification_handler(batch_size=16)
    only = OnlyAfterStep()
    h.add_callback(only)
    h.train(epochs=1, progress_bar=False)
    assert only.steps == 6 and not counted


def test_a_method_that_looks_like_a_hook_but_is_none_warns_once():
    class Typo(Callback):
        def on_epoch_start(self, handler, epoch):  # the hook is on_epoch_begin
            raise AssertionError("never called")

    h = hc.classification_handler()
    with pytest.warns(NNHandlerWarning, match=r"Typo\.on_epoch_start looks like a callback hook.*did you mean on_epoch_begin"):
        h.add_callback(Typo())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h.add_callback(Typo())  # told once per class
    h.train(epochs=1, progress_bar=False)


def test_hooks_see_unscaled_gradients_under_clipping():
    class GradNorm(Callback):
        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, handler, optimizer):
            self.norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in handler.module.parameters()]))))

    h = hc.classification_handler(batch_size=16)
    cb = GradNorm()
    h.add_callback(cb)
    h.train(epochs=1, progress_bar=False, gradient_clipping_norm=1e-3)
    assert len(cb.norms) == 6 and max(cb.norms) > 1e-3  # before clipping
