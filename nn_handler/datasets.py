"""Synthetic datasets that build from plain kwargs, so data specs can name them."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

# Synthetic data is for examples and tests; a spec read from a file names these functions, so
# their sizes are bounded (a small file cannot make load allocate gigabytes).
MAX_ELEMENTS = 2**26


def _check_size(name: str, **sizes: int) -> None:
    total = 1
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
        total *= value
    if total > MAX_ELEMENTS:
        raise ValueError(f"{name}: {' x '.join(f'{k}={v}' for k, v in sizes.items())} is more than "
                         f"{MAX_ELEMENTS:,} elements of synthetic data")


def synthetic_classification(n: int = 512, in_features: int = 8, num_classes: int = 3, seed: int = 0,
                             noise: float = 0.5, sample_seed: Optional[int] = None) -> TensorDataset:
    """Gaussian blobs around ``num_classes`` random centres: ``(x, label)`` pairs, fixed by ``seed``.

    ``sample_seed``, when given, draws the samples from their own stream (the centres still
    come from ``seed``): a held-out set of the same problem.
    """
    _check_size("synthetic_classification", n=n, in_features=in_features)
    _check_size("synthetic_classification", num_classes=num_classes, in_features=in_features)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, in_features, generator=g) * 2.0
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[labels] + noise * torch.randn(n, in_features, generator=g)
    return TensorDataset(x, labels)


def synthetic_regression(n: int = 512, in_features: int = 8, out_features: int = 1, seed: int = 0,
                         noise: float = 0.1) -> TensorDataset:
    """``y = x W + noise`` for a random ``W`` fixed by ``seed``."""
    _check_size("synthetic_regression", n=n, in_features=in_features)
    _check_size("synthetic_regression", n=n, out_features=out_features)
    _check_size("synthetic_regression", in_features=in_features, out_features=out_features)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, out_features, generator=g)
    x = torch.randn(n, in_features, generator=g)
    return TensorDataset(x, x @ w + noise * torch.randn(n, out_features, generator=g))


def digits(split: str = "train", val_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download): ``(x, label)`` pairs.

    ``x`` has 64 features scaled to [0, 1]; labels are 0-9. ``split`` is "train", "val" or
    "all"; the train/val partition is a permutation fixed by ``seed``, so the two splits of
    the same seed never overlap.
    """
    from sklearn.datasets import load_digits  # scikit-learn is needed only by this dataset

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return TensorDataset(x, y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * float(val_fraction)))
    index = order[:n_val] if split == "val" else order[n_val:]
    return TensorDataset(x[index], y[index])
