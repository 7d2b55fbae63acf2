"""SampleGrid: a PNG of samples from a generative model every N epochs."""
from __future__ import annotations

import os
import string
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


def _plain_filename(name: Any) -> bool:
    """A file name with no directory part whose only format field is ``{epoch}`` (with a spec)."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name or ".." in name or "\0" in name:
        return False
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(name) if f is not None]
    except ValueError:
        return False
    return all(f == "epoch" for f in fields)


class SampleGrid(Callback):
    """Every ``every_n_epochs`` epochs, draw ``n`` samples with ``handler.sample`` and write a PNG.

    ``sample_shape`` is one sample's shape: ``[C, H, W]`` or ``[H, W]`` gives an image grid
    (``value_range`` maps to black..white; None: the samples' min..max), ``[2]`` a scatter
    plot. The fixed ``seed`` draws the same noise each time, so successive pictures show the
    model's progress and the training's random streams are not touched (seed=None draws
    from them). The EMA weights are used when EMA is on. Under DDP every rank samples its
    share and rank 0 writes ``dirpath/filename`` (``{epoch}``: epochs done, from 1).
    """

    def __init__(self, sample_shape: Sequence[int], every_n_epochs: int = 5, n: int = 64, steps: int = 200,
                 corrector_steps: int = 0, seed: Optional[int] = 0, dirpath: str = "samples",
                 filename: str = "samples_epoch{epoch:03d}.png", value_range: Optional[Sequence[float]] = None,
                 nrow: Optional[int] = None):
        if int(every_n_epochs) < 1 or int(n) < 1 or int(steps) < 1:
            raise ValueError(f"SampleGrid: every_n_epochs, n and steps must be >= 1, got "
                             f"{every_n_epochs!r}, {n!r}, {steps!r}")
        self.sample_shape = [int(d) for d in sample_shape]
        self.every_n_epochs = int(every_n_epochs)
        self.n = int(n)
        self.steps = int(steps)
        self.corrector_steps = int(corrector_steps)
        self.seed = seed
        self.dirpath = os.fspath(dirpath)
        if "dirpath" in self._init_kwargs:  # a pathlib.Path is recorded as the plain string it names
            self._init_kwargs["dirpath"] = self.dirpath
        self.filename = filename
        self.value_range = None if value_range is None else [float(v) for v in value_range]
        self.nrow = nrow
        self.written: List[str] = []
        self._root: Optional[str] = None  # set by confine_paths when restored from a file
        self._recorded: Optional[Dict[str, str]] = None

    def confine_paths(self, root: Any, fallback: Any = None) -> None:
        """Honour the recorded ``dirpath``/``filename`` only inside ``root`` (``NNHandler.load``
        passes the checkpoint's directory, the runner the run's output directory): before the
        next write, a ``dirpath`` outside it (links resolved) becomes ``root/samples``, a
        ``filename`` with a path separator, ``..`` or a format field other than ``{epoch...}``
        the default, with one warning naming what was dropped. ``root=None`` lifts it.
        ``fallback`` is accepted for the same call as ModelCheckpoint's and not used."""
        self._root = None if root is None else os.path.abspath(os.fspath(root))
        self._recorded = None if root is None else {"dirpath": self.dirpath, "filename": self.filename}

    def _settle(self, handler: "NNHandler") -> None:
        if self._root is None or self._recorded is None:
            return
        recorded, self._recorded = self._recorded, None
        dropped = []
        if self.dirpath == recorded["dirpath"]:
            where = os.path.realpath(self.dirpath) if isinstance(self.dirpath, str) else None
            root = os.path.realpath(self._root)
            if where is None or os.path.commonpath([where, root]) != root:
                dropped.append(f"dirpath {self.dirpath!r}")
                self.dirpath = self._init_kwargs["dirpath"] = os.path.join(self._root, "samples")
        if self.filename == recorded["filename"] and not _plain_filename(self.filename):
            dropped.append(f"filename {self.filename!r}")
            self.filename = self._init_kwargs["filename"] = "samples_epoch{epoch:03d}.png"
        if dropped:
            handler._warn(f"SampleGrid: the recorded {' and '.join(dropped)} would write outside {self._root}; "
                          f"writing to {os.path.join(self.dirpath, self.filename)} instead")

    def on_epoch_end(self, handler: "NNHandler", epoch: int, logs: Dict[str, float]) -> None:
        if handler.epoch % self.every_n_epochs == 0:
            self.write(handler)

    def write(self, handler: "NNHandler") -> str:
        """Draw the samples and write the PNG now; returns its path."""
        from ..plotting import save_samples_png
        self._settle(handler)
        samples = handler.sample([self.n, *self.sample_shape], self.steps, corrector_steps=self.corrector_steps,
                                 seed=self.seed, progress_bar=False)
        path = os.path.join(self.dirpath, self.filename.format(epoch=handler.epoch))
        if handler.rank == 0:
            save_samples_png(samples, path, nrow=self.nrow, value_range=self.value_range,
                             title=f"epoch {handler.epoch}")
        self.written.append(path)
        return path

    def state_dict(self) -> Dict[str, Any]:
        return {"written": list(self.written)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.written = [str(p) for p in state.get("written", [])]
