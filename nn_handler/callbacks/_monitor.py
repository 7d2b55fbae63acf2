"""What ModelCheckpoint and EarlyStopping share: reading a monitored value and comparing scores."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

MODES = ("min", "max")


def check_mode(owner: str, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be 'min' or 'max', got {mode!r}")
    return mode


def monitored(logs: Mapping[str, Any], key: str) -> Optional[float]:
    """``logs[key]`` as a float, or None when the epoch has no (finite) value for it."""
    value = logs.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def better(a: float, b: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``a`` improves on ``b`` by more than ``min_delta``."""
    return a < b - min_delta if mode == "min" else a > b + min_delta
