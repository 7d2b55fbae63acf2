"""What ModelCheckpoint and EarlyStopping share: reading a monitored value and comparing scores."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

from ..errors import SettingError

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

MODES = ("min", "max")


def check_mode(owner: str, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be 'min' or 'max', got {mode!r}")
    return mode


def logged_names(handler: "NNHandler") -> List[str]:
    """What a training call of ``handler`` logs each epoch, as a monitor may name it: ``loss`` (also
    ``train_loss``), ``lr``, each metric (also ``train_<metric>``), and with validation data
    ``val_loss`` and ``val_<metric>``."""
    metrics = list(handler.metrics)
    names = ["loss", "train_loss", "lr", *metrics, *(f"train_{m}" for m in metrics)]
    if handler.val_loader is not None:
        names += ["val_loss", *(f"val_{m}" for m in metrics)]
    return names


def check_monitor(owner: str, monitor: str, handler: "NNHandler") -> None:
    """Raise ``SettingError("monitor", ...)`` before training when no epoch of this run can log ``monitor``."""
    names = logged_names(handler)
    if monitor in names:
        return
    hint = ""
    if monitor.startswith("val_") and handler.val_loader is None:
        hint = " (val_* values need validation data: h.set_val_loader(...))"
    raise SettingError("monitor", f"{owner}: monitor={monitor!r} is not a value this run logs{hint}; "
                                  f"it logs {', '.join(names)}")


def monitored(logs: Mapping[str, Any], key: str) -> Optional[float]:
    """``logs[key]`` as a float, or None when the epoch has no (finite) value for it. ``train_loss``
    and ``train_<metric>`` name the epoch's ``loss`` and ``<metric>``."""
    if key not in logs and key.startswith("train_"):
        key = "loss" if key == "train_loss" else key[len("train_"):]
    value = logs.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def better(a: float, b: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``a`` improves on ``b`` by more than ``min_delta``."""
    return a < b - min_delta if mode == "min" else a > b + min_delta
