"""Importable components for the generative tests: a 2-D mixture of two Gaussians, a small
score network, a model that returns its own loss, and a custom Sampler with state.

Checkpoints record classes by import path, so they live here, not in test functions.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nn_handler import ModelType, NNHandler
from nn_handler.sampler import Sampler, randn
from nn_handler.sde import VPSDE

MODES = ((-1.5, 0.0), (1.5, 0.0))
MODE_STD = 0.2


def two_gaussians(n: int = 2048, seed: int = 0) -> TensorDataset:
    """``n`` points, half around each of MODES with std MODE_STD (a dataset of 1-tuples)."""
    g = torch.Generator().manual_seed(seed)
    which = torch.arange(n) % 2
    centers = torch.tensor(MODES)[which]
    return TensorDataset(centers + MODE_STD * torch.randn(n, 2, generator=g))


MIXTURE = {"_target_": "helpers_generative.two_gaussians", "n": 2048, "seed": 0}
MIXTURE_VAL = {**MIXTURE, "n": 512, "seed": 1}


class ScoreMLP(nn.Module):
    """``model(t, x)`` -> score of a VP SDE: ``-eps_net(x, t) / std(t)``, the usual noise-prediction
    parameterisation (denoising score matching then regresses ``eps_net`` on the noise)."""

    def __init__(self, dim: int = 2, hidden: int = 64, beta_min: float = 0.1, beta_max: float = 10.0):
        super().__init__()
        self.sde = VPSDE(beta_min=beta_min, beta_max=beta_max)
        self.net = nn.Sequential(nn.Linear(dim + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))
        self.register_buffer("freqs", torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs
        _, std = self.sde.marginal_prob(x, t)
        return -self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1)) / std[:, None]


SDE_KWARGS = {"beta_min": 0.1, "beta_max": 10.0}


def score_handler(hidden: int = 64, lr: float = 3e-3, batch_size: int = 256, val: bool = False) -> NNHandler:
    """A SCORE_BASED handler on the mixture with a VP SDE and Adam (no loss: denoising score matching)."""
    h = NNHandler(ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, dim=2, hidden=hidden, **SDE_KWARGS)
    h.set_sde(VPSDE, **SDE_KWARGS)
    h.set_optimizer(torch.optim.Adam, lr=lr)
    h.set_train_loader(MIXTURE, batch_size=batch_size, shuffle=True)
    if val:
        h.set_val_loader(MIXTURE_VAL, batch_size=512)
    return h


class GaussianModel(nn.Module):
    """A GENERATIVE model that returns its own loss: the Gaussian negative log-likelihood of a batch."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))
        self.log_std = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.log_std.exp()
        return (0.5 * z ** 2 + self.log_std).sum(dim=1).mean()


def gaussian_nll(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The same loss as a user function ``loss_fn(model, batch)``, doubled (to tell the paths apart)."""
    return 2.0 * model(batch[0])


class GaussianSampler(Sampler):
    """Draws from a GaussianModel's fitted distribution; counts its calls (state)."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.calls = 0

    def sample(self, model, sde, shape, steps, corrector_steps=0, generator=None, device=None,
               progress_bar=False, **options):
        self.calls += 1
        z = torch.randn(tuple(shape), generator=generator, device=device)
        return model.mean + self.temperature * model.log_std.exp() * z

    def state_dict(self) -> Dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.calls = int(state["calls"])


class ScaledEulerMaruyama(Sampler):
    """A custom score sampler: plain Euler-Maruyama whose noise is scaled by ``noise_scale``; counts steps."""

    def __init__(self, noise_scale: float = 1.0):
        self.noise_scale = noise_scale
        self.steps_taken = 0

    @torch.no_grad()
    def sample(self, model, sde, shape, steps, corrector_steps=0, generator=None, device=None,
               progress_bar=False, **options):
        x = sde.prior_sampling(shape, generator=generator, device=device)
        dt = (sde.T - sde.eps) / steps
        for i in range(steps):
            t = torch.full((x.shape[0],), sde.T - i * dt)
            drift, g = sde.sde(x, t)
            x = x - (drift - g[:, None] ** 2 * model(t, x)) * dt + self.noise_scale * g[:, None] * dt ** 0.5 * randn(
                x, generator)
            self.steps_taken += 1
        return x

    def state_dict(self) -> Dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps_taken = int(state["steps_taken"])


def near_mode_fractions(samples: torch.Tensor, radius: float = 0.6):
    """Per mode, the fraction of samples within ``radius`` of it."""
    centers = torch.tensor(MODES)
    d = torch.cdist(samples, centers)
    return [(d[:, i] < radius).float().mean().item() for i in range(len(MODES))]


class ExactMixtureScore(nn.Module):
    """The exact score of MODES/MODE_STD diffused by a VP SDE: sampling with it checks the sampler alone."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 10.0):
        super().__init__()
        self.sde = VPSDE(beta_min=beta_min, beta_max=beta_max)
        self.register_buffer("centers", torch.tensor(MODES))
        self.dummy = nn.Parameter(torch.zeros(()))  # something for an optimizer and EMA to hold

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.sde.log_mean_coeff(t))[:, None, None]  # (n, 1, 1)
        _, std = self.sde.marginal_prob(x, t)
        var = alpha[:, :, 0] ** 2 * MODE_STD ** 2 + std[:, None] ** 2  # (n, 1)
        diff = x[:, None, :] - alpha * self.centers[None]  # (n, k, d)
        logits = -(diff ** 2).sum(-1) / (2 * var)
        weights = torch.softmax(logits, dim=1)[..., None]
        return -(weights * diff).sum(1) / var + 0 * self.dummy


def one_thread_fixture():
    """A module-scoped pytest fixture body: tiny models run fastest (and steadiest on a busy machine)
    with one intra-op thread; the setting is put back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CallCounter(nn.Module):
    """Wraps a score model and counts its calls (to check predictor and corrector step counts)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return self.inner(t, x)
