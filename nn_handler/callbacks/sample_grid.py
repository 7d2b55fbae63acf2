"""SampleGrid: a PNG of samples from a generative model every N epochs."""
from __future__ import annotations

import math
import operator
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .base import Callback
from .model_checkpoint import field_problem

if TYPE_CHECKING:  # pragma: no cover
    from ..handler import NNHandler


def _plain_filename(name: Any) -> bool:
    """A ``.png`` file name with no directory part whose only format field is ``{epoch}``, with at
    most a short number format (``{epoch:03d}``; no conversion, nested field or wide padding)."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name or ".." in name or "\0" in name \
            or "\\" in name or not name.lower().endswith(".png"):
        return False
    return field_problem(name, ("epoch",), any_name=False) is None


# Bounds on what one picture may cost (a SampleGrid's settings can come from a file).
MAX_SAMPLES = 4096
MAX_ELEMENTS = 2 ** 26
MAX_STEPS = 100_000
MAX_DIMS = 8


def _count(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``, else a ValueError naming it."""
    number = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            if isinstance(value, float) and value.is_integer():
                number = int(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"SampleGrid: {name} must be an integer from {low} to {high}, got {str(value)[:80]}")
    return number


class SampleGrid(Callback):
    """Every ``every_n_epochs`` epochs, draw ``n`` samples with ``handler.sample`` and write a PNG.

    ``sample_shape`` is one sample's shape: ``[C, H, W]`` or ``[H, W]`` gives an image grid
    (``value_range`` maps to black..white; None: the samples' min..max), ``[2]`` a scatter
    plot. The fixed ``seed`` draws the same noise each time, so successive pictures show the
    model's progress and the training's random streams are not touched (seed=None draws
    from them). The EMA weights are used when EMA is on. Under DDP every rank samples its
    share and rank 0 writes ``dirpath/filename`` (``{epoch}``: epochs done, from 1).

    The settings are bounded, as they may come from a file: ``n`` at most 4096, ``n`` times
    the sample's size at most 2**26 elements, ``steps`` and ``corrector_steps`` at most
    100,000, ``nrow`` at most ``n``; anything else is a ValueError naming the value.
    """

    def __init__(self, sample_shape: Sequence[int], every_n_epochs: int = 5, n: int = 64, steps: int = 200,
                 corrector_steps: int = 0, seed: Optional[int] = 0, dirpath: str = "samples",
                 filename: str = "samples_epoch{epoch:03d}.png", value_range: Optional[Sequence[float]] = None,
                 nrow: Optional[int] = None):
        self.every_n_epochs = _count(every_n_epochs, "every_n_epochs", 1, 2 ** 31)
        self.n = _count(n, "n", 1, MAX_SAMPLES)
        self.steps = _count(steps, "steps", 1, MAX_STEPS)
        self.corrector_steps = _count(corrector_steps, "corrector_steps", 0, MAX_STEPS)
        if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, Sequence) \
                or not 1 <= len(sample_shape) <= MAX_DIMS:
            raise ValueError(f"SampleGrid: sample_shape must be a list of 1 to {MAX_DIMS} sizes, got "
                             f"{str(sample_shape)[:80]}")
        self.sample_shape = [_count(d, "each sample_shape size", 1, MAX_ELEMENTS) for d in sample_shape]
        elements = self.n * math.prod(self.sample_shape)
        if elements > MAX_ELEMENTS:
            raise ValueError(f"SampleGrid: n * prod(sample_shape) must be at most {MAX_ELEMENTS} elements, got "
                             f"{self.n} x {self.sample_shape} = {elements}")
        self.nrow = None if nrow is None else _count(nrow, "nrow", 1, self.n)
        self.seed = seed
        self.dirpath = os.fspath(dirpath)
        if "dirpath" in self._init_kwargs:  # a pathlib.Path is recorded as the plain string it names
            self._init_kwargs["dirpath"] = self.dirpath
        self.filename = filename
        if value_range is not None and (isinstance(value_range, (str, bytes)) or not isinstance(value_range, Sequence)
                                        or len(value_range) != 2):
            raise ValueError(f"SampleGrid: value_range must be None or [lo, hi], got {str(value_range)[:80]}")
        self.value_range = None if value_range is None else [float(v) for v in value_range]
        self.written: List[str] = []
        self._root: Optional[str] = None  # set by confine_paths when restored from a file
        self._recorded: Optional[Dict[str, str]] = None

    def relocate(self, dirpath: Any) -> None:
        """Write the next pictures into ``dirpath`` (and record it there): a run that goes on
        from a checkpoint moves a restored grid into its own output directory."""
        self.dirpath = os.fspath(dirpath)
        if "dirpath" in self._init_kwargs:
            self._init_kwargs["dirpath"] = self.dirpath

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
