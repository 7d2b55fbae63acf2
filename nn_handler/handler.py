"""NNHandler: one object that owns a model and everything around its training.

The handler is a facade: the loop lives in ``training``, the checkpoint format in
``checkpointing``, the distributed policy in ``distributed``, recording components as
plain data in ``specs``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed, rng, specs, training
from .callbacks.base import Callback
from .data import DataSlot, build_dataset, build_loader
from .ema import EMA
from .enums import LoggingMode, ModelType, coerce_logging_mode, coerce_model_type
from .history import History

DeviceLike = Optional[Union[str, torch.device]]
logger = logging.getLogger("nn_handler")


# A module already holding its weights (the checkpoint fast path), used by the next constructor call.
_PREBUILT: "contextvars.ContextVar[Optional[nn.Module]]" = contextvars.ContextVar("nn_handler_prebuilt", default=None)


@contextlib.contextmanager
def prebuilt_module(module: Optional[nn.Module]):
    """Make ``NNHandler(...)`` inside the block adopt ``module`` instead of building one."""
    token = _PREBUILT.set(module)
    try:
        yield
    finally:
        _PREBUILT.reset(token)


class NNHandlerWarning(UserWarning):
    """A component could not be recorded or restored; the message says which and what to do."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under any DDP (``module``) or torch.compile (``_orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


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
                 use_distributed: Optional[bool] = None, **model_kwargs: Any):
        if isinstance(model_class, nn.Module):
            raise TypeError("NNHandler takes the model's class and its keyword arguments, not a built model: "
                            f"NNHandler({type(model_class).__name__}, **kwargs)")
        if not callable(model_class):
            raise TypeError(f"model_class must be an nn.Module class, got {model_class!r}")
        self._dist = distributed.setup(use_distributed)
        self._device = distributed.resolve_device(device, self._dist)
        self._model_type = coerce_model_type(model_type)
        self.logger = logger
        self._configure_logging(coerce_logging_mode(logger_mode))
        module = _PREBUILT.get()
        _PREBUILT.set(None)  # adopted once
        adopted = module is not None
        if module is None:
            module = model_class(**model_kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"model_class {model_class!r} built a {type(module).__name__}, not an nn.Module")
        module = module.to(self._device)
        self._module = _unwrap(module)  # the user's own module, under e.g. a factory's torch.compile
        self._model: nn.Module = module
        if self._dist.enabled:
            ids = [self._device.index] if self._device.type == "cuda" else None
            # A module adopted from a checkpoint holds the same verified weights on every rank:
            # DDP's initial broadcast of rank 0's parameters would only copy them again.
            self._model = nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                              **({"init_sync": False} if adopted else {}))
        # Each component's record: name -> (spec or None, reason it could not be recorded).
        # ``load`` rebuilds only nn.Module classes, so a factory function is not recordable.
        model_record = (specs.record(model_class, model_kwargs) if isinstance(model_class, type) else
                        (None, f"model_class {getattr(model_class, '__qualname__', model_class)!r} is a function, "
                               f"not an nn.Module class"))
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
        self._settings = training.TrainSettings()
        self._history = History()
        self._data: Dict[str, DataSlot] = {"train": DataSlot("train"), "val": DataSlot("val")}
        self._data_seed: Optional[int] = None
        # Components a loaded checkpoint could not restore: name -> why (told again when they are needed).
        self._not_restored: Dict[str, str] = {}
        # Plain data saved with every checkpoint and restored by load: run id, lineage, the run's config.
        from .checkpointing.store import lineage_for  # checkpointing imports this module
        self.metadata: Dict[str, Any] = {"lineage": lineage_for(None, None)}
        # Inside an epoch: where the loop is (saved by a mid-epoch checkpoint); after load: where to go on.
        self._position: Optional[training.Position] = None
        self._resume_position: Optional[Dict[str, Any]] = None
        self.epoch = 0
        self.global_step = 0
        self.stop_training = False

    # ------------------------------------------------------------------ read-only views
    @property
    def model(self) -> nn.Module:
        """The model as trained (wrapped in DistributedDataParallel under DDP)."""
        return self._model

    @property
    def module(self) -> nn.Module:
        """The user's own module, unwrapped."""
        return self._module

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

    def set_loss_fn(self, loss_fn: Callable, **kwargs: Any) -> None:
        """A loss class (built with ``kwargs``) or a function (``kwargs`` bound to it)."""
        if isinstance(loss_fn, nn.Module):
            built, record = loss_fn, (None, f"the loss was given as a built {type(loss_fn).__name__}; "
                                            f"pass the class and its kwargs to record it")
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
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must subclass nn_handler.callbacks.Callback, got {callback!r}")
        self._callbacks.append(callback)

    def set_sde(self, sde_class: Optional[type], **kwargs: Any) -> None:
        self._sde = None if sde_class is None else sde_class(**kwargs)
        self._records["sde"] = specs.record(sde_class, kwargs) if sde_class is not None else (None, None)

    def set_sampler(self, sampler_class: Optional[type], **kwargs: Any) -> None:
        self._sampler = None if sampler_class is None else sampler_class(**kwargs)
        self._records["sampler"] = specs.record(sampler_class, kwargs) if sampler_class is not None else (None, None)

    def set_train_loader(self, dataset: Union[Dataset, Mapping[str, Any], None] = None, **dataloader_kwargs: Any) -> None:
        """A Dataset, or a spec ``{"_target_": "pkg.mod.fn", **kwargs}`` that builds one, plus DataLoader options.

        After ``load`` the recorded options are reused when none are given.
        """
        self._set_loader("train", dataset, dataloader_kwargs)

    def set_val_loader(self, dataset: Union[Dataset, Mapping[str, Any], None] = None, **dataloader_kwargs: Any) -> None:
        self._set_loader("val", dataset, dataloader_kwargs)

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
              keep_last: Optional[int] = None, handle_signals: Optional[bool] = None) -> None:
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
        """
        if int(epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs!r}")
        self._settings = self._settings.updated(
            validate_every=validate_every, gradient_accumulation_steps=gradient_accumulation_steps, use_amp=use_amp,
            gradient_clipping_norm=gradient_clipping_norm, ema_decay=ema_decay, validate_with_ema=validate_with_ema)
        if ema_decay is not None and not ema_decay:
            self._settings.ema_decay = None
        if gradient_clipping_norm is not None and not gradient_clipping_norm:
            self._settings.gradient_clipping_norm = None
        if seed is not None:
            rng.seed_everything(int(seed))
            self._data_seed = int(seed)
        elif self._data_seed is None:
            # Like RandomSampler: draw from the global stream, so torch.manual_seed fixes the order.
            self._data_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._data_seed = distributed.broadcast_object(self._data_seed, self._dist)
        store = None
        if checkpoint_dir is not None:
            from .checkpointing.store import CheckpointStore
            store = checkpoint_dir if isinstance(checkpoint_dir, CheckpointStore) else \
                CheckpointStore(checkpoint_dir, keep_last=keep_last)
        elif save_every_n_steps or save_every_n_epochs:
            raise ValueError("save_every_n_steps / save_every_n_epochs need a checkpoint_dir")
        if handle_signals is None:
            handle_signals = store is not None
        if epochs:
            training.run(self, int(epochs), progress_bar, store=store, every_n_steps=save_every_n_steps,
                         every_n_epochs=save_every_n_epochs, handle_signals=handle_signals)

    def _ensure_ema(self, decay: Optional[float]) -> Optional[EMA]:
        if not decay:
            self._ema = None
        elif self._ema is None:
            self._ema = EMA(self._module, decay)
        elif self._ema.decay != decay:
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
        outputs = []
        try:
            with training.autocast_context(self, self._settings.use_amp):
                for batch in batches:
                    x = batch[0] if isinstance(batch, (list, tuple)) else batch
                    outputs.append(module(training.to_device(x, self._device)).float())
        finally:
            module.train(was_training)
        if shard:
            if not outputs:  # fewer samples than ranks: this rank's rows are all padding
                if total == 0:
                    raise ValueError("predict() got no data")
                probe = original[0:1] if isinstance(original, torch.Tensor) else original[0]
                x = probe[0] if isinstance(probe, (list, tuple)) else probe
                x = x if isinstance(original, torch.Tensor) else x.unsqueeze(0)
                outputs.append(module(training.to_device(x, self._device)).float()[:0])
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
    def state_dict(self) -> Dict[str, Any]:
        """The whole handler as plain data (what ``save`` writes)."""
        from .checkpointing.state import dump
        return dump(self)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the whole handler to ``path`` atomically. Under DDP rank 0 writes and every rank waits."""
        from .checkpointing import save
        save(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: DeviceLike = None, strict_load: bool = False,
             skip_optimizer: bool = False, skip_scheduler: bool = False, skip_history: bool = False,
             skip_callbacks: bool = False, skip_sampler_sde: bool = False, skip_ema: bool = False, *,
             model_class: Optional[Callable[..., nn.Module]] = None, model_kwargs: Optional[Dict[str, Any]] = None,
             model_type: Optional[Union[ModelType, str]] = None, mmap: bool = False,
             trusted_packages: Sequence[str] = ()) -> "NNHandler":
        """A handler rebuilt from a file written by ``save``; each ``skip_*`` leaves that part fresh.

        The keyword-only ``model_class``/``model_kwargs``/``model_type`` build that model
        instead of the recorded one (a new head for transfer learning, say); its weights
        then load under ``strict_load``. ``mmap=True`` adopts the file's memory-mapped
        tensors without copying them (fastest; the file must then not be rewritten in
        place while the handler lives, which ``save`` never does). A file may name, besides
        classes of each component's own kind, only nn_handler's and torch's own building
        blocks and what lives in the model's package or in ``trusted_packages``.
        """
        from .checkpointing import load
        return load(cls, path, device=device, strict_load=strict_load, skip_optimizer=skip_optimizer,
                    skip_scheduler=skip_scheduler, skip_history=skip_history, skip_callbacks=skip_callbacks,
                    skip_sampler_sde=skip_sampler_sde, skip_ema=skip_ema, model_class=model_class,
                    model_kwargs=model_kwargs, model_type=model_type, mmap=mmap,
                    trusted_packages=trusted_packages)

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
        from .checkpointing import initialize_from_checkpoint
        return initialize_from_checkpoint(cls, checkpoint_path, model_class, model_type=model_type, device=device,
                                          strict_load=strict_load, prefix=prefix, trusted_packages=trusted_packages,
                                          **model_kwargs)

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
