"""The model's forward as the loop calls it, autocast, moving batches, and validation.

``make_forward`` turns the model type into one function ``batch -> (loss, predictions, targets,
batch_size)``, so the training step and ``evaluate`` share it.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch

from ..enums import ModelType
from ..fsdp import is_sharded
from ..losses import denoising_score_matching
from .progress import Averages

if TYPE_CHECKING:  # pragma: no cover
    from .loop import LoopContext

Forward = Callable[[Any], Tuple[torch.Tensor, Any, Any, int]]


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` (a tensor, or lists, tuples and dicts of them) on ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def autocast_context(device: torch.device, enabled: bool):
    """float16 autocast on CUDA, bfloat16 elsewhere; a no-op when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batch_size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (list, tuple)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 1


def _plain_missing(component: str, how: str) -> str:
    return f"no {component} is set: set it with {how}"


def make_forward(model: torch.nn.Module, model_type: ModelType, loss_fn: Optional[Callable], sde: Any = None,
                 missing: Callable[[str, str], str] = _plain_missing) -> Forward:
    """``batch -> (loss, predictions, targets, batch_size)`` for ``model_type``.

    ``missing(component, how)`` words the error when a needed component is not set (the
    handler's says why a loaded checkpoint could not restore it).
    """
    if model_type in (ModelType.CLASSIFICATION, ModelType.REGRESSION):
        if loss_fn is None:
            raise RuntimeError(missing("loss_fn", "h.set_loss_fn(torch.nn.CrossEntropyLoss)"))

        def forward(batch):
            x, y = batch[0], batch[1]
            out = model(x)
            return loss_fn(out, y), out, y, (len(x) if type(x) is torch.Tensor else _batch_size(x))
        return forward

    if model_type is ModelType.SCORE_BASED:
        if loss_fn is None and sde is None:
            raise RuntimeError(missing("sde", "h.set_sde(YourSDE, ...) or h.set_loss_fn(fn(model, x, sde))"))

        def forward(batch):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            loss = loss_fn(model, x, sde) if loss_fn is not None else denoising_score_matching(model, x, sde)
            return loss, None, None, _batch_size(x)
        return forward

    def forward(batch):  # GENERATIVE
        if loss_fn is not None:
            loss = loss_fn(model, batch)
        else:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            loss = model(x)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise RuntimeError("a GENERATIVE model needs a scalar loss: give h.set_loss_fn(fn(model, batch)) "
                               "or make the model's forward return its loss")
        return loss, None, None, _batch_size(batch[0] if isinstance(batch, (list, tuple)) else batch)
    return forward


@torch.no_grad()
def evaluate(ctx: "LoopContext", loader: Any,
             batch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Tuple[float, Dict[str, float]]:
    """Average loss and metrics of ``ctx``'s model over ``loader``, in eval mode.

    Exact under DDP: each rank sums over its share (an evaluation loader gives each sample to
    one rank) and the sums are added over the ranks before dividing. ``batch_end(index, logs)``
    is called after each batch (the callbacks' validation batch hook).
    """
    module, device, metrics, forward = ctx.module, ctx.device, ctx.metrics, ctx.forward
    was_training = module.training
    module.eval()
    sums = Averages(device, list(metrics))
    non_blocking = device.type == "cuda"
    # A sharded (FSDP) model's forward is a collective: every rank runs as many as the rank with the most
    # batches (an evaluation loader need not give each the same number), the extra ones on a repeated batch
    # whose results are dropped.
    extra = equal_forwards(len(loader), ctx.dist) if is_sharded(module) and ctx.dist.enabled else None
    try:
        with autocast_context(device, ctx.settings.use_amp):
            batch = None
            for index, batch in enumerate(loader):
                batch = to_device(batch, device, non_blocking)
                loss, out, y, n = forward(batch)
                sums.add(loss, n)
                for name, fn in metrics.items():
                    sums.metrics[name] += float(fn(out, y)) * n
                if batch_end is not None:
                    batch_end(index, {"loss": loss.detach(), "batch_size": n})
            for _ in range(extra or 0):
                if batch is None:  # this rank had no batch at all: one from the dataset, dropped too
                    batch = to_device(next(iter(type(loader)(loader.dataset, batch_size=1))), device)
                forward(batch)
    finally:
        module.train(was_training)
    return sums.reduce(ctx.dist)


def equal_forwards(mine: int, dist_info: Any) -> int:
    """How many forwards this rank must add so that every rank runs as many as the one with the most."""
    import torch.distributed as dist
    most = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - mine
