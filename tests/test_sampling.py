"""Sampling: score-matching training on a 2-D mixture, Euler-Maruyama + Langevin, seeds, EMA,
custom samplers, GENERATIVE models, and exact resume of a score-based run with EMA."""
from __future__ import annotations

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch

from nn_handler import ModelType, NNHandler
from nn_handler.sampler import EulerMaruyama, Sampler
from nn_handler.sde import VPSDE

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)


@pytest.fixture(scope="module")
def trained():
    """A score network trained briefly (30 epochs of 16 steps, about 2 s) with EMA."""
    h = hg.score_handler(hidden=128, lr=3e-3, batch_size=128)
    h.train(30, seed=0, ema_decay=0.99, progress_bar=False)
    return h


def exact_handler() -> NNHandler:
    h = NNHandler(hg.ExactMixtureScore, device="cpu", model_type=ModelType.SCORE_BASED, **hg.SDE_KWARGS)
    h.set_sde(VPSDE, **hg.SDE_KWARGS)
    return h


# ---------------------------------------------------------------------------- the sampler itself
def test_euler_maruyama_with_the_exact_score_reproduces_the_mixture():
    samples = exact_handler().sample((4000, 2), steps=100, seed=0)
    near = hg.near_mode_fractions(samples, radius=0.6)
    assert min(near) > 0.45 and sum(near) > 0.97
    assert samples[:, 1].std().item() == pytest.approx(hg.MODE_STD, rel=0.1)  # the modes' own width


def test_langevin_corrector_runs_the_requested_number_of_model_calls_and_keeps_the_modes():
    h = exact_handler()
    counter = hg.CallCounter(h.module)
    samples = EulerMaruyama(snr=0.05).sample(counter, h.sde, (2000, 2), steps=40, corrector_steps=2,
                                             generator=torch.Generator().manual_seed(0))
    assert counter.calls == 40 * (1 + 2)
    near = hg.near_mode_fractions(samples)
    assert min(near) > 0.4 and sum(near) > 0.9
    plain = EulerMaruyama(snr=0.05).sample(counter, h.sde, (2000, 2), steps=40,
                                           generator=torch.Generator().manual_seed(0))
    assert not torch.equal(samples, plain)


def test_snr_and_other_options_pass_through_h_sample_to_the_sampler():
    h = exact_handler()
    a = h.sample((50, 2), steps=10, corrector_steps=1, seed=0, snr=0.01)
    b = h.sample((50, 2), steps=10, corrector_steps=1, seed=0, snr=0.3)
    assert not torch.equal(a, b)
    with pytest.raises(TypeError, match="unknown options.*bogus"):
        h.sample((5, 2), steps=2, seed=0, bogus=1)


# ---------------------------------------------------------------------------- training on the mixture
def test_denoising_score_matching_loss_falls_and_samples_land_near_both_modes(trained):
    losses = trained.train_losses
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[-5:]) < sum(losses[5:10])
    samples = trained.sample((2000, 2), steps=100, seed=0)
    near = hg.near_mode_fractions(samples)
    # each mode holds half the data: both must be found, and nearly everything must be near one
    assert min(near) > 0.35 and sum(near) > 0.8, near
    assert samples.abs().max() < 10


def test_a_score_based_handler_without_sde_or_loss_says_how_to_set_one():
    h = NNHandler(hg.ScoreMLP, device="cpu", model_type="score_based", hidden=8)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_train_loader(hg.MIXTURE, batch_size=64)
    with pytest.raises(RuntimeError, match="set_sde"):
        h.train(1, progress_bar=False)
    with pytest.raises(RuntimeError, match="set_sde"):
        h.sample((4, 2), steps=2)


