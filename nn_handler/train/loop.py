"""The epoch loop: train each epoch, validate, record, step the scheduler, save, stop.

``run`` works on a ``LoopContext``, the pieces of one training call laid out explicitly (the
handler builds it in ``NNHandler._loop_context``); it changes only the ``Progress`` and
``History`` parts, the model, optimizer, EMA and scaler, and it saves through ``ctx.save``,
knowing nothing of files. One epoch is ``_train_epoch`` (the batches, ``Stepper`` doing each
step) then ``_close_epoch`` (averages, validation, history, scheduler).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from ..callbacks.base import HOOKS, Callback, dispatch
from ..distributed import DistInfo
from ..ema import EMA
from ..history import History
from .evaluate import Forward, evaluate, to_device
from .preemption import StopRequests, preempt
from .progress import Averages, Position, Progress
from .settings import TrainSettings
from .step import Stepper

if TYPE_CHECKING:  # pragma: no cover
    from ..data import DataSlot
    from ..handler import NNHandler


@dataclass
class LoopContext:
    """Everything one training call uses, by name. ``handler`` is only what callback hooks receive
    (and where a hook sets ``stop_training``); the loop reads nothing else from it."""

    handler: "NNHandler"
    model: torch.nn.Module  # as trained: DistributedDataParallel under DDP
    module: torch.nn.Module  # the user's own module
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Callable[[], Any]  # the scheduler now (read each epoch), or None
    forward: Forward  # batch -> (loss, predictions, targets, batch_size)
    metrics: Dict[str, Callable]
    callbacks: List[Callback]
    settings: TrainSettings
    train: "DataSlot"
    val: "DataSlot"
    progress: Progress
    history: History
    dist: DistInfo
    warn: Callable[[str], None]  # a user-facing warning (rank 0)
    log_epoch: Callable[[Dict[str, float]], None]  # the epoch's log line
    logger: logging.Logger
    ema: Optional[EMA] = None
    scaler: Optional[torch.amp.GradScaler] = None  # float16 AMP on CUDA
    save: Optional[Callable[..., Optional[str]]] = None  # save(tag="") -> path; None: nowhere to save
    # Called before anything changes the weights, the optimizer state or the EMA (the optimizer step, an EMA
    # swap for validation): a background save copies them meanwhile (None: no asynchronous saves).
    before_update: Optional[Callable[[], None]] = None


def check_ready(train: "DataSlot", val: "DataSlot", optimizer: Optional[torch.optim.Optimizer],
                missing: Callable[[str, str], str], not_restored: Mapping[str, str]) -> None:
    """Raise, before anything is built or changed, when a training call cannot start: no training
    data, a dataset a checkpoint could not hold, no optimizer, or metrics a load did not restore."""
    if not train.is_set:
        if train.missing_dataset:
            raise RuntimeError("the training dataset was given as an object when the checkpoint was saved, so it is "
                               "not in the file: set it again with h.set_train_loader(dataset) (the recorded loader "
                               f"options {train.options} are reused)")
        raise RuntimeError("no training data: call h.set_train_loader(dataset, batch_size=..., shuffle=True) first")
    if not val.is_set and val.missing_dataset:
        raise RuntimeError("the validation dataset was given as an object when the checkpoint was saved, so it is "
                           "not in the file: set it again with h.set_val_loader(dataset) (the recorded loader "
                           f"options {val.options} are reused)")
    if optimizer is None:
        raise RuntimeError(missing("optimizer", "h.set_optimizer(torch.optim.Adam, lr=1e-3)"))
    lost_metrics = [c.split(":", 1)[1] for c in not_restored if c.startswith("metric:")]
    if lost_metrics:
        raise RuntimeError(f"the metrics {lost_metrics} were not restored from the checkpoint "
                           f"({not_restored['metric:' + lost_metrics[0]]}): add them again with "
                           f"h.add_metric(name, fn) so that their history stays aligned with the epochs")


def run(ctx: LoopContext, epochs: int, progress_bar: bool = True, every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None, handle_signals: bool = False) -> None:
    """Train ``epochs`` more epochs.

    An epoch interrupted by a mid-epoch checkpoint (``ctx.progress.resume``) counts as one of
    the ``epochs`` and goes on from its next batch. With ``ctx.save`` a checkpoint is saved every
    ``every_n_steps`` optimizer steps and ``every_n_epochs`` epochs, and with ``handle_signals``
    SIGTERM/SIGUSR1/SIGINT save one and raise Preempted.
    """
    h, progress, callbacks = ctx.handler, ctx.progress, ctx.callbacks
    loader = ctx.train.loader
    hooks = {name: dispatch(callbacks, name) for name in HOOKS}
    distributed = ctx.dist.enabled and isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel)
    try:
        steps_per_epoch: Optional[int] = len(loader)
    except TypeError:
        steps_per_epoch = None
    before, after = hooks["on_before_optimizer_step"], hooks["on_after_optimizer_step"]
    stepper = Stepper(ctx.model, ctx.module, ctx.optimizer, ctx.forward, ctx.device, ctx.settings, progress,
                      scaler=ctx.scaler, ema=ctx.ema, distributed=distributed, before_update=ctx.before_update,
                      before_step=(lambda: [cb.on_before_optimizer_step(h, ctx.optimizer) for cb in before])
                      if before else None,
                      after_step=(lambda step: [cb.on_after_optimizer_step(h, step) for cb in after]) if after else None)
    show_bar = progress_bar and ctx.dist.is_main
    resume = progress.resume  # consumed: a later call starts its epochs from their beginning
    progress.resume = None
    if resume is not None and int(resume.get("epoch", progress.epoch)) != progress.epoch:
        resume = None
    check_stop = handle_signals or ctx.save is not None
    stops = StopRequests(handle_signals, agree=check_stop and ctx.dist.enabled)  # (DDP or FSDP: the ranks vote)

    h.stop_training = False
    for cb in hooks["on_train_begin"]:
        cb.on_train_begin(h)
    bar = tqdm(total=epochs * steps_per_epoch if steps_per_epoch else None, disable=None if show_bar else True,
               unit="batch", dynamic_ncols=True, mininterval=0.5, leave=True)
    with stops:
        try:
            for _ in range(epochs):
                epoch = progress.epoch
                bar.set_description(f"epoch {epoch + 1}")
                sums = _train_epoch(ctx, stepper, hooks, bar if show_bar else None, resume,
                                    stops if check_stop else None, every_n_steps, steps_per_epoch is not None)
                resume = None
                logs = _close_epoch(ctx, epoch, sums, hooks)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "val_loss")}, refresh=False)
                ctx.log_epoch(logs)
                for cb in hooks["on_epoch_end"]:
                    cb.on_epoch_end(h, epoch, logs)
                if ctx.save is not None and every_n_epochs and progress.epoch % every_n_epochs == 0:
                    ctx.save()
                if check_stop:  # a signal during validation or the last step stops here, between epochs
                    signum = stops.requested(settle=True)
                    if signum:
                        preempt(signum, ctx.save, ctx.logger)
                if ctx.dist.enabled:  # a callback may decide on one rank only (history lives on rank 0)
                    device = ctx.device
                    flag = torch.tensor([int(bool(h.stop_training))], device=device if device.type == "cuda" else "cpu")
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    h.stop_training = bool(flag.item())
                if h.stop_training:
                    ctx.logger.info("training stopped by a callback after epoch %d", progress.epoch)
                    break
        finally:
            bar.close()
            progress.position = None
    for cb in hooks["on_train_end"]:
        cb.on_train_end(h)


def _train_epoch(ctx: LoopContext, step: Stepper, hooks: Dict[str, List[Callback]], bar: Any,
                 resume: Optional[Dict[str, Any]], stops: Optional[StopRequests], every_n_steps: Optional[int],
                 sized: bool) -> Averages:
    """The batches of epoch ``ctx.progress.epoch``, from ``resume``'s position when it has one; returns
    the epoch's sums. ``bar``: the progress bar when shown; ``stops``: when stops are checked."""
    h, progress, device, metrics = ctx.handler, ctx.progress, ctx.device, ctx.metrics
    loader, sampler = ctx.train.loader, ctx.train.sampler
    epoch = progress.epoch
    start = int(resume["step_in_epoch"]) if resume is not None else 0
    if sampler is not None:
        sampler.seed = progress.data_seed
        sampler.set_epoch(epoch)
        sampler.start = start * (loader.batch_size or 1)  # fast-forward by index, never by iterating
        if sampler.loader_generator is not None:  # the loader's own seeds (workers), per epoch
            sampler.loader_generator.manual_seed(int(progress.data_seed) + epoch)
    elif start:
        ctx.warn("an iterable dataset cannot be fast-forwarded: the interrupted epoch starts over")
        start = 0
    steps_total = start + len(loader) if sized else None
    for cb in hooks["on_epoch_begin"]:
        cb.on_epoch_begin(h, epoch)
    ctx.module.train()
    sums = Averages(device, list(metrics))
    if start:
        sums.load_state_dict(resume["partial"])
        bar.update(start) if bar is not None else None
    position = progress.position = Position(epoch, start, sums)
    step.begin_epoch()
    batch_begin, batch_end = hooks["on_batch_begin"], hooks["on_batch_end"]
    move = device.type != "cpu"  # DataLoader batches are already in host memory
    non_blocking = device.type == "cuda" and bool(ctx.train.options.get("pin_memory"))
    add = sums.add
    step_in_epoch = start - 1
    for step_in_epoch, batch in enumerate(loader, start):
        # The per-step path: nothing here that a hand-written loop would not do,
        # unless a feature that needs it is on.
        if batch_begin:
            for cb in batch_begin:
                cb.on_batch_begin(h, step_in_epoch)
        if move:
            batch = to_device(batch, device, non_blocking)
        loss, out, y, n, updated = step(batch, step_in_epoch, steps_total)
        add(loss, n)
        if metrics:
            with torch.no_grad():
                for name, fn in metrics.items():
                    sums.metrics[name] += float(fn(out.detach(), y)) * n
        if updated:
            position.step = step_in_epoch + 1
            if stops is not None:
                signum = stops.requested()
                if signum:
                    preempt(signum, ctx.save, ctx.logger)
                if every_n_steps and ctx.save is not None and progress.global_step % every_n_steps == 0:
                    ctx.save()
        if batch_end:
            logs = {"loss": loss.detach(), "batch_size": n, "global_step": progress.global_step}
            for cb in batch_end:
                cb.on_batch_end(h, step_in_epoch, logs)
        if bar is not None:
            bar.update(1)
    if step.finish_epoch():  # an iterable dataset's last, partial accumulation group
        position.step = step_in_epoch + 1
    if step_in_epoch < 0:
        raise RuntimeError("the training loader yielded no batches")
    return sums


