"""Experiment loggers: the train loss and learning rates every N optimizer steps, the epoch's logs,
and at the end the run's hyperparameters with the final metrics. ``CSVLogger`` writes a CSV file
(one header, one row per logged step) and ``hparams.json``; ``TensorBoardLogger`` writes event
files through ``torch.utils.tensorboard`` (the ``tensorboard`` extra).

Only rank 0 writes. Each row or event is flushed as it is written, so a crash leaves what was
logged. A run that goes on from a checkpoint (same ``dirpath``) continues the same log at the
checkpoint's global step: CSV rows beyond it (logged after the last checkpoint by a run that then
crashed) are dropped before appending; TensorBoard purges them (``SummaryWriter(purge_step=...)``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler

LOGS_DIR = "logs"  # where a restored logger whose recorded dirpath lies outside the run writes instead
HPARAMS_FILE = "hparams.json"
_DEFAULT_CSV = "metrics.csv"
_FIXED = ("step", "epoch")  # the CSV's first columns


def _steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"every_n_steps must be an integer >= 0 (0: epoch rows only), got {str(value)[:80]}")
    return value


def _plain_csv_name(name: Any) -> bool:
    return isinstance(name, str) and name.lower().endswith(".csv") and name not in (".csv",) and ".." not in name \
        and not any(c in name for c in ("/", "\\", "\x00", os.sep))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def epoch_values(logs: Dict[str, Any]) -> Dict[str, float]:
    """An epoch's logs under the logged names: ``loss`` -> ``train_loss``, a metric ``m`` -> ``train_m``,
    ``val_*`` and ``lr`` as they are; values that are not finite numbers (not validated) left out."""
    out: Dict[str, float] = {}
    for key, value in logs.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            continue
        name = "train_loss" if key == "loss" else key if key == "lr" or key.startswith("val_") else f"train_{key}"
        out[name] = number
    return out


def hyperparameters(handler: "NNHandler") -> Dict[str, Any]:
    """The run config (``handler.metadata["run_config"]``, which the runner sets) flattened to dotted keys
    with plain values (lists, None and others as strings); without one, the optimizer and its defaults."""
    config = handler.metadata.get("run_config") if isinstance(handler.metadata, dict) else None
    if not isinstance(config, dict):
        config = {}
        if handler.optimizer is not None:
            config = {"optimizer": {"_target_": type(handler.optimizer).__qualname__, **handler.optimizer.defaults}}
    flat: Dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        elif prefix:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)

    walk(config, "")
    return flat


class _Logger(Callback):
    """What the loggers share: the step filter, rank 0 only, and the confinement of a recorded ``dirpath``."""

    def __init__(self, dirpath: str = LOGS_DIR, every_n_steps: int = 50):
        self.dirpath = os.fspath(dirpath)
        if "dirpath" in self._init_kwargs:  # a pathlib.Path is recorded as the plain string it names
            self._init_kwargs["dirpath"] = self.dirpath
        self.every_n_steps = _steps(every_n_steps)
        self._last_step = -1
        self._final: Dict[str, float] = {}
        self._root: Optional[str] = None  # set by confine_paths when restored from a file
        self._recorded: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ paths
    def relocate(self, dirpath: Any) -> None:
        """Write from now on into ``dirpath`` (and record it): the runner moves a restored logger into its run."""
        self.dirpath = self._init_kwargs["dirpath"] = os.fspath(dirpath)

    def confine_paths(self, root: Any, fallback: Any = None) -> None:
        """Honour the recorded ``dirpath`` (and file name) only inside ``root`` (``NNHandler.load``: the
        checkpoint's directory; the runner: the run's directory). Before the next write a ``dirpath``
        outside it (links resolved) becomes ``root/logs``, with one warning. ``root=None`` lifts it;
        ``fallback`` is accepted for the same call as ModelCheckpoint's and not used."""
        self._root = None if root is None else os.path.abspath(os.fspath(root))
        self._recorded = None if root is None else self._paths()

    def _paths(self) -> Dict[str, Any]:
        return {"dirpath": self.dirpath}

    def _settle(self, handler: "NNHandler") -> None:
        if self._root is None or self._recorded is None:
            return
        recorded, self._recorded = self._recorded, None
        dropped = self._drop(recorded)
        if self.dirpath == recorded["dirpath"]:
            where = self.dirpath if isinstance(self.dirpath, str) and "\x00" not in self.dirpath else None
            if where is None or not _inside(os.path.realpath(os.path.abspath(where)), os.path.realpath(self._root)):
                dropped.append(f"dirpath {str(self.dirpath)[:200]!r}")
                self.relocate(os.path.join(self._root, LOGS_DIR))
        if dropped:
            handler._warn(f"{type(self).__name__}: the recorded {' and '.join(dropped)} would write outside "
                          f"{self._root}; logging into {self.dirpath} instead")

    def _drop(self, recorded: Dict[str, Any]) -> List[str]:
        return []

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, handler: "NNHandler") -> None:
        self._last_step = int(handler.global_step)
        self._final = {}
        if handler.rank != 0:
            return
        self._settle(handler)
        os.makedirs(self.dirpath, exist_ok=True)
        self._open(handler, int(handler.global_step))

    def on_batch_end(self, handler: "NNHandler", batch: int, logs: Dict[str, Any]) -> None:
        step = logs["global_step"]
        if not self.every_n_steps or step % self.every_n_steps or step == self._last_step or handler.rank != 0:
            return
        self._last_step = step
        values = {"train_loss_step": float(logs["loss"])}  # the only .item(): on logged steps
        if handler.optimizer is not None:
            for i, group in enumerate(handler.optimizer.param_groups):
                values[f"lr_group{i}"] = float(group["lr"])
        self._write(step, handler.epoch + 1, values)

    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        if handler.rank != 0:
            return
        values = epoch_values(logs)
        self._final = values
        self._write(int(handler.global_step), handler.epoch, values)

    def on_train_end(self, handler: "NNHandler") -> None:
        if handler.rank != 0:
            return
        self._hparams(handler, hyperparameters(handler), dict(self._final))
        self._close()

    # ------------------------------------------------------------------ what each writer does
    def _open(self, handler: "NNHandler", step: int) -> None:
        raise NotImplementedError

    def _write(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        raise NotImplementedError

    def _hparams(self, handler: "NNHandler", hparams: Dict[str, Any], metrics: Dict[str, float]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class CSVLogger(_Logger):
    """``dirpath/filename``: columns ``step`` (optimizer steps), ``epoch`` (from 1), then each value as
    first seen: ``train_loss_step`` and ``lr_group<i>`` every ``every_n_steps`` steps (0: none),
    ``train_loss``, ``train_<metric>``, ``val_loss``, ``val_<metric>`` and ``lr`` (the epoch's logs)
    at each epoch's end, in the same row when it falls on a logged step. A new column rewrites the
    file with the wider header. ``on_train_end`` writes ``dirpath/hparams.json`` (``hparams``: the
    run config, ``metrics``: the last epoch's values). Resumed at global step S in the same place,
    rows with a step beyond S are dropped and the log goes on after them, under its one header."""

    def __init__(self, dirpath: str = LOGS_DIR, every_n_steps: int = 50, filename: str = _DEFAULT_CSV):
        super().__init__(dirpath, every_n_steps)
        if not _plain_csv_name(filename):
            raise ValueError(f"CSVLogger: filename must be a plain file name ending in .csv, got {str(filename)[:80]!r}")
        self.filename = filename
        self.columns: List[str] = list(_FIXED)
        self._file: Optional[io.BufferedWriter] = None
        self._last: Optional[Dict[str, Any]] = None  # the last row written, and where it starts in the file
        self._last_offset = 0

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.filename)

    def _paths(self) -> Dict[str, Any]:
        return {"dirpath": self.dirpath, "filename": self.filename}

    def _drop(self, recorded: Dict[str, Any]) -> List[str]:
        if self.filename == recorded["filename"] and not _plain_csv_name(self.filename):
            self.filename = self._init_kwargs["filename"] = _DEFAULT_CSV
            return [f"filename {str(recorded['filename'])[:200]!r}"]
        return []

    def _read(self) -> List[Dict[str, str]]:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            rows = [dict(zip(header, row)) for row in reader]
        self.columns = header
        return rows

    def _open(self, handler: "NNHandler", step: int) -> None:
        self._close()
        path = self.path
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise RuntimeError(f"CSVLogger: {path} is not a regular file; not logging into it")
        rows: List[Dict[str, str]] = []
        self.columns = list(_FIXED)
        if os.path.exists(path):
            rows = self._read()
            if self.columns[:2] != list(_FIXED):
                raise RuntimeError(f"CSVLogger: {path} exists and is not a log this logger wrote (its header is not "
                                   f"'step,epoch,...'); give another dirpath or filename")
            rows = [r for r in rows if _step_of(r) is not None and _step_of(r) <= step]  # past the resumed step: gone
        self._rewrite(rows)

    def _line(self, row: Dict[str, Any]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])
        return buffer.getvalue().encode("utf-8")

    def _rewrite(self, rows: List[Dict[str, Any]]) -> None:
        """The whole file anew (header and ``rows``), atomically, then open for appending."""
        self._close()
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._line({c: c for c in self.columns}))
            for row in rows[:-1]:
                f.write(self._line(row))
            self._last_offset = f.tell()
            if rows:
                f.write(self._line(rows[-1]))
        os.replace(tmp, self.path)
        self._last = dict(rows[-1]) if rows else None
        self._file = open(self.path, "ab")

    def _write(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if self._file is None:
            return
        row: Dict[str, Any] = {"step": step, "epoch": epoch, **{k: repr(v) for k, v in values.items()}}
        merge = self._last is not None and _step_of(self._last) == step
        if merge:
            row = {**self._last, **row}
        new = [k for k in row if k not in self.columns]
        if new:  # a wider header: rewrite everything (a few times per run)
            self._close()
            rows = self._read()
            self.columns += new
            self._rewrite(rows[:-1] + [row] if merge else rows + [row])
            return
        if merge:
            self._file.truncate(self._last_offset)
            self._file.seek(self._last_offset)
        else:
            self._last_offset = self._file.tell()
        self._file.write(self._line(row))
        self._file.flush()
        self._last = row

    def _hparams(self, handler: "NNHandler", hparams: Dict[str, Any], metrics: Dict[str, float]) -> None:
        path = os.path.join(self.dirpath, HPARAMS_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"hparams": hparams, "metrics": metrics, "global_step": int(handler.global_step),
                       "epoch": int(handler.epoch)}, f, indent=2, default=str)
        os.replace(tmp, path)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_of(row: Dict[str, Any]) -> Optional[int]:
    try:
        return int(row.get("step"))
    except (TypeError, ValueError):
        return None


