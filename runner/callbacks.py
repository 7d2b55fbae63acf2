"""The runner's own callbacks. They are not part of a model's training state, so
``recorded = False`` keeps them out of checkpoints."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

from nn_handler.callbacks import Callback


class EpochProgressBar(Callback):
    """A tqdm bar per epoch, on rank 0, only when stderr is a terminal and ``enabled``."""

    recorded = False

    def __init__(self, total_epochs: int, enabled: bool = True):
        self.total_epochs = total_epochs
        self.enabled = enabled
        self._start = 0
        self._bar: Optional[tqdm] = None

    def on_train_begin(self, handler: Any) -> None:
        self._start = handler.epoch

    def on_epoch_begin(self, handler: Any, epoch: int) -> None:
        show = self.enabled and handler.rank == 0 and sys.stderr.isatty()
        try:
            total: Optional[int] = len(handler.train_loader)
        except TypeError:
            total = None
        self._bar = tqdm(total=total, disable=not show, unit="batch", dynamic_ncols=True, leave=False,
                         desc=f"epoch {epoch + 1} ({epoch + 1 - self._start}/{self.total_epochs})")

    def on_batch_end(self, handler: Any, batch: int, logs: Dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_epoch_end(self, handler: Any, epoch: int, logs: Dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
