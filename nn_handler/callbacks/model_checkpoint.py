"""ModelCheckpoint: keep the best k checkpoints by a monitored value, and the last one."""
from __future__ import annotations

import math
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Pattern

from ._monitor import better, check_mode, check_monitor, monitored
from .base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


class ModelCheckpoint(Callback):
    """Save the handler every ``every_n_epochs`` epochs, keeping the ``save_top_k`` best files.

    ``filename`` is a ``str.format`` template over ``epoch`` (epochs done, from 1),
    ``step`` (optimizer steps) and the epoch's logs (``loss``, ``val_loss``, ``lr``,
    metrics and ``val_<metric>``): ``"epoch{epoch:03d}-{val_loss:.4f}.pt"``. A file is
    written only when its score enters the best ``save_top_k`` (-1 keeps all, 0 none); the
    file that falls out is deleted. An epoch without a value for ``monitor`` (not
    validated, say) writes no ranked file. ``monitor=None`` ranks by epoch, keeping the
    latest k; a ``monitor`` the run never logs (``loss``/``train_loss``, ``lr``, the metrics, and
    with validation data ``val_loss``/``val_<metric>``) is refused when training starts, with a
    ``SettingError`` naming the values it does log. ``save_last`` also writes ``last_filename``
    every time. Every file is a whole handler checkpoint written through ``handler.save``
    (atomic; under DDP rank 0 writes), and it already lists itself in this callback's state.

    Only its own files are ever deleted: a file that falls out of the best k is removed only
    when it lies in ``dirpath``, its name fits ``filename``'s pattern and it carries this
    project's checksum trailer (anything else is left, with a warning).

    Restored from a checkpoint, the callback is confined (see ``confine_paths``): the paths the
    file records (``dirpath``, ``filename``, ``last_filename``, the ``best_k_models`` keys)
    are honoured only inside the directory the checkpoint was loaded from (the runner: the
    run's output directory); anything else is dropped, with one warning naming it, before
    the callback writes or deletes anything. A recorded file name must end in ``.pt``,
    ``.pth`` or ``.ckpt``, and a recorded ``filename`` may hold only plain fields with short
    number formats (``{epoch:03d}``, ``{val_loss:.4f}``; no ``!r``, nested fields or wide
    paddings). A confined callback never writes over an existing file that is not an intact
    nn_handler checkpoint (it warns once; the last file goes to ``last.pt`` instead, a ranked
    one is not written). A value the caller sets after ``load`` is the caller's own and is
    honoured as given.
    """

    def __init__(self, dirpath: str = "checkpoints", filename: str = "epoch{epoch:03d}.pt",
                 monitor: Optional[str] = "val_loss", mode: str = "min", save_top_k: int = 1,
                 save_last: bool = True, every_n_epochs: int = 1, last_filename: str = "last.pt"):
        check_mode("ModelCheckpoint", mode)
        if int(save_top_k) < -1:
            raise ValueError(f"ModelCheckpoint: save_top_k must be -1 (all), 0 (none) or a count, got {save_top_k!r}")
        if int(every_n_epochs) < 1:
            raise ValueError(f"ModelCheckpoint: every_n_epochs must be >= 1, got {every_n_epochs!r}")
        self.dirpath = os.fspath(dirpath)
        if "dirpath" in self._init_kwargs:  # a pathlib.Path is recorded as the plain string it names
            self._init_kwargs["dirpath"] = self.dirpath
        self.filename = filename
        self.monitor = monitor
        self.mode = mode if monitor is not None else "max"
        self.save_top_k = int(save_top_k)
        self.save_last = bool(save_last)
        self.every_n_epochs = int(every_n_epochs)
        self.last_filename = last_filename
        self.best_k_models: Dict[str, float] = {}  # path -> score
        self.last_model_path: Optional[str] = None
        self._warned = False
        # Confinement (a callback restored from a file): the tree its recorded paths must stay in,
        # where its files go when the recorded directory is outside it, and the recorded values.
        self._root: Optional[str] = None
        self._fallback: Optional[str] = None
        self._recorded: Optional[Dict[str, Any]] = None
        self._settled = True
        self._refused: set = set()  # paths already warned about (one warning each)
        self._refused_writes: set = set()

    # ------------------------------------------------------------------ confinement
    def confine_paths(self, root: Any, fallback: Any = None) -> None:
        """Honour the paths this callback was built and restored with only inside ``root``.

        ``NNHandler.load`` calls it with the checkpoint's own directory; the runner with the
        run's output directory. Before the callback next writes, a recorded ``dirpath``
        outside ``root`` (symbolic links resolved) is replaced by ``fallback`` (default:
        ``root``), a ``filename``/``last_filename`` with a path separator or ``..`` by the
        default, and ``best_k_models`` keys that are not files of this callback in that
        directory are dropped: one warning names all of it. ``root=None`` lifts the
        confinement (the caller vouches for the recorded paths).
        """
        if root is None:
            self._root = self._fallback = self._recorded = None
            self._settled = True
            return
        if self._recorded is None:  # what the file said, as opposed to what a caller sets later
            self._recorded = {"dirpath": self.dirpath, "filename": self.filename,
                              "last_filename": self.last_filename}
        self._root = os.path.abspath(os.fspath(root))
        self._fallback = os.path.abspath(os.fspath(fallback)) if fallback is not None else self._root
        self._settled = False

    def _from_file(self, name: str) -> bool:
        recorded = self._recorded or {}
        return name in recorded and getattr(self, name) == recorded[name]

    def _set_setting(self, name: str, value: Any) -> None:
        setattr(self, name, value)
        self._init_kwargs[name] = value  # the files written from now on record what is really used
        if self._recorded is not None:
            self._recorded[name] = value

    def _settle(self, handler: "NNHandler") -> None:
        """Apply the confinement once, before the first write or deletion after a restore."""
        if self._settled:
            return
        self._settled = True
        root = os.path.realpath(self._root)
        dropped: List[str] = []
        if self._from_file("dirpath"):
            where = self.dirpath if isinstance(self.dirpath, str) else None
            if where is None or "\x00" in where or not _inside(os.path.realpath(os.path.abspath(where)), root):
                dropped.append(f"dirpath {self.dirpath!r} (outside {self._root}; writing into {self._fallback} "
                               f"instead)")
                self._set_setting("dirpath", self._fallback)
        for name, default in (("filename", _DEFAULT_FILENAME), ("last_filename", _DEFAULT_LAST)):
            if self._from_file(name):
                problem = _template_problem(getattr(self, name), formatted=name == "filename")
                if problem:
                    dropped.append(f"{name} {getattr(self, name)!r} ({problem}; using {default!r})")
                    self._set_setting(name, default)
        kept: Dict[str, float] = {}
        for path, score in self.best_k_models.items():
            problem = self._not_mine(path, check_file=False)
            if problem:
                dropped.append(f"best_k_models entry {path!r} ({problem})")
            else:
                kept[path] = score
        self.best_k_models = kept
        if self.last_model_path is not None and not self._is_last(self.last_model_path):
            dropped.append(f"last_model_path {self.last_model_path!r} (not this callback's last file)")
            self.last_model_path = None
        if dropped:
            handler._warn("ModelCheckpoint restored from a file: recorded paths are honoured only inside "
                          f"{self._root}; dropped " + "; ".join(dropped))

    def _is_last(self, path: str) -> bool:
        return isinstance(path, str) and _same_file_place(path, os.path.join(self.dirpath, self.last_filename))

    def _pattern(self) -> Optional[Pattern[str]]:
        return _name_pattern(self.filename)

    def _not_mine(self, path: Any, check_file: bool = True) -> Optional[str]:
        """Why ``path`` is not a ranked file of this callback (None: it is one)."""
        if not isinstance(path, str) or not path or "\x00" in path:
            return "not a path"
        directory, name = os.path.split(os.path.abspath(path))
        if os.path.realpath(directory) != os.path.realpath(os.path.abspath(self.dirpath)):
            return f"not in {self.dirpath}"
        pattern = self._pattern()
        if pattern is None or not pattern.fullmatch(name):
            return f"its name does not fit {self.filename!r}"
        if not check_file:
            return None
        if os.path.islink(path) or not os.path.isfile(path):
            return "not a regular file"
        from ..checkpointing.io import read_trailer
        try:
            if read_trailer(path) is None:
                return "it carries no nn_handler checksum trailer"
        except Exception as exc:  # damaged, foreign, unreadable: not ours to delete
            return f"not an intact nn_handler checkpoint ({type(exc).__name__})"
        return None

    # ------------------------------------------------------------------ results
    @property
    def best_model_path(self) -> Optional[str]:
        if not self.best_k_models:
            return None
        pick = min if self.mode == "min" else max
        return pick(self.best_k_models, key=self.best_k_models.__getitem__)

    @property
    def best_model_score(self) -> Optional[float]:
        path = self.best_model_path
        return None if path is None else self.best_k_models[path]

    # ------------------------------------------------------------------ hook
    def on_train_begin(self, handler: "NNHandler") -> None:
        """Refuse, before any epoch, a ``monitor`` this run never logs (a misspelling, val_* without validation)."""
        if self.monitor is not None:
            check_monitor("ModelCheckpoint", self.monitor, handler)

    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        done = handler.epoch
        if done % self.every_n_epochs:
            return
        self._settle(handler)
        if self.save_top_k != 0:
            score = float(done) if self.monitor is None else monitored(logs, self.monitor)
            if score is None:
                self._warn_missing(handler, logs)
            else:
                self._save_ranked(handler, score, self._path(handler, logs))
        if self.save_last:
            path = os.path.join(self.dirpath, self.last_filename)
            if not self._may_replace(handler, path):
                fallback = os.path.join(self.dirpath, _DEFAULT_LAST)
                path = fallback if fallback != path and self._may_replace(handler, fallback) else None
            if path is not None:
                self.last_model_path = path
                handler.save(path)

    def _path(self, handler: "NNHandler", logs: Dict[str, float]) -> str:
        values = {**{k: float(v) for k, v in logs.items()}, "epoch": handler.epoch, "step": handler.global_step}
        try:
            name = self.filename.format(**values)
        except (KeyError, IndexError) as exc:
            raise KeyError(f"ModelCheckpoint filename {self.filename!r} names {exc}, which this epoch does not have; "
                           f"available: {sorted(values)}") from None
        if self._root is not None and (name in (".", "..") or any(sep in name for sep in _SEPARATORS)):
            raise ValueError(f"ModelCheckpoint filename {self.filename!r} gave {name!r}, which is not a plain "
                             f"file name in {self.dirpath}")
        return os.path.join(self.dirpath, name)

    def _may_replace(self, handler: "NNHandler", path: str) -> bool:
        """Whether this callback may write ``path``. Confined (restored from a file, or run by the
        runner), it never replaces an existing entry that is not an intact nn_handler checkpoint
        (a user's notes, another tool's file, a link, a directory): one warning names it."""
        if self._root is None or not os.path.lexists(path):
            return True
        problem = None
        if os.path.islink(path) or not os.path.isfile(path):
            problem = "it is not a regular file"
        else:
            from ..checkpointing.io import read_trailer
            try:
                if read_trailer(path) is None:
                    problem = "it carries no nn_handler checksum trailer"
            except Exception as exc:  # damaged, foreign, unreadable: not ours to replace
                problem = f"it is not an intact nn_handler checkpoint ({type(exc).__name__})"
        if problem is None:
            return True
        if path not in self._refused_writes:
            self._refused_writes.add(path)
            handler._warn(f"ModelCheckpoint: not writing over {path}: {problem}, so it is not a checkpoint this "
                          f"callback wrote")
        return False

    def _save_ranked(self, handler: "NNHandler", score: float, path: str) -> None:
        if not self._may_replace(handler, path):
            return
        best = self.best_k_models
        if self.save_top_k > 0 and path not in best and len(best) >= self.save_top_k:
            worst = self._worst()
            if not better(score, best[worst], self.mode):
                return
        best[path] = score
        evicted = None
        if self.save_top_k > 0 and len(best) > self.save_top_k:
            evicted = self._worst(exclude=path)
            del best[evicted]
        handler.save(path)  # the file already records its own place in best_k_models
        if evicted is not None and handler.rank == 0 and evicted != self.last_model_path:
            self._delete(handler, evicted)

    def _delete(self, handler: "NNHandler", path: str) -> None:
        """Remove a file that fell out of the best k, only if it is one of this callback's own."""
        if not os.path.lexists(path):
            return
        problem = self._not_mine(path)
        if problem is None:
            try:
                Path(path).unlink()
            except FileNotFoundError:
                pass
            return
        if path not in self._refused:
            self._refused.add(path)
            handler._warn(f"ModelCheckpoint: not deleting {path}, which fell out of the best {self.save_top_k}: "
                          f"{problem}, so it is not a file this callback wrote")

    def _worst(self, exclude: Optional[str] = None) -> str:
        candidates = [p for p in self.best_k_models if p != exclude]
        pick = max if self.mode == "min" else min
        return pick(candidates, key=self.best_k_models.__getitem__)

    def _warn_missing(self, handler: "NNHandler", logs: Dict[str, float]) -> None:
        if not self._warned and self.monitor not in logs:
            self._warned = True
            handler.logger.warning("ModelCheckpoint: no %r in this epoch's logs (available: %s); epochs without it "
                                   "write no ranked checkpoint", self.monitor, sorted(logs))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"best_k_models": dict(self.best_k_models), "last_model_path": self.last_model_path}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        best = state.get("best_k_models") if isinstance(state, dict) else None
        self.best_k_models = {}
        for key, value in (best.items() if isinstance(best, dict) else ()):
            if isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not math.isnan(float(value)):
                self.best_k_models[key] = float(value)
        last = state.get("last_model_path") if isinstance(state, dict) else None
        self.last_model_path = last if isinstance(last, str) else None
        if self._root is not None:
            self._settled = False  # these paths came from outside: check them before the next write


