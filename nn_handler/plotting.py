"""PNG pictures with matplotlib, headless: sample grids, scatter plots, loss and metric curves.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, never
``pyplot``), so nothing depends on, or changes, the process's matplotlib backend, and no
display is needed. Files are written atomically (a temporary file, then a rename) with the
permissions a plain ``open`` gives (the umask honoured, not the temporary file's 0600).

Curves: epochs on integer ticks; ``losses.png`` on a log axis when a curve spans more than a
decade (all values positive); every point where training went on from a checkpoint (a resume,
a fine-tune) is marked, from ``h.metadata["training_starts"]`` (a list of ``{"epoch": E,
"label": "resumed"}``: E epochs were done when that training call began; the runner records
one per training task) or the ``starts`` argument. A picture with nothing to show is not
written: ``plot_metrics`` of a handler without metrics (a score model) writes no file.
"""
from __future__ import annotations

import math
import operator
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .handler import NNHandler

PathLike = Union[str, os.PathLike]

__all__ = ["save_samples_png", "image_grid", "plot_losses", "plot_metrics", "losses_figure", "metrics_figure",
           "curves_figure", "record_start", "training_starts", "STARTS_KEY"]


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _write(fig: "Figure", path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _nrow(nrow: Optional[int], n: int) -> int:
    """Images per row: ``nrow`` (an int >= 1; more than ``n`` is ``n``), None: about sqrt(n)."""
    if nrow is None or nrow == 0:
        return max(1, math.ceil(math.sqrt(n)))
    try:
        count = None if isinstance(nrow, bool) else operator.index(nrow)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"nrow must be None or an integer >= 1, got {str(nrow)[:80]}")
    return max(1, min(count, n))  # a row longer than the samples would only be blank canvas


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 1,
               value_range: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """Images ``(n, C, H, W)`` (C = 1 or 3) or ``(n, H, W)`` tiled into one ``(H', W', C)`` array in [0, 1].

    ``value_range`` (lo, hi) maps lo to black and hi to white; None uses the samples' own min and max.
    """
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes (n, H, W) or (n, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    lo, hi = value_range if value_range is not None else (x.min().item(), x.max().item())
    x = ((x - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    n, c, h, w = x.shape
    nrow = _nrow(nrow, n)
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0)


def save_samples_png(samples: torch.Tensor, path: PathLike, nrow: Optional[int] = None,
                     value_range: Optional[Sequence[float]] = None, title: Optional[str] = None) -> Path:
    """Write ``samples`` as a PNG: a grid for images (``(n, H, W)`` or ``(n, C, H, W)``), a
    scatter plot for 2-D points ``(n, 2)``, a histogram for 1-D values ``(n,)`` or ``(n, 1)``.
    ``nrow`` larger than the number of samples is clamped to it."""
    samples = samples.detach().float().cpu()
    if samples.dim() == 1 or (samples.dim() == 2 and samples.shape[1] == 1):
        fig = _figure(5, 4)
        ax = fig.add_subplot()
        ax.hist(samples.reshape(-1).numpy(), bins=50)
    elif samples.dim() == 2 and samples.shape[1] == 2:
        fig = _figure(5, 5)
        ax = fig.add_subplot()
        ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=4, alpha=0.6)
        ax.set_aspect("equal", adjustable="datalim")
    else:
        grid = image_grid(samples, nrow=nrow, value_range=tuple(value_range) if value_range is not None else None)
        height, width = grid.shape[0], grid.shape[1]
        scale = 6.0 / max(height, width)
        fig = _figure(max(2.0, width * scale), max(2.0, height * scale) + (0.4 if title else 0.0))
        ax = fig.add_subplot()
        ax.imshow(grid[..., 0].numpy() if grid.shape[2] == 1 else grid.numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _write(fig, path)


STARTS_KEY = "training_starts"
Start = Tuple[int, str]  # (epochs done when a training call began, what it was: "resumed", "fine-tuned")


def record_start(h: "NNHandler", label: str) -> None:
    """Record in ``h.metadata`` that training goes on from ``h.epoch`` (call it before ``h.train``;
    a fresh run, at epoch 0, records nothing). The pictures mark each recorded start."""
    if h.epoch <= 0:
        return
    starts = [s for s in h.metadata.get(STARTS_KEY) or []
              if isinstance(s, dict) and isinstance(s.get("epoch"), int) and s["epoch"] < h.epoch]
    h.metadata[STARTS_KEY] = [*starts, {"epoch": int(h.epoch), "label": str(label)}]


def training_starts(h: "NNHandler") -> List[Start]:
    """The starts recorded in ``h.metadata`` (see ``record_start``), inside the recorded history."""
    found: List[Start] = []
    for item in h.metadata.get(STARTS_KEY) or []:
        epoch = item.get("epoch") if isinstance(item, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 < epoch < len(h.train_losses):
            found.append((epoch, str(item.get("label") or "resumed")[:40]))
    return sorted(set(found))


def _points(values: Sequence[Optional[float]], offset: int) -> List[Tuple[int, float]]:
    return [(offset + i + 1, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(v)]


def spans_decades(series: Dict[str, List[Tuple[int, float]]]) -> bool:
    """Whether a log axis reads better: every value positive and some curve spanning more than a decade."""
    values = [v for points in series.values() for _, v in points]
    if not values or min(values) <= 0 or any(math.isinf(v) for v in values):
        return False
    return any(max(v for _, v in points) > 10 * min(v for _, v in points) for points in series.values() if points)


def curves_figure(series: Dict[str, List[Optional[float]]], ylabel: str, title: str, epochs: int,
                  starts: Sequence[Start] = (), log_scale: Union[bool, str] = False) -> Optional["Figure"]:
    """One line per series over epochs 1..``epochs`` (a series shorter than ``epochs``: a validation
    set added later, ends at the last epoch), or None when no series has a value. ``starts``: vertical
    marks between epoch E and E + 1; ``log_scale``: True, False or "auto" (``spans_decades``)."""
    from matplotlib.ticker import MaxNLocator

    points = {name: _points(values, max(0, epochs - len(values))) for name, values in series.items()}
    points = {name: p for name, p in points.items() if p}
    if not points:
        return None
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, p in points.items():
        ax.plot(*zip(*p), marker="o" if len(p) < 30 else None, markersize=3, label=name)
    if log_scale is True or (log_scale == "auto" and spans_decades(points)):
        ax.set_yscale("log")
    for i, (epoch, label) in enumerate(starts):
        ax.axvline(epoch + 0.5, color="0.4", linestyle="--", linewidth=1,
                   label=f"{label} after epoch {epoch}" if i < 3 else None)
    ax.set_xlim(0.5, max(x for p in points.values() for x, _ in p) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def losses_figure(h: "NNHandler", starts: Optional[Sequence[Start]] = None) -> Optional["Figure"]:
    """The loss curves' figure (training, and validation when it has values), or None before any epoch."""
    series: Dict[str, List[Optional[float]]] = {"train": list(h.train_losses)}
    if any(v is not None and not math.isnan(v) for v in h.val_losses):
        series["validation"] = list(h.val_losses)
    return curves_figure(series, "loss", "loss", len(h.train_losses),
                         training_starts(h) if starts is None else starts, log_scale="auto")


def metrics_figure(h: "NNHandler", starts: Optional[Sequence[Start]] = None) -> Optional["Figure"]:
    """The metric curves' figure (training and validation), or None when there are none to draw."""
    series: Dict[str, List[Optional[float]]] = {}
    for name, values in h.train_metrics_history.items():
        series[f"train {name}"] = list(values)
    for name, values in h.val_metrics_history.items():
        series[f"val {name}"] = list(values)
    return curves_figure(series, "value", "metrics", len(h.train_losses),
                         training_starts(h) if starts is None else starts)


def plot_losses(h: "NNHandler", path: PathLike, starts: Optional[Sequence[Start]] = None) -> Optional[Path]:
    """Training (and validation) loss per epoch as a PNG; None (no file) before any epoch."""
    fig = losses_figure(h, starts)
    return None if fig is None else _write(fig, path)


def plot_metrics(h: "NNHandler", path: PathLike, starts: Optional[Sequence[Start]] = None) -> Optional[Path]:
    """Each metric per epoch, training and validation, as a PNG; None (no file) when the handler records
    no metric values (a score model has only its losses, which ``plot_losses`` draws)."""
    fig = metrics_figure(h, starts)
    return None if fig is None else _write(fig, path)
