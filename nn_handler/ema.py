"""Exponential moving average of a model's weights, on PyTorch's own averaging utilities."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .fsdp import full_tensor, is_sharded, like, local


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

    def sharded_state(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """(decay and count, the averaged weights) for a sharded checkpoint."""
        return {"decay": self.decay, "num_updates": self.num_updates}, dict(self.module.state_dict())

    def load_sharded(self, plain: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        with torch.no_grad():
            for name, t in tensors.items():
                if name in own and own[name].data_ptr() != t.data_ptr():
                    own[name].copy_(t)
        self.averaged.n_averaged.fill_(int(plain.get("num_updates", self.num_updates)))

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


class ShardedEMA:
    """The EMA of an FSDP2 model: one averaged shard per parameter and buffer on each rank.

    ``AveragedModel`` deep-copies its model, which FSDP2 forbids; here the average is kept as
    this rank's local shards (the same ``lerp`` as ``EMA``), so it costs 1/world of the model's
    memory. ``state_dict()`` gathers whole tensors on rank 0 (collective: every rank calls it),
    ``load_state_dict`` takes whole tensors on every rank; ``sharded_state`` and
    ``load_sharded`` keep them as DTensor shards for a DCP checkpoint.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r} (0 turns EMA off)")
        self.decay = float(decay)
        self._names = list(module.state_dict().keys())
        self._shadow = {name: t.detach().clone() for name, t in module.state_dict().items()}
        self._updates = 0

    @property
    def num_updates(self) -> int:
        return self._updates

    def _pairs(self, module: nn.Module):
        live = module.state_dict()
        for name in self._names:
            yield local(self._shadow[name]), local(live[name])

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        pairs = list(self._pairs(module))
        floats = [(s, w) for s, w in pairs if s.is_floating_point()]
        if self._updates == 0:
            for s, w in pairs:
                s.copy_(w)
        else:
            if floats:
                torch._foreach_lerp_([s for s, _ in floats], [w for _, w in floats], 1.0 - self.decay)
            for s, w in pairs:
                if not s.is_floating_point():
                    s.copy_(w)
        self._updates += 1

    def state_dict(self) -> Dict[str, Any]:
        weights = {name: full_tensor(t) for name, t in self._shadow.items()}  # collective
        return {"decay": self.decay, "num_updates": self._updates, "weights": weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        weights = state["weights"]
        missing = sorted(set(self._names) - set(weights))
        if missing:
            raise KeyError(f"missing EMA weights {missing[:5]}")
        with torch.no_grad():
            for name in self._names:
                target = self._shadow[name]
                if tuple(weights[name].shape) != tuple(target.shape):
                    raise RuntimeError(f"EMA weight {name} has shape {tuple(weights[name].shape)}, the model "
                                       f"{tuple(target.shape)}")
                local(target).copy_(local(like(target, weights[name])))
        self._updates = int(state["num_updates"])

    def sharded_state(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        return {"decay": self.decay, "num_updates": self._updates}, dict(self._shadow)

    def load_sharded(self, plain: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                if name in self._shadow and t is not self._shadow[name]:
                    local(self._shadow[name]).copy_(local(t))
        self._updates = int(plain.get("num_updates", self._updates))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for s, w in self._pairs(module):
            w.copy_(s)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        live = [w.clone() for _, w in self._pairs(module)]
        try:
            self.copy_to(module)
            yield module
        finally:
            with torch.no_grad():
                for (_, w), saved in zip(self._pairs(module), live):
                    w.copy_(saved)


def ema_for(module: nn.Module, decay: float):
    """The EMA that fits ``module``: ``ShardedEMA`` for an FSDP2 model, else ``EMA``."""
    return ShardedEMA(module, decay) if is_sharded(module) else EMA(module, decay)
