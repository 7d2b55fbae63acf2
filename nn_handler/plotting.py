"""PNG pictures with matplotlib, headless: sample grids, scatter plots, loss and metric curves.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, never
``pyplot``), so nothing depends on, or changes, the process's matplotlib backend, and no
display is needed. Files are written atomically (a temporary file, then a rename).
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

__all__ = ["save_samples_png", "image_grid", "plot_losses", "plot_metrics"]


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


def _curves(path: PathLike, series: Dict[str, List[float]], ylabel: str, title: str, epochs: int) -> Path:
    """One line per series; a series shorter than ``epochs`` (validation set later) ends at the last epoch."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    drawn = False
    for name, values in series.items():
        offset = max(0, epochs - len(values))
        points = [(offset + i + 1, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=name)
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no epochs recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _write(fig, path)


def plot_losses(h: "NNHandler", path: PathLike) -> Path:
    """Training (and validation) loss per epoch as a PNG."""
    series = {"train": list(h.train_losses)}
    if any(v is not None and not math.isnan(v) for v in h.val_losses):
        series["validation"] = list(h.val_losses)
    return _curves(path, series, "loss", "loss", len(h.train_losses))


def plot_metrics(h: "NNHandler", path: PathLike) -> Path:
    """Each metric per epoch, training and validation, as a PNG."""
    series: Dict[str, List[float]] = {}
    for name, values in h.train_metrics_history.items():
        series[f"train {name}"] = list(values)
    for name, values in h.val_metrics_history.items():
        series[f"val {name}"] = list(values)
    return _curves(path, series, "value", "metrics", len(h.train_losses))
