"""NNHandler: one object that owns a model and everything around its training.

The handler is a facade: the loop lives in ``train``, the checkpoint format in
``checkpointing``, the distributed policy in ``distributed``, recording components as
plain data in ``specs``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed, fsdp, parts, rng, specs
from .callbacks.base import HOOKS, Callback, dispatch, unknown_hooks
from .checkpointing import format as F
from .checkpointing.save import BackgroundSave
from .checkpointing.store import lineage_for
from .data import DataSlot, build_dataset, build_loader
from .ema import EMA, ShardedEMA, ema_for
from .enums import LoggingMode, ModelType, coerce_logging_mode, coerce_model_type
from .errors import SettingError
from .history import History
from .modules import unwrap
from .train import LoopContext, Progress, TrainSettings, autocast_context, check_ready, make_forward, to_device
from .train import run as run_loop

if TYPE_CHECKING:  # pragma: no cover
    from .checkpointing.file import CheckpointFile

DeviceLike = Optional[Union[str, torch.device]]
logger = logging.getLogger("nn_handler")
_UNSET = object()
_TOLD_HOOKS: set = set()  # (callback class, method name) already warned about as not a hook


def _as_lists(value: Any) -> Any:
    """``value`` with tuples as lists, for comparing a recorded kwarg with a configured one."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


class NNHandlerWarning(UserWarning):
    """A component could not be recorded or restored; the message says which and what to do."""


