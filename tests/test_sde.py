"""The SDEs: closed-form marginals, consistency with their own drift and diffusion, priors, recording."""
from __future__ import annotations

import math

import helpers_generative as hg
import pytest
import torch

from nn_handler import ModelType, NNHandler
from nn_handler.losses import denoising_score_matching
from nn_handler.sde import SDE, VESDE, VPSDE, SubVPSDE

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)

TIMES = torch.tensor([1e-3, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
X0 = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(len(TIMES), 2)


def integral_of_beta(t: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    """int_0^t beta(s) ds by the trapezoid rule (exact for a linear beta; not the closed form under test)."""
    out = []
    for ti in t.tolist():
        s = torch.linspace(0, ti, 101, dtype=torch.float64)
        out.append(torch.trapezoid(b0 + s * (b1 - b0), s))
    return torch.stack(out)


def test_vp_marginal_is_the_known_gaussian_kernel():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    mean, std = sde.marginal_prob(X0, TIMES)
    alpha = torch.exp(-0.5 * integral_of_beta(TIMES, 0.1, 20.0))
    torch.testing.assert_close(mean, alpha[:, None] * X0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(std, torch.sqrt(1 - alpha ** 2), rtol=1e-6, atol=1e-9)


def test_sub_vp_marginal_has_the_vp_mean_and_the_squared_vp_variance():
    sde = SubVPSDE(beta_min=0.1, beta_max=20.0)
    mean, std = sde.marginal_prob(X0, TIMES)
    alpha = torch.exp(-0.5 * integral_of_beta(TIMES, 0.1, 20.0))
    torch.testing.assert_close(mean, alpha[:, None] * X0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(std, 1 - alpha ** 2, rtol=1e-6, atol=1e-9)
    assert torch.all(std <= VPSDE(0.1, 20.0).marginal_prob(X0, TIMES)[1])


def test_ve_marginal_keeps_the_mean_and_grows_sigma_geometrically():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    mean, std = sde.marginal_prob(X0, TIMES)
    torch.testing.assert_close(mean, X0)
    torch.testing.assert_close(std, 0.01 * (5000.0 ** TIMES))
    assert std[-1].item() == pytest.approx(50.0)


def _moments_by_integration(sde: SDE, t_end: float, var0: float, n: int = 4000):
    """Mean factor m(t) and variance v(t) of the SDE started at x0 = 1, integrated with RK4 from
    the SDE's own drift and diffusion: m' = f(1, t) m (the drift is linear), v' = 2 f(1, t) v + g(t)^2."""
    def rates(t: float, m: float, v: float):
        tt = torch.tensor([t], dtype=torch.float64)
        f = sde.drift(torch.ones(1, 1, dtype=torch.float64), tt).item()  # f(x, t) = f(1, t) x
        g = sde.diffusion(tt).item()
        return f * m, 2 * f * v + g * g

    m, v, h = 1.0, var0, t_end / n
    for i in range(n):
        t = i * h
        k1 = rates(t, m, v)
        k2 = rates(t + h / 2, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = rates(t + h / 2, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = rates(t + h, m + h * k3[0], v + h * k3[1])
        m += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return m, v


@pytest.mark.parametrize("sde, var0", [(VPSDE(0.1, 20.0), 0.0), (SubVPSDE(0.1, 20.0), 0.0),
                                       (VESDE(0.01, 50.0), 0.01 ** 2)],  # VE's data counts as sigma_min-perturbed
                         ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("t_end", [0.25, 1.0])
def test_marginals_agree_with_the_sdes_own_drift_and_diffusion(sde, var0, t_end):
    m, v = _moments_by_integration(sde, t_end, var0, n=400)
    mean, std = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), torch.tensor([t_end], dtype=torch.float64))
    assert mean.item() == pytest.approx(m, rel=1e-6)
    assert std.item() ** 2 == pytest.approx(v, rel=1e-5)


def test_simulating_the_vp_sde_reaches_its_marginal():
    """Euler-Maruyama paths of the forward SDE (drift and diffusion) match marginal_prob statistically."""
    sde = VPSDE(0.1, 20.0)
    g = torch.Generator().manual_seed(0)
    x = torch.full((10000, 1), 2.0, dtype=torch.float64)
    steps, t_end = 200, 0.4
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, dtype=torch.float64)
        drift, diffusion = sde.sde(x, t)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    mean, std = sde.marginal_prob(torch.full((1, 1), 2.0, dtype=torch.float64), torch.tensor([t_end]).double())
    assert x.mean().item() == pytest.approx(mean.item(), abs=0.02)
    assert x.std().item() == pytest.approx(std.item(), rel=0.02)


@pytest.mark.parametrize("sde, std", [(VPSDE(), 1.0), (SubVPSDE(), 1.0), (VESDE(sigma_max=7.0), 7.0)],
                         ids=["vp", "subvp", "ve"])
def test_prior_sampling_is_reproducible_from_a_generator_and_has_the_prior_std(sde, std):
    a = sde.prior_sampling((4000, 3), generator=torch.Generator().manual_seed(1))
    b = sde.prior_sampling((4000, 3), generator=torch.Generator().manual_seed(1))
    assert a.shape == (4000, 3) and torch.equal(a, b)
    assert a.std().item() == pytest.approx(std, rel=0.03)
    # the marginal at T is (close to) the prior, whatever the data
    mean, marginal_std = sde.marginal_prob(torch.full((1, 3), 3.0), torch.tensor([sde.T]))
    assert marginal_std.item() == pytest.approx(std, rel=0.01)
    assert abs(mean).max().item() < 0.05 * std or isinstance(sde, VESDE)


def test_time_range_and_defaults_follow_song_et_al():
    assert (VPSDE().T, VPSDE().eps, VPSDE().beta_min, VPSDE().beta_max) == (1.0, 1e-3, 0.1, 20.0)
    assert (VESDE().eps, VESDE().sigma_min, VESDE().sigma_max) == (1e-5, 0.01, 50.0)
    assert VPSDE(T=2.0, eps=0.01).T == 2.0


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min <= beta_max"):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="eps < T"):
        SubVPSDE(eps=1.0, T=1.0)


def test_state_dict_holds_the_settings_and_restores_them():
    sde = VESDE(sigma_min=0.02, sigma_max=30.0)
    assert sde.state_dict() == {"sigma_min": 0.02, "sigma_max": 30.0, "T": 1.0, "eps": 1e-5}
    other = VESDE()
    other.load_state_dict(sde.state_dict())
    assert other.state_dict() == sde.state_dict()
    with pytest.raises(KeyError, match="unknown settings"):
        other.load_state_dict({"beta_min": 1.0})


@pytest.mark.parametrize("cls, kwargs", [(VPSDE, {"beta_min": 0.2, "beta_max": 12.0}),
                                         (SubVPSDE, {"beta_min": 0.05, "beta_max": 7.5, "eps": 1e-4}),
                                         (VESDE, {"sigma_min": 0.05, "sigma_max": 9.0})])
def test_each_sde_round_trips_through_save_and_load(tmp_path, cls, kwargs):
    h = NNHandler(hg.ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, hidden=8)
    h.set_sde(cls, **kwargs)
    h.save(tmp_path / "sde.pt")
    loaded = NNHandler.load(tmp_path / "sde.pt")
    assert type(loaded.sde) is cls and loaded.sde.state_dict() == h.sde.state_dict()
    assert NNHandler.load(tmp_path / "sde.pt", skip_sampler_sde=True).sde is None


def test_denoising_score_matching_is_smallest_for_the_true_score():
    """The DSM loss (weighting sigma^2) ranks the exact score of the data below a wrong one."""
    sde = VPSDE(**hg.SDE_KWARGS)
    exact = hg.ExactMixtureScore(**hg.SDE_KWARGS)
    x = hg.two_gaussians(4096, seed=3).tensors[0]
    torch.manual_seed(0)
    exact_loss = denoising_score_matching(exact, x, sde).item()
    torch.manual_seed(0)
    wrong_loss = denoising_score_matching(lambda t, x_t: exact(t, x_t) * 0.5, x, sde).item()
    torch.manual_seed(0)
    zero_loss = denoising_score_matching(lambda t, x_t: torch.zeros_like(x_t), x, sde).item()
    assert zero_loss == pytest.approx(2.0, rel=0.05)  # E|z|^2 in two dimensions
    assert exact_loss < wrong_loss < zero_loss


def test_score_mlp_film_blocks_and_the_original_layout_for_recorded_kwargs():
    from nn_handler.models import ScoreMLP

    x, t = torch.randn(5, 1, 8, 8), torch.rand(5) * 0.9 + 0.05
    old = ScoreMLP(shape=(1, 8, 8), hidden=16, layers=2)  # kwargs recorded before `film` existed: the old network
    assert not old.film and sorted(old.state_dict()) == sorted(
        ["freqs", "time.0.weight", "time.0.bias", "time.2.weight", "time.2.bias", "inp.weight", "inp.bias",
         "blocks.0.1.weight", "blocks.0.1.bias", "blocks.1.1.weight", "blocks.1.1.bias", "out.1.weight", "out.1.bias"])
    film = ScoreMLP(shape=(1, 8, 8), hidden=16, layers=2, film=True)
    for model in (old, film):
        score = model(t, x)
        assert score.shape == x.shape and torch.isfinite(score).all()
    # the FiLM blocks start as the identity (fc2 = 0) and the score is -eps / std(t)
    _, std = film.sde.marginal_prob(x, t)
    eps = film.out(film.inp(x.reshape(5, -1))).reshape(x.shape)
    torch.testing.assert_close(film(t, x), -eps / std.reshape(5, 1, 1, 1))
