"""Errors shared across nn_handler (a leaf module: it imports nothing from the package)."""
from __future__ import annotations

import os
from typing import Union


class SettingError(ValueError):
    """A setting was given a value it cannot take; ``name`` says which setting."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# ---------------------------------------------------------------------------- checkpoint files
class CheckpointError(RuntimeError):
    """Something is wrong with a checkpoint file; ``path`` says which."""

    def __init__(self, path: Union[str, os.PathLike, None], message: str):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{message} (checkpoint: {self.path})" if self.path else message)


class UnsafeCheckpointError(CheckpointError):
    """The file needs more than plain tensors and containers to load (pickled code or objects)."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged: truncated, unreadable, or its contents do not match their checksum."""


class NotACheckpointError(CheckpointError):
    """The file is not a checkpoint of the kind asked for (not a PyTorch file, or not a handler file)."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is intact but does not fit: format version, keys or shapes."""
