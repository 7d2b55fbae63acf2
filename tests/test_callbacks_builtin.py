"""The built-in callbacks: ModelCheckpoint, EarlyStopping, LearningRateLogger, SampleGrid; their
settings and state through save/load; the PNG pictures."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch

from nn_handler import ModelType, NNHandler, NNHandlerWarning
from nn_handler.callbacks import Callback, EarlyStopping, LearningRateLogger, ModelCheckpoint, SampleGrid
from nn_handler.plotting import save_samples_png
from nn_handler.sde import VPSDE

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quiet_load(path, **kwargs) -> NNHandler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NNHandler.load(path, **kwargs)


def assert_png(path: Path, min_size=(50, 50)) -> None:
    import matplotlib.image
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    assert image.std() > 0  # not a blank picture


def frozen_handler(**kwargs) -> NNHandler:
    """A classifier whose SGD step is zero: every epoch has the same loss (nothing improves)."""
    torch.manual_seed(0)
    h = hc.classification_handler(dropout=0.0, scheduler=False, **kwargs)
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    return h


# ---------------------------------------------------------------------------- ModelCheckpoint
def test_model_checkpoint_keeps_the_best_k_by_val_loss_and_last(tmp_path):
    torch.manual_seed(0)
    h = hc.classification_handler()
    h.set_optimizer(torch.optim.SGD, lr=0.5, momentum=0.9)  # a bumpy validation loss
    cb = ModelCheckpoint(dirpath=str(tmp_path), filename="epoch{epoch:03d}-{val_loss:.4f}.pt", monitor="val_loss",
                         mode="min", save_top_k=2)
    h.add_callback(cb)
    h.train(6, seed=0, progress_bar=False)
    ranked = sorted(range(6), key=lambda i: h.val_losses[i])[:2]
    expected = {str(tmp_path / f"epoch{i + 1:03d}-{h.val_losses[i]:.4f}.pt") for i in ranked}
    assert set(cb.best_k_models) == expected
    assert sorted(os.listdir(tmp_path)) == sorted([Path(p).name for p in expected] + ["last.pt"])
    assert cb.best_model_score == pytest.approx(min(h.val_losses))
    best = quiet_load(cb.best_model_path)
    assert best.epoch == ranked[0] + 1  # the file is the handler at that epoch
    # the file already lists itself in the callback's recorded state
    assert cb.best_model_path in best.callbacks[0].best_k_models
    assert quiet_load(tmp_path / "last.pt").epoch == 6


def test_model_checkpoint_mode_max_on_a_metric_and_top_k_minus_one_keeps_all(tmp_path):
    torch.manual_seed(0)
    h = hc.classification_handler()
    top = ModelCheckpoint(dirpath=str(tmp_path / "top"), filename="e{epoch}-{val_accuracy:.3f}.pt",
                          monitor="val_accuracy", mode="max", save_top_k=1, save_last=False)
    every = ModelCheckpoint(dirpath=str(tmp_path / "all"), monitor="val_loss", save_top_k=-1, save_last=False)
    h.add_callback(top)
    h.add_callback(every)
    h.train(3, seed=0, progress_bar=False)
    assert len(os.listdir(tmp_path / "top")) == 1
    assert top.best_model_score == pytest.approx(max(h.val_metrics_history["accuracy"]))
    assert sorted(os.listdir(tmp_path / "all")) == ["epoch001.pt", "epoch002.pt", "epoch003.pt"]


def test_model_checkpoint_without_monitor_keeps_the_latest_k(tmp_path):
    h = hc.classification_handler(val=False)
    h.add_callback(ModelCheckpoint(dirpath=str(tmp_path), monitor=None, save_top_k=2, save_last=False))
    h.train(4, seed=0, progress_bar=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch003.pt", "epoch004.pt"]


def test_model_checkpoint_skips_epochs_without_the_monitored_value(tmp_path):
    h = hc.classification_handler()
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=3)
    h.add_callback(cb)
    h.train(4, seed=0, validate_every=2, progress_bar=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch002.pt", "epoch004.pt", "last.pt"]


def test_model_checkpoint_names_a_template_key_that_the_epoch_lacks(tmp_path):
    h = hc.classification_handler(val=False)
    h.add_callback(ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}-{val_f1}.pt", monitor="loss"))
    with pytest.raises(KeyError, match="val_f1.*available.*loss"):
        h.train(1, seed=0, progress_bar=False)


def test_model_checkpoint_state_survives_load_and_keeps_ranking_across_the_resume(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    torch.manual_seed(0)
    straight = hc.classification_handler()
    straight.add_callback(ModelCheckpoint(dirpath=str(straight_dir), save_top_k=2, filename="e{epoch}.pt"))
    straight.train(5, seed=0, progress_bar=False)
    torch.manual_seed(0)
    first = hc.classification_handler()
    first.add_callback(ModelCheckpoint(dirpath=str(resumed_dir), save_top_k=2, filename="e{epoch}.pt"))
    first.train(3, seed=0, progress_bar=False)
    resumed = quiet_load(resumed_dir / "last.pt")
    cb = resumed.callbacks[0]
    assert isinstance(cb, ModelCheckpoint) and cb.save_top_k == 2 and cb.filename == "e{epoch}.pt"
    assert cb.best_k_models == first.callbacks[0].best_k_models
    resumed.train(2, progress_bar=False)
    assert sorted(os.listdir(resumed_dir)) == sorted(os.listdir(straight_dir))
    assert {Path(p).name: s for p, s in cb.best_k_models.items()} == \
        {Path(p).name: s for p, s in straight.callbacks[0].best_k_models.items()}


def test_model_checkpoint_records_a_path_directory_as_a_string(tmp_path):
    h = hc.classification_handler(val=False)
    h.add_callback(ModelCheckpoint(dirpath=tmp_path / "p", monitor="loss"))
    h.train(1, seed=0, progress_bar=False)
    cb = quiet_load(tmp_path / "p" / "last.pt").callbacks[0]
    assert cb.dirpath == str(tmp_path / "p") and len(cb.best_k_models) == 1


def test_model_checkpoint_refuses_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        ModelCheckpoint(mode="lowest")
    with pytest.raises(ValueError, match="save_top_k"):
        ModelCheckpoint(save_top_k=-2)


# ---------------------------------------------------------------------------- EarlyStopping
def test_early_stopping_stops_after_patience_epochs_without_improvement():
    h = frozen_handler()
    cb = EarlyStopping(monitor="val_loss", patience=2, min_delta=1e-6)
    h.add_callback(cb)
    h.train(10, seed=0, progress_bar=False)
    assert h.epoch == 3 and cb.stopped_epoch == 3 and cb.best_epoch == 1 and cb.wait == 2


def test_early_stopping_keeps_going_while_the_monitored_value_improves():
    torch.manual_seed(0)
    h = hc.classification_handler(dropout=0.0)
    cb = EarlyStopping(monitor="loss", patience=1)
    h.add_callback(cb)
    h.train(4, seed=0, progress_bar=False)
    assert h.epoch == 4 and cb.stopped_epoch is None and cb.best == pytest.approx(min(h.train_losses))


def test_early_stopping_mode_max_and_min_delta():
    h = frozen_handler()
    cb = EarlyStopping(monitor="val_accuracy", mode="max", patience=1, min_delta=0.5)
    h.add_callback(cb)
    h.train(5, seed=0, progress_bar=False)
    assert h.epoch == 2 and cb.best == pytest.approx(h.val_metrics_history["accuracy"][0])


def test_early_stopping_state_survives_load_so_a_resumed_run_stops_when_the_straight_one_does(tmp_path):
    h = frozen_handler()
    h.add_callback(EarlyStopping(monitor="val_loss", patience=3, min_delta=1e-6))
    h.train(2, seed=0, progress_bar=False)
    h.save(tmp_path / "es.pt")
    loaded = quiet_load(tmp_path / "es.pt")
    cb = loaded.callbacks[0]
    assert (cb.monitor, cb.patience, cb.mode, cb.min_delta) == ("val_loss", 3, "min", 1e-6)
    assert cb.wait == 1 and cb.best == pytest.approx(h.val_losses[0])
    loaded.train(10, progress_bar=False)
    assert loaded.epoch == 4 and cb.stopped_epoch == 4


# ---------------------------------------------------------------------------- LearningRateLogger
def test_learning_rate_logger_records_the_lr_each_epoch_trains_with_and_survives_load(tmp_path):
    h = hc.classification_handler()  # StepLR gamma 0.7 from lr 1e-2
    h.add_callback(LearningRateLogger(log=False))
    h.train(3, seed=0, progress_bar=False)
    cb = h.callbacks[0]
    assert cb.epochs == [0, 1, 2]
    assert cb.lr == pytest.approx([1e-2, 7e-3, 4.9e-3])
    h.save(tmp_path / "lr.pt")
    loaded = quiet_load(tmp_path / "lr.pt")
    assert loaded.callbacks[0].log is False and loaded.callbacks[0].lrs == cb.lrs
    loaded.train(1, progress_bar=False)
    assert loaded.callbacks[0].epochs == [0, 1, 2, 3] and loaded.callbacks[0].lr[-1] == pytest.approx(3.43e-3)


def test_learning_rate_logger_logs_every_group(caplog):
    h = hc.classification_handler()
    h.add_callback(LearningRateLogger())
    with caplog.at_level("INFO", logger="nn_handler"):
        h.train(1, seed=0, progress_bar=False)
    assert "epoch 1: lr 0.01" in caplog.text


# ---------------------------------------------------------------------------- SampleGrid and pictures
def _exact_score_handler() -> NNHandler:
    h = NNHandler(hg.ExactMixtureScore, device="cpu", model_type=ModelType.SCORE_BASED, **hg.SDE_KWARGS)
    h.set_sde(VPSDE, **hg.SDE_KWARGS)
    h.set_optimizer(torch.optim.SGD, lr=0.0)
    h.set_train_loader(hg.MIXTURE, batch_size=1024)
    return h


def test_sample_grid_writes_a_png_every_n_epochs_and_survives_load(tmp_path):
    h = _exact_score_handler()
    h.add_callback(SampleGrid(sample_shape=[2], every_n_epochs=2, n=200, steps=20, dirpath=str(tmp_path)))
    h.train(4, seed=0, progress_bar=False)
    assert sorted(os.listdir(tmp_path)) == ["samples_epoch002.png", "samples_epoch004.png"]
    assert_png(tmp_path / "samples_epoch004.png")
    h.save(tmp_path / "grid.pt")
    cb = quiet_load(tmp_path / "grid.pt").callbacks[0]
    assert (cb.sample_shape, cb.every_n_epochs, cb.n, cb.steps, cb.dirpath) == ([2], 2, 200, 20, str(tmp_path))
    assert cb.written == [str(tmp_path / "samples_epoch002.png"), str(tmp_path / "samples_epoch004.png")]


def test_sample_grid_does_not_disturb_the_training_random_streams(tmp_path):
    runs = []
    for with_grid in (False, True):
        torch.manual_seed(0)
        h = hg.score_handler(hidden=16)
        if with_grid:
            h.add_callback(SampleGrid(sample_shape=[2], every_n_epochs=1, n=10, steps=3, dirpath=str(tmp_path)))
        h.train(2, seed=0, ema_decay=0.9, progress_bar=False)
        runs.append(h)
    hc.assert_same(runs[0].module.state_dict(), runs[1].module.state_dict(), "weights")


def test_image_samples_become_a_grid_png(tmp_path):
    images = torch.rand(10, 1, 8, 8)
    assert_png(save_samples_png(images, tmp_path / "gray.png", value_range=(0, 1)))
    assert_png(save_samples_png(torch.rand(5, 3, 6, 6), tmp_path / "rgb.png"))
    assert_png(save_samples_png(torch.randn(300), tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="C in"):
        save_samples_png(torch.rand(4, 5, 6, 6), tmp_path / "bad.png")


def test_plot_losses_and_metrics_write_pngs(tmp_path):
    h = hc.classification_handler()
    h.train(3, seed=0, progress_bar=False)
    h.plot_losses(tmp_path / "losses.png")
    h.plot_metrics(tmp_path / "metrics.png")
    assert_png(tmp_path / "losses.png")
    assert_png(tmp_path / "metrics.png")


# ---------------------------------------------------------------------------- every callback, settings + state
CALLBACKS = [
    (ModelCheckpoint, dict(dirpath="ckpts", filename="x{epoch}.pt", monitor="val_accuracy", mode="max",
                           save_top_k=3, save_last=False, every_n_epochs=2, last_filename="final.pt"),
     {"best_k_models": {"ckpts/x2.pt": 0.5}, "last_model_path": None}),
    (EarlyStopping, dict(monitor="loss", patience=7, mode="max", min_delta=0.01),
     {"best": 0.25, "best_epoch": 3, "wait": 2, "stopped_epoch": None}),
    (LearningRateLogger, dict(log=False), {"epochs": [0, 1], "lrs": [[0.1, 0.2], [0.05, 0.1]]}),
    (SampleGrid, dict(sample_shape=[1, 8, 8], every_n_epochs=3, n=9, steps=50, corrector_steps=1, seed=4,
                      dirpath="pics", filename="s{epoch}.png", value_range=[-1.0, 1.0], nrow=3),
     {"written": ["pics/s3.png"]}),
]


@pytest.mark.parametrize("cls, kwargs, state", CALLBACKS, ids=[c[0].__name__ for c in CALLBACKS])
def test_every_builtin_callback_round_trips_its_settings_and_state(tmp_path, cls, kwargs, state):
    cb = cls(**kwargs)
    assert isinstance(cb, Callback)
    cb.load_state_dict(state)
    h = hc.classification_handler()
    h.add_callback(cb)
    h.save(tmp_path / "cb.pt")
    loaded = quiet_load(tmp_path / "cb.pt").callbacks
    assert len(loaded) == 1 and type(loaded[0]) is cls
    assert loaded[0].init_kwargs == kwargs
    for name, value in kwargs.items():
        assert getattr(loaded[0], name) == value, name
    assert loaded[0].state_dict() == state
    assert quiet_load(tmp_path / "cb.pt", skip_callbacks=True).callbacks == []


def test_a_sample_grid_restored_from_a_forged_file_writes_only_inside_the_run(tmp_path):
    """A file cannot make SampleGrid write a picture outside the directory it was loaded from."""
    from nn_handler.checkpointing import atomic_save
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    h = _exact_score_handler()
    h.add_callback(SampleGrid(sample_shape=[2], every_n_epochs=1, n=20, steps=3, dirpath=str(run)))
    h.save(run / "grid.pt")
    state = torch.load(run / "grid.pt", weights_only=True)
    for kwargs in ({"dirpath": str(victim)}, {"dirpath": str(run), "filename": "../victim/x{epoch}.png"},
                   {"dirpath": str(run), "filename": "{epoch.__class__}.png"}):
        state["callbacks"][0]["spec"].update(kwargs)
        atomic_save(state, run / "forged.pt")
        loaded = NNHandler.load(run / "forged.pt")
        with pytest.warns(NNHandlerWarning, match="SampleGrid: the recorded"):
            loaded.train(1, progress_bar=False)
        assert os.listdir(victim) == []
        written = loaded.callbacks[0].written[-1]
        assert os.path.commonpath([os.path.realpath(written), str(run)]) == str(run) and os.path.isfile(written)
        state["callbacks"][0]["spec"].update(dirpath=str(run), filename="samples_epoch{epoch:03d}.png")