class NNHandler:
    """Owns a PyTorch model, its optimisation and its history; saves and loads all of it.

    >>> h = NNHandler(MLP, device="cpu", in_features=8, out_features=2)
    >>> h.set_optimizer(torch.optim.Adam, lr=1e-3); h.set_loss_fn(torch.nn.CrossEntropyLoss)
    >>> h.set_train_loader(dataset, batch_size=32, shuffle=True); h.train(epochs=5)
    >>> h.save("run.pt"); h2 = NNHandler.load("run.pt")
    """

    ModelType = ModelType
    LoggingMode = LoggingMode

    def __init__(self, model_class: Callable[..., nn.Module], device: DeviceLike = "cpu",
                 logger_mode: Optional[Union[LoggingMode, str]] = None,
                 model_type: Union[ModelType, str] = ModelType.CLASSIFICATION,
                 use_distributed: Optional[bool] = None, strategy: Any = None, **model_kwargs: Any):
        if isinstance(model_class, nn.Module):
            raise TypeError("NNHandler takes the model's class and its keyword arguments, not a built model: "
                            f"NNHandler({type(model_class).__name__}, **kwargs)")
        if not callable(model_class):
            raise TypeError(f"model_class must be an nn.Module class, got {model_class!r}")
        self._setup(model_class, device, logger_mode, model_type, use_distributed, model_kwargs, None, strategy)

    @classmethod
    def _built(cls, model_class: Callable[..., nn.Module], module: Optional[nn.Module], *, device: DeviceLike,
               model_type: Union[ModelType, str], model_kwargs: Dict[str, Any], strategy: Any = None) -> "NNHandler":
        """A handler around ``module``, already built (and holding a checkpoint's verified weights), recorded
        as ``model_class(**model_kwargs)``; ``module=None`` builds it as the constructor does."""
        handler = cls.__new__(cls)
        handler._setup(model_class, device, None, model_type, None, model_kwargs, module, strategy)
        return handler

    def _setup(self, model_class: Callable[..., nn.Module], device: DeviceLike, logger_mode: Any, model_type: Any,
               use_distributed: Optional[bool], model_kwargs: Dict[str, Any], module: Optional[nn.Module],
               strategy: Any = None) -> None:
        self._dist = distributed.setup(use_distributed)
        policy = fsdp.coerce_strategy(strategy)
        self._fsdp: Optional[fsdp.FSDP] = policy if self._dist.enabled else None  # one process: nothing to shard
        self._saver = BackgroundSave(self._dist)
        self._defer_staging = False  # inside train with async_save: see save
        self._device = distributed.resolve_device(device, self._dist)
        self._model_type = coerce_model_type(model_type)
        self.logger = logger
        self._configure_logging(coerce_logging_mode(logger_mode))
        adopted = module is not None
        if module is None:
            module = model_class(**model_kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"model_class {model_class!r} built a {type(module).__name__}, not an nn.Module")
        module = module.to(self._device)
        self._module = unwrap(module)  # the user's own module, under e.g. a factory's torch.compile
        self._model: nn.Module = module
        if self._fsdp is not None:  # sharded in place: the module is its own wrapper
            self._model = self._module = fsdp.shard(self._module, self._fsdp, self._device, self._dist.world_size)
        elif self._dist.enabled:
            ids = [self._device.index] if self._device.type == "cuda" else None
            # A module adopted from a checkpoint holds the same verified weights on every rank:
            # DDP's initial broadcast of rank 0's parameters would only copy them again.
            self._model = nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                              **({"init_sync": False} if adopted else {}))
        # Each component's record: name -> (spec or None, reason it could not be recorded). A class or
        # an importable function returning the module (``timm.create_model``, ``mypkg.models.build``)
        # is recorded alike; ``load`` calls a recorded function only when the caller trusts it.
        model_record = specs.record(model_class, model_kwargs)
        self._records: Dict[str, Tuple[Optional[dict], Optional[str]]] = {"model": model_record}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._scheduler: Any = None
        self._loss_fn: Optional[Callable] = None
        self._metrics: Dict[str, Callable] = {}
        self._callbacks: List[Callback] = []
        self._sde: Any = None
        self._sampler: Any = None
        self._ema: Optional[EMA] = None
        self._grad_scaler: Optional[torch.amp.GradScaler] = None
        self._settings = TrainSettings()
        self._history = History()
        self._data: Dict[str, DataSlot] = {"train": DataSlot("train"), "val": DataSlot("val")}
        # Components a loaded checkpoint could not restore: name -> why (told again when they are needed).
        self._not_restored: Dict[str, str] = {}
        # Plain data saved with every checkpoint and restored by load: run id, lineage, the run's config.
        self.metadata: Dict[str, Any] = {"lineage": lineage_for(None, None)}
        # Epochs and steps done, the data seed; inside an epoch where the loop is (saved by a mid-epoch
        # checkpoint), after load where to go on.
        self._progress = Progress()
        self.stop_training = False
        # What a file can say of a model class it cannot name (one in a __main__ script): its name and kwargs.
        self._model_origin = (getattr(model_class, "__qualname__", None), dict(model_kwargs))

    # ------------------------------------------------------------------ read-only views
    @property
    def model(self) -> nn.Module:
        """The model as trained (wrapped in DistributedDataParallel under DDP; sharded in place under FSDP)."""
        return self._model

    @property
    def strategy(self) -> str:
        """How the model is spread over the ranks: "fsdp" (sharded), "ddp" (replicated) or "none" (one process)."""
        return "fsdp" if self._fsdp is not None else ("ddp" if self._dist.enabled else "none")

    @property
    def module(self) -> nn.Module:
        """The user's own module, unwrapped."""
        return self._module

    @property
    def resumes_inside_epoch(self) -> bool:
        """A load left a position inside an epoch: the next ``train`` goes on from its next batch."""
        return self._progress.resumes_inside_epoch

    @property
    def epoch(self) -> int:
        """Epochs trained over the handler's whole life (the next epoch's 0-based index)."""
        return self._progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._progress.epoch = int(value)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over the handler's whole life."""
        return self._progress.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._progress.global_step = int(value)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model_type(self) -> ModelType:
        return self._model_type

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self._optimizer

    @property
    def scheduler(self) -> Any:
        return self._scheduler

    @property
    def loss_fn(self) -> Optional[Callable]:
        return self._loss_fn

    @property
    def metrics(self) -> Dict[str, Callable]:
        return dict(self._metrics)

    @property
    def callbacks(self) -> List[Callback]:
        return list(self._callbacks)

    @property
    def ema(self) -> Optional[EMA]:
        return self._ema

    @property
    def sde(self) -> Any:
        return self._sde

    @property
    def sampler(self) -> Any:
        return self._sampler

    @property
    def train_losses(self) -> List[float]:
        return self._history.train_losses

    @property
    def val_losses(self) -> List[float]:
        return self._history.val_losses

    @property
    def train_metrics_history(self) -> Dict[str, List[float]]:
        return self._history.train_metrics

    @property
    def val_metrics_history(self) -> Dict[str, List[float]]:
        return self._history.val_metrics

    @property
    def rank(self) -> int:
        return self._dist.rank

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def is_distributed(self) -> bool:
        return self._dist.enabled

    @property
    def train_loader(self) -> Optional[DataLoader]:
        return self._data["train"].loader

    @property
    def val_loader(self) -> Optional[DataLoader]:
        return self._data["val"].loader

    @property
    def settings(self) -> Dict[str, Any]:
        """The training settings ``train`` uses when an argument is left as None."""
        return self._settings.to_dict()

    # ------------------------------------------------------------------ components
    def set_optimizer(self, optimizer_class: type, **kwargs: Any) -> None:
        """``optimizer_class(model parameters, **kwargs)``; a scheduler already set is rebuilt around it."""
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        self._optimizer = optimizer_class(self._module.parameters(), **kwargs)
        self._records["optimizer"] = specs.record(optimizer_class, kwargs)
        self._not_restored.pop("optimizer", None)
        if self._scheduler is not None:
            spec, _ = self._records.get("scheduler", (None, None))
            cls, sched_kwargs = type(self._scheduler), (specs.split(spec)[1] if spec else {})
            self.logger.info("rebuilding the scheduler %s around the new optimizer (fresh state)", cls.__name__)
            self.set_scheduler(cls, **sched_kwargs)

    def set_scheduler(self, scheduler_class: Optional[type], **kwargs: Any) -> None:
        """``scheduler_class(optimizer, **kwargs)``, stepped once per epoch; None clears it.

        ReduceLROnPlateau steps on the validation loss of validated epochs, or on the
        training loss when there is no validation loader.
        """
        if scheduler_class is None:
            self._scheduler = None
            self._records.pop("scheduler", None)
            return
        if self._optimizer is None:
            raise RuntimeError("set the optimizer before the scheduler: h.set_optimizer(...), then h.set_scheduler(...)")
        self._scheduler = scheduler_class(self._optimizer, **kwargs)
        self._records["scheduler"] = specs.record(scheduler_class, kwargs)
        self._not_restored.pop("scheduler", None)

    def update_optimizer(self, **changes: Any) -> Dict[str, Any]:
        """Change the optimizer's hyperparameters (``lr``, ``weight_decay``, ``betas``, ...) in place,
        keeping its state (moments, step counts) and the scheduler's; returns the changes that took
        effect (those that differ from what was set).

        Every parameter group takes the new values; a new ``lr`` is also the scheduler's base lr
        (``initial_lr``/``base_lrs``), so the schedule continues from it. The optimizer's record is
        updated, so the next checkpoint records the new values. A name the optimizer does not take
        raises TypeError naming it.
        """
        if self._optimizer is None:
            raise RuntimeError(self._missing("optimizer", "h.set_optimizer(torch.optim.Adam, lr=1e-3)"))
        spec, reason = self._records.get("optimizer", (None, None))
        recorded = specs.split(spec)[1] if spec else {}
        changed = {k: v for k, v in specs.to_plain(changes).items() if _as_lists(recorded.get(k, _UNSET)) != _as_lists(v)}
        if not changed:
            return {}
        cls = type(self._optimizer)
        try:  # the optimizer's own validation of the new values, on a throwaway instance
            cls([torch.zeros(1, requires_grad=True)], **{**recorded, **changed})
        except TypeError as exc:
            raise TypeError(f"{cls.__name__} does not take {sorted(changed)}: {exc}") from None
        for group in self._optimizer.param_groups:
            for key, value in changed.items():
                group[key] = tuple(value) if isinstance(value, list) and isinstance(group.get(key), tuple) else value
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = value
        if "lr" in changed and hasattr(self._scheduler, "base_lrs"):
            self._scheduler.base_lrs = [changed["lr"]] * len(self._optimizer.param_groups)
        self._records["optimizer"] = specs.record(cls, {**recorded, **changed}) if spec else (spec, reason)
        return changed

    def set_loss_fn(self, loss_fn: Callable, **kwargs: Any) -> None:
        """A loss class (built with ``kwargs``) or a function (``kwargs`` bound to it), or a built loss.

        A built loss is recorded when its constructor arguments can be recovered exactly (torch's own
        losses: ``CrossEntropyLoss(label_smoothing=0.1)``); otherwise ``save`` warns that it is not
        recorded (pass the class and its kwargs instead).
        """
        if isinstance(loss_fn, nn.Module):
            recovered = specs.builtin_loss_kwargs(loss_fn)
            built, record = loss_fn, (specs.record(type(loss_fn), recovered) if recovered is not None else (
                None, f"the loss was given as a built {type(loss_fn).__name__} whose constructor arguments cannot be "
                      f"recovered; pass the class and its kwargs to record it"))
            if kwargs:
                raise TypeError("kwargs are only accepted with a loss class or function, not a built loss module")
        elif isinstance(loss_fn, type):
            built, record = loss_fn(**kwargs), specs.record(loss_fn, kwargs)
        elif callable(loss_fn):
            built = functools.partial(loss_fn, **kwargs) if kwargs else loss_fn
            record = specs.record(loss_fn, kwargs)
        else:
            raise TypeError(f"loss_fn must be a class or a function, got {loss_fn!r}")
        if isinstance(built, nn.Module):
            built = built.to(self._device)
        self._loss_fn = built
        self._records["loss_fn"] = record
        self._not_restored.pop("loss_fn", None)

    def add_metric(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
        """Track ``fn(predictions, targets) -> float`` per epoch, averaged over samples, for train and validation."""
        if not callable(fn):
            raise TypeError(f"metric {name!r} must be a function (predictions, targets) -> float")
        self._metrics[str(name)] = fn
        self._records[f"metric:{name}"] = specs.record(fn)
        self._not_restored.pop(f"metric:{name}", None)

    def add_callback(self, callback: Callback) -> None:
        """Add ``callback``; its hooks run in the order callbacks were added. A method that looks like
        a hook (``on_...``) but is none is told once per class: the loop would never call it."""
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must subclass nn_handler.callbacks.Callback, got {callback!r}")
        for name, close in unknown_hooks(callback):
            key = (type(callback), name)
            if key not in _TOLD_HOOKS:
                _TOLD_HOOKS.add(key)
                hint = f"; did you mean {close}?" if close else f"; the hooks are {', '.join(HOOKS)}"
                self._warn(f"{type(callback).__qualname__}.{name} looks like a callback hook but is none, so it is "
                           f"never called{hint}")
        self._callbacks.append(callback)

    def set_sde(self, sde_class: Optional[type], **kwargs: Any) -> None:
        self._sde = None if sde_class is None else sde_class(**kwargs)
        self._records["sde"] = specs.record(sde_class, kwargs) if sde_class is not None else (None, None)

    def set_sampler(self, sampler_class: Optional[type], **kwargs: Any) -> None:
        self._sampler = None if sampler_class is None else sampler_class(**kwargs)
        self._records["sampler"] = specs.record(sampler_class, kwargs) if sampler_class is not None else (None, None)

    def set_train_loader(self, dataset: Union[Dataset, Mapping[str, Any], None] = None, *,
                         trusted_packages: Optional[Sequence[str]] = None, **dataloader_kwargs: Any) -> None:
        """A Dataset, or a spec ``{"_target_": "pkg.mod.fn", **kwargs}`` that builds one, plus DataLoader options.

        After ``load`` the recorded options are reused when none are given. ``trusted_packages``
        (a list, possibly empty) says the spec was read from a file: it is then built only under
        ``load``'s trust rules, widened by those packages, as ``load`` builds a recorded dataset.
        """
        self._set_loader("train", dataset, dataloader_kwargs, from_file=trusted_packages is not None,
                         trusted=tuple(trusted_packages or ()))

    def set_val_loader(self, dataset: Union[Dataset, Mapping[str, Any], None] = None, *,
                       trusted_packages: Optional[Sequence[str]] = None, **dataloader_kwargs: Any) -> None:
        """As ``set_train_loader``, for the validation data."""
        self._set_loader("val", dataset, dataloader_kwargs, from_file=trusted_packages is not None,
                         trusted=tuple(trusted_packages or ()))

    def _set_loader(self, name: str, dataset: Any, options: Dict[str, Any], *, from_file: bool = False,
                    trusted: Tuple[str, ...] = ()) -> None:
        slot = self._data[name]
        if dataset is None:
            raise TypeError(f"set_{name}_loader needs a dataset or a dataset spec")
        if not options and slot.missing_dataset:
            options = dict(slot.options)
        built, spec = build_dataset(dataset, f"{name} dataset", from_file=from_file, trusted=trusted)
        loader, sampler = build_loader(built, options, self._dist, pad=name == "train")
        self._data[name] = DataSlot(name, dataset=built, spec=spec, options=dict(options), loader=loader, sampler=sampler)

    # ------------------------------------------------------------------ training
    def train(self, epochs: int, validate_every: Optional[int] = None, gradient_accumulation_steps: Optional[int] = None,
              use_amp: Optional[bool] = None, gradient_clipping_norm: Optional[float] = None,
              ema_decay: Optional[float] = None, seed: Optional[int] = None, progress_bar: bool = True, *,
              validate_with_ema: Optional[bool] = None, checkpoint_dir: Any = None,
              save_every_n_steps: Optional[int] = None, save_every_n_epochs: Optional[int] = None,
              keep_last: Optional[int] = None, handle_signals: Optional[bool] = None, async_save: bool = False,
              sharded_checkpoints: Optional[bool] = None) -> None:
        """Train ``epochs`` more epochs.

        A setting left as None keeps what the handler has (after ``load``, what was saved).
        ``ema_decay=0`` turns EMA off, ``gradient_clipping_norm=0`` turns clipping off.
        ``seed`` re-seeds every random stream (and the data order) at the start of this call.
        ``validate_with_ema=True`` computes the validation loss and metrics with the EMA
        weights (when EMA is on); the live weights are put back bit for bit after.

        Never lose a run: with ``checkpoint_dir`` (a directory, or a ``CheckpointStore`` for
        best-k retention) a checkpoint is written every ``save_every_n_steps`` optimizer steps
        and every ``save_every_n_epochs`` epochs (``last.pth`` points at the newest, only the
        newest ``keep_last`` are kept), and SIGTERM, SIGUSR1 or a first Ctrl-C finish the
        current step, save, and raise ``Preempted`` (a SystemExit with code 128 + the signal
        number; ``handle_signals=False`` leaves signals alone). A checkpoint taken inside an
        epoch resumes with its next batch, and an interrupted epoch counts as one of ``epochs``.
        ``async_save=True`` writes each checkpoint in the background while training goes on (the
        pre-emption checkpoint is written at once; ``train`` returns once the last one is complete).
        ``sharded_checkpoints`` writes DCP directories (``ckpt-....dcp``); the default is sharded under FSDP.
        """
        if int(epochs) < 0:
            raise SettingError("epochs", f"epochs must be >= 0, got {epochs!r}")
        self._settings = self._settings.updated(
            validate_every=validate_every, gradient_accumulation_steps=gradient_accumulation_steps, use_amp=use_amp,
            gradient_clipping_norm=gradient_clipping_norm, ema_decay=ema_decay, validate_with_ema=validate_with_ema)
        if ema_decay is not None and not ema_decay:
            self._settings.ema_decay = None
        if gradient_clipping_norm is not None and not gradient_clipping_norm:
            self._settings.gradient_clipping_norm = None
        progress = self._progress
        if seed is not None:
            rng.seed_everything(int(seed))
            progress.data_seed = int(seed)
        elif progress.data_seed is None:
            # Like RandomSampler: draw from the global stream, so torch.manual_seed fixes the order.
            progress.data_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        progress.data_seed = distributed.broadcast_object(progress.data_seed, self._dist)
        store = None
        if checkpoint_dir is not None:
            from .checkpointing.store import CheckpointStore
            store = checkpoint_dir if isinstance(checkpoint_dir, CheckpointStore) else \
                CheckpointStore(checkpoint_dir, keep_last=keep_last)
            if sharded_checkpoints is not None:
                store.sharded = bool(sharded_checkpoints)
            if epochs:
                store.check_monitor(self)  # a misspelled monitor: an error now, not a warning at the first save
        elif save_every_n_steps or save_every_n_epochs:
            raise ValueError("save_every_n_steps / save_every_n_epochs need a checkpoint_dir")
        if handle_signals is None:
            handle_signals = store is not None
        if epochs:
            def save(tag: str = "") -> str:  # a pre-emption's checkpoint is written before the process goes
                return str(store.save(self, tag=tag, asynchronous=bool(async_save) and tag != "preempt"))

            context = self._loop_context(save if store is not None else None)
            if async_save:
                context.before_update = self._saver.wait_staged
            self._defer_staging = bool(async_save)
            try:
                run_loop(context, int(epochs), progress_bar, every_n_steps=save_every_n_steps,
                         every_n_epochs=save_every_n_epochs, handle_signals=handle_signals)
            except BaseException:
                try:
                    self._saver.wait()  # never leave a write behind; the first error is the one raised
                except Exception as exc:  # noqa: BLE001
                    self.logger.warning("the background save also failed: %s", exc)
                raise
            finally:
                self._defer_staging = False
            self._saver.wait()

    def _loop_context(self, save: Optional[Callable[..., Optional[str]]] = None) -> LoopContext:
        """The pieces the training loop works on, after checking that training can start.

        ``save(tag="")`` writes a checkpoint and returns its path (None: nowhere to save). The
        forward, GradScaler and EMA are built for the current settings (EMA off drops it).
        """
        check_ready(self._data["train"], self._data["val"], self._optimizer, self._missing, self._not_restored)
        settings = self._settings
        forward = make_forward(self._model, self._model_type, self._loss_fn, self._sde, self._missing)
        scaler = self._grad_scaler_for(settings.use_amp)
        ema = self._ensure_ema(settings.ema_decay)
        return LoopContext(
            handler=self, model=self._model, module=self._module, device=self._device, optimizer=self._optimizer,
            scheduler=lambda: self._scheduler, forward=forward, metrics=self._metrics, callbacks=self.callbacks,
            settings=settings, train=self._data["train"], val=self._data["val"], progress=self._progress,
            history=self._history, dist=self._dist, warn=self._warn, log_epoch=self._log_epoch, logger=self.logger,
            ema=ema, scaler=scaler, save=save)

    def _ensure_ema(self, decay: Optional[float]) -> Optional[EMA]:
        """The EMA for ``decay``: none when it is off, a new one, or the current one carried to a new decay."""
        if not decay:
            self._ema = None
        elif self._ema is None:
            self._ema = ema_for(self._module, decay)
        elif self._ema.decay != decay:
            if isinstance(self._ema, ShardedEMA):
                self._ema.decay = float(decay)  # the average so far goes on under the new decay
            else:
                state = self._ema.state_dict()
                self._ema = EMA(self._module, decay)
                self._ema.load_state_dict({**state, "decay": decay})
        return self._ema

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """Inside the block the model holds its EMA weights; the live weights come back after.

        >>> with h.ema_weights():
        ...     h.predict(x)          # or evaluate, sample, export a copy of h.module.state_dict()
        """
        if self._ema is None:
            raise RuntimeError("no EMA weights: train with ema_decay=0.999 (say), or load a checkpoint saved "
                               "with EMA (without skip_ema=True)")
        self._saver.wait_staged()  # (a background save's copy of the weights comes first)
        with self._ema.swapped_into(self._module) as module:
            yield module

    def sample(self, shape: Sequence[int], steps: int = 500, corrector_steps: int = 0, seed: Optional[int] = None,
               *, use_ema: bool = True, progress_bar: Optional[bool] = None, **options: Any) -> torch.Tensor:
        """``shape[0]`` samples of shape ``shape[1:]`` from the model, on the CPU.

        Uses the sampler set with ``set_sampler`` or, for a SCORE_BASED model, the default
        :class:`~nn_handler.sampler.EulerMaruyama` predictor (``steps`` steps from ``T`` to
        ``eps`` of the SDE set with ``set_sde``) with ``corrector_steps`` Langevin corrector
        steps per time. ``seed`` makes the samples reproducible (every random number comes
        from a generator seeded with it); None draws from the global random stream. With EMA
        on (and ``use_ema``) the EMA weights are used and the live weights are left as they
        were. ``progress_bar=None`` shows a bar on rank 0 for long runs (>= 200 model calls).
        ``options`` go to the sampler (``snr=`` for the default one).

        Under DDP every rank must call it: each rank draws its share of the samples (rows
        ``rank, rank + world, ...``, with its own seed derived from ``seed``) and every rank
        gets all of them, gathered in that order.
        """
        from .sampler import EulerMaruyama
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] < 1:
            raise ValueError(f"shape must start with the number of samples (>= 1), got {shape!r}")
        if self._model_type not in (ModelType.SCORE_BASED, ModelType.GENERATIVE):
            raise RuntimeError(f"sample() is for SCORE_BASED and GENERATIVE models; this handler's model_type is "
                               f"{self._model_type}")
        sampler = self._sampler
        if sampler is None:
            if self._model_type is not ModelType.SCORE_BASED:
                raise RuntimeError(self._missing("sampler", "h.set_sampler(YourSampler, **kwargs), a subclass of "
                                                            "nn_handler.sampler.Sampler"))
            if self._sde is None:
                raise RuntimeError(self._missing("sde", "h.set_sde(nn_handler.sde.VPSDE, beta_min=0.1, beta_max=20)"))
            sampler = EulerMaruyama()
        if not callable(getattr(sampler, "sample", None)):
            raise TypeError(f"the sampler {type(sampler).__name__} has no sample() method; subclass "
                            f"nn_handler.sampler.Sampler")
        n, rank, world = shape[0], self._dist.rank, self._dist.world_size
        local_shape = (len(range(rank, n, world)), *shape[1:])
        generator: Optional[torch.Generator] = None
        if seed is not None or self._dist.enabled:
            if seed is None:  # ranks seeded alike must still draw different samples
                seed = int(torch.randint(0, 2 ** 62, (1,)).item())
            generator = torch.Generator(device=self._device)
            generator.manual_seed((int(seed) + 1_000_003 * rank) % 2 ** 63)
        if progress_bar is None:
            progress_bar = int(steps) * (1 + int(corrector_steps)) >= 200
        module = self._module
        was_training = module.training
        if use_ema and self._ema is not None:
            self._saver.wait_staged()  # (a background save's copy of the weights comes first)
        ema = self._ema.swapped_into(module) if (use_ema and self._ema is not None) else contextlib.nullcontext()
        module.eval()
        try:
            with ema, torch.no_grad():
                local = sampler.sample(module, self._sde, local_shape, int(steps), corrector_steps=int(corrector_steps),
                                       generator=generator, device=self._device,
                                       progress_bar=bool(progress_bar) and self._dist.is_main, **options)
        finally:
            module.train(was_training)
        if tuple(local.shape) != local_shape:
            raise RuntimeError(f"{type(sampler).__name__}.sample returned shape {tuple(local.shape)}, "
                               f"expected {local_shape}")
        if self._dist.enabled:
            local = distributed.gather_rows(local.contiguous(), n, self._dist)
        return local.cpu()

    def _grad_scaler_for(self, use_amp: bool) -> Optional[torch.amp.GradScaler]:
        """A GradScaler for float16 autocast on CUDA; CPU autocast uses bfloat16 and needs none."""
        if not (use_amp and self._device.type == "cuda"):
            return None
        if self._grad_scaler is None:
            self._grad_scaler = torch.amp.GradScaler("cuda")
        return self._grad_scaler

    def eval(self) -> "NNHandler":
        """Put the model in evaluation mode."""
        self._model.eval()
        return self

    @torch.no_grad()
    def predict(self, data: Union[torch.Tensor, Dataset, DataLoader], batch_size: int = 256) -> torch.Tensor:
        """The model's outputs for ``data`` (a tensor, Dataset or DataLoader), in order, on the CPU.

        For a dataset of ``(input, target)`` pairs only the inputs are used. Under DDP every
        rank calls it: a tensor or Dataset is split over the ranks (sample i on rank
        i % world_size) and the outputs are gathered, in dataset order and without padding
        duplicates, on every rank; a DataLoader is run whole on each rank.
        """
        if self._model_type is ModelType.SCORE_BASED:
            raise RuntimeError("a SCORE_BASED model is called as model(t, x); draw samples instead of predict()")
        shard = self._dist.enabled and not isinstance(data, DataLoader)
        total = len(data) if shard else 0
        original = data
        if shard:
            rank, world = self._dist.rank, self._dist.world_size
            data = data[rank::world] if isinstance(data, torch.Tensor) else \
                torch.utils.data.Subset(data, range(rank, total, world))
        if isinstance(data, torch.Tensor):
            batches = data.split(batch_size)
        elif isinstance(data, DataLoader):
            batches = data
        else:
            batches = DataLoader(data, batch_size=batch_size, shuffle=False)
        module = self._module
        was_training = module.training
        module.eval()
        def first_input() -> torch.Tensor:  # the data's first input, as a batch of one
            probe = original[0:1] if isinstance(original, torch.Tensor) else original[0]
            x = probe[0] if isinstance(probe, (list, tuple)) else probe
            return x if isinstance(original, torch.Tensor) else x.unsqueeze(0)

        outputs = []
        x = None
        extra = 0
        if self._fsdp is not None:  # a sharded forward is a collective: every rank runs as many (counted first)
            from .train.evaluate import equal_forwards
            extra = equal_forwards(len(batches), self._dist)
        try:
            with autocast_context(self._device, self._settings.use_amp):
                for batch in batches:
                    x = batch[0] if isinstance(batch, (list, tuple)) else batch
                    outputs.append(module(to_device(x, self._device)).float())
                if extra:
                    if x is None:  # this rank's share is empty: its first forward gives the empty rows
                        x = first_input()
                        outputs.append(module(to_device(x, self._device)).float()[:0])
                        extra -= 1
                    for _ in range(extra):
                        module(to_device(x, self._device))
        finally:
            module.train(was_training)
        if shard:
            if not outputs:  # fewer samples than ranks: this rank's rows are all padding
                if total == 0:
                    raise ValueError("predict() got no data")
                outputs.append(module(to_device(first_input(), self._device)).float()[:0])
            return distributed.gather_rows(torch.cat(outputs), total, self._dist).cpu()
        if not outputs:
            raise ValueError("predict() got no data")
        return torch.cat(outputs).cpu()

    # ------------------------------------------------------------------ pictures
    def plot_losses(self, path: Union[str, os.PathLike]) -> None:
        """Write the training (and validation) loss per epoch as a PNG (matplotlib, headless)."""
        from .plotting import plot_losses
        if self._dist.is_main:
            plot_losses(self, path)

    def plot_metrics(self, path: Union[str, os.PathLike]) -> None:
        """Write each metric per epoch, training and validation, as a PNG (matplotlib, headless)."""
        from .plotting import plot_metrics
        if self._dist.is_main:
            plot_metrics(self, path)

    # ------------------------------------------------------------------ checkpoints
    def parts(self, context: Optional[parts.LoadContext] = None) -> Dict[str, Any]:
        """The handler's state by name (the checkpoint's keys), each part Stateful (``state_dict()`` and
        ``load_state_dict(state)``); ``context`` says what a load may build from a file and where to tell
        what it cannot restore. Everything ``save`` writes besides ``header()``."""
        from .sampler import Sampler
        from .sde import SDE
        ctx = context or parts.LoadContext(path="<state_dict>", warn=self._warn, not_restored=self._not_restored,
                                           rank=self.rank, is_main=self._dist.is_main)
        records = self._records

        def record(name: str) -> Callable[[], parts.Record]:
            return lambda: records.get(name, (None, None))

        def component(name: str, attr: str, setter: Callable[..., None], expected: Any, **options: Any) -> parts.Component:
            return parts.Component(name, lambda: getattr(self, attr), record(name), setter, expected, context=ctx,
                                   **options)

        schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        return {
            F.MODEL_STATE: parts.Weights(self._module, lambda weights: None),  # built with the model (loading)
            F.OPTIMIZER: parts.OptimizerPart("optimizer", lambda: self._optimizer, record("optimizer"), self.set_optimizer,
                                             torch.optim.Optimizer, context=ctx, model=lambda: self._module),
            F.SCHEDULER: component("scheduler", "_scheduler", self.set_scheduler, schedulers),
            F.GRAD_SCALER: parts.GradScaler(lambda: self._grad_scaler, lambda: self._grad_scaler_for(True)),
            F.LOSS: component("loss_fn", "_loss_fn", self.set_loss_fn, nn.Module, functions=True, stateful=False),
            F.METRICS: parts.Metrics(self._metrics, records, self.add_metric, context=ctx),
            F.HISTORY: self._history,
            F.CALLBACKS: parts.Callbacks(self._callbacks, self.add_callback, context=ctx),
            F.SDE: component("sde", "_sde", self.set_sde, SDE),
            F.SAMPLER: component("sampler", "_sampler", self.set_sampler, Sampler),
            F.EMA: parts.EmaWeights(lambda: self._ema, self._put_ema, self._module, context=ctx),
            F.SETTINGS: self._settings,
            F.PROGRESS: parts.ProgressPart(self._progress, rank=self.rank),
            F.DATA: parts.Data(self._data, lambda name, spec, options, trust: self._set_loader(
                name, spec, options, from_file=True, trusted=trust), context=ctx),
            F.RNG: parts.RandomStreams(rank=self.rank),
            F.METADATA: parts.Metadata(lambda: self.metadata, self._put_metadata),
        }

    def header(self) -> Dict[str, Any]:
        """The plain records a checkpoint holds besides the parts: world size and the model's spec."""
        spec, reason = self._records["model"]
        model: Dict[str, Any] = {"spec": spec, "model_type": str(self.model_type)}
        if spec is None:  # the class's name and plain kwargs, so that a load can say what to pass
            name, kwargs = self._model_origin
            model["name"] = name
            if not specs.plain_problem(specs.to_plain(kwargs), "kwargs"):
                model["kwargs"] = specs.to_plain(kwargs)
        return {F.WORLD_SIZE: self.world_size, F.MODEL: model,
                F.STRATEGY: self._fsdp.record() if self._fsdp is not None else {"strategy": self.strategy},
                F.UNRECORDED: {} if spec is not None else {"model": reason or "not recordable"}}

    def _put_ema(self, ema: Optional[EMA]) -> None:
        self._ema = ema

    def _put_metadata(self, metadata: Dict[str, Any]) -> None:
        self.metadata = metadata

    def _drop(self, component: str) -> None:
        """Unset a component a load built but could not give its state (its record goes too)."""
        setattr(self, f"_{component}", None)
        self._records.pop(component, None)

    def state_dict(self) -> Dict[str, Any]:
        """The whole handler as plain data (what ``save`` writes)."""
        from .checkpointing.save import assemble
        return assemble(self.parts(), self.header())

    def save(self, path: Union[str, os.PathLike], *, sharded: Optional[bool] = None, asynchronous: bool = False,
             after: Optional[Callable[[], None]] = None) -> None:
        """Write the whole handler to ``path`` atomically. Under DDP rank 0 writes and every rank waits.

        ``sharded=True`` (the default for a path ending in ``.dcp``) writes a directory of
        ``torch.distributed.checkpoint`` shards, each rank its own, committed by one rename; it loads on
        any number of ranks, under any strategy. ``asynchronous=True`` copies the state now and writes it
        in a background thread while training goes on (at most one save in flight: the next save, the
        end of ``train`` and ``wait_for_save()`` wait for it, and raise its error). ``after`` runs on rank
        0 once the checkpoint is complete (in the background thread for an asynchronous save).
        """
        from .checkpointing import sharded as shards
        from .checkpointing.save import finish_staging, snapshot, write
        if sharded is None:
            sharded = os.fspath(path).rstrip("/").endswith(shards.SUFFIX) or shards.is_sharded(path)
        sharded = bool(sharded)
        self._saver.wait()  # at most one in flight; its error is raised here, on every rank
        if not asynchronous:
            write(snapshot(self.parts(), self.header(), self._dist, sharded=sharded), path, self._dist, self._warn,
                  sharded=sharded)
            if after is not None and self._dist.is_main:
                after()
        else:
            group = self._saver.group() if sharded else None
            # Inside train the weights, optimizer state and EMA change only at the next optimizer step, which
            # waits for the background thread to have copied them (``before_update``): they are copied there.
            later = self._live_storages() if self._defer_staging else None
            snap = snapshot(self.parts(), self.header(), self._dist, sharded=sharded, stage=True, later=later)
            info, warn, main = self._dist, self._warn, self._dist.is_main

            def stage() -> None:
                snap.state, snap.tensors = finish_staging(snap.state), finish_staging(snap.tensors)

            def write_in_background() -> Optional[BaseException]:
                error = write(snap, path, info, warn, group=group, sharded=sharded, agree=False)
                if error is None and after is not None and main:
                    after()
                return error

            self._saver.submit(write_in_background, path, stage=stage if later else None)
        for cb in dispatch(self._callbacks, "on_save"):
            cb.on_save(self, os.fspath(path))

    def _live_storages(self) -> set:
        """The storages that only an optimizer step (and the EMA update after it) changes."""
        from .checkpointing.save import storages
        trees: List[Any] = [list(self._module.parameters())]
        if self._optimizer is not None:
            trees.append([dict(s) for s in self._optimizer.state.values()])
        if self._ema is not None:
            trees.append(self._ema.sharded_state()[1])
        return storages(*trees)

    @property
    def saving(self) -> bool:
        """An asynchronous save is still being written (``wait_for_save`` would wait)."""
        return self._saver.writing

    def wait_for_save(self) -> None:
        """Wait for an asynchronous save in flight (every rank calls it); raise its error if it failed on any rank."""
        self._saver.wait()

    @classmethod
    def load(cls, path: Union[str, os.PathLike, "CheckpointFile"], device: DeviceLike = None,
             strict_load: bool = False, skip_optimizer: bool = False, skip_scheduler: bool = False,
             skip_history: bool = False, skip_callbacks: bool = False, skip_sampler_sde: bool = False,
             skip_ema: bool = False, *, model_class: Optional[Callable[..., nn.Module]] = None,
             model_kwargs: Optional[Dict[str, Any]] = None, model_type: Optional[Union[ModelType, str]] = None,
             mmap: bool = False, trusted_packages: Sequence[str] = (), strategy: Any = None) -> "NNHandler":
        """A handler rebuilt from a file written by ``save``; each ``skip_*`` leaves that part fresh.

        ``path`` may be an open ``nn_handler.checkpointing.CheckpointFile`` (then it is read through,
        and verified at most once). The keyword-only ``model_class``/``model_kwargs``/``model_type``
        build that model instead of the recorded one (a new head for transfer learning, say); its
        weights then load under ``strict_load``. ``mmap=True`` adopts the file's memory-mapped
        tensors without copying them (fastest; the file must then not be rewritten in place while
        the handler lives, which ``save`` never does). A file may name, besides classes of each
        component's own kind, only nn_handler's and torch's own building blocks and what lives in the
        model's package or in ``trusted_packages``.

        ``path`` may be a sharded checkpoint (a ``.dcp`` directory), saved by any number of ranks: it
        loads on this job's ranks, resharded. ``strategy`` ("ddp", "fsdp" or an ``FSDP`` policy) says how
        to spread the model over a job's ranks; by default as the checkpoint was (FSDP when it was sharded
        with FSDP), replicated otherwise.
        """
        from .loading import load
        leave_out = parts.left_out(skip_optimizer=skip_optimizer, skip_scheduler=skip_scheduler,
                                   skip_history=skip_history, skip_callbacks=skip_callbacks,
                                   skip_sampler_sde=skip_sampler_sde, skip_ema=skip_ema)
        return load(cls, path, device=device, strict_load=strict_load, leave_out=leave_out, model_class=model_class,
                    model_kwargs=model_kwargs, model_type=model_type, mmap=mmap, trusted_packages=trusted_packages,
                    strategy=strategy)

    @classmethod
    def initialize_from_checkpoint(cls, checkpoint_path: Union[str, os.PathLike],
                                   model_class: Optional[Callable[..., nn.Module]] = None,
                                   model_type: Optional[Union[ModelType, str]] = None, device: DeviceLike = None,
                                   strict_load: bool = True, *, prefix: Optional[str] = None,
                                   trusted_packages: Sequence[str] = (), **model_kwargs: Any) -> "NNHandler":
        """A new handler with only the model weights from ``checkpoint_path``: a handler file, a state_dict,
        a PyTorch Lightning ``.ckpt`` (``prefix="model."`` picks the weights under that prefix), a
        ``{"state_dict": ...}`` or ``{"model": ...}`` dict, or a safetensors file (``export``'s too).
        Without ``model_class`` the model the file records is rebuilt under ``load``'s trust rules."""
        from .loading import initialize_from_checkpoint
        return initialize_from_checkpoint(cls, checkpoint_path, model_class, model_type=model_type, device=device,
                                          strict_load=strict_load, prefix=prefix, trusted_packages=trusted_packages,
                                          **model_kwargs)

    @classmethod
    def convert(cls, source: Union[str, os.PathLike], target: Union[str, os.PathLike], *,
                trusted_packages: Sequence[str] = (), model_class: Optional[Callable[..., nn.Module]] = None,
                model_kwargs: Optional[Dict[str, Any]] = None) -> str:
        """Consolidate a sharded checkpoint (a ``.dcp`` directory) into one file, or shard one file (a
        ``target`` ending in ``.dcp``), in one process; returns ``target``. The whole handler is loaded
        (``load``'s trust rules apply) and saved in the other form, its per-rank records carried over, so
        a job of the source's size resumes the result as it would the source."""
        from .loading import convert
        return convert(cls, source, target, trusted_packages=trusted_packages, model_class=model_class,
                       model_kwargs=model_kwargs)

    def export(self, path: Union[str, os.PathLike], ema: bool = True) -> "os.PathLike[str]":
        """Write the model's weights to ``path`` as safetensors (the EMA weights when there are any,
        unless ``ema=False``), with the model's spec in the file's metadata, atomically.

        ``safetensors.torch.load_file(path)`` reads it, and so do ``initialize_from_checkpoint`` and
        ``load`` (which rebuild the recorded model under the usual trust rules). Needs the
        ``safetensors`` package (``pip install 'nn-handler[interop]'``). Under DDP every rank calls it.
        """
        from .interop import export
        return export(self, path, ema=ema)

    # ------------------------------------------------------------------ logging and messages
    def _configure_logging(self, mode: Optional[LoggingMode]) -> None:
        if mode is None or not self._dist.is_main:
            return
        for handler in list(logger.handlers):
            if getattr(handler, "_nn_handler", False):
                logger.removeHandler(handler)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        targets: List[logging.Handler] = []
        if mode in (LoggingMode.CONSOLE, LoggingMode.BOTH):
            targets.append(logging.StreamHandler())
        if mode in (LoggingMode.FILE, LoggingMode.BOTH):
            targets.append(logging.FileHandler(os.environ.get("NN_HANDLER_LOG_FILE", "nn_handler.log")))
        for target in targets:
            target.setFormatter(fmt)
            target._nn_handler = True  # type: ignore[attr-defined]
            logger.addHandler(target)
        logger.setLevel(logging.INFO)

    def _log_epoch(self, logs: Dict[str, float]) -> None:
        if self._dist.is_main and logger.isEnabledFor(logging.INFO):
            logger.info("epoch %d: %s", self.epoch, ", ".join(f"{k}={v:.6g}" for k, v in logs.items()))

    def _warn(self, message: str) -> None:
        if self._dist.is_main:
            warnings.warn(message, NNHandlerWarning, stacklevel=3)  # once: an application routes
            # warnings to its logs with logging.captureWarnings (the runner does)

    def _missing(self, component: str, how: str) -> str:
        why = self._not_restored.get(component)
        text = f"no {component} is set: set it with {how}"
        return f"{text} ({why})" if why else text

    def __repr__(self) -> str:
        return (f"NNHandler({type(self._module).__name__}, device={self._device}, model_type={self._model_type}, "
                f"epoch={self.epoch}, world_size={self.world_size})")
