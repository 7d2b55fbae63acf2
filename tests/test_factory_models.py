"""A model built by a function (``timm.create_model``, ``torchvision.models.resnet18``, a user's
``mypkg.models.build(width=...)``): recorded as that function and its kwargs, rebuilt by ``NNHandler.load``
only when the caller trusts it by name, and resumed bit for bit."""
from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any, Tuple

import pytest
import torch

from nn_handler import NNHandler, NNHandlerWarning
from nn_handler.checkpointing import CheckpointError, UnsafeCheckpointError, read_info

PACKAGE = "facpkg_models_test"  # a package of the user's, on sys.path only for these tests
MODULE = f"{PACKAGE}.models"
FACTORY = '''
import torch
from torch import nn

CALLS = []


def build(width: int = 8, classes: int = 3) -> nn.Module:
    """A user's model factory: the way timm and torchvision hand out their models."""
    CALLS.append(width)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, classes))
'''
DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 4, "num_classes": 3,
        "seed": 0}


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The user's package ``facpkg_models_test`` (written to ``tmp_path``, importable), its ``models`` module."""
    (tmp_path / "src" / PACKAGE).mkdir(parents=True)
    (tmp_path / "src" / PACKAGE / "__init__.py").write_text("")
    (tmp_path / "src" / PACKAGE / "models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    for name in (MODULE, PACKAGE):
        sys.modules.pop(name, None)
    module = importlib.import_module(MODULE)
    yield module
    for name in (MODULE, PACKAGE):
        sys.modules.pop(name, None)


def _handler(module: Any) -> NNHandler:
    h = NNHandler(module.build, device="cpu", width=8)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(DATA, batch_size=16, shuffle=True)
    return h


def _saved(module: Any, path: Path, epochs: int = 1) -> Tuple[NNHandler, Path]:
    torch.manual_seed(0)
    h = _handler(module)
    h.train(epochs=epochs, seed=0, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)  # the model is recordable: no "cannot be recorded"
        h.save(path)
    return h, path


def test_a_factory_model_is_recorded_as_its_function_and_kwargs(factory, tmp_path):
    _, path = _saved(factory, tmp_path / "run.pt")
    model = read_info(path)["model"]
    assert model["target"] == f"{MODULE}.build" and model["kwargs"] == {"width": 8}


def test_load_refuses_an_untrusted_factory_naming_trusted_packages_and_calls_nothing(factory, tmp_path):
    _, path = _saved(factory, tmp_path / "run.pt")
    calls = len(factory.CALLS)
    with pytest.raises(UnsafeCheckpointError) as caught:
        NNHandler.load(path)
    message = str(caught.value)
    assert f"{MODULE}.build" in message and "function" in message
    assert f"trusted_packages=[{PACKAGE!r}]" in message
    assert "bare state_dict" not in message and "not recorded" not in message
    with pytest.raises(UnsafeCheckpointError, match=r"trusted_packages="):
        NNHandler.initialize_from_checkpoint(path)
    assert len(factory.CALLS) == calls  # refused before the function could run


def test_load_with_trust_rebuilds_the_factory_model_and_its_training_state(factory, tmp_path):
    h, path = _saved(factory, tmp_path / "run.pt")
    for trust in ([PACKAGE], [MODULE], [f"{MODULE}.build"]):
        h2 = NNHandler.load(path, trusted_packages=trust)
        assert isinstance(h2.module, torch.nn.Sequential) and h2.module[0].out_features == 8
        for key, value in h.module.state_dict().items():
            assert torch.equal(value, h2.module.state_dict()[key]), key
        assert h2.epoch == 1 and type(h2.optimizer) is torch.optim.Adam and h2.train_loader is not None
    weights = NNHandler.initialize_from_checkpoint(path, trusted_packages=[PACKAGE])
    assert torch.equal(weights.module[0].weight, h.module[0].weight)
    # Saved again after the load, the file still records the factory (a resumed run stays resumable).
    h2.save(tmp_path / "again.pt")
    assert read_info(tmp_path / "again.pt")["model"]["target"] == f"{MODULE}.build"


def test_a_factory_model_resumes_bit_for_bit(factory, tmp_path):
    torch.manual_seed(0)
    straight = _handler(factory)
    straight.train(epochs=3, seed=0, progress_bar=False)
    _, path = _saved(factory, tmp_path / "half.pt", epochs=1)
    torch.manual_seed(987)  # disturb every stream: load must bring them back
    torch.rand(100)
    resumed = NNHandler.load(path, device="cpu", trusted_packages=[PACKAGE])
    resumed.train(epochs=2, progress_bar=False)
    assert resumed.epoch == straight.epoch == 3 and resumed.global_step == straight.global_step
    assert resumed.train_losses == straight.train_losses
    for key, value in straight.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert straight.optimizer.state_dict()["state"].keys() == resumed.optimizer.state_dict()["state"].keys()
    for index, state in straight.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.optimizer.state_dict()["state"][index][name]))


def test_a_trusted_factory_that_does_not_import_says_to_make_it_importable(factory, tmp_path, monkeypatch):
    _, path = _saved(factory, tmp_path / "run.pt")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "src")])
    for name in (MODULE, PACKAGE):
        sys.modules.pop(name, None)
    with pytest.raises(CheckpointError) as caught:
        NNHandler.load(path, trusted_packages=[PACKAGE])
    assert "does not import here" in str(caught.value) and "PYTHONPATH" in str(caught.value)


def test_an_unrecordable_factory_still_says_to_pass_the_model(tmp_path):
    """A function with no import path (defined inside a function) cannot be recorded: load says what to pass."""
    def local_build(width: int = 8) -> torch.nn.Module:
        return torch.nn.Linear(4, width)

    h = NNHandler(local_build, device="cpu", width=8)
    with pytest.warns(NNHandlerWarning, match="model cannot be recorded.*inside a function"):
        h.save(tmp_path / "local.pt")
    with pytest.raises(CheckpointError, match=r"model class was not recorded.*model_class="):
        NNHandler.load(tmp_path / "local.pt")
    h2 = NNHandler.load(tmp_path / "local.pt", model_class=local_build, model_kwargs={"width": 8})
    assert torch.equal(h2.module.weight, h.module.weight)
