"""NNHandler.load / initialize_from_checkpoint: exact resume, skip flags, strictness, prefixes, file contents."""
from __future__ import annotations

import warnings

import helpers_core as hc
import pytest
import torch
from torch.optim.lr_scheduler import StepLR

from nn_handler import ModelType, NNHandler, NNHandlerWarning
from nn_handler.checkpointing import CheckpointError
from nn_handler.ema import EMA
from nn_handler.models import MLP


@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    """A checkpoint of a handler with every component, and the handler itself."""
    torch.manual_seed(0)
    h = hc.full_handler()
    path = tmp_path_factory.mktemp("full") / "full.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)  # everything in it is recordable
        h.save(path)
    return path, h


def load_quietly(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)
        return NNHandler.load(path, trusted_packages=hc.TRUST, **kwargs)


def rewrite(path, out, change):
    """A valid (checksummed) handler file holding the checkpoint's contents after ``change(state)``.

    It stands for a file written by another version or tool: handler files must carry a
    checksum, so it is written through the library's own writer.
    """
    from nn_handler.checkpointing.io import atomic_save

    state = torch.load(path, weights_only=True)
    change(state)
    atomic_save(state, out)
    return out


# ---------------------------------------------------------------------------- exact resume
def _train_straight(epochs, build, **train_kwargs):
    torch.manual_seed(0)
    h = build()
    h.train(epochs=epochs, seed=0, progress_bar=False, **train_kwargs)
    return h


def _train_resumed(first, total, build, path, **train_kwargs):
    torch.manual_seed(0)
    h = build()
    h.train(epochs=first, seed=0, progress_bar=False, **train_kwargs)
    h.save(path)
    del h
    torch.manual_seed(987)  # disturb every stream: load must bring them back
    torch.rand(100)
    resumed = NNHandler.load(path, device="cpu")
    resumed.train(epochs=total - first, progress_bar=False)  # every setting from the file
    return resumed


def _assert_identical_runs(a: NNHandler, b: NNHandler):
    assert a.epoch == b.epoch and a.global_step == b.global_step
    hc.assert_same(a.module.state_dict(), b.module.state_dict(), "weights")
    hc.assert_same(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    hc.assert_same(a.scheduler.state_dict(), b.scheduler.state_dict(), "scheduler")
    assert a.train_losses == b.train_losses
    hc.assert_same(a.val_losses, b.val_losses, "val_losses")
    hc.assert_same(a.train_metrics_history, b.train_metrics_history, "train metrics")
    hc.assert_same(a.val_metrics_history, b.val_metrics_history, "val metrics")
    assert a.ema is not None and b.ema is not None
    hc.assert_same(a.ema.state_dict(), b.ema.state_dict(), "ema")


def test_resume_after_two_of_four_epochs_matches_straight_training(tmp_path):
    straight = _train_straight(4, hc.classification_handler, ema_decay=0.9)
    resumed = _train_resumed(2, 4, hc.classification_handler, tmp_path / "half.pt", ema_decay=0.9)
    assert len(straight.train_losses) == 4 and len(straight.val_losses) == 4
    assert straight.train_losses[0] != straight.train_losses[-1]
    _assert_identical_runs(straight, resumed)


def test_resume_with_accumulation_clipping_and_plateau_scheduler_matches_straight_training(tmp_path):
    def build():
        h = hc.classification_handler(scheduler=False)
        h.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=0)
        return h

    settings = dict(ema_decay=0.8, gradient_accumulation_steps=4, gradient_clipping_norm=0.05)
    straight = _train_straight(3, build, **settings)
    resumed = _train_resumed(1, 3, build, tmp_path / "accum.pt", **settings)
    assert resumed.settings["gradient_accumulation_steps"] == 4
    assert resumed.settings["gradient_clipping_norm"] == 0.05
    # 6 batches per epoch in groups of 4: two optimizer steps an epoch.
    assert straight.global_step == 6
    _assert_identical_runs(straight, resumed)