def _close_epoch(ctx: LoopContext, epoch: int, sums: Averages, hooks: Dict[str, List[Callback]]) -> Dict[str, float]:
    """Average the epoch, validate when due, record the history, step the scheduler, count the
    epoch; returns the epoch's logs (loss, metrics, val_*, lr)."""
    settings, val, module, ema = ctx.settings, ctx.val, ctx.module, ctx.ema
    train_loss, train_metrics = sums.reduce(ctx.dist)
    logs: Dict[str, float] = {"loss": train_loss, **train_metrics}
    validated = val.is_set and (epoch + 1) % settings.validate_every == 0
    val_loss = math.nan
    val_metrics: Dict[str, float] = {name: math.nan for name in ctx.metrics}
    if validated:
        if ctx.before_update is not None:
            ctx.before_update()
        h = ctx.handler
        for cb in hooks["on_validation_begin"]:
            cb.on_validation_begin(h, epoch)
        batch_hooks = hooks["on_validation_batch_end"]
        batch_end = (lambda index, batch_logs: [cb.on_validation_batch_end(h, index, batch_logs) for cb in batch_hooks]
                     ) if batch_hooks else None
        with (ema.swapped_into(module) if ema is not None and settings.validate_with_ema
              else contextlib.nullcontext()):
            val_loss, val_metrics = evaluate(ctx, val.loader, batch_end)
        logs["val_loss"] = val_loss
        logs.update({f"val_{k}": v for k, v in val_metrics.items()})
        for cb in hooks["on_validation_end"]:
            cb.on_validation_end(h, epoch, {"val_loss": val_loss, **{f"val_{k}": v for k, v in val_metrics.items()}})
    ctx.history.append(train_loss, train_metrics, val_loss if val.is_set else None,
                       val_metrics if val.is_set else None)
    scheduler = ctx.scheduler()
    if scheduler is not None:
        if isinstance(scheduler, ReduceLROnPlateau):  # on the validation loss, or the training loss without one
            if validated:
                scheduler.step(val_loss)
            elif not val.is_set:
                scheduler.step(train_loss)
        else:
            scheduler.step()
    logs["lr"] = ctx.optimizer.param_groups[0]["lr"]
    ctx.progress.epoch += 1
    ctx.progress.position = None
    return logs
