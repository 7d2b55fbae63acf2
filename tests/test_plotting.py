"""The pictures' decisions, read off the figures ``nn_handler.plotting`` builds: a log axis when a
loss curve spans decades, integer epoch ticks, the point where a resumed run started marked, no
empty plots (a score model gets no metrics.png), and PNGs written with the umask's permissions."""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch

from nn_handler import NNHandler
from nn_handler.plotting import losses_figure, metrics_figure, plot_losses, plot_metrics, record_start

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)


def history(train: List[float], val: Optional[List[float]] = None, metrics: Optional[Dict[str, List[float]]] = None,
            metadata: Optional[dict] = None) -> SimpleNamespace:
    """What the plotting functions read of a handler: its history, metrics and metadata."""
    metrics = metrics or {}
    return SimpleNamespace(train_losses=list(train), val_losses=list(val or []), metrics=dict.fromkeys(metrics),
                           train_metrics_history={k: list(v) for k, v in metrics.items()},
                           val_metrics_history={k: list(v) for k, v in metrics.items()},
                           metadata=dict(metadata or {}), epoch=len(train))


def visible_ticks(ax) -> List[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


def marks(ax) -> List[float]:
    """x positions of the vertical lines (the start marks)."""
    return [float(line.get_xdata()[0]) for line in ax.lines
            if len(set(map(float, line.get_xdata()))) == 1 and len(line.get_xdata()) == 2]


# ---------------------------------------------------------------------------- the loss axis
@pytest.mark.parametrize("train", [
    [63.0, 9.0, 7.0, 6.0, 5.5, 5.0],  # a first value of 63 then 5-10
    [10.0 ** -k for k in range(6)],  # synthetic data from 1 to 1e-5
])
def test_a_loss_curve_spanning_more_than_a_decade_is_on_a_log_axis(train):
    ax = losses_figure(history(train)).axes[0]
    assert ax.get_yscale() == "log"


@pytest.mark.parametrize("train", [
    [2.3, 1.9, 1.5, 1.2, 1.0],  # within a decade: linear reads best
    [0.5, -0.2, -1.0, -3.0, -9.0],  # negative values (an ELBO, a log-likelihood): no log axis
])
def test_a_loss_curve_within_a_decade_or_not_positive_stays_linear(train):
    ax = losses_figure(history(train)).axes[0]
    assert ax.get_yscale() == "linear"


def test_the_validation_curve_counts_for_the_log_axis_and_nan_epochs_are_skipped():
    h = history([2.0, 1.8, 1.7, 1.6], val=[math.nan, 40.0, math.nan, 1.5])
    ax = losses_figure(h).axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.lines] == ["train", "validation"]
    assert list(ax.lines[1].get_xdata()) == [2, 4]


# ---------------------------------------------------------------------------- epoch ticks
@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 1000])
def test_epoch_ticks_are_whole_numbers(epochs):
    h = history([1.0 / (i + 1) for i in range(epochs)], metrics={"accuracy": [0.5] * epochs})
    for fig in (losses_figure(h), metrics_figure(h)):
        ticks = visible_ticks(fig.axes[0])
        assert ticks and all(t.is_integer() for t in ticks), ticks


# ---------------------------------------------------------------------------- where a run went on
def test_the_start_of_a_resumed_run_is_marked_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    h = hc.classification_handler()
    record_start(h, "resumed")  # a fresh run (epoch 0) records nothing
    assert "training_starts" not in h.metadata
    h.train(3, seed=0, progress_bar=False)
    h.save(tmp_path / "a.pt")
    assert marks(losses_figure(h).axes[0]) == []

    resumed = NNHandler.load(tmp_path / "a.pt")
    record_start(resumed, "resumed")
    resumed.train(2, progress_bar=False)
    resumed.save(tmp_path / "b.pt")
    again = NNHandler.load(tmp_path / "b.pt")  # the mark is recorded in the checkpoint
    record_start(again, "fine-tuned")
    again.train(1, progress_bar=False)
    for fig in (losses_figure(again), metrics_figure(again)):
        ax = fig.axes[0]
        assert marks(ax) == [3.5, 5.5]  # between the last epoch before and the first after
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "resumed after epoch 3" in legend and "fine-tuned after epoch 5" in legend


def test_explicit_starts_are_drawn_and_out_of_range_records_are_ignored():
    h = history([1.0, 0.9, 0.8, 0.7], metadata={"training_starts": [{"epoch": 2, "label": "resumed"},
                                                                     {"epoch": 99, "label": "bogus"}, "junk"]})
    assert marks(losses_figure(h).axes[0]) == [2.5]
    assert marks(losses_figure(h, starts=[(1, "fine-tuned")]).axes[0]) == [1.5]


# ---------------------------------------------------------------------------- no empty pictures
def test_a_score_model_without_metrics_gets_no_metrics_picture_but_its_losses(tmp_path):
    h = history([60.0 * 0.99 ** i + 1 for i in range(1000)], val=[math.nan] * 9 * 100 + [1.2] * 100)
    assert metrics_figure(h) is None
    assert plot_metrics(h, tmp_path / "metrics.png") is None
    assert not (tmp_path / "metrics.png").exists()
    assert plot_losses(h, tmp_path / "losses.png") == tmp_path / "losses.png"
    assert losses_figure(h).axes[0].get_yscale() == "log"


def test_nothing_is_drawn_before_the_first_epoch(tmp_path):
    h = history([], metrics={"accuracy": []})
    assert plot_losses(h, tmp_path / "l.png") is None and plot_metrics(h, tmp_path / "m.png") is None
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- the files
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_pngs_are_written_with_the_umask_permissions_and_read_back(tmp_path, umask, mode):
    import matplotlib.image

    before = os.umask(umask)
    try:
        path = plot_losses(history([3.0, 2.0, 1.5], val=[3.5, 2.5, 2.0]), tmp_path / "losses.png")
    finally:
        os.umask(before)
    assert stat.S_IMODE(Path(path).stat().st_mode) == mode
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] >= 300 and image.shape[1] >= 400 and image.std() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["losses.png"]  # no temporary left behind