_DEFAULT_FILENAME = "epoch{epoch:03d}.pt"
_DEFAULT_LAST = "last.pt"
_SEPARATORS = tuple({"/", "\\", os.sep, os.altsep or "/"})
_FIELD = r"[^/\\\x00]+"
_PLAIN_FIELD = re.compile(r"[A-Za-z_]\w*")


def _name_problem(name: Any) -> Optional[str]:
    """Why ``name`` is not a plain file name inside a directory (None: it is one)."""
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if any(sep in name for sep in _SEPARATORS) or "\x00" in name:
        return "it holds a path separator"
    if ".." in name or name == ".":
        return "it holds '..'"
    return None


def _template_problem(template: Any, formatted: bool) -> Optional[str]:
    """Why a recorded ``filename``/``last_filename`` is not one this callback writes (None: it is)."""
    problem = _name_problem(template)
    if problem is None and not template.lower().endswith(CHECKPOINT_SUFFIXES):
        problem = f"not a checkpoint file name (it must end in {', '.join(CHECKPOINT_SUFFIXES)})"
    if problem is None and formatted:  # (last_filename is used as it is: its braces are literal)
        problem = field_problem(template, _INT_FIELDS)
    return problem


# What a template read from a file may hold (ModelCheckpoint's and SampleGrid's): plain field names,
# no conversion (!r, !s, !a), no nested field, and only a short spec: an integer (epoch, step) as
# ``d`` with a width of at most two digits, any value as a fixed/exponent/general float with at
# most two digits of width and precision. So a formatted name is at most a few hundred characters.
_INT_SPEC = re.compile(r"0?\d{0,2}d?")
_FLOAT_SPEC = re.compile(r"0?\d{0,2}(?:\.\d{1,2})?[fFeEgG]?")
_INT_FIELDS = ("epoch", "step")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def field_problem(template: str, allowed: Any, any_name: bool = True) -> Optional[str]:
    """Why ``template``'s format fields are not all short and plain (None: they are).

    ``allowed``: the integer fields (``d`` allowed); with ``any_name`` other plain names are
    accepted too (float specs only), otherwise only the ``allowed`` ones."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return "not a valid format template"
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _PLAIN_FIELD.fullmatch(field) or (not any_name and field not in allowed):
            return f"a template field {field!r} that is not allowed"  # no {x.attr} or {x[i]} from a file
        if conversion is not None:
            return f"a conversion !{conversion} in the field {field!r}"
        spec = spec or ""
        if not (_FLOAT_SPEC.fullmatch(spec) or (field in allowed and _INT_SPEC.fullmatch(spec))):
            return f"a format spec {spec[:40]!r} in the field {field!r} that is not a short number format"
    return None


def _name_pattern(template: Any) -> Optional[Pattern[str]]:
    """A regex matching every name ``template.format(...)`` can produce (None: not a template)."""
    if not isinstance(template, str):
        return None
    parts = []
    try:
        for literal, field, _, _ in string.Formatter().parse(template):
            parts.append(re.escape(literal))
            if field is not None:
                parts.append(_FIELD)
    except ValueError:
        return None
    return re.compile("".join(parts))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _same_file_place(a: str, b: str) -> bool:
    try:
        return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))
    except (TypeError, ValueError):
        return False
