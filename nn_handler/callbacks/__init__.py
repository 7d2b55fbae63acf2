"""Callbacks: hooks into the training loop whose state survives save/load."""
from .base import Callback

__all__ = ["Callback"]
