"""Loss and metric history, one value per epoch."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional


class History:
    def __init__(self) -> None:
        self.train_losses: List[float] = []
        self.val_losses: List[float] = []
        self.train_metrics: Dict[str, List[float]] = {}
        self.val_metrics: Dict[str, List[float]] = {}

    def append(self, train_loss: float, train_metrics: Dict[str, float],
               val_loss: Optional[float], val_metrics: Optional[Dict[str, float]]) -> None:
        """One epoch. With a validation loader, an epoch that was not validated records NaN."""
        self.train_losses.append(float(train_loss))
        for name, value in train_metrics.items():
            self.train_metrics.setdefault(name, []).append(float(value))
        if val_loss is not None:
            self.val_losses.append(float(val_loss))
            for name, value in (val_metrics or {}).items():
                self.val_metrics.setdefault(name, []).append(float(value))

    def state_dict(self) -> Dict[str, Any]:
        return {"train_losses": list(self.train_losses), "val_losses": list(self.val_losses),
                "train_metrics": {k: list(v) for k, v in self.train_metrics.items()},
                "val_metrics": {k: list(v) for k, v in self.val_metrics.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.train_losses = [float(v) for v in state.get("train_losses", [])]
        self.val_losses = [float(v) for v in state.get("val_losses", [])]
        self.train_metrics = {k: [float(x) for x in v] for k, v in state.get("train_metrics", {}).items()}
        self.val_metrics = {k: [float(x) for x in v] for k, v in state.get("val_metrics", {}).items()}

    def last(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self.train_losses:
            out["loss"] = self.train_losses[-1]
        if self.val_losses and not math.isnan(self.val_losses[-1]):
            out["val_loss"] = self.val_losses[-1]
        return out
