"""EMA: PyTorch's averaging utilities, the ema_weights() context manager, validation under EMA,
and EMA state and decay across save/load."""
from __future__ import annotations

import warnings

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from nn_handler import NNHandler
from nn_handler.train import evaluate

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)


def trained_with_ema(**train_kwargs) -> NNHandler:
    torch.manual_seed(0)
    h = hc.classification_handler(dropout=0.0)
    h.train(2, seed=0, ema_decay=0.8, progress_bar=False, **train_kwargs)
    return h


def test_ema_is_built_on_torch_swa_utils():
    h = trained_with_ema()
    assert isinstance(h.ema.averaged, AveragedModel) and h.ema.num_updates == h.global_step == 12


def test_ema_weights_context_holds_the_average_and_puts_the_live_weights_back():
    h = trained_with_ema()
    live = {k: v.clone() for k, v in h.module.state_dict().items()}
    with h.ema_weights() as module:
        assert module is h.module
        hc.assert_same(h.module.state_dict(), h.ema.module.state_dict(), "inside")
        assert any(not torch.equal(v, live[k]) for k, v in h.module.state_dict().items())
    hc.assert_same(h.module.state_dict(), live, "after")


def test_ema_weights_context_restores_the_live_weights_when_the_block_raises():
    h = trained_with_ema()
    live = {k: v.clone() for k, v in h.module.state_dict().items()}
    with pytest.raises(KeyError):
        with h.ema_weights():
            raise KeyError("boom")
    hc.assert_same(h.module.state_dict(), live, "after error")


def test_ema_weights_without_ema_says_how_to_turn_it_on():
    h = hc.classification_handler()
    with pytest.raises(RuntimeError, match="ema_decay"):
        with h.ema_weights():
            pass


def test_predictions_under_ema_weights_are_the_ema_models():
    h = trained_with_ema()
    x = torch.randn(5, hc.IN)
    h.ema.module.eval()
    with h.ema_weights():
        inside = h.predict(x)
    assert torch.equal(inside, h.ema.module(x))
    assert not torch.equal(h.predict(x), inside)


def test_validate_with_ema_reports_the_ema_models_loss_without_changing_training():
    plain = trained_with_ema()
    with_ema = trained_with_ema(validate_with_ema=True)
    hc.assert_same(with_ema.module.state_dict(), plain.module.state_dict(), "weights")
    assert with_ema.train_losses == plain.train_losses
    assert with_ema.val_losses != plain.val_losses
    with with_ema.ema_weights():
        expected, _ = evaluate(with_ema._loop_context(), with_ema.val_loader)
    assert with_ema.val_losses[-1] == pytest.approx(expected, rel=1e-12)
    assert plain.settings["validate_with_ema"] is False and with_ema.settings["validate_with_ema"] is True


def test_ema_state_and_decay_survive_save_and_load_and_training_continues_them(tmp_path):
    h = trained_with_ema(validate_with_ema=True)
    h.save(tmp_path / "ema.pt")
    loaded = NNHandler.load(tmp_path / "ema.pt")
    assert loaded.ema.decay == 0.8 and loaded.ema.num_updates == 12
    assert loaded.settings["validate_with_ema"] is True
    hc.assert_same(loaded.ema.state_dict(), h.ema.state_dict(), "ema")
    loaded.train(1, progress_bar=False)
    h.train(1, progress_bar=False)
    assert loaded.ema.num_updates == 18
    hc.assert_same(loaded.ema.state_dict(), h.ema.state_dict(), "ema after one more epoch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert NNHandler.load(tmp_path / "ema.pt", skip_ema=True).ema is None
