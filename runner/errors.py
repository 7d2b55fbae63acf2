"""The runner's one error type: a user's mistake, reported as one clear line."""
from __future__ import annotations

from hydra.errors import CompactHydraException


class RunnerError(CompactHydraException):
    """A mistake in the config or the inputs (key, path, target), told in one message.

    Hydra prints only the message of a ``CompactHydraException`` (no traceback) unless
    ``HYDRA_FULL_ERROR=1`` is set, and exits non-zero.
    """
