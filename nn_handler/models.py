"""Small models for examples, demos and tests."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """A multilayer perceptron: ``in_features -> hidden... -> out_features`` with ReLU and optional dropout."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64,), dropout: float = 0.0):
        super().__init__()
        layers = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearStack(nn.Sequential):
    """``layers`` square Linear layers of ``width``: a plain, large model for benchmarks."""

    def __init__(self, width: int = 4096, layers: int = 6):
        super().__init__(*[nn.Linear(width, width) for _ in range(layers)])


class _FiLMBlock(nn.Module):
    """A pre-LayerNorm residual MLP block whose normalised input is scaled and shifted by the time
    embedding (FiLM): ``h + fc2(silu(fc1(silu(norm(h) * (1 + scale) + shift))))``; ``fc2`` starts
    at zero, so each block starts as the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        u = nn.functional.silu(self.norm(h) * (1.0 + scale) + shift)
        return h + self.fc2(nn.functional.silu(self.fc1(u)))


class ScoreMLP(nn.Module):
    """A small score network for a VP SDE: ``model(t, x) -> score`` for samples of ``shape``.

    The network predicts the noise ``eps(x_t, t)`` from the flattened sample and a sinusoidal
    embedding of ``t`` (``embed_dim`` features, passed through a small MLP); the score is
    ``-eps / std(t)`` with ``std(t)`` the marginal standard deviation of
    ``VPSDE(beta_min, beta_max)``, so denoising score matching regresses eps on the noise. Give
    the same ``beta_min``/``beta_max`` as the SDE set on the handler.

    ``film=False`` (the original network): ``layers`` residual ``SiLU -> Linear`` blocks with the
    time embedding added to every hidden layer. ``film=True``: ``layers`` pre-LayerNorm residual
    MLP blocks (two Linear layers each) whose input is scaled and shifted by the time embedding
    (FiLM), and a LayerNorm before the output layer; for the same training time it learns the
    8x8 digits markedly better than a wider ``film=False`` network (``experiment=digits_score``).
    ``film`` defaults to False, so the kwargs recorded before it existed rebuild the same network.
    """

    def __init__(self, shape: Sequence[int] = (2,), hidden: int = 256, layers: int = 3, embed_dim: int = 32,
                 beta_min: float = 0.1, beta_max: float = 20.0, film: bool = False):
        super().__init__()
        import math

        from .sde import VPSDE

        self.shape = tuple(int(d) for d in shape)
        self.sde = VPSDE(beta_min=beta_min, beta_max=beta_max)
        self.film = bool(film)
        dim = 1
        for d in self.shape:
            dim *= d
        half = max(1, embed_dim // 2)
        self.register_buffer("freqs", torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(1000.0) / half)))
        self.inp = nn.Linear(dim, hidden)
        if self.film:
            self.time = nn.Sequential(nn.Linear(2 * half, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
            self.blocks = nn.ModuleList(_FiLMBlock(hidden) for _ in range(int(layers)))
            self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        else:
            self.time = nn.Sequential(nn.Linear(2 * half, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(int(layers)))
            self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = t.reshape(n).to(x.dtype)
        angles = (t * 1000.0)[:, None] * self.freqs[None, :]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.inp(x.reshape(n, -1))
        if self.film:
            for block in self.blocks:
                h = block(h, emb)
        else:
            h = h + emb
            for block in self.blocks:
                h = h + block(h) + emb
        eps = self.out(h).reshape(x.shape)
        _, std = self.sde.marginal_prob(x, t)
        return -eps / std.reshape(n, *([1] * (x.dim() - 1)))
