"""The Callback base: hooks into the training loop, state that survives save/load."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, Optional

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
    def on_train_begin(self, handler: "NNHandler") -> None: ...
    def on_train_end(self, handler: "NNHandler") -> None: ...
    def on_epoch_begin(self, handler: "NNHandler", epoch: int) -> None: ...
    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None: ...
    def on_batch_begin(self, handler: "NNHandler", batch: int) -> None: ...
    def on_batch_end(self, handler: "NNHandler", batch: int, logs: Dict[str, Any]) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
        return f"{type(self).__name__}({args})"


HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin", "on_batch_end")


def overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` implements ``hook`` (so the loop calls only what does something)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)
