"""NNHandler as a facade: train semantics, settings, enums, devices, predict, schedulers, callbacks, recording."""
from __future__ import annotations

import warnings

import helpers_core as hc
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from nn_handler import LoggingMode, ModelType, NNHandler, NNHandlerWarning
from nn_handler.callbacks import Callback
from nn_handler.datasets import synthetic_classification
from nn_handler.metrics import accuracy
from nn_handler.models import MLP


def quiet_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)
        return NNHandler.load(path, **kwargs)


# ---------------------------------------------------------------------------- train(epochs) and settings
def test_train_trains_that_many_more_epochs_each_call():
    h = hc.classification_handler()
    h.train(epochs=2, progress_bar=False)
    h.train(epochs=3, progress_bar=False)
    assert h.epoch == 5 and len(h.train_losses) == 5 and len(h.val_losses) == 5
    assert len(h.train_metrics_history["accuracy"]) == 5 and len(h.val_metrics_history["accuracy"]) == 5
    assert h.global_step == 5 * 6  # 96 samples in batches of 16
    h.train(epochs=0, progress_bar=False)
    assert h.epoch == 5


def test_loaded_handler_trains_more_epochs_after_the_saved_ones(tmp_path):
    h = hc.classification_handler()
    h.train(epochs=2, progress_bar=False)
    h.save(tmp_path / "h.pt")
    h2 = quiet_load(tmp_path / "h.pt")
    h2.train(epochs=2, progress_bar=False)
    assert h2.epoch == 4 and len(h2.train_losses) == 4 and h2.train_losses[:2] == h.train_losses


def test_settings_left_none_keep_the_saved_values_after_load(tmp_path):
    h = hc.classification_handler()
    h.train(epochs=1, ema_decay=0.95, gradient_accumulation_steps=2, gradient_clipping_norm=0.5, use_amp=True,
            validate_every=1, validate_with_ema=True, progress_bar=False)
    h.save(tmp_path / "s.pt")
    h2 = quiet_load(tmp_path / "s.pt")
    expected = {"validate_every": 1, "gradient_accumulation_steps": 2, "use_amp": True,
                "gradient_clipping_norm": 0.5, "ema_decay": 0.95, "validate_with_ema": True}
    assert h2.settings == expected
    h2.train(epochs=1, progress_bar=False)
    assert h2.settings == expected
    assert h2.ema.decay == 0.95 and h2.ema.num_updates == 6  # 3 steps an epoch with accumulation 2
    assert h2.global_step == 6


def test_a_fresh_handler_uses_the_documented_defaults():
    h = hc.classification_handler()
    assert h.settings == {"validate_every": 1, "gradient_accumulation_steps": 1, "use_amp": False,
                          "gradient_clipping_norm": None, "ema_decay": None, "validate_with_ema": False}
    h.train(epochs=1, progress_bar=False)
    assert h.ema is None and h.global_step == 6


def test_ema_decay_zero_turns_ema_off():
    h = hc.classification_handler()
    h.train(epochs=1, ema_decay=0.9, progress_bar=False)
    assert h.ema is not None
    h.train(epochs=1, ema_decay=0, progress_bar=False)
    assert h.ema is None and h.settings["ema_decay"] is None
    h.train(epochs=1, progress_bar=False)
    assert h.ema is None


def test_a_new_ema_decay_continues_the_average_with_the_new_decay():
    h = hc.classification_handler()
    h.train(epochs=1, ema_decay=0.9, progress_bar=False)
    h.train(epochs=1, ema_decay=0.5, progress_bar=False)
    assert h.ema.decay == 0.5 and h.ema.num_updates == 12


def test_invalid_settings_are_refused_with_their_name():
    h = hc.classification_handler()
    with pytest.raises(ValueError, match="ema_decay"):
        h.train(epochs=1, ema_decay=1.5, progress_bar=False)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        h.train(epochs=1, gradient_accumulation_steps=0, progress_bar=False)
    with pytest.raises(ValueError, match="epochs"):
        h.train(epochs=-1, progress_bar=False)


