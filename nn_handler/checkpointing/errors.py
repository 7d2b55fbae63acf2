"""The errors a checkpoint can raise (defined in the leaf ``nn_handler.errors``). Each names the path it is about."""
from __future__ import annotations

from ..errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)

__all__ = ["CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError", "NotACheckpointError",
           "IncompatibleCheckpointError"]
