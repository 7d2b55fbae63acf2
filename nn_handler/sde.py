"""Forward SDEs for score-based generative models (Song et al., 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations").

Each SDE ``dx = f(x, t) dt + g(t) dW`` on ``t in [eps, T]`` is built from plain keyword
arguments, so ``h.set_sde(VPSDE, beta_min=0.1, beta_max=20.0)`` records it in checkpoints,
and offers what training and sampling use:

- ``sde(x, t) -> (drift, diffusion)``, also as ``drift(x, t)`` and ``diffusion(t)``;
- ``marginal_prob(x0, t) -> (mean, std)`` of the perturbation kernel ``p_t(x_t | x0)``,
  which is Gaussian with an isotropic ``std`` for these linear SDEs;
- ``prior_sampling(shape, generator=None, device=None)``, a draw from ``p_T``;
- ``T`` (the end time) and ``eps`` (the smallest time trained and sampled, which avoids the
  singular score at ``t = 0``).

``t`` is a tensor of shape ``(batch,)``; per-sample results broadcast over ``x``'s other dims.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE"]

DeviceLike = Optional[Union[str, torch.device]]


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values`` of shape (batch,) reshaped to broadcast against ``x`` of shape (batch, ...)."""
    return values.reshape(-1, *([1] * (x.dim() - 1)))


class SDE:
    """Base class: a linear forward SDE with settings given as plain kwargs.

    Subclasses implement ``drift``, ``diffusion``, ``marginal_prob`` and (when the prior
    is not a standard normal) ``prior_std``. ``state_dict`` holds the settings, so a
    checkpoint restores exactly the SDE that trained the model even when a subclass
    changes a setting after construction.
    """

    #: names of the constructor settings (also the keys of ``state_dict``)
    settings: Tuple[str, ...] = ("T", "eps")

    def __init__(self, T: float = 1.0, eps: float = 1e-5):
        if not 0.0 <= float(eps) < float(T):
            raise ValueError(f"{type(self).__name__}: need 0 <= eps < T, got eps={eps!r}, T={T!r}")
        self.T = float(T)
        self.eps = float(eps)

    # -- the SDE itself
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """``g(t)``, shape (batch,)."""
        raise NotImplementedError

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(f(x, t), g(t))``: the drift (shaped like ``x``) and the diffusion (shape (batch,))."""
        return self.drift(x, t), self.diffusion(t)

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean (shaped like ``x``) and std (shape (batch,)) of ``p_t(x_t | x_0 = x)``."""
        raise NotImplementedError

    def prior_std(self) -> float:
        return 1.0

    def prior_sampling(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                       device: DeviceLike = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A draw from the prior ``N(0, prior_std^2 I)``; ``generator`` (None: the global stream)."""
        if generator is not None and device is None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * self.prior_std()

    # -- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {name: float(getattr(self, name)) for name in self.settings}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unknown = set(state) - set(self.settings)
        if unknown:
            raise KeyError(f"{type(self).__name__}.load_state_dict: unknown settings {sorted(unknown)}; "
                           f"expected {list(self.settings)}")
        for name, value in state.items():
            setattr(self, name, float(value))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.settings)
        return f"{type(self).__name__}({args})"


class VPSDE(SDE):
    """Variance preserving: ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW`` with
    ``beta(t) = beta_min + t (beta_max - beta_min)`` (the continuous DDPM).

    ``p_t(x_t | x_0) = N(alpha(t) x_0, (1 - alpha(t)^2) I)``, ``alpha(t) = exp(-1/2 int_0^t beta)``.
    """

    settings = ("beta_min", "beta_max", "T", "eps")

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, eps: float = 1e-3):
        super().__init__(T=T, eps=eps)
        if not 0.0 <= float(beta_min) <= float(beta_max):
            raise ValueError(f"{type(self).__name__}: need 0 <= beta_min <= beta_max, "
                             f"got beta_min={beta_min!r}, beta_max={beta_max!r}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``log alpha(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min``."""
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * _per_sample(self.beta(t), x) * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_mean_coeff(t)
        mean = _per_sample(torch.exp(log_alpha), x) * x
        std = torch.sqrt(-torch.expm1(2.0 * log_alpha))  # sqrt(1 - alpha^2), accurate near t = 0
        return mean, std


class SubVPSDE(VPSDE):
    """Sub-variance preserving: the VP drift with ``g(t)^2 = beta(t) (1 - alpha(t)^4)``.

    ``p_t(x_t | x_0) = N(alpha(t) x_0, (1 - alpha(t)^2)^2 I)``: the variance stays below the VP one.
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(4.0 * self.log_mean_coeff(t)))

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_mean_coeff(t)
        mean = _per_sample(torch.exp(log_alpha), x) * x
        std = -torch.expm1(2.0 * log_alpha)  # 1 - alpha^2
        return mean, std


class VESDE(SDE):
    """Variance exploding: ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dW`` with
    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (SMLD / NCSN).

    ``p_t(x_t | x_0) = N(x_0, sigma(t)^2 I)``; the prior is ``N(0, sigma_max^2 I)``. As usual
    (and as in Song et al.'s code), the data at ``t = 0`` counts as already perturbed with
    ``sigma_min``: integrating the SDE from ``x_0`` alone gives ``sigma(t)^2 - sigma_min^2``.
    """

    settings = ("sigma_min", "sigma_max", "T", "eps")

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, eps: float = 1e-5):
        super().__init__(T=T, eps=eps)
        if not 0.0 < float(sigma_min) < float(sigma_max):
            raise ValueError(f"VESDE: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x, self.sigma(t)

    def prior_std(self) -> float:
        return self.sigma_max