def test_seed_reseeds_every_stream_at_the_start_of_the_call(tmp_path):
    base = hc.classification_handler()
    base.save(tmp_path / "start.pt")
    runs = []
    for disturbance, seed in ((1, 7), (2, 7), (3, 8)):
        h = quiet_load(tmp_path / "start.pt")
        torch.manual_seed(disturbance)
        h.train(epochs=2, seed=seed, progress_bar=False)
        runs.append(h)
    assert runs[0].train_losses == runs[1].train_losses
    hc.assert_same(runs[0].module.state_dict(), runs[1].module.state_dict(), "weights")
    assert runs[0].train_losses != runs[2].train_losses


def test_without_a_seed_the_global_torch_seed_fixes_the_run():
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        h = hc.classification_handler()
        h.train(epochs=2, progress_bar=False)
        losses.append(h.train_losses)
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------- enums, device, per-instance state
@pytest.mark.parametrize("text, member", [("classification", ModelType.CLASSIFICATION),
                                          ("REGRESSION", ModelType.REGRESSION),
                                          ("Generative", ModelType.GENERATIVE),
                                          ("score_based", ModelType.SCORE_BASED),
                                          ("Score_Based", ModelType.SCORE_BASED)])
def test_model_type_strings_are_accepted_case_insensitively(text, member):
    h = NNHandler(MLP, device="cpu", model_type=text, in_features=2, out_features=2)
    assert h.model_type is member


def test_an_unknown_model_type_is_refused_listing_the_choices():
    with pytest.raises(ValueError, match="CLASSIFICATION, REGRESSION, GENERATIVE, SCORE_BASED"):
        NNHandler(MLP, device="cpu", model_type="segmentation", in_features=2, out_features=2)


def test_handler_enums_are_the_module_enums():
    assert NNHandler.ModelType is ModelType and NNHandler.LoggingMode is LoggingMode
    h = NNHandler(MLP, device="cpu", logger_mode="Console", model_type=NNHandler.ModelType.REGRESSION,
                  in_features=2, out_features=1)
    assert h.model_type is ModelType.REGRESSION


def test_device_none_chooses_automatically():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h = NNHandler(MLP, device=None, in_features=2, out_features=2)
    assert h.device.type == expected.type
    assert next(h.module.parameters()).device.type == expected.type
    assert h.rank == 0 and h.world_size == 1 and h.is_distributed is False


def test_the_constructor_takes_a_class_not_a_built_model():
    with pytest.raises(TypeError, match="not a built model"):
        NNHandler(MLP(2, 2), device="cpu")


def test_two_handlers_share_no_state():
    a = hc.classification_handler()
    b = NNHandler(MLP, device="cpu", **hc.MODEL_KWARGS)
    a.add_callback(hc.Counter("a"))
    a.add_metric("extra", accuracy)
    a.train(epochs=1, ema_decay=0.9, gradient_clipping_norm=1.0, progress_bar=False)
    assert b.train_losses == [] and b.val_losses == [] and b.train_metrics_history == {}
    assert b.callbacks == [] and b.metrics == {} and b.ema is None and b.optimizer is None
    assert b.settings["ema_decay"] is None and b.settings["gradient_clipping_norm"] is None
    assert b.epoch == 0 and b.global_step == 0 and b.train_loader is None
    assert not any(p1 is p2 for p1 in a.module.parameters() for p2 in b.module.parameters())
    c = hc.classification_handler()
    c.train(epochs=1, progress_bar=False)
    assert len(a.train_losses) == 1 and len(c.train_losses) == 1 and a.train_losses is not c.train_losses


# ---------------------------------------------------------------------------- predict
def test_predict_returns_outputs_in_order_for_tensor_dataset_and_loader():
    h = NNHandler(MLP, device="cpu", **hc.MODEL_KWARGS)
    data = synthetic_classification(n=50, in_features=hc.IN, num_classes=hc.OUT)
    x = data.tensors[0]
    h.module.eval()
    with torch.no_grad():
        expected = h.module(x)
    h.module.train()
    from_tensor = h.predict(x, batch_size=8)
    from_dataset = h.predict(data, batch_size=8)
    from_loader = h.predict(DataLoader(data, batch_size=7, shuffle=False))
    for out in (from_tensor, from_dataset, from_loader):
        assert out.shape == (50, hc.OUT)
        assert torch.allclose(out, expected, atol=1e-6)
    assert h.module.training  # predict left the mode as it was


