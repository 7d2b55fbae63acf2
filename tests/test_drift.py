"""runner.drift: the classification of config drift, as pure functions of two dicts."""
from runner import drift
from runner.drift import FATAL, HARMLESS, RISKY, UNSET

STORED = {
    "task": "train",
    "model": {"_target_": "nn_handler.models.MLP", "in_features": 64, "out_features": 10, "hidden": [16],
              "dropout": 0.0},
    "data": {"train": {"_target_": "ds", "n": 512}, "batch_size": 64, "num_workers": None},
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
    "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 5},
    "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
    "seed": 0,
    "device": None,
    "checkpoint": {"path": None, "save_every": 0},
    "train": {"epochs": 2, "ema_decay": None, "gradient_clipping_norm": None, "progress_bar": True},
    "launcher": {"nproc_per_node": 1},
    "world_size": 1,
}


def _current(**changes):
    """A copy of STORED with dotted keys changed."""
    import copy

    out = copy.deepcopy(STORED)
    for dotted, value in changes.items():
        node = out
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def levels(differences):
    return {d.key: d.level for d in differences}


def test_identical_configs_do_not_drift():
    assert drift.classify(STORED, _current()) == []


def test_harmless_risky_and_fatal_differences_are_classified():
    current = _current(task="resume", train__epochs=5, train__progress_bar=False, checkpoint__path="runs/a",
                       launcher__nproc_per_node=2, data__num_workers=4,
                       optimizer__lr=1e-4, data__batch_size=32, seed=3, world_size=2, train__ema_decay=0.9,
                       train__gradient_clipping_norm=1.0, loss={"_target_": "torch.nn.MSELoss"},
                       model__hidden=[32])
    found = levels(drift.classify(STORED, current))
    assert found == {
        "train.epochs": HARMLESS, "train.progress_bar": HARMLESS, "checkpoint.path": HARMLESS,
        "launcher.nproc_per_node": HARMLESS, "data.num_workers": HARMLESS,
        "optimizer.lr": RISKY, "data.batch_size": RISKY, "seed": RISKY, "world_size": RISKY,
        "train.ema_decay": RISKY, "train.gradient_clipping_norm": RISKY, "loss._target_": RISKY,
        "model.hidden": FATAL,
    }  # "task" is never compared


def test_differences_come_most_serious_first_with_both_values():
    out = drift.classify(STORED, _current(train__epochs=5, optimizer__lr=1e-4, model__dropout=0.1))
    assert [(d.key, d.level) for d in out] == [("model.dropout", FATAL), ("optimizer.lr", RISKY),
                                               ("train.epochs", HARMLESS)]
    assert (out[1].stored, out[1].current) == (1e-3, 1e-4)
    assert out[1].as_dict()["reason"]


def test_the_model_class_is_fatal():
    out = drift.classify(STORED, _current(model___target_="mypkg.Other"))
    assert levels(out) == {"model._target_": FATAL}


def test_null_or_empty_in_the_current_config_means_as_recorded():
    # resume's defaults: model {} and data null are the recorded ones; seed null continues the streams
    current = _current(model={}, data={"train": None, "batch_size": None}, seed=None, optimizer=None)
    assert drift.classify(STORED, current) == []


def test_a_partial_model_override_compares_only_the_given_kwargs():
    assert levels(drift.classify(STORED, _current(model={"dropout": 0.1}))) == {"model.dropout": FATAL}


def test_a_key_only_in_the_current_config_differs_from_unset():
    out = drift.classify(STORED, _current(optimizer__weight_decay=0.01))
    assert [(d.key, d.stored, d.current, d.level) for d in out] == [("optimizer.weight_decay", UNSET, 0.01, RISKY)]


def test_nothing_to_compare_without_a_stored_config():
    assert drift.classify({}, _current(model__hidden=[32])) == []


def test_finetune_notes_a_new_optimizer_and_scheduler_and_warns_a_new_model():
    current = _current(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
                       scheduler={"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 3},
                       model__out_features=3, data__batch_size=16)
    found = levels(drift.classify(STORED, current, task="finetune"))
    assert found["optimizer._target_"] == HARMLESS and found["optimizer.lr"] == HARMLESS
    assert found["scheduler._target_"] == HARMLESS and found["scheduler.T_max"] == HARMLESS
    assert found["model.out_features"] == RISKY  # warned, not refused: finetune builds the configured model
    assert found["data.batch_size"] == RISKY


def test_unknown_keys_are_treated_as_risky():
    level, reason = drift.level_of("something_new.value")
    assert level == RISKY and "not classified" in reason


def test_lists_and_tuples_compare_as_values():
    assert drift.classify(STORED, _current(model__hidden=(16,))) == []


def test_inherit_fills_what_the_current_config_leaves_to_the_checkpoint():
    current = _current(model={"dropout": 0.1}, data={"train": None, "batch_size": 32}, seed=None, optimizer=None)
    out = drift.inherit(current, STORED, keep=["seed"])
    assert out["model"] == {**STORED["model"], "dropout": 0.1}
    assert out["data"]["train"] == STORED["data"]["train"] and out["data"]["batch_size"] == 32
    assert out["optimizer"] == STORED["optimizer"]
    assert out["seed"] is None  # kept: null on resume means "not re-seeded"
    # a full spec (with its own _target_) is taken as it is
    full = drift.inherit(_current(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}), STORED)
    assert full["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_the_warning_table_lists_key_both_values_and_why():
    out = drift.classify(STORED, _current(optimizer__lr=1e-4, data__batch_size=32))
    text = drift.table(out)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["key", "checkpoint", "now"]
    assert any(line.split()[:3] == ["data.batch_size", "64", "32"] for line in lines)
    assert any(line.split()[:3] == ["optimizer.lr", "0.001", "0.0001"] for line in lines)
    assert drift.one_line(out) == "data.batch_size: 64 -> 32; optimizer.lr: 0.001 -> 0.0001"