class TensorBoardLogger(_Logger):
    """TensorBoard event files in ``dirpath`` through ``torch.utils.tensorboard.SummaryWriter`` (needs the
    ``tensorboard`` package: ``pip install nn-handler[tensorboard]``). Scalars at the global step:
    ``train/loss_step`` and ``lr/group<i>`` every ``every_n_steps`` steps, and each epoch ``train/loss``,
    ``train/<metric>``, ``val/loss``, ``val/<metric>``, ``lr`` and ``epoch``. ``on_train_end`` adds the
    run config as hyperparameters with the final metrics (``add_hparams``, run ``hparams``). Resumed at
    global step S, events after S are purged (``purge_step=S + 1``)."""

    def __init__(self, dirpath: str = LOGS_DIR, every_n_steps: int = 50):
        super().__init__(dirpath, every_n_steps)
        _summary_writer()  # fails now, naming the package, rather than when training starts
        self._writer: Any = None

    def _open(self, handler: "NNHandler", step: int) -> None:
        self._close()
        self._writer = _summary_writer()(log_dir=self.dirpath, purge_step=step + 1)

    def _write(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_scalar(_tag(key), value, step)
        if "train_loss" in values:  # an epoch's end
            self._writer.add_scalar("epoch", epoch, step)
        self._writer.flush()

    def _hparams(self, handler: "NNHandler", hparams: Dict[str, Any], metrics: Dict[str, float]) -> None:
        if self._writer is None:
            return
        self._writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams",
                                 global_step=int(handler.global_step))
        self._writer.flush()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``, ``lr_group0`` -> ``lr/group0``, ``val_accuracy`` -> ``val/accuracy``."""
    if key.startswith(("train_", "val_", "lr_")):
        return key.replace("_", "/", 1)
    return key


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises this when the tensorboard package is missing
        raise ImportError("TensorBoardLogger needs the tensorboard package: pip install 'nn-handler[tensorboard]' "
                          f"(or pip install tensorboard) ({exc})") from None
    return SummaryWriter