def test_eval_puts_the_model_in_evaluation_mode():
    h = NNHandler(MLP, device="cpu", **hc.MODEL_KWARGS)
    assert h.model.training
    assert h.eval() is h and not h.model.training and not h.module.net[2].training


# ---------------------------------------------------------------------------- schedulers
def _plateau_handler(val: bool, validate_every: int = 1) -> NNHandler:
    h = hc.classification_handler(scheduler=False, val=val)
    h.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=0)
    h.train(epochs=4, validate_every=validate_every, progress_bar=False)
    return h


def test_reduce_lr_on_plateau_steps_on_the_validation_loss():
    h = _plateau_handler(val=True)
    assert h.scheduler.best in h.val_losses and h.scheduler.best not in h.train_losses
    assert h.scheduler.last_epoch == 4


def test_reduce_lr_on_plateau_steps_on_the_training_loss_without_validation():
    h = _plateau_handler(val=False)
    assert h.val_losses == []
    assert h.scheduler.best in h.train_losses and h.scheduler.last_epoch == 4


def test_reduce_lr_on_plateau_steps_only_on_validated_epochs():
    h = _plateau_handler(val=True, validate_every=2)
    assert h.scheduler.last_epoch == 2
    validated = [v for v in h.val_losses if v == v]
    assert len(validated) == 2 and h.scheduler.best in validated


def test_set_optimizer_rebuilds_an_existing_scheduler_around_the_new_optimizer():
    h = hc.classification_handler()
    h.set_optimizer(torch.optim.SGD, lr=0.5)
    assert isinstance(h.scheduler, torch.optim.lr_scheduler.StepLR) and h.scheduler.optimizer is h.optimizer
    assert h.scheduler.gamma == 0.7
    with pytest.raises(RuntimeError, match="set the optimizer before the scheduler"):
        NNHandler(MLP, device="cpu", in_features=2, out_features=2).set_scheduler(torch.optim.lr_scheduler.StepLR,
                                                                                   step_size=1)


# ---------------------------------------------------------------------------- callbacks
def test_callback_base_records_constructor_arguments_of_a_subclass_with_only_its_own_init():
    cb = hc.Counter("name", start=4)
    assert cb.init_kwargs == {"name": "name", "start": 4}
    assert hc.Counter("positional").init_kwargs == {"name": "positional"}
    assert repr(cb) == "Counter(name='name', start=4)"

    class WithKwargs(Callback):
        def __init__(self, a, **extra):
            self.a = a

    assert WithKwargs(1, b=2).init_kwargs == {"a": 1, "b": 2}


def test_callback_hooks_are_called_in_order():
    h = hc.classification_handler(val=False)
    log = hc.EventLog()
    h.add_callback(log)
    h.train(epochs=2, progress_bar=False)
    batches = [("batch_begin", 0), ("batch_end", 0)]
    assert log.events[0] == ("train_begin",) and log.events[-1] == ("train_end",)
    assert log.events[1] == ("epoch_begin", 0) and log.events[2:4] == batches
    assert [e for e in log.events if e[0] == "epoch_begin"] == [("epoch_begin", 0), ("epoch_begin", 1)]
    epoch_ends = [e for e in log.events if e[0] == "epoch_end"]
    assert [e[1] for e in epoch_ends] == [0, 1] and {"loss", "lr", "accuracy"} <= set(epoch_ends[0][2])
    assert sum(1 for e in log.events if e[0] == "batch_end") == 12


def test_a_callback_can_stop_training():
    h = hc.classification_handler()
    h.add_callback(hc.StopAfter(2))
    h.train(epochs=5, progress_bar=False)
    assert h.epoch == 2 and len(h.train_losses) == 2


def test_add_callback_refuses_objects_that_are_not_callbacks():
    h = NNHandler(MLP, device="cpu", in_features=2, out_features=2)
    with pytest.raises(TypeError, match="Callback"):
        h.add_callback(object())