# ---------------------------------------------------------------------------- seeds and EMA
def test_the_same_seed_gives_the_same_samples_and_another_seed_others(trained):
    a = trained.sample((64, 2), steps=20, seed=7)
    b = trained.sample((64, 2), steps=20, seed=7)
    c = trained.sample((64, 2), steps=20, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_none_draws_from_the_global_stream(trained):
    torch.manual_seed(3)
    a = trained.sample((32, 2), steps=10)
    after = torch.rand(1)
    torch.manual_seed(3)
    b = trained.sample((32, 2), steps=10)
    assert torch.equal(a, b) and torch.equal(after, torch.rand(1))
    torch.manual_seed(3)
    assert not torch.equal(torch.rand(1), after)  # sampling consumed the stream


def test_a_seeded_sample_leaves_the_global_stream_alone(trained):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    trained.sample((16, 2), steps=5, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_sampling_uses_the_ema_weights_and_leaves_the_live_weights_untouched(trained):
    live = {k: v.clone() for k, v in trained.module.state_dict().items()}
    trained.module.train()
    with_ema = trained.sample((64, 2), steps=20, seed=0)
    assert trained.module.training  # mode restored
    for k, v in trained.module.state_dict().items():
        assert torch.equal(v, live[k]), k
    without = trained.sample((64, 2), steps=20, seed=0, use_ema=False)
    assert not torch.equal(with_ema, without)
    # the EMA weights in a separate model give exactly the EMA samples
    ema_model = hg.ScoreMLP(hidden=128, **hg.SDE_KWARGS)
    ema_model.load_state_dict(trained.ema.module.state_dict())
    ema_model.eval()
    expected = EulerMaruyama().sample(ema_model, trained.sde, (64, 2), 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(with_ema, expected)


def test_progress_bar_shows_on_long_runs_only(capsys, monkeypatch):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a bar shows only on a terminal
    h = exact_handler()
    h.sample((4, 2), steps=20, seed=0)
    assert "sampling" not in capsys.readouterr().err
    h.sample((4, 2), steps=250, seed=0)
    assert "sampling" in capsys.readouterr().err
    h.sample((4, 2), steps=250, seed=0, progress_bar=False)
    assert "sampling" not in capsys.readouterr().err


def test_bad_shapes_and_classifiers_are_refused():
    with pytest.raises(ValueError, match="number of samples"):
        exact_handler().sample((0, 2), steps=3)
    with pytest.raises(RuntimeError, match="SCORE_BASED and GENERATIVE"):
        hc.classification_handler().sample((3, 6), steps=3)


# ---------------------------------------------------------------------------- custom samplers
def test_a_custom_sampler_set_with_set_sampler_is_used_and_round_trips(tmp_path):
    h = exact_handler()
    h.set_sampler(hg.ScaledEulerMaruyama, noise_scale=0.0)
    a = h.sample((100, 2), steps=30, seed=0)
    b = h.sample((100, 2), steps=30, seed=1)
    assert h.sampler.steps_taken == 60
    # without noise the reverse process is a deterministic map of the prior draw, so it differs by seed
    assert not torch.equal(a, b) and a.std(0)[1] < 0.2  # the noise-free sampler collapses the modes' width
    h.save(tmp_path / "custom.pt")
    loaded = NNHandler.load(tmp_path / "custom.pt")
    assert isinstance(loaded.sampler, hg.ScaledEulerMaruyama) and isinstance(loaded.sampler, Sampler)
    assert loaded.sampler.noise_scale == 0.0 and loaded.sampler.steps_taken == 60
    assert torch.equal(loaded.sample((100, 2), steps=30, seed=0), a)
    assert NNHandler.load(tmp_path / "custom.pt", skip_sampler_sde=True).sampler is None


def test_the_default_sampler_round_trips_with_its_settings(tmp_path):
    h = exact_handler()
    h.set_sampler(EulerMaruyama, snr=0.07, denoise=False)
    h.save(tmp_path / "em.pt")
    loaded = NNHandler.load(tmp_path / "em.pt")
    assert isinstance(loaded.sampler, EulerMaruyama) and (loaded.sampler.snr, loaded.sampler.denoise) == (0.07, False)
    assert torch.equal(loaded.sample((20, 2), 10, 1, seed=4), h.sample((20, 2), 10, 1, seed=4))


# ---------------------------------------------------------------------------- GENERATIVE models
def _generative(loss_fn=None) -> NNHandler:
    h = NNHandler(hg.GaussianModel, device="cpu", model_type=ModelType.GENERATIVE)
    h.set_optimizer(torch.optim.Adam, lr=0.05)
    if loss_fn is not None:
        h.set_loss_fn(loss_fn)
    h.set_train_loader(hg.MIXTURE, batch_size=256, shuffle=True)
    return h


def test_a_generative_model_that_returns_its_loss_trains_and_samples_through_its_sampler(tmp_path):
    h = _generative()
    h.train(15, seed=0, progress_bar=False)
    assert h.train_losses[-1] < h.train_losses[0] - 0.5
    with pytest.raises(RuntimeError, match="set_sampler"):
        h.sample((10, 2), steps=1)
    h.set_sampler(hg.GaussianSampler, temperature=1.0)
    samples = h.sample((4000, 2), steps=1, seed=0)
    assert samples.mean(0)[0].abs() < 0.1 and samples.std(0)[0] == pytest.approx(1.51, rel=0.1)
    h.save(tmp_path / "gen.pt")
    loaded = NNHandler.load(tmp_path / "gen.pt")
    assert loaded.model_type is ModelType.GENERATIVE and loaded.sampler.calls == 1
    assert torch.equal(loaded.sample((4000, 2), steps=1, seed=0), samples)


def test_a_generative_loss_function_gets_the_model_and_the_batch():
    torch.manual_seed(0)
    by_model = _generative()
    by_model.train(1, seed=0, progress_bar=False)
    by_fn = _generative(hg.gaussian_nll)
    by_fn.train(1, seed=0, progress_bar=False)
    assert by_fn.train_losses[0] == pytest.approx(2 * by_model.train_losses[0], rel=0.05)


# ---------------------------------------------------------------------------- exact resume with EMA
def test_score_based_resume_after_two_of_four_epochs_with_ema_matches_straight_training(tmp_path):
    torch.manual_seed(0)  # the same initial weights
    straight = hg.score_handler(hidden=32, val=True)
    straight.train(4, seed=0, ema_decay=0.9, validate_with_ema=True, progress_bar=False)
    torch.manual_seed(0)
    first = hg.score_handler(hidden=32, val=True)
    first.train(2, seed=0, ema_decay=0.9, validate_with_ema=True, progress_bar=False)
    first.save(tmp_path / "half.pt")
    resumed = NNHandler.load(tmp_path / "half.pt")
    assert resumed.ema.decay == 0.9 and resumed.ema.num_updates == first.ema.num_updates
    assert resumed.settings["validate_with_ema"] is True
    resumed.train(2, progress_bar=False)
    hc.assert_same(resumed.module.state_dict(), straight.module.state_dict(), "weights")
    hc.assert_same(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")
    assert resumed.train_losses == straight.train_losses and resumed.val_losses == straight.val_losses
    assert torch.equal(resumed.sample((16, 2), 10, seed=2), straight.sample((16, 2), 10, seed=2))
