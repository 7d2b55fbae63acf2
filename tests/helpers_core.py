"""Importable components for the core tests.

Checkpoints record every component as its import path plus plain kwargs, so the classes
that tests save and load must live in an importable module (this one), not in a test
function or in ``__main__``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

from nn_handler import NNHandler
from nn_handler.callbacks import Callback
from nn_handler.metrics import accuracy
from nn_handler.models import MLP
from nn_handler.sampler import Sampler
from nn_handler.sde import SDE

IN, OUT = 6, 3
MODEL_KWARGS: Dict[str, Any] = {"in_features": IN, "out_features": OUT, "hidden": [16], "dropout": 0.2}
TRAIN_DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 96, "in_features": IN,
              "num_classes": OUT, "seed": 0}
VAL_DATA = {**TRAIN_DATA, "n": 48, "seed": 1}


# ---------------------------------------------------------------------------- models
class YourModel(nn.Module):
    """The seed documentation's inference example: input_size -> hidden_size -> output_size."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class OwnMLP(MLP):
    """A user's own model, defined in the same module as their callbacks, SDE and sampler: a plain
    ``NNHandler.load(path)`` trusts what that module defines."""


class Wrapper(nn.Module):
    """A user model whose only child is called ``module`` (its own keys start with ``module.``)."""

    def __init__(self, in_features: int = IN, out_features: int = OUT):
        super().__init__()
        self.module = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class MLPWithExtraHead(MLP):
    """MLP plus one more layer: its extra keys are missing from an MLP checkpoint."""

    def __init__(self, in_features: int, out_features: int, hidden=(64,), dropout: float = 0.0, extra: int = 2):
        super().__init__(in_features, out_features, hidden, dropout)
        self.extra = nn.Linear(out_features, extra)


class SameMLP(MLP):
    """Another class with exactly MLP's parameters."""


def compiled_mlp(**kwargs: Any) -> nn.Module:
    """A model factory returning a torch.compile wrapper (keys ``_orig_mod.*``); compiles lazily."""
    return torch.compile(MLP(**kwargs))


class ScoreNet(nn.Module):
    """A tiny score model called as ``model(t, x)``."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.lin = nn.Linear(dim + 1, dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([x, t[:, None]], dim=1))


# ---------------------------------------------------------------------------- SDE and sampler
class ToySDE(SDE):
    """A variance-exploding SDE built from plain kwargs, with state that survives save/load."""

    T = 1.0
    eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 1.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.calls = 0
        self.table = torch.zeros(3)

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor):
        self.calls += 1
        std = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return x, std

    def state_dict(self) -> Dict[str, Any]:
        return {"calls": self.calls, "table": self.table.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.table = state["table"].clone()


class ToySampler(Sampler):
    def __init__(self, steps: int = 10, snr: float = 0.1):
        self.steps = steps
        self.snr = snr
        self.draws = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.draws = int(state["draws"])


# What a file holding this module's callbacks, SDE and sampler must be told to trust (the model
# is nn_handler's MLP, so its module does not vouch for them).
TRUST = ["helpers_core"]


# ---------------------------------------------------------------------------- callbacks
class Counter(Callback):
    """Counts epochs; only its own __init__ (the base records the arguments)."""

    def __init__(self, name: str, start: int = 0):
        self.name = name
        self.count = start

    def on_epoch_end(self, handler, epoch, logs):
        self.count += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.count = int(state["count"])


class EventLog(Callback):
    """Records every hook call, in order."""

    def __init__(self, tag: str = "log"):
        self.tag = tag
        self.events: List[tuple] = []

    def on_train_begin(self, handler):
        self.events.append(("train_begin",))

    def on_train_end(self, handler):
        self.events.append(("train_end",))

    def on_epoch_begin(self, handler, epoch):
        self.events.append(("epoch_begin", epoch))

    def on_epoch_end(self, handler, epoch, logs):
        self.events.append(("epoch_end", epoch, sorted(logs)))

    def on_batch_begin(self, handler, batch):
        self.events.append(("batch_begin", batch))

    def on_batch_end(self, handler, batch, logs):
        self.events.append(("batch_end", batch))

    def state_dict(self) -> Dict[str, Any]:
        return {"n_events": len(self.events)}


class StopAfter(Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, handler, epoch, logs):
        if epoch + 1 >= self.epochs:
            handler.stop_training = True


# ---------------------------------------------------------------------------- builders and comparisons
def classification_handler(*, dropout: float = 0.2, scheduler: bool = True, val: bool = True,
                           metric: bool = True, batch_size: int = 16, model: type = MLP) -> NNHandler:
    """A small classification handler with data specs, Adam, StepLR, a metric and dropout."""
    h = NNHandler(model, device="cpu", **{**MODEL_KWARGS, "dropout": dropout})
    h.set_optimizer(torch.optim.Adam, lr=1e-2, weight_decay=1e-4)
    if scheduler:
        h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7)
    h.set_loss_fn(torch.nn.CrossEntropyLoss, label_smoothing=0.05)
    if metric:
        h.add_metric("accuracy", accuracy)
    h.set_train_loader(TRAIN_DATA, batch_size=batch_size, shuffle=True)
    if val:
        h.set_val_loader(VAL_DATA, batch_size=32)
    return h


def full_handler(model: type = MLP) -> NNHandler:
    """A handler with every component set and trained two epochs with EMA."""
    h = classification_handler(model=model)
    h.add_callback(Counter("first", start=5))
    h.add_callback(EventLog("middle"))
    h.add_callback(Counter("last"))
    h.set_sde(ToySDE, sigma_min=0.02, sigma_max=2.0)
    h.set_sampler(ToySampler, steps=7, snr=0.2)
    h.sde.calls = 3
    h.sde.table = torch.tensor([1.0, 2.0, 3.0])
    h.sampler.draws = 11
    h.train(epochs=2, ema_decay=0.9, seed=0, progress_bar=False)
    return h


def assert_same(a: Any, b: Any, where: str = "value") -> None:
    """Bit-identical nested structures of tensors and plain data (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
