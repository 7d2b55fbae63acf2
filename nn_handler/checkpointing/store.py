"""A run's checkpoint directory: naming, ``last.pth``, the newest valid checkpoint, retention.

Files are named by training progress (``ckpt-e0003-s000000120.pth``: epoch 3, global step
120), so order never depends on file times. ``last.pth`` is a symbolic link to the newest,
replaced atomically. Pruning keeps the newest ``keep_last`` (and the best ``keep_best`` by
a monitored value recorded in each file), never the file the run was resumed or fine-tuned
from, and never the newest one.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

from .errors import CheckpointError
from .io import safe_load, verify

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

logger = logging.getLogger("nn_handler")
PathLike = Union[str, os.PathLike]
LAST = "last.pth"
_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)(?:-(\w+))?\.pth$")
_SUFFIXES = (".pth", ".pt", ".ckpt")


class NoCheckpointFound(FileNotFoundError):
    """A directory holds no complete, verified checkpoint."""


def checkpoint_name(epoch: int, global_step: int, tag: str = "") -> str:
    return f"ckpt-e{epoch:04d}-s{global_step:09d}{'-' + tag if tag else ''}.pth"


def _progress(path: Path) -> Optional[Tuple[int, int, int]]:
    """``(global_step, epoch, step_in_epoch)`` recorded in ``path`` (only its small records are read), or None."""
    try:
        state = safe_load(path, map_location="cpu", mmap=True)
    except Exception:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        return None
    progress = state["progress"]
    position = progress.get("position") or {}
    return int(progress.get("global_step", 0)), int(progress.get("epoch", 0)), int(position.get("step_in_epoch", 0))


def _candidates(directory: Path) -> Iterable[Path]:
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if name.startswith(".") or not name.endswith(_SUFFIXES) or path.is_symlink():
                continue
            yield path


def find_latest(directory: PathLike) -> Path:
    """The newest complete, verified checkpoint under ``directory`` (searched recursively).

    Ordered by training progress recorded in the files, not by file times. Damaged or
    partial files are skipped with a warning naming them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"not a directory: {directory}")
    ranked: List[Tuple[Tuple[int, int, int], str, Path]] = []
    for path in _candidates(directory):
        progress = _progress(path)
        if progress is None:
            warnings.warn(f"skipping {path}: not a readable nn_handler checkpoint", stacklevel=2)
            continue
        ranked.append((progress, path.name, path))
    for _, _, path in sorted(ranked, reverse=True):
        try:
            if verify(path).checksum:
                return path
            warnings.warn(f"skipping {path}: it carries no checksum", stacklevel=2)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint {path}: {exc}", stacklevel=2)
    raise NoCheckpointFound(f"no complete, verified checkpoint found under {directory}")


def resolve_checkpoint(path: PathLike) -> Path:
    """A file as is; a directory -> its newest valid checkpoint."""
    path = Path(path)
    return find_latest(path) if path.is_dir() else path


def _link_last(directory: Path, target: Path) -> None:
    tmp = directory / f".{LAST}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target.name, tmp)
        os.replace(tmp, directory / LAST)
    except OSError:  # no symlinks here: fall back to a hard link, then to nothing
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(target, tmp)
            os.replace(tmp, directory / LAST)
        except OSError as exc:
            logger.warning("could not point %s at %s: %s", directory / LAST, target, exc)


class CheckpointStore:
    """Saves a handler into ``directory`` by progress, keeps ``last.pth`` current, prunes old files."""

    def __init__(self, directory: PathLike, keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 monitor: Optional[str] = None, mode: str = "min"):
        if keep_last is not None and int(keep_last) < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
        if keep_best and not monitor:
            raise ValueError("keep_best needs a monitor (e.g. monitor='val_loss')")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last = None if keep_last is None else int(keep_last)
        self.keep_best = None if not keep_best else int(keep_best)
        self.monitor = monitor
        self.mode = mode

    def save(self, h: "NNHandler", tag: str = "") -> Path:
        """Save on every rank (rank 0 writes); then rank 0 updates ``last.pth`` and prunes."""
        path = self.directory / checkpoint_name(h.epoch, h.global_step, tag)
        if self.monitor:
            h.metadata["monitor"] = {"name": self.monitor, "value": _monitored(h, self.monitor)}
        h.save(path)
        if h.rank == 0:
            _link_last(self.directory, path)
            self.prune(protect=_protected(h))
        return path

    def prune(self, protect: Iterable[PathLike] = ()) -> List[Path]:
        """Delete what the retention settings do not keep; returns the deleted paths."""
        if self.keep_last is None and self.keep_best is None:
            return []
        files = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and not path.is_symlink():
                files.append((int(match.group(2)), int(match.group(1)), path))
        files.sort()
        keep = {files[-1][2]} if files else set()  # never leave the directory without the newest
        if self.keep_last is not None:
            keep.update(p for *_, p in files[-self.keep_last:])
        if self.keep_best:
            scored = [(s, p) for *_, p in files if (s := _recorded_score(p, self.monitor)) is not None]
            scored.sort(key=lambda sp: sp[0], reverse=self.mode == "max")
            keep.update(p for _, p in scored[: self.keep_best])
        protected = {Path(p).resolve() for p in protect if p}
        deleted = []
        for *_, path in files:
            if path in keep or path.resolve() in protected:
                continue
            try:
                path.unlink()
                deleted.append(path)
            except OSError as exc:
                logger.warning("could not prune %s: %s", path, exc)
        return deleted


def _monitored(h: "NNHandler", name: str) -> Optional[float]:
    history = {"loss": h.train_losses, "train_loss": h.train_losses, "val_loss": h.val_losses}
    for side, values in (("train", h.train_metrics_history), ("val", h.val_metrics_history)):
        for metric, series in values.items():
            history[f"{side}_{metric}"] = series
    series = history.get(name)
    if not series:
        return None
    value = float(series[-1])
    return None if math.isnan(value) else value


def _recorded_score(path: Path, monitor: Optional[str]) -> Optional[float]:
    try:
        state = safe_load(path, map_location="cpu", mmap=True)
        record = (state.get("metadata") or {}).get("monitor") or {}
    except Exception:
        return None
    return record.get("value") if record.get("name") == monitor else None


def _protected(h: "NNHandler") -> List[str]:
    parent = ((h.metadata.get("lineage") or {}).get("parent") or {}).get("path")
    return [parent] if parent else []


def lineage_for(parent_path: Optional[PathLike], previous: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A new run's lineage record: its own id and, when it continues from a file, that file."""
    import uuid

    from .io import file_checksum

    record: Dict[str, Any] = {"run_id": uuid.uuid4().hex, "parent": None}
    if parent_path is not None:
        parent = Path(parent_path).resolve()
        record["parent"] = {"path": str(parent), "checksum": file_checksum(parent),
                            "run_id": (previous or {}).get("run_id")}
    return record
