"""The Callback base: hooks into the training loop, state that survives save/load."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


class Callback:
    """Subclass and override the hooks you need.

    The base records the arguments a subclass was constructed with (``init_kwargs``), so
    a checkpoint can re-create the callback; a subclass needs only its own ``__init__``.
    State that changes during training belongs in ``state_dict``/``load_state_dict``.
    A hook may set ``handler.stop_training = True`` to end training after the epoch.
    A callback class with ``recorded = False`` (progress, logging) is left out of checkpoints.
    """

    recorded: bool = True

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        kwargs_record: Dict[str, Any] = {}
        problem: Optional[str] = None
        try:
            bound = inspect.signature(cls).bind(*args, **kwargs)
        except TypeError:
            bound = None  # __init__ will raise the real error
        if bound is not None:
            params = inspect.signature(cls).parameters
            for name, value in bound.arguments.items():
                kind = params[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        problem = f"{cls.__qualname__} takes *{name}, which cannot be recorded as keywords"
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    kwargs_record.update(value)
                else:
                    kwargs_record[name] = value
        obj._init_kwargs = kwargs_record
        obj._init_problem = problem
        return obj

    @property
    def init_kwargs(self) -> Dict[str, Any]:
        """The constructor arguments, by name, that re-create this callback."""
        return dict(getattr(self, "_init_kwargs", {}))

    # Hooks. ``epoch`` is the 0-based index of the epoch over the handler's whole life;
    # ``logs`` carries the epoch's losses and metrics ("loss", "val_loss", "lr", names).
    # The loop calls a hook only on callbacks that override it, so an unused hook costs nothing.
    def on_train_begin(self, handler: "NNHandler") -> None:
        """Fit start: before the first epoch of a ``train`` call."""

    def on_train_end(self, handler: "NNHandler") -> None:
        """Fit end: after the last epoch of a ``train`` call (not after a pre-emption)."""

    def on_epoch_begin(self, handler: "NNHandler", epoch: int) -> None: ...
    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None: ...

    def on_batch_begin(self, handler: "NNHandler", batch: int) -> None:
        """Train batch start; ``batch`` is its index in the epoch."""

    def on_batch_end(self, handler: "NNHandler", batch: int, logs: Dict[str, Any]) -> None:
        """Train batch end; ``logs``: "loss" (a tensor: call ``.item()`` only when needed, it syncs
        the device), "batch_size", "global_step"."""

    def on_before_optimizer_step(self, handler: "NNHandler", optimizer: Any) -> None:
        """After the group's backward passes, before clipping and the step: the gradients are
        there, unscaled under AMP."""

    def on_after_optimizer_step(self, handler: "NNHandler", global_step: int) -> None:
        """After the step (gradients zeroed, EMA updated); ``global_step`` counts it."""

    def on_validation_begin(self, handler: "NNHandler", epoch: int) -> None: ...

    def on_validation_batch_end(self, handler: "NNHandler", batch: int, logs: Dict[str, Any]) -> None:
        """``logs``: "loss" (a tensor) and "batch_size" of this rank's validation batch."""

    def on_validation_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        """``logs``: "val_loss" and "val_<metric>" of the epoch."""

    def on_save(self, handler: "NNHandler", path: str) -> None:
        """After ``handler.save(path)`` wrote the file (on every rank)."""

    def on_load(self, handler: "NNHandler", path: str) -> None:
        """After ``NNHandler.load(path)`` restored the handler this callback was restored into (just
        before the random streams are restored, so drawing random numbers here changes nothing)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
        return f"{type(self).__name__}({args})"


HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin", "on_batch_end",
         "on_before_optimizer_step", "on_after_optimizer_step", "on_validation_begin", "on_validation_batch_end",
         "on_validation_end", "on_save", "on_load")


def overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` implements ``hook`` (so the loop calls only what does something)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def dispatch(callbacks: List[Callback], hook: str) -> List[Callback]:
    """The callbacks that implement ``hook``, in order."""
    return [cb for cb in callbacks if overrides(cb, hook)]


# Names users bring from other libraries (Lightning, Keras), and their hook here.
_ALIASES = {"on_fit_start": "on_train_begin", "on_fit_end": "on_train_end", "on_train_start": "on_train_begin",
            "on_train_batch_start": "on_batch_begin", "on_train_batch_begin": "on_batch_begin",
            "on_train_batch_end": "on_batch_end", "on_train_epoch_start": "on_epoch_begin",
            "on_train_epoch_end": "on_epoch_end", "on_validation_start": "on_validation_begin",
            "on_validation_epoch_start": "on_validation_begin", "on_validation_epoch_end": "on_validation_end",
            "on_save_checkpoint": "on_save", "on_load_checkpoint": "on_load", "on_test_batch_end": "on_validation_batch_end"}


def _closest_hook(name: str, difflib: Any) -> Optional[str]:
    if name in _ALIASES:
        return _ALIASES[name]
    for wrong, right in (("_start", "_begin"), ("_stop", "_end"), ("_finish", "_end")):
        fixed = name.replace(wrong, right)
        if fixed in HOOKS:
            return fixed
    close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_hooks(callback: Callback) -> List[Tuple[str, Optional[str]]]:
    """Methods of ``callback``'s class that look like hooks (``on_...``) but are none:
    ``(name, the closest hook or None)``; the loop would never call them."""
    import difflib
    found = []
    for cls in type(callback).__mro__:
        if cls is Callback or cls is object:
            continue
        for name, value in vars(cls).items():
            if name.startswith("on_") and callable(value) and name not in HOOKS and name not in (n for n, _ in found):
                found.append((name, _closest_hook(name, difflib)))
    return found
