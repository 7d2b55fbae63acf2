"""Where training stands: epochs and optimizer steps done, the data seed, and a position inside an epoch.

``Progress`` is the part a checkpoint saves as its "progress" entry and a load restores
(Stateful, as torch.distributed.checkpoint expects). While the loop runs, ``position`` says how
far the current epoch got (the batches up to the last optimizer step, and their loss and metric
sums); after a load, ``resume`` says where the next ``train`` goes on.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..distributed import DistInfo, all_reduce_sum


class Averages:
    """Sample-weighted sums of the loss and each metric over an epoch.

    Per step only the detached loss is appended to a list (no ``.item()``, so no device
    sync, and no tensor arithmetic); the list is folded into a float64 total every
    ``_FOLD`` steps and at the end.
    """

    _FOLD = 1024

    def __init__(self, device: torch.device, metric_names: List[str]):
        self.device = device
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.losses: List[torch.Tensor] = []
        self.sizes: List[int] = []
        self.count = 0
        self.metrics = {name: 0.0 for name in metric_names}

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.losses.append(loss.detach())
        self.sizes.append(n)
        if len(self.losses) >= self._FOLD:
            self._fold()

    def _fold(self) -> None:
        if self.losses:
            weights = torch.tensor(self.sizes, dtype=torch.float64, device=self.device)
            self.total += torch.stack(self.losses).to(torch.float64).reshape(-1) @ weights
            self.count += sum(self.sizes)
            self.losses, self.sizes = [], []

    def state_dict(self) -> Dict[str, Any]:
        self._fold()
        return {"total": self.total.detach().cpu().clone(), "count": self.count, "metrics": dict(self.metrics)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.total = state["total"].to(device=self.device, dtype=torch.float64).clone()
        self.count = int(state["count"])
        self.metrics.update({k: float(v) for k, v in state["metrics"].items()})

    def reduce(self, dist: DistInfo) -> Tuple[float, Dict[str, float]]:
        """Exact averages over every sample seen, summed over ranks (NaN when there were none)."""
        self._fold()
        totals = torch.tensor([self.total.item(), float(self.count), *self.metrics.values()], dtype=torch.float64)
        totals = all_reduce_sum(totals.to(self.device) if self.device.type == "cuda" else totals, dist).cpu()
        count = totals[1].item()
        if count == 0:
            return math.nan, {name: math.nan for name in self.metrics}
        return totals[0].item() / count, {name: totals[2 + i].item() / count for i, name in enumerate(self.metrics)}


class Position:
    """Where training is inside the current epoch: the batches done up to the last optimizer step."""

    __slots__ = ("epoch", "step", "sums")

    def __init__(self, epoch: int, step: int, sums: Averages):
        self.epoch, self.step, self.sums = epoch, step, sums

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step, "partial": self.sums.state_dict()}


def _no_partial() -> Dict[str, Any]:
    """The sums of a rank that saved no share of the epoch (more ranks load than saved)."""
    return {"total": torch.zeros((), dtype=torch.float64), "count": 0, "metrics": {}}


class Progress:
    """Epochs and optimizer steps done, the data order's seed, and where an epoch stands.

    ``position`` is set by the loop inside an epoch (a checkpoint taken then resumes with the
    next batch); ``resume`` is set by ``load_state_dict`` from such a checkpoint and consumed by
    the next run of the loop: ``{"epoch", "step_in_epoch", "partial"}`` with this rank's sums.
    """

    def __init__(self) -> None:
        self.epoch: int = 0
        self.global_step: int = 0
        self.data_seed: Optional[int] = None
        self.position: Optional[Position] = None
        self.resume: Optional[Dict[str, Any]] = None

    @property
    def resumes_inside_epoch(self) -> bool:
        """A load left a position inside an epoch to go on from."""
        return self.resume is not None

    def rank_state(self) -> Optional[Dict[str, Any]]:
        """This rank's partial-epoch sums, or None outside an epoch (or before its first optimizer step)."""
        position = self.position
        return position.sums.state_dict() if position is not None and position.step > 0 else None

    def state_dict(self, partials: Optional[List[Optional[Dict[str, Any]]]] = None) -> Dict[str, Any]:
        """The checkpoint's "progress" entry; ``partials``: every rank's ``rank_state()`` in rank order
        (this process's alone when None), saved only inside an epoch."""
        state: Dict[str, Any] = {"epoch": self.epoch, "global_step": self.global_step, "data_seed": self.data_seed}
        position = self.position
        if position is not None and position.step > 0:
            # Saved inside an epoch (after an optimizer step): resuming goes on with the next batch.
            state["position"] = {"epoch": position.epoch, "step_in_epoch": position.step,
                                 "partial": list(partials) if partials is not None else [self.rank_state()]}
        return state

    def load_state_dict(self, state: Dict[str, Any], rank: int = 0) -> None:
        """Restore a "progress" entry; a saved position becomes ``resume`` with rank ``rank``'s sums
        (zeros when that rank saved none)."""
        self.epoch = int(state.get("epoch", 0))
        self.global_step = int(state.get("global_step", 0))
        self.data_seed = state.get("data_seed")
        self.position = None
        self.resume = None
        position = state.get("position")
        if position:
            partials = position.get("partial") or []
            mine = partials[rank] if rank < len(partials) else None
            self.resume = {"epoch": int(position["epoch"]), "step_in_epoch": int(position["step_in_epoch"]),
                           "partial": mine or _no_partial()}
