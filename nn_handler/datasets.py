"""Synthetic datasets that build from plain kwargs, so data specs can name them."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def synthetic_classification(n: int = 512, in_features: int = 8, num_classes: int = 3, seed: int = 0,
                             noise: float = 0.5) -> TensorDataset:
    """Gaussian blobs around ``num_classes`` random centres: ``(x, label)`` pairs, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, in_features, generator=g) * 2.0
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[labels] + noise * torch.randn(n, in_features, generator=g)
    return TensorDataset(x, labels)


def synthetic_regression(n: int = 512, in_features: int = 8, out_features: int = 1, seed: int = 0,
                         noise: float = 0.1) -> TensorDataset:
    """``y = x W + noise`` for a random ``W`` fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, out_features, generator=g)
    x = torch.randn(n, in_features, generator=g)
    return TensorDataset(x, x @ w + noise * torch.randn(n, out_features, generator=g))
