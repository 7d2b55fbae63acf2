"""Exponential moving average of a model's weights, on PyTorch's own averaging utilities."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA:
    """Shadow weights ``w_ema <- decay * w_ema + (1 - decay) * w`` after every optimizer step.

    Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (a fused
    ``_foreach_lerp_``); buffers such as BatchNorm statistics are averaged too.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r} (0 turns EMA off)")
        self.decay = float(decay)
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The model holding the averaged weights."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged.item())

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.averaged.update_parameters(module)

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.averaged.n_averaged.fill_(int(state["num_updates"]))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s weights (and buffers) with the averaged ones, for good (e.g. to export)."""
        for dst, src in zip(_tensors(module), _tensors(self.module)):
            dst.copy_(src)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into ``module``; the live weights come back after.

        The live values are copied back bit for bit (also when the block raises), so
        validating or sampling under EMA weights never changes training. Blocks nest.
        """
        live = [t.detach().clone() for t in _tensors(module)]
        try:
            self.copy_to(module)
            yield module
        finally:
            with torch.no_grad():
                for dst, src in zip(_tensors(module), live):
                    dst.copy_(src)


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()
