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
