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
import shutil
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

from .errors import CheckpointError
from .file import CheckpointFile
from .format import is_count, short
from .io import read_trailer
from .sharded import HEADER, is_sharded, sweep_partials
from .sharded import SUFFIX as sharded_suffix

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

logger = logging.getLogger("nn_handler")
PathLike = Union[str, os.PathLike]
LAST = "last.pth"
_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)(?:-(\w+))?\.(?:pth|dcp)$")
_SUFFIXES = (".pth", ".pt", ".ckpt")


class NoCheckpointFound(FileNotFoundError):
    """A directory holds no complete, verified checkpoint."""


class SkippedCheckpoints(UserWarning):
    """``find_latest`` passed over files it could not use; ``skipped`` says which and why, one line each."""

    def __init__(self, message: str, skipped: List[str]):
        super().__init__(message)
        self.skipped = list(skipped)


def checkpoint_name(epoch: int, global_step: int, tag: str = "", sharded: bool = False) -> str:
    return f"ckpt-e{epoch:04d}-s{global_step:09d}{'-' + tag if tag else ''}{sharded_suffix if sharded else '.pth'}"


def _progress(ckpt: CheckpointFile) -> Tuple[Optional[Tuple[int, int, int]], str]:
    """``((global_step, epoch, step_in_epoch), "")`` recorded in ``ckpt`` (only its small records are read),
    or ``(None, why it cannot be ranked)``. Never raises: the file may hold anything."""
    try:
        state = ckpt.contents()
    except CheckpointError as exc:
        return None, exc.message
    except Exception as exc:  # noqa: BLE001 (e.g. the file went away meanwhile)
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        return None, "it records no training progress (not an nn_handler checkpoint)"
    progress = state["progress"]
    position = progress.get("position")
    if position is None:
        position = {}
    if not isinstance(position, dict):
        return None, f"its progress.position is {short(position)}, not a mapping"
    values = []
    for field, record in (("global_step", progress), ("epoch", progress), ("step_in_epoch", position)):
        value = record.get(field, 0)
        if not is_count(value):
            where = "progress.position" if record is position else "progress"
            return None, f"its {where}.{field} is {short(value)}, not a whole number from 0 to 2**63 - 1"
        values.append(value)
    return (values[0], values[1], values[2]), ""


def _candidates(directory: Path) -> Iterable[Path]:
    """Checkpoint-like files and sharded checkpoint directories under ``directory`` (recursively; hidden files
    and directories, temporaries, partial sharded saves and links left out)."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        inside = []
        for name in dirs:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink():
                continue
            if is_sharded(path):
                yield path  # a committed sharded checkpoint: not searched inside
            else:
                inside.append(name)
        dirs[:] = inside
        for name in sorted(files):
            path = Path(root) / name
            try:
                if name.startswith(".") or not name.endswith(_SUFFIXES) or path.is_symlink() or not path.is_file():
                    continue
            except OSError:
                continue
            yield path


def find_latest(directory: PathLike) -> Path:
    """The newest complete, verified checkpoint under ``directory`` (searched recursively).

    Ordered by training progress recorded in the files, not by file times. The files it cannot
    use (damaged, partial, without a checksum, another tool's file, a progress record that is
    not whole numbers) are skipped, all named in one warning (``SkippedCheckpoints``);
    NoCheckpointFound when none is left.
    """
    with open_latest(directory) as ckpt:
        return Path(ckpt.path)


def open_latest(directory: PathLike) -> CheckpointFile:
    """``find_latest``'s file, opened and verified: each candidate is opened once, its header ranked,
    and only the chosen one is hashed (then the others are closed). The caller closes the result."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"not a directory: {directory}")
    if is_sharded(directory):  # a sharded checkpoint itself, not a directory of checkpoints
        return CheckpointFile.open(directory).verify()
    ranked: List[Tuple[Tuple[int, int, int], str, CheckpointFile]] = []
    skipped: List[str] = []
    found: Optional[CheckpointFile] = None
    try:
        for path in _candidates(directory):
            try:
                ckpt = CheckpointFile.open(path)
            except CheckpointError as exc:
                skipped.append(f"damaged checkpoint {path}: {exc.message}")
                continue
            except OSError as exc:  # gone or unreadable since it was listed
                skipped.append(f"{path}: {exc}")
                continue
            progress, why = _progress(ckpt)
            if progress is None:
                ckpt.close()
                skipped.append(f"{path}: not a usable nn_handler checkpoint ({why})")
                continue
            ranked.append((progress, path.name, ckpt))
        for _, _, ckpt in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True):
            try:
                if ckpt.trailer is not None and ckpt.verify().verified:
                    found = ckpt
                    break
                skipped.append(f"{ckpt.path}: it carries no checksum")
            except CheckpointError as exc:
                skipped.append(f"damaged checkpoint {ckpt.path}: {exc.message}")
            except OSError as exc:
                skipped.append(f"{ckpt.path}: {exc}")
    finally:
        for _, _, ckpt in ranked:
            if ckpt is not found:
                ckpt.close()
    if skipped:
        message = (f"skipping {skipped[0]}" if len(skipped) == 1 else
                   f"skipping {len(skipped)} files under {directory} that are not usable checkpoints: "
                   + "; ".join(skipped))
        warnings.warn(SkippedCheckpoints(message, skipped), stacklevel=3)
    if found is None:
        raise NoCheckpointFound(f"no complete, verified checkpoint found under {directory}")
    return found


