"""EarlyStopping: end training when a monitored value stops improving."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from ._monitor import better, check_mode, check_monitor, monitored
from .base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


class EarlyStopping(Callback):
    """Set ``handler.stop_training`` after ``patience`` epochs without an improvement of ``monitor``.

    An improvement beats the best value so far by more than ``min_delta`` (down for
    ``mode="min"``, up for ``"max"``). Epochs without a value for ``monitor`` (not
    validated) neither improve nor count against the patience. The best value and the
    epochs waited are state: a resumed run goes on counting where it stopped. A ``monitor``
    the run never logs (see ``_monitor.logged_names``) is refused when training starts, with a
    ``SettingError`` naming the values it does log.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        check_mode("EarlyStopping", mode)
        if int(patience) < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {patience!r}")
        if float(min_delta) < 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.patience = int(patience)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.wait = 0
        self.stopped_epoch: Optional[int] = None
        self._warned = False

    def on_train_begin(self, handler: "NNHandler") -> None:
        """Refuse, before any epoch, a ``monitor`` this run never logs (a misspelling, val_* without validation)."""
        check_monitor("EarlyStopping", self.monitor, handler)

    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        value = monitored(logs, self.monitor)
        if value is None:
            if not self._warned and self.monitor not in logs:
                self._warned = True
                handler.logger.warning("EarlyStopping: no %r in this epoch's logs (available: %s)",
                                       self.monitor, sorted(logs))
            return
        if self.best is None or better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, handler.epoch, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = handler.epoch
            handler.stop_training = True
            handler.logger.info("EarlyStopping: %s did not improve on %.6g (epoch %d) for %d epochs; stopping",
                                self.monitor, self.best, self.best_epoch, self.wait)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_epoch = state.get("best_epoch")
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = state.get("stopped_epoch")
