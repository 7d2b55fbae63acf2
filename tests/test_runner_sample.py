"""task=sample from the CLI, and a tiny experiment=digits_score run (its epochs and steps cut way down)."""
from __future__ import annotations

import matplotlib.image
import torch
from test_runner import metrics, ok, run_cli

TINY_SCORE = ["experiment=digits_score", "train.epochs=2", "model.hidden=32", "model.layers=1",
              "data.train.val_fraction=0.9", "data.val.val_fraction=0.9", "sample.every_n_epochs=1", "sample.n=16",
              "sample.steps=20", "train.progress_bar=false"]


def test_tiny_digits_score_run_writes_grids_and_task_sample_writes_samples_pt_and_png(tmp_path):
    ok(run_cli(TINY_SCORE + ["hydra.run.dir=train"], cwd=tmp_path))
    record = metrics(tmp_path / "train")
    assert record["epoch"] == 2 and record["train_loss"] is not None
    grids = sorted((tmp_path / "train" / "samples").glob("*.png"))
    assert len(grids) == 2, grids
    assert matplotlib.image.imread(str(grids[-1])).ndim == 3

    # sample.steps (and corrector_steps, value_range) not given: those the training run's grids used
    ok(run_cli(["task=sample", "checkpoint.path=train", "sample.n=8", "seed=0", "hydra.run.dir=s_ema"], cwd=tmp_path))
    samples = torch.load(tmp_path / "s_ema" / "samples.pt", weights_only=True)
    assert samples.shape == (8, 1, 8, 8) and torch.isfinite(samples).all()
    image = matplotlib.image.imread(str(tmp_path / "s_ema" / "samples.png"))
    assert image.ndim == 3 and image.shape[0] > 8
    assert metrics(tmp_path / "s_ema")["weights"] == "ema"
    assert metrics(tmp_path / "s_ema")["steps"] == 20  # recorded in the run config (TINY_SCORE)

    ok(run_cli(["task=sample", "checkpoint.path=train", "sample.n=8", "sample.steps=10", "seed=0",
                "hydra.run.dir=s_ten"], cwd=tmp_path))
    assert metrics(tmp_path / "s_ten")["steps"] == 10  # the command line wins

    ok(run_cli(["task=sample", "checkpoint.path=train", "sample.n=8", "seed=0",
                "load.skip_ema=true", "hydra.run.dir=s_live"], cwd=tmp_path))
    live = torch.load(tmp_path / "s_live" / "samples.pt", weights_only=True)
    assert metrics(tmp_path / "s_live")["weights"] == "live"
    assert live.shape == samples.shape and not torch.equal(live, samples)  # other weights, same noise