def resolve_checkpoint(path: PathLike) -> Path:
    """A file as is; a directory -> its newest valid checkpoint."""
    path = Path(path)
    return find_latest(path) if path.is_dir() else path


# ``last.pth``'s temporary link: ``.last.pth.<host>.<pid>.tmp`` (earlier versions: ``.last.pth.<pid>.tmp``).
_LINK_TMP = re.compile(r"^\." + re.escape(LAST) + r"\.(?:(?P<host>[^/\\]+)\.)?(?P<pid>\d+)\.tmp$")


def _sweep_link_temporaries(directory: Path) -> List[Path]:
    """Remove ``last.pth`` temporaries that a killed link update on this host left in ``directory``.

    Like the save temporaries (``io._clean_stale_temporaries``): only names of that pattern,
    only links or plain files, only when their writer (the pid in the name) is gone.
    """
    host, swept = socket.gethostname(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return swept
    for name in names:
        match = _LINK_TMP.match(name)
        if match is None or (match.group("host") is not None and match.group("host") != host):
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid():
            continue  # this process's own (replaced below)
        try:
            os.kill(pid, 0)
            continue  # its writer is still running: leave it
        except ProcessLookupError:
            pass
        except (OverflowError, PermissionError, OSError):
            continue
        path = directory / name
        try:
            if not (path.is_symlink() or path.is_file()):
                continue
            path.unlink()
            swept.append(path)
        except OSError:
            pass
    return swept


def _link_last(directory: Path, target: Path) -> None:
    if Path(os.path.abspath(target)).parent != Path(os.path.abspath(directory)):
        logger.warning("not pointing %s at %s: the link names only files in its own directory", directory / LAST,
                       target)
        return
    _sweep_link_temporaries(directory)
    tmp = directory / f".{LAST}.{socket.gethostname()}.{os.getpid()}.tmp"
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
                 monitor: Optional[str] = None, mode: str = "min", sharded: Optional[bool] = None):
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
        self.sharded = sharded  # DCP directories; None: sharded when the model is (FSDP)
        self._not_pruned: set = set()  # files of the store's pattern that it did not write (warned once each)
        self._monitor_checked = False

    def check_monitor(self, h: "NNHandler") -> None:
        """Raise ValueError, before training, when ``monitor`` is no value ``h``'s history will hold
        (a misspelling, ``val_*`` without validation data), naming the values it will hold."""
        self._monitor_checked = True
        if not self.monitor:
            return
        names = monitor_names(h)
        if self.monitor not in names:
            hint = " (val_* values need validation data)" if self.monitor.startswith("val_") and \
                h.val_loader is None else ""
            raise ValueError(f"monitor {self.monitor!r} is not a value this run records{hint}; "
                             f"choose one of {', '.join(names)}")

    def save(self, h: "NNHandler", tag: str = "", asynchronous: bool = False) -> Path:
        """Save on every rank (rank 0 writes); then rank 0 updates ``last.pth`` and prunes (``asynchronous``:
        once the background write is complete)."""
        sharded = self.sharded if self.sharded is not None else h.strategy == "fsdp"
        path = self.directory / checkpoint_name(h.epoch, h.global_step, tag, sharded=sharded)
        if not self._monitor_checked:  # not checked before training (the caller's job): never fail a save for it
            try:
                self.check_monitor(h)
            except ValueError as exc:
                logger.warning("%s; the checkpoints record no value for it, so keep_best ranks none", exc)
        if self.monitor:
            h.metadata["monitor"] = {"name": self.monitor, "value": _monitored(h, self.monitor)}
        protect = _protected(h)

        def after() -> None:
            _link_last(self.directory, path)
            self.prune(protect=protect)

        h.save(path, sharded=sharded, asynchronous=asynchronous, after=after)
        return path

    def prune(self, protect: Iterable[PathLike] = ()) -> List[Path]:
        """Delete what the retention settings do not keep; returns the deleted paths."""
        if self.keep_last is None and self.keep_best is None:
            return []
        files = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and not path.is_symlink() and self._written_here(path):
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
        sweep_partials(self.directory)  # killed sharded saves (no save is in flight while pruning)
        for *_, path in files:
            if path in keep or path.resolve() in protected:
                continue
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                deleted.append(path)
            except OSError as exc:
                logger.warning("could not prune %s: %s", path, exc)
        return deleted

    def _written_here(self, path: Path) -> bool:
        """Whether ``path`` (a name of the store's pattern) is a file this store wrote: a plain file
        carrying this project's checksum trailer. Anything else is never pruned (one warning each)."""
        problem = None
        try:
            if path.is_dir():
                if not is_sharded(path) or read_trailer(path / HEADER) is None:
                    problem = "a directory that is not a complete sharded checkpoint"
            elif not path.is_file():
                problem = "not a regular file"
            elif read_trailer(path) is None:
                problem = "it carries no nn_handler checksum trailer"
        except Exception as exc:  # damaged, foreign, unreadable
            problem = f"not an intact nn_handler checkpoint ({type(exc).__name__})"
        if problem is None:
            return True
        if path not in self._not_pruned:
            self._not_pruned.add(path)
            logger.warning("retention leaves %s alone: %s, so it is not a checkpoint this store wrote", path, problem)
        return False


