"""What ``train`` keeps between calls (and across save/load): validation cadence, accumulation, AMP,
clipping, EMA."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from ..errors import SettingError


@dataclass
class TrainSettings:
    """What ``train`` keeps between calls (and across save/load) unless told otherwise.

    Stateful (``state_dict``/``load_state_dict``, as torch.distributed.checkpoint expects), with
    plain values only.
    """

    validate_every: int = 1
    gradient_accumulation_steps: int = 1
    use_amp: bool = False
    gradient_clipping_norm: Optional[float] = None  # None or 0: no clipping
    ema_decay: Optional[float] = None  # None or 0: no EMA
    validate_with_ema: bool = False  # validation loss and metrics with the EMA weights (when EMA is on)

    def updated(self, **changes: Any) -> "TrainSettings":
        """A copy with every change that is not None applied, validated (``SettingError`` names the setting)."""
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        new = TrainSettings(**values)
        if int(new.validate_every) < 1:
            raise SettingError("validate_every", f"validate_every must be >= 1, got {new.validate_every!r}")
        if int(new.gradient_accumulation_steps) < 1:
            raise SettingError("gradient_accumulation_steps", "gradient_accumulation_steps must be >= 1, got "
                                                              f"{new.gradient_accumulation_steps!r}")
        if new.gradient_clipping_norm is not None and float(new.gradient_clipping_norm) < 0:
            raise SettingError("gradient_clipping_norm",
                               f"gradient_clipping_norm must be >= 0, got {new.gradient_clipping_norm!r}")
        if new.ema_decay is not None and not 0.0 <= float(new.ema_decay) < 1.0:
            raise SettingError("ema_decay", f"ema_decay must be in [0, 1), got {new.ema_decay!r} (0 turns EMA off)")
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
        """The defaults with the known keys of ``values`` applied, validated; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls().updated(**{k: v for k, v in values.items() if k in known})

    # The Stateful protocol of torch.distributed.checkpoint.
    def state_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Become ``from_dict(state)``, in place (so references to this object see the loaded values)."""
        loaded = type(self).from_dict(state)
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))
