"""LearningRateLogger: the learning rate of every parameter group, per epoch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

from .base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


class LearningRateLogger(Callback):
    """Records, at the start of each epoch, the learning rate that epoch trains with.

    ``epochs[i]`` (0-based) trained with ``lrs[i]`` (one value per parameter group);
    ``lr`` is the first group's list. With ``log`` the values also go to the handler's log.
    """

    def __init__(self, log: bool = True):
        self.log = bool(log)
        self.epochs: List[int] = []
        self.lrs: List[List[float]] = []

    @property
    def lr(self) -> List[float]:
        return [groups[0] for groups in self.lrs]

    def on_epoch_begin(self, handler: "NNHandler", epoch: int) -> None:
        if handler.optimizer is None:
            return
        lrs = [float(group["lr"]) for group in handler.optimizer.param_groups]
        self.epochs.append(int(epoch))
        self.lrs.append(lrs)
        if self.log and handler.rank == 0:
            handler.logger.info("epoch %d: lr %s", epoch + 1, ", ".join(f"{v:.6g}" for v in lrs))

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": list(self.epochs), "lrs": [list(v) for v in self.lrs]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epochs = [int(e) for e in state.get("epochs", [])]
        self.lrs = [[float(v) for v in groups] for groups in state.get("lrs", [])]
