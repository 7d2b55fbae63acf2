"""The training loop: epochs, steps, accumulation, AMP, clipping, EMA, callbacks, validation."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from .callbacks.base import overrides
from .distributed import StopVote
from .enums import ModelType
from .losses import denoising_score_matching  # noqa: F401 (also importable from here, as before)

if TYPE_CHECKING:  # pragma: no cover
    from .handler import NNHandler


@dataclass
class TrainSettings:
    """What ``train`` keeps between calls (and across save/load) unless told otherwise."""

    validate_every: int = 1
    gradient_accumulation_steps: int = 1
    use_amp: bool = False
    gradient_clipping_norm: Optional[float] = None  # None or 0: no clipping
    ema_decay: Optional[float] = None  # None or 0: no EMA
    validate_with_ema: bool = False  # validation loss and metrics with the EMA weights (when EMA is on)

    def updated(self, **changes: Any) -> "TrainSettings":
        """A copy with every change that is not None applied, validated."""
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        new = TrainSettings(**values)
        if int(new.validate_every) < 1:
            raise ValueError(f"validate_every must be >= 1, got {new.validate_every!r}")
        if int(new.gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {new.gradient_accumulation_steps!r}")
        if new.gradient_clipping_norm is not None and float(new.gradient_clipping_norm) < 0:
            raise ValueError(f"gradient_clipping_norm must be >= 0, got {new.gradient_clipping_norm!r}")
        if new.ema_decay is not None and not 0.0 <= float(new.ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {new.ema_decay!r} (0 turns EMA off)")
        new.validate_every = int(new.validate_every)
        new.gradient_accumulation_steps = int(new.gradient_accumulation_steps)
        new.use_amp = bool(new.use_amp)
        new.gradient_clipping_norm = float(new.gradient_clipping_norm) if new.gradient_clipping_norm else None
        new.ema_decay = float(new.ema_decay) if new.ema_decay else None
        new.validate_with_ema = bool(new.validate_with_ema)
        return new

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        return cls().updated(**{k: v for k, v in values.items() if k in known})


class Position:
    """Where training is inside the current epoch: the batches done up to the last optimizer step."""

    __slots__ = ("epoch", "step", "sums")

    def __init__(self, epoch: int, step: int, sums: "_Averages"):
        self.epoch, self.step, self.sums = epoch, step, sums

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step, "partial": self.sums.state_dict()}


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return f"training stopped by signal {self.signum}; checkpoint saved at {self.checkpoint}"


class _SignalStop:
    """SIGTERM, SIGUSR1 and SIGINT ask the loop to stop after the current step.

    A repeated SIGTERM/SIGUSR1 changes nothing; a second SIGINT aborts at once. Only the
    main thread of the main process installs handlers; the previous ones come back after.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_SignalStop":
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        if not self.signum:
            self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C aborts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _batch_size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (list, tuple)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 1


def make_forward(h: "NNHandler") -> Callable[[Any], Tuple[torch.Tensor, Any, Any, int]]:
    """``batch -> (loss, predictions, targets, batch_size)`` for the handler's model type."""
    model, loss_fn, model_type = h.model, h.loss_fn, h.model_type

    if model_type in (ModelType.CLASSIFICATION, ModelType.REGRESSION):
        if loss_fn is None:
            raise RuntimeError(h._missing("loss_fn", "h.set_loss_fn(torch.nn.CrossEntropyLoss)"))

        def forward(batch):
            x, y = batch[0], batch[1]
            out = model(x)
            return loss_fn(out, y), out, y, (len(x) if type(x) is torch.Tensor else _batch_size(x))
        return forward

    if model_type is ModelType.SCORE_BASED:
        sde = h.sde
        if loss_fn is None and sde is None:
            raise RuntimeError(h._missing("sde", "h.set_sde(YourSDE, ...) or h.set_loss_fn(fn(model, x, sde))"))

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


