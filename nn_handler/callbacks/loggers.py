"""Experiment loggers: the train loss and learning rates every N optimizer steps, the epoch's logs,
and at the end the run's hyperparameters with the final metrics. ``CSVLogger`` writes a CSV file
(one header, one row per logged step) and ``hparams.json``; ``TensorBoardLogger`` writes event
files through ``torch.utils.tensorboard`` (the ``tensorboard`` extra); ``MLflowLogger`` an MLflow
run through ``MlflowClient`` (the ``mlflow`` extra, imported only when one is made).

Only rank 0 writes. Each row or event is flushed as it is written, so a crash leaves what was
logged. A run that goes on from a checkpoint (same ``dirpath``) continues the same log at the
checkpoint's global step: CSV rows beyond it (logged after the last checkpoint by a run that then
crashed) are dropped before appending; TensorBoard purges them (``SummaryWriter(purge_step=...)``);
MLflow, which cannot delete a point, reopens the same run (its id is the logger's state) and skips
each metric's steps that run already holds.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
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


# ---------------------------------------------------------------------------- MLflow
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id (a uuid4's hex)
_MAX_URI = 2000
_MAX_NAME = 250  # MLflow's own limit on experiment, run, param and metric names
_FILE_SCHEMES = ("", "file")


def _mlflow() -> Any:
    """The ``mlflow`` package (imported only when an MLflowLogger is made), or one clear ImportError."""
    try:
        import mlflow  # noqa: F401
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError("MLflowLogger needs the mlflow package: pip install 'nn-handler[mlflow]' (or pip install "
                          f"mlflow-skinny) ({exc})") from None
    return MlflowClient, Metric, Param, MlflowException


def _metric_name(key: str) -> str:
    """A name MLflow takes (alphanumerics, ``_ - . / space``; not a path that normalises to another)."""
    name = re.sub(r"[^\w.\- /]", "_", key).strip("/ ")[:_MAX_NAME]
    return name.replace("..", "__") or "_"


def _text_option(value: Any, what: str, limit: int, optional: bool = True) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\x00" in value:
        raise ValueError(f"MLflowLogger: {what} must be a non-empty string of at most {limit} characters, got "
                         f"{str(value)[:80]!r}")
    return value


def _file_store_path(uri: str) -> Optional[str]:
    """The local directory of a file-store tracking URI (a plain path or ``file:``), else None."""
    from urllib.parse import unquote, urlparse
    parsed = urlparse(uri)
    if len(parsed.scheme) == 1:  # a Windows drive letter, not a scheme
        return uri
    if parsed.scheme not in _FILE_SCHEMES or parsed.netloc not in ("", "localhost"):
        return None
    return unquote(parsed.path) if parsed.scheme else uri


class MLflowLogger(_Logger):
    """An MLflow run through ``mlflow.tracking.MlflowClient`` (needs the ``mlflow`` package:
    ``pip install 'nn-handler[mlflow]'``, which installs ``mlflow-skinny``). The same values as
    ``CSVLogger``, under the same names, as metrics at the global step: ``train_loss_step`` and
    ``lr_group<i>`` every ``every_n_steps`` steps, ``train_loss``, ``train_<metric>``, ``val_loss``,
    ``val_<metric>``, ``lr`` and ``epoch`` at each epoch's end. The run config (``hyperparameters``) is
    logged as params when training starts and again (new keys only) at its end; the run's latest
    metrics are then the final ones, and the run is marked FINISHED.

    ``tracking_uri``: where the run is stored; None: a file store in ``dirpath/mlruns`` (MLflow's
    file store is in maintenance mode and refused unless ``MLFLOW_ALLOW_FILE_STORE`` is set, so this
    logger sets it to true for a file store it writes, unless the environment says otherwise).

    Resumed: MLflow cannot delete metric points, so the run id is kept in the logger's state (and so
    in every checkpoint), the same run is reopened, and each metric's points at or below the last
    step that run already holds for it (logged after the checkpoint by a run that then crashed) are
    skipped: every step appears once, the first time it was logged. A run id the store does not
    know (another store, a new run directory) starts a new run. Restored from a file, a recorded
    ``tracking_uri`` is honoured only when it is a file store inside the confining directory (see
    ``confine_paths``); anything else (a server a file names) is replaced by ``dirpath/mlruns`` with
    one warning: ``use_tracking_uri`` sets it again, as the caller's own choice.
    """

    def __init__(self, dirpath: str = LOGS_DIR, every_n_steps: int = 50, tracking_uri: Optional[str] = None,
                 experiment_name: str = "nn_handler", run_name: Optional[str] = None):
        super().__init__(dirpath, every_n_steps)
        self.tracking_uri = _text_option(tracking_uri, "tracking_uri", _MAX_URI)
        self.experiment_name = _text_option(experiment_name, "experiment_name", _MAX_NAME, optional=False)
        self.run_name = _text_option(run_name, "run_name", _MAX_NAME)
        self._api = _mlflow()  # fails now, naming the package, rather than when training starts
        self.run_id: Optional[str] = None
        self._client: Any = None
        self._logged: Dict[str, int] = {}  # metric name -> the last step the run holds for it
        self._vouched = False  # use_tracking_uri: the caller chose the URI (not a file's record)

    # ------------------------------------------------------------------ state and paths
    def state_dict(self) -> Dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        run_id = (state or {}).get("run_id")
        if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
            raise ValueError(f"MLflowLogger: the recorded run_id {str(run_id)[:80]!r} is not an MLflow run id "
                             f"(32 hexadecimal digits)")
        self.run_id = run_id

    def use_tracking_uri(self, tracking_uri: Optional[str]) -> None:
        """Log into ``tracking_uri`` from now on (and record it), as the caller's choice (never confined)."""
        self.tracking_uri = self._init_kwargs["tracking_uri"] = _text_option(tracking_uri, "tracking_uri", _MAX_URI)
        self._vouched = True

    def _paths(self) -> Dict[str, Any]:
        return {"dirpath": self.dirpath, "tracking_uri": self.tracking_uri}

    def _drop(self, recorded: Dict[str, Any]) -> List[str]:
        uri = recorded["tracking_uri"]
        if uri is None or self._vouched or self.tracking_uri != uri:
            return []
        where = _file_store_path(uri)
        if where is not None and "\x00" not in where and _inside(os.path.realpath(os.path.abspath(where)),
                                                                  os.path.realpath(self._root)):
            return []
        self.tracking_uri = self._init_kwargs["tracking_uri"] = None
        return [f"tracking_uri {uri[:200]!r}"]

    @property
    def store_uri(self) -> str:
        """The tracking URI the run is written to (``tracking_uri``, or the file store in ``dirpath/mlruns``)."""
        if self.tracking_uri is not None:
            return self.tracking_uri
        from pathlib import Path
        return Path(os.path.abspath(os.path.join(self.dirpath, "mlruns"))).as_uri()

    # ------------------------------------------------------------------ the run
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._api[3] as exc:
            raise RuntimeError(f"MLflowLogger: {what} in the tracking store {self.store_uri} failed: "
                               f"{str(exc)[:500]}") from None

    def _open(self, handler: "NNHandler", step: int) -> None:
        MlflowClient, _, _, MlflowException = self._api
        uri = self.store_uri
        if _file_store_path(uri) is not None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = self._call("connecting", MlflowClient, tracking_uri=uri)
        self._logged = {}
        run = None
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except MlflowException:
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                handler._warn(f"MLflowLogger: the run {self.run_id} is not in {uri} (another store, or deleted); "
                              f"starting a new run there")
                run = None
        if run is None:
            experiment = self._call("finding the experiment", client.get_experiment_by_name, self.experiment_name)
            experiment_id = experiment.experiment_id if experiment is not None else self._call(
                "creating the experiment", client.create_experiment, self.experiment_name)
            run = self._call("creating a run", client.create_run, experiment_id, run_name=self.run_name)
            self.run_id = run.info.run_id
        else:
            for key in run.data.metrics:  # what the run holds already: those steps are not logged again
                history = self._call("reading the run", client.get_metric_history, self.run_id, key)
                self._logged[key] = max((m.step for m in history), default=-1)
            if run.info.status != "RUNNING":
                self._call("reopening the run", client.update_run, self.run_id, status="RUNNING")
        self._params(handler, hyperparameters(handler))

    def _params(self, handler: "NNHandler", hparams: Dict[str, Any]) -> None:
        """The run config as params: new keys only (an MLflow param never changes; a changed value is told)."""
        _, _, Param, _ = self._api
        held = self._call("reading the run", self._client.get_run, self.run_id).data.params
        limit = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
        new, changed = [], []
        for key, value in hparams.items():
            name, text = _metric_name(key), str(value)[:limit]
            if name not in held:
                new.append(Param(name, text))
                held[name] = text
            elif held[name] != text:
                changed.append(name)
        for i in range(0, len(new), 100):  # MLflow's limit on params per batch
            self._call("logging params", self._client.log_batch, self.run_id, params=new[i:i + 100])
        if changed:
            handler._warn(f"MLflowLogger: the run {self.run_id} keeps the first value of each param (MLflow never "
                          f"changes one); these differ now: {', '.join(sorted(changed)[:20])}")

    def _write(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if self._client is None:
            return
        _, Metric, _, _ = self._api
        if "train_loss" in values:  # an epoch's end
            values = {**values, "epoch": float(epoch)}
        stamp = int(time.time() * 1000)
        metrics = []
        for key, value in values.items():
            name = _metric_name(key)
            if step > self._logged.get(name, -1):
                metrics.append(Metric(name, float(value), stamp, int(step)))
                self._logged[name] = step
        if metrics:
            self._call("logging metrics", self._client.log_batch, self.run_id, metrics=metrics)

    def _hparams(self, handler: "NNHandler", hparams: Dict[str, Any], metrics: Dict[str, float]) -> None:
        if self._client is not None:
            self._params(handler, hparams)

    def _close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            self._call("finishing the run", client.set_terminated, self.run_id, "FINISHED")
