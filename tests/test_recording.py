"""What a checkpoint can record of components given as objects: built losses, classes of a ``__main__`` script."""
from __future__ import annotations

import warnings

import helpers_core as hc
import pytest
import torch

from nn_handler import NNHandler, NNHandlerWarning


def _saved(tmp_path, loss):
    h = hc.classification_handler()
    h.set_loss_fn(loss)
    h.train(1, progress_bar=False)
    path = tmp_path / "run.pth"
    return h, path


def test_a_built_torch_loss_is_recorded_with_its_arguments(tmp_path):
    h, path = _saved(tmp_path, torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)
        h.save(path)
        loaded = NNHandler.load(path)
    assert type(loaded.loss_fn) is torch.nn.CrossEntropyLoss
    assert loaded.loss_fn.label_smoothing == 0.1 and loaded.loss_fn.ignore_index == 2
    logits, y = torch.randn(5, hc.OUT), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(loaded.loss_fn(logits, y), h.loss_fn(logits, y))


def test_a_built_loss_whose_arguments_cannot_be_recovered_is_told_at_save_and_at_load(tmp_path):
    h, path = _saved(tmp_path, torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])))
    with pytest.warns(NNHandlerWarning, match=r"loss_fn cannot be recorded .*CrossEntropyLoss whose constructor "
                                              r"arguments cannot be recovered"):
        h.save(path)
    with pytest.warns(NNHandlerWarning, match=r"loss_fn was not recorded .*set it again with h\.set_loss_fn"):
        loaded = NNHandler.load(path)
    assert loaded.loss_fn is None
