"""Datasets the runner's presets use (built from specs, so checkpoints record them)."""
from __future__ import annotations

from torch.utils.data import TensorDataset

from nn_handler.datasets import digits


def digits_images(split: str = "train", val_fraction: float = 0.2, seed: int = 0,
                  low: float = -1.0, high: float = 1.0) -> TensorDataset:
    """scikit-learn's 8x8 digits as images ``(1, 8, 8)`` scaled to ``[low, high]`` ([-1, 1] by
    default), without labels (a dataset of 1-tuples): the data of ``experiment=digits_score``.
    The train/val partition is that of ``nn_handler.datasets.digits`` with the same ``seed``."""
    x = digits(split, val_fraction=val_fraction, seed=seed).tensors[0]
    return TensorDataset((low + (high - low) * x).reshape(-1, 1, 8, 8))
