"""The runner's one error type, and the mapping of the library's errors about the user's inputs onto it."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from hydra.errors import CompactHydraException

from nn_handler import specs
from nn_handler.checkpointing import CheckpointError, UnsafeCheckpointError


class RunnerError(CompactHydraException):
    """A mistake in the config or the inputs (key, path, target), told in one message.

    Hydra prints only the message of a ``CompactHydraException`` (no traceback) unless
    ``HYDRA_FULL_ERROR=1`` is set, and exits non-zero.
    """


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The library's errors about the user's inputs become one-line RunnerErrors."""
    try:
        yield
    except RunnerError:
        raise
    except UnsafeCheckpointError as exc:
        refusal = getattr(exc, "refusal", None)
        if refusal is None:
            raise RunnerError(f"cannot use the checkpoint: {exc}") from exc
        raise RunnerError(f"cannot use the checkpoint {exc.path}: {refusal}{trust_hint(exc)}") from exc
    except specs.UntrustedTarget as exc:
        raise RunnerError(f"{exc}{trust_hint(exc)}") from exc
    except CheckpointError as exc:
        raise RunnerError(f"cannot use the checkpoint: {exc}") from exc
    except specs.SpecError as exc:
        raise RunnerError(str(exc)) from exc
    except OSError as exc:  # a missing file, a full disk or a permission error during a save: the
        raise RunnerError(str(exc)) from exc  # library's message names the path and what is intact


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """``exc`` as one line: its message (a RunnerError's as is, others after their type name), lines joined."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, RunnerError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trust_hint(exc: Any) -> str:
    """How to allow a refused target from the command line, when the user trusts the file."""
    how = []
    if getattr(exc, "package", None):
        how.append(f"add load.trusted_packages=[{exc.package}]")
    if getattr(exc, "skip_flag", None):
        how.append(f"add load.{exc.skip_flag}=true to leave it out")
    return f" (if you trust this file: {', or '.join(how)})" if how else ""