def monitor_names(h: "NNHandler") -> List[str]:
    """The values a store's ``monitor`` may name for ``h``: ``loss``/``train_loss``, ``train_<metric>``
    and, with validation data, ``val_loss`` and ``val_<metric>``."""
    metrics = list(h.metrics)
    names = ["loss", "train_loss", *(f"train_{m}" for m in metrics)]
    if h.val_loader is not None:
        names += ["val_loss", *(f"val_{m}" for m in metrics)]
    return names


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
    """The monitored value the store recorded in ``path`` (a finite float), or None. Never raises."""
    try:
        with CheckpointFile.open(path) as ckpt:
            state = ckpt.contents()
    except Exception:  # noqa: BLE001 (unreadable: not ranked)
        return None
    metadata = state.get("metadata") if isinstance(state, dict) else None
    record = metadata.get("monitor") if isinstance(metadata, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or record.get("name") != monitor:
        return None
    value = record.get("value")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) else None


def _protected(h: "NNHandler") -> List[str]:
    parent = ((h.metadata.get("lineage") or {}).get("parent") or {}).get("path")
    return [parent] if parent else []


def lineage_for(parent_path: Optional[PathLike], previous: Optional[Dict[str, Any]],
                checksum: Any = "read") -> Dict[str, Any]:
    """A new run's lineage record: its own id and, when it continues from a file, that file (and
    its ``checksum``, read from the file's checksum record unless the caller, who opened it, says)."""
    import uuid

    from .io import file_checksum

    record: Dict[str, Any] = {"run_id": uuid.uuid4().hex, "parent": None}
    if parent_path is not None:
        parent = Path(parent_path).resolve()
        record["parent"] = {"path": str(parent), "checksum": file_checksum(parent) if checksum == "read" else checksum,
                            "run_id": (previous or {}).get("run_id")}
    return record