def autocast_context(h: "NNHandler", enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if h.device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=h.device.type, dtype=dtype)


class _Averages:
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

    def reduce(self, h: "NNHandler") -> Tuple[float, Dict[str, float]]:
        """Exact averages over every sample seen, summed over ranks."""
        self._fold()
        totals = torch.tensor([self.total.item(), float(self.count), *self.metrics.values()], dtype=torch.float64)
        from .distributed import all_reduce_sum
        totals = all_reduce_sum(totals.to(h.device) if h.device.type == "cuda" else totals, h._dist).cpu()
        count = totals[1].item()
        if count == 0:
            return math.nan, {name: math.nan for name in self.metrics}
        return totals[0].item() / count, {name: totals[2 + i].item() / count for i, name in enumerate(self.metrics)}


@torch.no_grad()
def evaluate(h: "NNHandler", loader) -> Tuple[float, Dict[str, float]]:
    """Average loss and metrics of the model over ``loader``, in eval mode."""
    forward = make_forward(h)
    module = h.module
    was_training = module.training
    module.eval()
    sums = _Averages(h.device, list(h._metrics))
    non_blocking = h.device.type == "cuda"
    try:
        with autocast_context(h, h._settings.use_amp):
            for batch in loader:
                batch = to_device(batch, h.device, non_blocking)
                loss, out, y, n = forward(batch)
                sums.add(loss, n)
                for name, fn in h._metrics.items():
                    sums.metrics[name] += float(fn(out, y)) * n
    finally:
        module.train(was_training)
    return sums.reduce(h)


