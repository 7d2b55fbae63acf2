"""Bytes on disk: atomic writes and safe reads. Knows nothing about handlers."""
from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError

PathLike = Union[str, os.PathLike]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save(_use_new_zipfile_serialization=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is always either the old file or the new one.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and
    the temporary file replaces ``path`` in one rename; the directory is fsynced after.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def check_readable_file(path: PathLike) -> Path:
    """Raise the right error for a path that is missing, a directory, or empty."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
    if path.is_dir():
        raise NotACheckpointError(path, "expected a checkpoint file, found a directory")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(path, "the file is empty (an interrupted write?)")
    return path


def safe_load(path: PathLike, map_location: Optional[Union[str, torch.device]] = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError.

    Nothing in the file is unpickled beyond tensors and plain containers, so no code from
    it can run.
    """
    path = check_readable_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC and head != _LEGACY_MAGIC:
        raise NotACheckpointError(path, "not a PyTorch checkpoint (unknown file signature)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and head == _ZIP_MAGIC)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "unsupported" in text.lower():
            first = text.strip().splitlines()
            detail = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
            raise UnsafeCheckpointError(
                path, f"refused to load: the file holds pickled objects or code, not only tensors and "
                      f"plain data ({detail.strip()})") from None
        raise CorruptCheckpointError(path, f"the file cannot be unpickled ({text.splitlines()[0] if text else exc!r})") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CorruptCheckpointError(path, f"the file is truncated or damaged ({exc})") from None
    except RuntimeError as exc:
        raise CorruptCheckpointError(path, f"the file is truncated or damaged ({str(exc).splitlines()[0]})") from None
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise CorruptCheckpointError(path, f"the file is damaged ({type(exc).__name__}: {exc})") from None