# ---------------------------------------------------------------------------- unrecordable components
def test_a_lambda_loss_warns_on_save_and_load_and_train_then_asks_for_it(tmp_path):
    h = hc.classification_handler()
    h.set_loss_fn(lambda out, y: F.cross_entropy(out, y))
    h.train(epochs=1, progress_bar=False)
    with pytest.warns(NNHandlerWarning, match=r"loss_fn cannot be recorded.*lambda"):
        h.save(tmp_path / "lambda.pt")
    with pytest.warns(NNHandlerWarning, match=r"loss_fn was not recorded.*set it again with h\.set_loss_fn"):
        h2 = NNHandler.load(tmp_path / "lambda.pt")
    assert h2.loss_fn is None
    with pytest.raises(RuntimeError, match=r"no loss_fn is set: set it with h\.set_loss_fn.*lambda"):
        h2.train(epochs=1, progress_bar=False)
    h2.set_loss_fn(torch.nn.CrossEntropyLoss)
    h2.train(epochs=1, progress_bar=False)
    assert h2.epoch == 2


def test_a_metric_defined_inside_a_function_warns_and_train_asks_for_it_again(tmp_path):
    def local_accuracy(pred, target):
        return accuracy(pred, target)

    h = hc.classification_handler()
    h.add_metric("local", local_accuracy)
    h.train(epochs=1, progress_bar=False)
    with pytest.warns(NNHandlerWarning, match=r"metric:local cannot be recorded.*inside a function"):
        h.save(tmp_path / "metric.pt")
    with pytest.warns(NNHandlerWarning, match=r"metric:local was not recorded.*h\.add_metric\('local', fn\)"):
        h2 = NNHandler.load(tmp_path / "metric.pt")
    assert set(h2.metrics) == {"accuracy"}
    with pytest.raises(RuntimeError, match=r"\['local'\] were not restored.*h\.add_metric"):
        h2.train(epochs=1, progress_bar=False)
    h2.add_metric("local", local_accuracy)
    h2.train(epochs=1, progress_bar=False)
    assert len(h2.train_metrics_history["local"]) == len(h2.train_losses) == 2


def test_a_callback_class_defined_in_a_test_function_warns_on_save_and_load(tmp_path):
    class LocalCallback(Callback):
        def __init__(self, k=1):
            self.k = k

    h = hc.classification_handler()
    h.add_callback(hc.Counter("kept"))
    h.add_callback(LocalCallback(k=3))
    with pytest.warns(NNHandlerWarning, match=r"callback\[1\] LocalCallback cannot be recorded.*inside a function"):
        h.save(tmp_path / "cb.pt")
    with pytest.warns(NNHandlerWarning, match=r"LocalCallback was not recorded.*h\.add_callback"):
        h2 = NNHandler.load(tmp_path / "cb.pt", trusted_packages=hc.TRUST)
    assert [type(cb).__name__ for cb in h2.callbacks] == ["Counter"]


def test_an_sde_class_defined_in_a_test_function_warns_and_score_training_asks_for_it(tmp_path):
    class LocalSDE(hc.ToySDE):
        pass

    h = NNHandler(hc.ScoreNet, device="cpu", model_type="score_based", dim=4)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_sde(LocalSDE, sigma_max=2.0)
    h.set_train_loader(TensorDataset(torch.randn(32, 4)), batch_size=16, shuffle=True)
    h.train(epochs=1, progress_bar=False)
    assert h.sde.calls == 2 and len(h.train_losses) == 1
    with pytest.warns(NNHandlerWarning) as record:
        h.save(tmp_path / "sde.pt")
    assert any("sde cannot be recorded" in str(w.message) and "LocalSDE" in str(w.message) for w in record)
    with pytest.warns(NNHandlerWarning) as record:
        h2 = NNHandler.load(tmp_path / "sde.pt")
    assert any("sde was not recorded" in str(w.message) and "h.set_sde(" in str(w.message) for w in record)
    assert h2.sde is None
    h2.set_train_loader(TensorDataset(torch.randn(32, 4)))
    with pytest.raises(RuntimeError, match=r"no sde is set: set it with h\.set_sde"):
        h2.train(epochs=1, progress_bar=False)


