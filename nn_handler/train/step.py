"""One training step: forward and backward per batch (a micro-step), an optimizer step per
accumulation group.

Gradients of a group are averaged over its batches, the last group of an epoch included when it
is short. AMP runs the forward under autocast and, on CUDA (float16), scales the loss with a
GradScaler; clipping sees unscaled gradients; EMA follows every optimizer step. Under DDP the
micro-steps that do not update skip the gradient all-reduce (``no_sync``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from ..ema import EMA
from .evaluate import Forward, autocast_context
from .progress import Progress
from .settings import TrainSettings


class Stepper:
    """Feeds batches through the model and steps the optimizer once per accumulation group.

    ``__call__`` is the per-batch path; it does nothing a hand-written loop would not do unless
    a setting that needs it is on (no ``.item()``, no device sync).
    """

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 forward: Forward, device: torch.device, settings: TrainSettings, progress: Progress,
                 scaler: Optional[Any] = None, ema: Optional[EMA] = None, distributed: bool = False,
                 before_step: Optional[Callable[[], None]] = None, after_step: Optional[Callable[[int], None]] = None,
                 before_update: Optional[Callable[[], None]] = None):
        self.model, self.module, self.optimizer, self.forward = model, module, optimizer, forward
        self.device, self.progress, self.scaler, self.ema = device, progress, scaler, ema
        self.accum = settings.gradient_accumulation_steps
        self.clip = settings.gradient_clipping_norm
        self.amp = settings.use_amp
        self.distributed = distributed  # model is DistributedDataParallel
        self.divisor = self.accum  # the size of the current accumulation group
        self.pending = 0  # micro-steps since the last optimizer step
        # The callbacks' before/after optimizer step hooks (None when no callback has them).
        self.before_step, self.after_step = before_step, after_step
        self.before_update = before_update  # waits until a background save has copied what the step changes

    def begin_epoch(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0

    def __call__(self, batch: Any, step_in_epoch: int, steps_total: Optional[int]) -> Tuple[torch.Tensor, Any, Any,
                                                                                              int, bool]:
        """One micro-step on ``batch`` and, when it ends a group, the optimizer step.

        ``steps_total`` is the epoch's number of batches (None for an iterable dataset: then a
        short last group is handled by ``finish_epoch``). Returns ``(loss, predictions,
        targets, batch_size, updated)``.
        """
        accum = self.accum
        if self.pending == 0 and accum > 1:
            # The mean over the group that this step starts: the last group of an
            # epoch may be short, and its gradient is still an average.
            self.divisor = accum if steps_total is None else min(accum, steps_total - step_in_epoch)
        self.pending += 1
        updating = self.pending == accum or step_in_epoch + 1 == steps_total
        if self.distributed and not updating and steps_total is not None:
            with self.model.no_sync():  # accumulate locally; gradients sync on the updating step
                loss, out, y, n = self._micro_step(batch)
        else:
            loss, out, y, n = self._micro_step(batch)
        if updating:
            self.optimizer_step()
            self.pending = 0
        return loss, out, y, n, updating

    def _micro_step(self, batch: Any) -> Tuple[torch.Tensor, Any, Any, int]:
        if self.amp:
            with autocast_context(self.device, True):
                loss, out, y, n = self.forward(batch)
        else:
            loss, out, y, n = self.forward(batch)
        scaled = loss / self.divisor if self.accum > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, out, y, n

    def finish_epoch(self) -> bool:
        """Step on an iterable dataset's last, partial group (its micro-steps synced every step);
        returns whether it stepped."""
        pending = self.pending
        if not pending:
            return False
        with torch.no_grad():  # its micro-steps were divided by accum: average over its own size
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.accum / pending)
        self.optimizer_step()
        self.pending = 0
        return True

    def optimizer_step(self) -> None:
        """Unscale (AMP) and clip, step, zero the gradients, count the step, update the EMA."""
        optimizer, scaler, clip, before = self.optimizer, self.scaler, self.clip, self.before_step
        if self.before_update is not None:
            self.before_update()
        if scaler is not None:
            if clip or before is not None:
                scaler.unscale_(optimizer)
            if before is not None:
                before()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if before is not None:
                before()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1
        if self.ema is not None:
            self.ema.update(self.module)
        if self.after_step is not None:
            self.after_step(self.progress.global_step)
