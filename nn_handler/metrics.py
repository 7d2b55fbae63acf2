"""Metric functions ``fn(predictions, targets) -> float`` that checkpoints can record by name."""
from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of arg-max predictions equal to the integer targets."""
    return (predictions.argmax(dim=1) == targets).float().mean().item()


def mean_absolute_error(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    return (predictions - targets).abs().mean().item()