def test_resume_without_the_saved_random_state_would_differ(tmp_path):
    """The exact-resume test can fail: restarting the random streams changes the run."""
    straight = _train_straight(3, hc.classification_handler, ema_decay=0.9)
    torch.manual_seed(0)
    h = hc.classification_handler()
    h.train(epochs=1, seed=0, ema_decay=0.9, progress_bar=False)
    h.train(epochs=2, seed=1, progress_bar=False)  # re-seeded: different dropout and order
    assert h.train_losses[0] == straight.train_losses[0]
    assert h.train_losses[1:] != straight.train_losses[1:]


# ---------------------------------------------------------------------------- components come back exactly
def test_load_restores_optimizer_class_hyperparameters_and_state(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert type(h2.optimizer) is torch.optim.Adam
    assert h2.optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert h2.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7 ** 2)
    hc.assert_same(h.optimizer.state_dict(), h2.optimizer.state_dict(), "optimizer")
    # The optimizer drives the loaded model's own parameters.
    assert {id(p) for p in h2.optimizer.param_groups[0]["params"]} == {id(p) for p in h2.module.parameters()}


def test_load_restores_scheduler_class_kwargs_and_state(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert type(h2.scheduler) is StepLR
    assert h2.scheduler.step_size == 1 and h2.scheduler.gamma == 0.7
    assert h2.scheduler.optimizer is h2.optimizer
    hc.assert_same(h.scheduler.state_dict(), h2.scheduler.state_dict(), "scheduler")
    assert h2.scheduler.last_epoch == 2


def test_load_restores_history_losses_and_metrics(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert h2.train_losses == h.train_losses and len(h2.train_losses) == 2
    assert h2.val_losses == h.val_losses and len(h2.val_losses) == 2
    assert h2.train_metrics_history == h.train_metrics_history
    assert set(h2.val_metrics_history) == {"accuracy"}
    assert h2.epoch == 2 and h2.global_step == h.global_step == 12


def test_load_recreates_callbacks_with_constructor_args_state_and_order(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert [type(cb).__name__ for cb in h2.callbacks] == ["Counter", "EventLog", "Counter"]
    first, middle, last = h2.callbacks
    assert first.init_kwargs == {"name": "first", "start": 5} and first.name == "first"
    assert last.init_kwargs == {"name": "last"} and last.name == "last"
    assert middle.tag == "middle"
    assert (first.count, last.count) == (7, 2)  # restored state, not the constructor's start
    assert all(a is not b for a, b in zip(h.callbacks, h2.callbacks))
    h2.train(epochs=1, progress_bar=False)
    assert (first.count, last.count) == (8, 3)


def test_load_restores_sde_and_sampler_from_kwargs_and_state(full_file):
    path, _ = full_file
    h2 = load_quietly(path)
    assert type(h2.sde) is hc.ToySDE and type(h2.sampler) is hc.ToySampler
    assert (h2.sde.sigma_min, h2.sde.sigma_max) == (0.02, 2.0)
    assert h2.sde.calls == 3 and torch.equal(h2.sde.table, torch.tensor([1.0, 2.0, 3.0]))
    assert (h2.sampler.steps, h2.sampler.snr, h2.sampler.draws) == (7, 0.2, 11)


def test_load_restores_ema_and_train_continues_it(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert isinstance(h2.ema, EMA) and h2.ema.decay == 0.9
    assert h2.ema.num_updates == h.ema.num_updates == 12
    hc.assert_same(h.ema.state_dict(), h2.ema.state_dict(), "ema")
    ema_before = h2.ema
    h2.train(epochs=1, progress_bar=False)
    assert h2.ema is ema_before and h2.ema.num_updates == 18  # continued, not restarted at 0


def test_load_restores_loss_metric_model_type_and_settings(full_file):
    path, h = full_file
    h2 = load_quietly(path)
    assert isinstance(h2.loss_fn, torch.nn.CrossEntropyLoss) and h2.loss_fn.label_smoothing == 0.05
    assert set(h2.metrics) == {"accuracy"}
    assert h2.model_type is ModelType.CLASSIFICATION
    assert h2.settings == h.settings and h2.settings["ema_decay"] == 0.9
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")


# ---------------------------------------------------------------------------- skip flags
FRESH = {
    "optimizer": lambda h: h.optimizer is None,
    "scheduler": lambda h: h.scheduler is None,
    "history": lambda h: (h.train_losses, h.val_losses, h.train_metrics_history, h.val_metrics_history) == ([], [], {}, {}),
    "callbacks": lambda h: h.callbacks == [],
    "sde": lambda h: h.sde is None,
    "sampler": lambda h: h.sampler is None,
    "ema": lambda h: h.ema is None and h.settings["ema_decay"] is None,
}
SKIPS = {
    "skip_optimizer": {"optimizer", "scheduler"},  # a scheduler cannot come back without its optimizer
    "skip_scheduler": {"scheduler"},
    "skip_history": {"history"},
    "skip_callbacks": {"callbacks"},
    "skip_sampler_sde": {"sde", "sampler"},
    "skip_ema": {"ema"},
}


def test_a_fresh_handler_has_every_component_unset():
    h = NNHandler(MLP, device="cpu", **hc.MODEL_KWARGS)
    assert all(check(h) for check in FRESH.values())


@pytest.mark.parametrize("flag", sorted(SKIPS))
def test_each_skip_flag_leaves_only_its_component_fresh(full_file, flag):
    path, _ = full_file
    if flag == "skip_optimizer":
        with pytest.warns(NNHandlerWarning, match="scheduler .*not restored because the optimizer was not"):
            h2 = NNHandler.load(path, trusted_packages=hc.TRUST, skip_optimizer=True)
    else:
        h2 = load_quietly(path, **{flag: True})
    fresh = {name for name, check in FRESH.items() if check(h2)}
    assert fresh == SKIPS[flag]
    baseline = load_quietly(path)
    assert {name for name, check in FRESH.items() if check(baseline)} == set()


def test_skip_ema_keeps_ema_off_when_training_continues(full_file):
    path, _ = full_file
    h2 = load_quietly(path, skip_ema=True)
    h2.train(epochs=1, progress_bar=False)
    assert h2.ema is None


def test_skip_history_keeps_weights_and_progress(full_file):
    path, h = full_file
    h2 = load_quietly(path, skip_history=True)
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")
    h2.train(epochs=1, progress_bar=False)
    assert len(h2.train_losses) == 1 and h2.epoch == 3


def test_skip_optimizer_and_scheduler_together_load_without_warnings(full_file):
    path, _ = full_file
    h2 = load_quietly(path, skip_optimizer=True, skip_scheduler=True)
    assert h2.optimizer is None and h2.scheduler is None
    with pytest.raises(RuntimeError, match=r"no optimizer is set: set it with h\.set_optimizer"):
        h2.train(epochs=1, progress_bar=False)


# ---------------------------------------------------------------------------- strict and non-strict
def _drop_and_add_key(state):
    weights = state["model_state_dict"]
    del weights["net.3.bias"]
    weights["extra.weight"] = torch.zeros(2, 2)


def test_strict_load_raises_a_checkpoint_error_naming_missing_and_unexpected_keys(full_file, tmp_path):
    path, _ = full_file
    bad = rewrite(path, tmp_path / "bad.pt", _drop_and_add_key)
    with pytest.raises(CheckpointError) as info:
        NNHandler.load(bad, trusted_packages=hc.TRUST, strict_load=True)
    text = str(info.value)
    assert "net.3.bias" in text and "extra.weight" in text and str(bad) in text


def test_non_strict_load_warns_naming_the_keys_and_loads_what_matches(full_file, tmp_path):
    path, h = full_file
    bad = rewrite(path, tmp_path / "bad.pt", _drop_and_add_key)
    with pytest.warns(NNHandlerWarning) as record:
        h2 = NNHandler.load(bad, trusted_packages=hc.TRUST)  # strict_load=False is the default
    text = " ".join(str(w.message) for w in record)
    assert "missing keys ['net.3.bias']" in text and "unexpected keys ['extra.weight']" in text
    assert torch.equal(h2.module.net[0].weight, h.module.net[0].weight)
    assert torch.equal(h2.module.net[3].weight, h.module.net[3].weight)


def test_initialize_from_checkpoint_is_strict_by_default(tmp_path):
    weights = MLP(**hc.MODEL_KWARGS).state_dict()
    del weights["net.0.bias"]
    torch.save(weights, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['net\.0\.bias'\]"):
        NNHandler.initialize_from_checkpoint(tmp_path / "partial.pt", MLP, **hc.MODEL_KWARGS)
    with pytest.warns(NNHandlerWarning, match=r"missing keys \['net\.0\.bias'\]"):
        h = NNHandler.initialize_from_checkpoint(tmp_path / "partial.pt", MLP, strict_load=False, **hc.MODEL_KWARGS)
    assert torch.equal(h.module.net[0].weight, weights["net.0.weight"])


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_always_raises_naming_the_key_and_both_shapes(full_file, strict):
    path, _ = full_file
    with pytest.raises(CheckpointError) as info:
        NNHandler.initialize_from_checkpoint(path, MLP, strict_load=strict, in_features=6, out_features=3, hidden=[8])
    text = str(info.value)
    assert "net.0.weight" in text and "(16, 6)" in text and "(8, 6)" in text
    with pytest.raises(CheckpointError, match=r"net\.0\.weight.*\(16, 6\).*\(8, 6\)"):
        NNHandler.load(path, strict_load=strict, model_class=MLP,
             model_kwargs={"in_features": 6, "out_features": 3, "hidden": [8]})


# ---------------------------------------------------------------------------- prefixes
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_prefixed_bare_state_dict_loads_through_initialize_from_checkpoint(tmp_path, prefix):
    model = MLP(**hc.MODEL_KWARGS)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "prefixed.pt")
    h = NNHandler.initialize_from_checkpoint(tmp_path / "prefixed.pt", MLP, **hc.MODEL_KWARGS)  # strict
    hc.assert_same(model.state_dict(), h.module.state_dict(), "weights")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_prefixed_handler_file_loads_and_saves_back_without_the_prefix(full_file, tmp_path, prefix):
    path, h = full_file

    def add_prefix(state):
        state["model_state_dict"] = {prefix + k: v for k, v in state["model_state_dict"].items()}

    prefixed = rewrite(path, tmp_path / "prefixed.pt", add_prefix)
    h2 = NNHandler.load(prefixed, trusted_packages=hc.TRUST, strict_load=True)
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")
    h3 = NNHandler.initialize_from_checkpoint(prefixed, MLP, **hc.MODEL_KWARGS)
    hc.assert_same(h.module.state_dict(), h3.module.state_dict(), "weights")
    h2.save(tmp_path / "again.pt")
    keys = list(torch.load(tmp_path / "again.pt", weights_only=True)["model_state_dict"])
    assert keys == list(h.module.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_a_model_whose_child_is_named_module_round_trips(tmp_path):
    h = NNHandler(hc.Wrapper, device="cpu")
    h.save(tmp_path / "wrapper.pt")
    saved = torch.load(tmp_path / "wrapper.pt", weights_only=True)["model_state_dict"]
    assert sorted(saved) == ["module.bias", "module.weight"]  # the model's own keys, kept
    h2 = NNHandler.load(tmp_path / "wrapper.pt", strict_load=True)
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")
    h3 = NNHandler.initialize_from_checkpoint(tmp_path / "wrapper.pt", hc.Wrapper)
    hc.assert_same(h.module.state_dict(), h3.module.state_dict(), "weights")
    # A DDP-wrapped copy of that model ("module.module.*") loads too.
    torch.save({"module." + k: v for k, v in h.module.state_dict().items()}, tmp_path / "ddp.pt")
    h4 = NNHandler.initialize_from_checkpoint(tmp_path / "ddp.pt", hc.Wrapper)
    hc.assert_same(h.module.state_dict(), h4.module.state_dict(), "weights")


def test_a_compiled_model_is_saved_without_the_orig_mod_prefix(tmp_path):
    h = NNHandler(hc.compiled_mlp, device="cpu", **hc.MODEL_KWARGS)  # a factory: compiles lazily, never here
    assert all(k.startswith("_orig_mod.") for k in h.model.state_dict())  # the compiled wrapper
    assert not any(k.startswith("_orig_mod.") for k in h.module.state_dict())  # the user's own module
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)  # a factory is recorded as such (issue 15)
        h.save(tmp_path / "compiled.pt")
    saved = torch.load(tmp_path / "compiled.pt", weights_only=True)["model_state_dict"]
    assert sorted(saved) == sorted(MLP(**hc.MODEL_KWARGS).state_dict())
    h2 = NNHandler.initialize_from_checkpoint(tmp_path / "compiled.pt", MLP, **hc.MODEL_KWARGS)
    hc.assert_same(saved, h2.module.state_dict(), "weights")
    h3 = NNHandler.initialize_from_checkpoint(tmp_path / "compiled.pt", hc.compiled_mlp, **hc.MODEL_KWARGS)
    hc.assert_same(saved, h3.module.state_dict(), "weights")


def test_a_model_built_by_a_function_is_rebuilt_by_load_only_when_trusted(tmp_path):
    h = NNHandler(hc.compiled_mlp, device="cpu", **hc.MODEL_KWARGS)
    h.save(tmp_path / "factory.pt")
    with pytest.raises(CheckpointError, match=r"compiled_mlp.*function.*trusted_packages="):
        NNHandler.load(tmp_path / "factory.pt")
    h2 = NNHandler.load(tmp_path / "factory.pt", trusted_packages=hc.TRUST)
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")


# ---------------------------------------------------------------------------- initialize_from_checkpoint
def test_initialize_from_a_bare_state_dict_loads_only_weights_with_defaults(tmp_path):
    model = MLP(**hc.MODEL_KWARGS)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    h = NNHandler.initialize_from_checkpoint(tmp_path / "weights.pt", MLP, **hc.MODEL_KWARGS)
    hc.assert_same(model.state_dict(), h.module.state_dict(), "weights")
    assert h.model_type is ModelType.CLASSIFICATION
    assert h.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert type(h.module) is MLP and len(h.module.net) == 4  # **model_kwargs reached the model (dropout layer)
    assert all(check(h) for check in FRESH.values()) and h.loss_fn is None and h.epoch == 0


def test_initialize_from_a_handler_file_loads_only_weights(full_file):
    path, h = full_file
    h2 = NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", model_type="Regression", **hc.MODEL_KWARGS)
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")
    assert h2.model_type is ModelType.REGRESSION
    assert all(check(h2) for check in FRESH.values()) and h2.loss_fn is None and h2.epoch == 0


def test_load_with_another_model_class_builds_that_model(full_file):
    path, h = full_file
    kwargs = {**hc.MODEL_KWARGS, "extra": 5}
    with pytest.warns(NNHandlerWarning) as record:
        h2 = NNHandler.load(path, model_class=hc.MLPWithExtraHead, model_kwargs=kwargs)
    assert any("missing keys ['extra.bias', 'extra.weight']" in str(w.message) for w in record)
    assert type(h2.module) is hc.MLPWithExtraHead and h2.module.extra.out_features == 5
    assert torch.equal(h2.module.net[0].weight, h.module.net[0].weight)
    with pytest.raises(CheckpointError, match=r"missing keys \['extra\.bias', 'extra\.weight'\]"):
        NNHandler.load(path, strict_load=True, model_class=hc.MLPWithExtraHead, model_kwargs=kwargs)
    # The saved optimizer state does not fit the new model's parameters: told, not half-restored.
    assert h2.optimizer is None and h2.scheduler is None
    h2.set_optimizer(torch.optim.SGD, lr=0.01)
    h2.train(epochs=1, progress_bar=False)
    assert len(h2.train_losses) == 3


def test_load_with_another_model_class_warns_that_the_optimizer_state_does_not_fit(full_file):
    path, _ = full_file
    with pytest.warns(NNHandlerWarning) as record:
        h2 = NNHandler.load(path, model_class=hc.MLPWithExtraHead, model_kwargs={**hc.MODEL_KWARGS, "extra": 5})
    text = " | ".join(str(w.message) for w in record)
    assert "optimizer from" in text and "does not fit" in text and "h.set_optimizer(" in text
    assert "scheduler" in text
    assert "EMA weights" in text and "not restored" in text
    assert h2.optimizer is None and h2.ema is None


def test_load_with_a_same_shaped_model_class_restores_everything(full_file):
    path, h = full_file
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)
        h2 = NNHandler.load(path, strict_load=True, model_class=hc.SameMLP, model_kwargs=hc.MODEL_KWARGS)
    assert type(h2.module) is hc.SameMLP
    hc.assert_same(h.module.state_dict(), h2.module.state_dict(), "weights")
    hc.assert_same(h.optimizer.state_dict(), h2.optimizer.state_dict(), "optimizer")


# ---------------------------------------------------------------------------- missing files, file contents
@pytest.mark.parametrize("how", ["load", "module load", "initialize_from_checkpoint"])
def test_a_missing_file_raises_file_not_found_naming_the_path(tmp_path, how):
    missing = tmp_path / "nowhere" / "missing.pt"
    with pytest.raises(FileNotFoundError) as info:
        if how == "load":
            NNHandler.load(missing)
        elif how == "module load":
            NNHandler.load(str(missing))
        else:
            NNHandler.initialize_from_checkpoint(missing, MLP, **hc.MODEL_KWARGS)
    assert str(missing) in str(info.value)


def _this_rank_rng(state):
    """Rank 0's random states: the file holds one dict per rank, in rank order."""
    assert isinstance(state["rng"], list) and len(state["rng"]) == state["world_size"]
    return state["rng"][0]


def test_checkpoint_is_plain_data_readable_with_weights_only(full_file):
    path, h = full_file
    state = torch.load(path, weights_only=True)
    assert isinstance(state["format_version"], int) and state["format_version"] >= 1
    hc.assert_same(state["model_state_dict"], h.module.state_dict(), "model_state_dict")
    assert state["world_size"] == 1
    assert state["versions"]["torch"] == str(torch.__version__)
    import nn_handler
    assert state["versions"]["nn_handler"] == nn_handler.__version__
    assert {"torch", "python"} <= set(_this_rank_rng(state))
    assert state["progress"]["epoch"] == 2 and state["progress"]["global_step"] == 12
    assert [c["spec"]["_target_"] for c in state["callbacks"]] == ["helpers_core.Counter", "helpers_core.EventLog",
                                                                  "helpers_core.Counter"]
    assert state["optimizer"]["spec"] == {"_target_": "torch.optim.adam.Adam", "lr": 1e-2, "weight_decay": 1e-4}
    assert state["ema"]["decay"] == 0.9
    assert state["sde"]["spec"]["sigma_max"] == 2.0 and state["sde"]["state"]["calls"] == 3


def test_saving_writes_the_rng_state_at_save_time(tmp_path):
    h = hc.classification_handler()
    torch.manual_seed(42)
    expected = torch.get_rng_state()
    h.save(tmp_path / "rng.pt")
    assert torch.equal(_this_rank_rng(torch.load(tmp_path / "rng.pt", weights_only=True))["torch"], expected)
    torch.manual_seed(7)
    NNHandler.load(tmp_path / "rng.pt")
    assert torch.equal(torch.get_rng_state(), expected)


def test_regression_handler_round_trips_its_model_type(tmp_path):
    h = NNHandler(MLP, device="cpu", model_type="REGRESSION", in_features=4, out_features=1)
    h.set_optimizer(torch.optim.SGD, lr=0.05)
    h.set_loss_fn(torch.nn.MSELoss)
    h.set_train_loader({"_target_": "nn_handler.datasets.synthetic_regression", "n": 64, "in_features": 4},
                       batch_size=16, shuffle=True)
    h.train(epochs=2, progress_bar=False)
    h.save(tmp_path / "reg.pt")
    h2 = NNHandler.load(tmp_path / "reg.pt")
    assert h2.model_type is ModelType.REGRESSION
    h2.train(epochs=1, progress_bar=False)
    assert len(h2.train_losses) == 3 and h2.train_losses[-1] < h2.train_losses[0]
