"""The two enumerations of the public API."""
from __future__ import annotations

from enum import Enum
from typing import Optional, Union


class _CaseInsensitiveEnum(str, Enum):
    """An enum whose members are also accepted as case-insensitive strings."""

    @classmethod
    def coerce(cls, value: Union["_CaseInsensitiveEnum", str]):
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key or member.name.lower() == key:
                    return member
        choices = ", ".join(m.name for m in cls)
        raise ValueError(f"invalid {cls.__name__} {value!r}: expected one of {choices} (any case)")

    def __str__(self) -> str:  # "classification", not "ModelType.CLASSIFICATION"
        return self.value


class ModelType(_CaseInsensitiveEnum):
    """What the model does, which decides how a batch becomes a loss."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    GENERATIVE = "generative"
    SCORE_BASED = "score_based"


class LoggingMode(_CaseInsensitiveEnum):
    """Where the handler sends its log records (rank 0 only)."""

    CONSOLE = "console"
    FILE = "file"
    BOTH = "both"


def coerce_model_type(value: Optional[Union[ModelType, str]]) -> ModelType:
    return ModelType.CLASSIFICATION if value is None else ModelType.coerce(value)


def coerce_logging_mode(value: Optional[Union[LoggingMode, str]]) -> Optional[LoggingMode]:
    return None if value is None else LoggingMode.coerce(value)
