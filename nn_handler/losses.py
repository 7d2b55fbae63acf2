"""Losses the handler provides (a checkpoint may name the functions defined here)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def denoising_score_matching(model: Callable, x: torch.Tensor, sde: Any) -> torch.Tensor:
    """Denoising score matching with the weighting lambda(t) = sigma(t)^2.

    ``t ~ U(eps, T)``, ``x_t = mean(x, t) + sigma(t) z``; the loss is
    ``mean over the batch of sum over dims of (sigma(t) s(t, x_t) + z)^2``, which is
    ``sigma^2 |s - grad log p_t(x_t | x)|^2``. The SDE provides ``marginal_prob(x, t)
    -> (mean, std)``, ``T`` and (optionally) ``eps``.
    """
    eps = float(getattr(sde, "eps", 1e-5))
    T = float(getattr(sde, "T", 1.0))
    t = torch.rand(x.shape[0], device=x.device) * (T - eps) + eps
    z = torch.randn_like(x)
    mean, std = sde.marginal_prob(x, t)
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    score = model(t, mean + std * z)
    return ((score * std + z) ** 2).reshape(x.shape[0], -1).sum(dim=1).mean()