def run(h: "NNHandler", epochs: int, progress_bar: bool, store: Any = None, every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None, handle_signals: bool = False) -> None:
    """Train ``epochs`` more epochs. The handler holds every piece of state this touches.

    An epoch interrupted by a mid-epoch checkpoint counts as one of the ``epochs`` and goes
    on from its next batch. With ``store`` (a CheckpointStore) checkpoints are written every
    ``every_n_steps`` optimizer steps and ``every_n_epochs`` epochs, and with
    ``handle_signals`` SIGTERM/SIGUSR1/SIGINT save one and raise Preempted.
    """
    train_slot = h._data["train"]
    if not train_slot.is_set:
        if train_slot.missing_dataset:
            raise RuntimeError("the training dataset was given as an object when the checkpoint was saved, so it is "
                               "not in the file: set it again with h.set_train_loader(dataset) (the recorded loader "
                               f"options {train_slot.options} are reused)")
        raise RuntimeError("no training data: call h.set_train_loader(dataset, batch_size=..., shuffle=True) first")
    val_slot = h._data["val"]
    if not val_slot.is_set and val_slot.missing_dataset:
        raise RuntimeError("the validation dataset was given as an object when the checkpoint was saved, so it is "
                           "not in the file: set it again with h.set_val_loader(dataset) (the recorded loader "
                           f"options {val_slot.options} are reused)")
    if h.optimizer is None:
        raise RuntimeError(h._missing("optimizer", "h.set_optimizer(torch.optim.Adam, lr=1e-3)"))
    lost_metrics = [c.split(":", 1)[1] for c in h._not_restored if c.startswith("metric:")]
    if lost_metrics:
        raise RuntimeError(f"the metrics {lost_metrics} were not restored from the checkpoint "
                           f"({h._not_restored['metric:' + lost_metrics[0]]}): add them again with "
                           f"h.add_metric(name, fn) so that their history stays aligned with the epochs")
    settings = h._settings
    forward = make_forward(h)
    model, module, optimizer, device = h.model, h.module, h.optimizer, h.device
    loader, sampler = train_slot.loader, train_slot.sampler
    accum = settings.gradient_accumulation_steps
    clip = settings.gradient_clipping_norm
    scaler = h._grad_scaler_for(settings.use_amp)
    ema = h._ensure_ema(settings.ema_decay)
    metrics = h._metrics
    callbacks = h.callbacks
    hooks = {name: [cb for cb in callbacks if overrides(cb, name)]
             for name in ("on_epoch_begin", "on_epoch_end", "on_batch_begin", "on_batch_end")}
    non_blocking = device.type == "cuda" and bool(train_slot.options.get("pin_memory"))
    distributed = h._dist.enabled and isinstance(model, torch.nn.parallel.DistributedDataParallel)
    try:
        steps_per_epoch: Optional[int] = len(loader)
    except TypeError:
        steps_per_epoch = None

    def optimizer_step() -> None:
        if scaler is not None:
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        h.global_step += 1
        if ema is not None:
            ema.update(module)

    amp = settings.use_amp
    move = device.type != "cpu"  # DataLoader batches are already in host memory

    divisor = accum

    def micro_step(batch):
        if amp:
            with autocast_context(h, True):
                loss, out, y, n = forward(batch)
        else:
            loss, out, y, n = forward(batch)
        scaled = loss / divisor if accum > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss, out, y, n

    batch_begin, batch_end = hooks["on_batch_begin"], hooks["on_batch_end"]
    show_bar = progress_bar and h._dist.is_main
    resume = h._resume_position
    h._resume_position = None
    if resume is not None and int(resume.get("epoch", h.epoch)) != h.epoch:
        resume = None
    batch_size = loader.batch_size or 1
    stop = _SignalStop() if handle_signals else None
    check_stop = stop is not None or store is not None
    agree_stop = check_stop and distributed

    vote = StopVote() if agree_stop else None

    def stop_requested(settle: bool = False) -> int:
        """The signal that asks to stop, or 0. Under DDP the ranks agree on it (so they save at
        the same step) through a CPU vote read one step later, never a sync with the device."""
        signum = stop.signum if stop is not None else 0
        if vote is not None:
            signum = vote.settle(signum) if settle else vote.poll(signum)
        return signum

    def preempt(signum: int) -> None:
        path = store.save(h, tag="preempt") if store is not None else None
        if path is None:
            h.logger.warning("stopping on signal %d with no checkpoint_dir: nothing was saved", signum)
        raise Preempted(signum, None if path is None else str(path))

    h.stop_training = False
    for cb in callbacks:
        cb.on_train_begin(h)
    bar = tqdm(total=epochs * steps_per_epoch if steps_per_epoch else None, disable=not show_bar,
               unit="batch", dynamic_ncols=True, mininterval=0.5, leave=True)
    if stop is not None:
        stop.__enter__()
    try:
        for _ in range(epochs):
            epoch = h.epoch
            bar.set_description(f"epoch {epoch + 1}")
            start = int(resume["step_in_epoch"]) if resume is not None else 0
            if sampler is not None:
                sampler.seed = h._data_seed
                sampler.set_epoch(epoch)
                sampler.start = start * batch_size  # fast-forward by index, never by iterating
                if sampler.loader_generator is not None:  # the loader's own seeds (workers), per epoch
                    sampler.loader_generator.manual_seed(int(h._data_seed) + epoch)
            elif start:
                h._warn("an iterable dataset cannot be fast-forwarded: the interrupted epoch starts over")
                start = 0
            steps_total = start + len(loader) if steps_per_epoch is not None else None
            for cb in hooks["on_epoch_begin"]:
                cb.on_epoch_begin(h, epoch)
            module.train()
            sums = _Averages(device, list(metrics))
            if start:
                sums.load_state_dict(resume["partial"])
                bar.update(start) if show_bar else None
            resume = None
            position = h._position = Position(epoch, start, sums)
            optimizer.zero_grad(set_to_none=True)
            pending = 0
            step_in_epoch = start - 1
            add = sums.add
            for step_in_epoch, batch in enumerate(loader, start):
                # The per-step path: nothing here that a hand-written loop would not do,
                # unless a feature that needs it is on.
                if batch_begin:
                    for cb in batch_begin:
                        cb.on_batch_begin(h, step_in_epoch)
                if move:
                    batch = to_device(batch, device, non_blocking)
                if pending == 0 and accum > 1:
                    # The mean over the group that this step starts: the last group of an
                    # epoch may be short, and its gradient is still an average.
                    divisor = accum if steps_total is None else min(accum, steps_total - step_in_epoch)
                pending += 1
                last_micro = pending == accum or step_in_epoch + 1 == steps_total
                if distributed and not last_micro and steps_total is not None:
                    with model.no_sync():  # accumulate locally; gradients sync on the updating step
                        loss, out, y, n = micro_step(batch)
                else:
                    loss, out, y, n = micro_step(batch)
                if last_micro:
                    optimizer_step()
                    pending = 0
                add(loss, n)
                if metrics:
                    with torch.no_grad():
                        for name, fn in metrics.items():
                            sums.metrics[name] += float(fn(out.detach(), y)) * n
                if last_micro:
                    position.step = step_in_epoch + 1
                    if check_stop:
                        signum = stop_requested()
                        if signum:
                            preempt(signum)
                        if every_n_steps and h.global_step % every_n_steps == 0:
                            store.save(h)
                if batch_end:
                    logs = {"loss": loss.detach(), "batch_size": n, "global_step": h.global_step}
                    for cb in batch_end:
                        cb.on_batch_end(h, step_in_epoch, logs)
                if show_bar:
                    bar.update(1)
            if pending:  # an iterable dataset's last, partial accumulation group (synced every step)
                with torch.no_grad():  # its micro-steps were divided by accum: average over its own size
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad.mul_(accum / pending)
                optimizer_step()
                position.step = step_in_epoch + 1
            if step_in_epoch < 0:
                raise RuntimeError("the training loader yielded no batches")

            train_loss, train_metrics = sums.reduce(h)
            logs: Dict[str, float] = {"loss": train_loss, **train_metrics}
            validated = val_slot.is_set and (epoch + 1) % settings.validate_every == 0
            val_loss = math.nan
            val_metrics: Dict[str, float] = {name: math.nan for name in metrics}
            if validated:
                with (ema.swapped_into(module) if ema is not None and settings.validate_with_ema
                      else contextlib.nullcontext()):
                    val_loss, val_metrics = evaluate(h, val_slot.loader)
                logs["val_loss"] = val_loss
                logs.update({f"val_{k}": v for k, v in val_metrics.items()})
            h._history.append(train_loss, train_metrics, val_loss if val_slot.is_set else None,
                              val_metrics if val_slot.is_set else None)
            scheduler = h.scheduler
            if scheduler is not None:
                if isinstance(scheduler, ReduceLROnPlateau):
                    if validated:
                        scheduler.step(val_loss)
                    elif not val_slot.is_set:
                        scheduler.step(train_loss)
                else:
                    scheduler.step()
            logs["lr"] = optimizer.param_groups[0]["lr"]
            h.epoch += 1
            h._position = None
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "val_loss")}, refresh=False)
            h._log_epoch(logs)
            for cb in hooks["on_epoch_end"]:
                cb.on_epoch_end(h, epoch, logs)
            if store is not None and every_n_epochs and h.epoch % every_n_epochs == 0:
                store.save(h)
            if check_stop:  # a signal during validation or the last step stops here, between epochs
                signum = stop_requested(settle=True)
                if signum:
                    preempt(signum)
            if distributed:  # a callback may decide on one rank only (history lives on rank 0)
                flag = torch.tensor([int(bool(h.stop_training))], device=device if device.type == "cuda" else "cpu")
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                h.stop_training = bool(flag.item())
            if h.stop_training:
                h.logger.info("training stopped by a callback after epoch %d", h.epoch)
                break
    finally:
        bar.close()
        h._position = None
        if stop is not None:
            stop.__exit__(None, None, None)
    for cb in callbacks:
        cb.on_train_end(h)