def test_a_score_based_handler_round_trips_its_sde_and_sampler(tmp_path):
    h = NNHandler(hc.ScoreNet, device="cpu", model_type=ModelType.SCORE_BASED, dim=4)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_sde(hc.ToySDE, sigma_max=3.0)
    h.set_sampler(hc.ToySampler, steps=4)
    h.set_train_loader({"_target_": "nn_handler.datasets.synthetic_regression", "n": 32, "in_features": 4},
                       batch_size=16, shuffle=True)
    h.train(epochs=1, progress_bar=False)
    h.save(tmp_path / "score.pt")
    h2 = quiet_load(tmp_path / "score.pt")
    assert h2.sde.sigma_max == 3.0 and h2.sde.calls == 2 and h2.sampler.steps == 4
    h2.train(epochs=1, progress_bar=False)
    assert h2.sde.calls == 4 and len(h2.train_losses) == 2


# ---------------------------------------------------------------------------- datasets
def test_a_dataset_given_as_an_object_must_be_set_again_and_reuses_the_recorded_options(tmp_path):
    data = synthetic_classification(n=96, in_features=hc.IN, num_classes=hc.OUT)
    h = hc.classification_handler()
    h.set_train_loader(data, batch_size=24, shuffle=True, drop_last=True)
    h.train(epochs=1, progress_bar=False)
    with pytest.warns(NNHandlerWarning, match=r"data\.train cannot be recorded.*given as an object"):
        h.save(tmp_path / "obj.pt")
    with pytest.warns(NNHandlerWarning, match=r"data\.train was not recorded.*h\.set_train_loader\(dataset\)"):
        h2 = NNHandler.load(tmp_path / "obj.pt")
    assert h2.train_loader is None and h2.val_loader is not None
    with pytest.raises(RuntimeError, match=r"set it again with h\.set_train_loader\(dataset\).*'batch_size': 24"):
        h2.train(epochs=1, progress_bar=False)
    h2.set_train_loader(data)
    assert h2.train_loader.batch_size == 24 and h2.train_loader.drop_last is True
    assert h2.train_loader.sampler.shuffle is True
    h2.train(epochs=1, progress_bar=False)
    assert h2.epoch == 2 and h2.global_step == 8


def test_a_validation_dataset_given_as_an_object_must_be_set_again(tmp_path):
    val = synthetic_classification(n=40, in_features=hc.IN, num_classes=hc.OUT, seed=3)
    h = hc.classification_handler()
    h.set_val_loader(val, batch_size=20)
    h.train(epochs=1, progress_bar=False)
    with pytest.warns(NNHandlerWarning, match=r"data\.val cannot be recorded"):
        h.save(tmp_path / "val.pt")
    with pytest.warns(NNHandlerWarning, match=r"h\.set_val_loader\(dataset\)"):
        h2 = NNHandler.load(tmp_path / "val.pt")
    with pytest.raises(RuntimeError, match=r"validation dataset .*h\.set_val_loader\(dataset\)"):
        h2.train(epochs=1, progress_bar=False)
    h2.set_val_loader(val)
    assert h2.val_loader.batch_size == 20
    h2.train(epochs=1, progress_bar=False)
    assert len(h2.val_losses) == len(h2.train_losses) == 2


def test_datasets_given_as_specs_are_rebuilt_by_load(tmp_path):
    h = hc.classification_handler()
    h.train(epochs=1, progress_bar=False)
    h.save(tmp_path / "spec.pt")
    h2 = quiet_load(tmp_path / "spec.pt")
    assert h2.train_loader.batch_size == 16 and h2.train_loader.sampler.shuffle is True
    assert len(h2.train_loader.dataset) == 96 and len(h2.val_loader.dataset) == 48
    assert torch.equal(h2.train_loader.dataset.tensors[0], h.train_loader.dataset.tensors[0])
    resumed = NNHandler.load(tmp_path / "spec.pt")
    resumed.train(epochs=2, progress_bar=False)
    assert resumed.epoch == 3 and len(resumed.val_losses) == 3


def test_a_factory_returning_a_compiled_model_exposes_the_users_own_module():
    from nn_handler.models import MLP

    def compiled_mlp(**kwargs):
        return torch.compile(MLP(**kwargs))  # compiled lazily: nothing is compiled by this test

    h = NNHandler(compiled_mlp, in_features=4, out_features=2, hidden=[8])
    assert type(h.module) is MLP  # what users inspect, EMA averages and predict/sample run
    assert h.model is not h.module and h.model._orig_mod is h.module  # what train runs
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    assert {id(p) for p in h.optimizer.param_groups[0]["params"]} == {id(p) for p in h.module.parameters()}
