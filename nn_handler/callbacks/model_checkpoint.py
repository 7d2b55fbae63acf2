"""ModelCheckpoint: keep the best k checkpoints by a monitored value, and the last one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from .base import Callback
from ._monitor import better, check_mode, monitored

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
    latest k. ``save_last`` also writes ``last_filename`` every time. Every file is a whole
    handler checkpoint written through ``handler.save`` (atomic; under DDP rank 0 writes),
    and it already lists itself in this callback's state.
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
    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        done = handler.epoch
        if done % self.every_n_epochs:
            return
        if self.save_top_k != 0:
            score = float(done) if self.monitor is None else monitored(logs, self.monitor)
            if score is None:
                self._warn_missing(handler, logs)
            else:
                self._save_ranked(handler, score, self._path(handler, logs))
        if self.save_last:
            self.last_model_path = os.path.join(self.dirpath, self.last_filename)
            handler.save(self.last_model_path)

    def _path(self, handler: "NNHandler", logs: Dict[str, float]) -> str:
        values = {**{k: float(v) for k, v in logs.items()}, "epoch": handler.epoch, "step": handler.global_step}
        try:
            name = self.filename.format(**values)
        except (KeyError, IndexError) as exc:
            raise KeyError(f"ModelCheckpoint filename {self.filename!r} names {exc}, which this epoch does not have; "
                           f"available: {sorted(values)}") from None
        return os.path.join(self.dirpath, name)

    def _save_ranked(self, handler: "NNHandler", score: float, path: str) -> None:
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
            Path(evicted).unlink(missing_ok=True)

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
        self.best_k_models = {str(k): float(v) for k, v in (state.get("best_k_models") or {}).items()}
        self.last_model_path = state.get("last_model_path")
