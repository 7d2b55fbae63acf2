"""Every reader honours integrity: ``inspect``, ``diff``, ``read_info``, ``find_latest``,
``initialize_from_checkpoint`` and the runner's inspect/diff tasks, on hostile files.

Two corpora built from one real handler checkpoint (optimizer, scheduler, history,
callbacks, EMA, data, metadata):

- forged: a wrongly typed value put at one field (a loop over field paths x bad values), the
  file re-saved with ``atomic_save`` so its checksum is valid (anyone can do this);
- damaged: one bit flipped at spread positions, checksum not recomputed.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.callbacks import EarlyStopping, LearningRateLogger
from nn_handler.checkpointing import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointFound,
    atomic_save,
    diff,
    find_latest,
    inspect,
    read_info,
    resolve_checkpoint,
)
from nn_handler.checkpointing.store import _recorded_score
from nn_handler.metrics import accuracy
from nn_handler.models import MLP
from runner.inspection import damage, format_diff, format_inspect

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 32, "in_features": 4, "num_classes": 3}
ROOT = "<root>"


def _nested(depth: int):
    value: object = {"leaf": torch.ones(1)}
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# A wrong value of every kind: missing, a string, a list of mixed things, a dict with mixed key
# types, a negative int, an int beyond int64, tensors nested in containers, a deep nesting.
BAD = {
    "none": None,
    "str": "x",
    "list": [1, "a", None],
    "dict": {"a": {"b": None}, 3: 4, (1, 2): "tuple key"},
    "negative": -5,
    "huge": 2 ** 70,
    "tensors": [torch.zeros(2), {"t": torch.ones(1, 2), "s": torch.tensor(3)}],
    "deep": _nested(60),
}

FIELDS = [
    (ROOT,), ("format",), ("format_version",), ("versions",), ("versions", "torch"), ("created",), ("world_size",),
    ("model",), ("model", "spec"), ("model", "spec", "_target_"), ("model", "spec", "hidden"), ("model", "model_type"),
    ("model_state_dict",), ("model_state_dict", "net.0.weight"),
    ("optimizer",), ("optimizer", "spec"), ("optimizer", "spec", "_target_"), ("optimizer", "state"),
    ("optimizer", "state", "param_groups"), ("optimizer", "state", "param_groups", 0),
    ("optimizer", "state", "param_groups", 0, "params"), ("optimizer", "state", "param_groups", 0, "lr"),
    ("optimizer", "state", "state"),
    ("scheduler",), ("scheduler", "spec", "_target_"), ("scheduler", "state"), ("scheduler", "state", "_last_lr"),
    ("loss_fn",), ("loss_fn", "spec"), ("metrics",), ("metrics", "accuracy"), ("metrics", "accuracy", "_target_"),
    ("history",), ("history", "train_losses"), ("history", "val_losses", 0), ("history", "train_metrics"),
    ("history", "train_metrics", "accuracy"),
    ("callbacks",), ("callbacks", 0), ("callbacks", 0, "spec"), ("callbacks", 0, "spec", "_target_"),
    ("callbacks", 1, "state"),
    ("ema",), ("ema", "decay"), ("ema", "num_updates"), ("ema", "weights"),
    ("train_settings",), ("progress",), ("progress", "epoch"), ("progress", "global_step"), ("progress", "position"),
    ("progress", "position", "step_in_epoch"),
    ("data",), ("data", "train"), ("data", "train", "dataset"), ("data", "train", "dataset", "_target_"),
    ("data", "train", "options"),
    ("unrecorded",), ("metadata",), ("metadata", "lineage"), ("metadata", "lineage", "parent"),
    ("metadata", "run_config"), ("metadata", "monitor"), ("metadata", "monitor", "value"),
    ("sde",), ("sampler",), ("rng",),
]


def _handler() -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, in_features=4, out_features=3, hidden=[8])
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.set_train_loader(DATA, batch_size=16)
    h.set_val_loader(DATA, batch_size=16)
    h.add_callback(EarlyStopping(monitor="val_loss", patience=5))
    h.add_callback(LearningRateLogger())
    h.metadata["run_config"] = {"optimizer": {"lr": 1e-3}, "data": {"batch_size": 16}}
    h.metadata["monitor"] = {"name": "val_loss", "value": 0.5}
    h.train(2, ema_decay=0.9, progress_bar=False)
    return h


def _put(state, path, value):
    if path == (ROOT,):
        return copy.deepcopy(value)
    state = copy.deepcopy(state)
    node = state
    for key in path[:-1]:
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return state


def _forge(state, path, name, directory):
    obj = _put(state, path, BAD[name])
    target = directory / f"forged-{'.'.join(map(str, path)).strip('<>')}-{name}.pt"
    atomic_save(obj, target)
    return target, obj


def _valid_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63


def _usable_progress(obj) -> bool:
    """What find_latest can rank: a progress record with non-negative int64 counters (absent ones count as 0)."""
    progress = obj.get("progress") if isinstance(obj, dict) else None
    if not isinstance(progress, dict):
        return False
    if not all(_valid_count(progress[k]) for k in ("epoch", "global_step") if k in progress):
        return False
    position = progress.get("position")
    if position is None:
        return True
    return isinstance(position, dict) and ("step_in_epoch" not in position
                                           or _valid_count(position["step_in_epoch"]))


def _variants():
    """Every field with 2 of the bad values, in rotation (all of them for the progress fields, that
    find_latest ranks by)."""
    names = list(BAD)
    for i, path in enumerate(FIELDS):
        chosen = names if path[0] == "progress" else [names[(3 * i + 4 * j) % len(names)] for j in range(2)]
        for name in chosen:
            yield path, name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``(base file, good file, forged directory, {forged file: forged object}, other tool's file)``."""
    root = tmp_path_factory.mktemp("readers")
    h = _handler()
    base = root / "base.pt"
    h.save(base)
    state = torch.load(base, weights_only=True)
    run = root / "run"
    forged = {}
    for path, name in _variants():
        target, obj = _forge(state, path, name, run)
        forged[target] = obj
    h.train(1, progress_bar=False)
    good = run / "good.pt"
    h.save(good)
    other = run / "other.pt"
    torch.save({"progress": {"global_step": None}}, other)  # another tool's file, no checksum
    return base, good, run, forged, other, state


def test_the_corpus_is_large_and_varied(corpus):
    _, _, _, forged, _, _ = corpus
    assert len(forged) == len(list(_variants())) >= 150
    assert {name for _, name in _variants()} == set(BAD)
    assert len({len(p) for p in FIELDS}) >= 4  # top level down to four keys deep


# ---------------------------------------------------------------------------- forged types
def _check_info_types(info, path):
    """What the runner relies on: read_info's fields have the documented types."""
    assert info["kind"] in ("handler", "weights"), path
    assert isinstance(info["parameters"], int), path
    if info["kind"] == "weights":
        return
    model = info["model"]
    assert model is None or (isinstance(model["target"], str) and isinstance(model["kwargs"], dict)), path
    for key in ("optimizer", "scheduler", "loss_fn"):
        assert info[key] is None or (isinstance(info[key], dict) and isinstance(info[key]["_target_"], str)), path
    assert isinstance(info["data"], dict) and isinstance(info["progress"], dict), path
    for entry in info["data"].values():
        assert isinstance(entry, dict), path
        dataset, options = entry.get("dataset"), entry.get("options")
        assert dataset is None or isinstance(dataset.get("_target_"), str), path
        assert options is None or isinstance(options, dict), path
    assert all(isinstance(t, str) for t in info["callbacks"]), path
    for key in ("versions", "train_settings", "history", "unrecorded"):
        assert isinstance(info[key], dict), path


def test_forged_types_never_make_a_reader_raise_a_raw_error(corpus):
    """inspect never raises; read_info and diff raise only CheckpointError; the runner's text always renders."""
    base, _, _, forged, _, _ = corpus
    raw, refused, described = [], 0, 0
    for path in forged:
        try:
            report = inspect(path)
            json.dumps(report)
            assert isinstance(format_inspect(report), str)
            described += 1
        except Exception as exc:  # noqa: BLE001 (collecting every failure)
            raw.append(f"inspect {path.name}: {type(exc).__name__}: {exc}")
        try:
            _check_info_types(read_info(path), path)
        except CheckpointError as exc:
            refused += 1
            if str(path) not in str(exc):
                raw.append(f"read_info {path.name}: the error does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001
            raw.append(f"read_info {path.name}: {type(exc).__name__}: {exc}")
        try:
            assert isinstance(format_diff(diff(base, path)), str)
        except CheckpointError as exc:
            if str(path) not in str(exc):
                raw.append(f"diff {path.name}: the error does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001
            raw.append(f"diff {path.name}: {type(exc).__name__}: {exc}")
        try:
            score = _recorded_score(path, "val_loss")
            if not (score is None or type(score) is float):
                raw.append(f"_recorded_score {path.name}: {score!r}")
        except Exception as exc:  # noqa: BLE001
            raw.append(f"_recorded_score {path.name}: {type(exc).__name__}: {exc}")
    assert not raw, f"{len(raw)} raw errors:\n" + "\n".join(raw[:40])
    assert described == len(forged)
    assert refused >= len(forged) // 3  # wrongly typed records are refused, not passed on


def test_inspect_of_a_forged_file_still_shows_what_is_sound_and_names_what_is_not(corpus, tmp_path):
    *_, state = corpus
    report = inspect(_forge(state, ("optimizer", "state", "param_groups"), "str", tmp_path)[0])
    assert report["integrity"]["verified"] is True and report["kind"] == "handler"
    assert report["model"]["target"] == "nn_handler.models.MLP" and report["parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert report["progress"] == {"epoch": 2, "global_step": 4}
    assert report["optimizer"]["target"] == "torch.optim.adam.Adam" and report["optimizer"]["param_groups"] == []
    assert any(p.startswith("optimizer.state.param_groups: ") for p in report["problems"]), report["problems"]
    assert "optimizer.state.param_groups: " in format_inspect(report)
    report = inspect(_forge(state, ("metadata",), "dict", tmp_path)[0])
    assert report["lineage"] is None and report["metadata_keys"] == ["(1, 2)", "3", "a"]
    report = inspect(_forge(state, ("ema",), "huge", tmp_path)[0])
    assert report["ema"] is None and report["history"]["epochs"] == 2
    assert any(p.startswith("ema: ") for p in report["problems"])
    report = inspect(corpus[0])
    assert report["problems"] == [] and "malformed records" not in format_inspect(report)


def test_find_latest_skips_and_names_in_one_warning_what_it_cannot_use(corpus):
    _, good, run, forged, other, _ = corpus
    unusable = [p for p, obj in forged.items() if not _usable_progress(obj)] + [other]
    assert len(unusable) >= 30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_latest(run) == good
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(skipped) == 1
    message = skipped[0]
    missing = [p.name for p in unusable if f"{p}:" not in message]
    assert not missing, f"not named: {missing}"
    named = [p.name for p in forged if p not in unusable and f"{p}:" in message]
    assert not named, f"named although usable: {named}"


def test_find_latest_over_only_unusable_files_is_no_checkpoint_found(corpus, tmp_path):
    _, _, _, forged, other, _ = corpus
    unusable = [p for p, obj in forged.items() if not _usable_progress(obj)][:20] + [other]
    for path in unusable:
        shutil.copy(path, tmp_path / path.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NoCheckpointFound, match=str(tmp_path)):
            resolve_checkpoint(tmp_path)
    assert len(caught) == 1 and all(str(tmp_path / p.name) in str(caught[0].message) for p in unusable)


def test_find_latest_with_another_tools_file_alone(tmp_path):
    torch.save({"progress": {"global_step": None}}, tmp_path / "other.pt")
    with pytest.warns(UserWarning, match="other.pt"):
        with pytest.raises(NoCheckpointFound):
            find_latest(tmp_path)


# ---------------------------------------------------------------------------- damage
def _flipped(base: Path, directory: Path, count: int = 40):
    data = base.read_bytes()
    positions = sorted({min(len(data) - 1, i * len(data) // (count - 1)) for i in range(count)}
                       | {len(data) - 1, len(data) - 5, len(data) - 30, 1})
    for i, pos in enumerate(positions):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (i % 8)
        path = directory / f"flip-{pos:07d}.pt"
        path.write_bytes(bytes(damaged))
        yield pos, path


def test_diff_refuses_every_damaged_file_naming_it(corpus, tmp_path):
    base, _, _, _, _, _ = corpus
    flips = list(_flipped(base, tmp_path))
    assert len(flips) >= 40
    for pos, path in flips:
        for a, b in ((base, path), (path, base)):
            with pytest.raises(CorruptCheckpointError) as caught:
                diff(a, b)
            assert caught.value.path == str(path) and str(path) in str(caught.value), pos
        report = inspect(path)  # never raises
        assert damage(report), (pos, report.get("integrity"))
        assert report.get("error") or report["integrity"].get("damaged") is True, pos
        assert isinstance(format_inspect(report), str)
        with pytest.raises(CorruptCheckpointError, match=str(path)):
            read_info(path)


def test_diff_of_sound_files_still_compares(corpus):
    base, good, _, _, _, _ = corpus
    d = diff(base, good)
    assert d["progress"]["epoch"] == (2, 3) and d["values"]


# ---------------------------------------------------------------------------- format version
@pytest.mark.parametrize("version", [2, 99])
def test_initialize_from_checkpoint_refuses_a_newer_format_version(corpus, tmp_path, version):
    base, _, _, _, _, _ = corpus
    state = torch.load(base, weights_only=True)
    state["format_version"] = version
    newer = tmp_path / "newer.pt"
    atomic_save(state, newer)
    with pytest.raises(IncompatibleCheckpointError, match="upgrade nn_handler") as caught:
        NNHandler.initialize_from_checkpoint(newer, MLP, in_features=4, out_features=3, hidden=[8])
    assert caught.value.path == str(newer) and f"format version {version}" in str(caught.value)


def test_initialize_from_checkpoint_refuses_an_invalid_format_version_and_loads_a_sound_one(corpus, tmp_path):
    base, _, _, _, _, _ = corpus
    state = torch.load(base, weights_only=True)
    state["format_version"] = "1"
    atomic_save(state, tmp_path / "odd.pt")
    with pytest.raises(IncompatibleCheckpointError, match="invalid format version"):
        NNHandler.initialize_from_checkpoint(tmp_path / "odd.pt", MLP, in_features=4, out_features=3, hidden=[8])
    h = NNHandler.initialize_from_checkpoint(base, MLP, in_features=4, out_features=3, hidden=[8])
    assert torch.equal(h.module.net[0].weight, state["model_state_dict"]["net.0.weight"])


def test_initialize_from_checkpoint_refuses_malformed_weights(corpus, tmp_path):
    base, _, _, _, _, _ = corpus
    state = torch.load(base, weights_only=True)
    state["model_state_dict"] = {3: torch.zeros(2), "net.0.weight": "x"}
    atomic_save(state, tmp_path / "odd.pt")
    with pytest.raises(IncompatibleCheckpointError, match="odd.pt"):
        NNHandler.initialize_from_checkpoint(tmp_path / "odd.pt", MLP, in_features=4, out_features=3, hidden=[8])


# ---------------------------------------------------------------------------- the runner
def test_the_runners_inspect_and_diff_tasks_give_one_clear_line(corpus, tmp_path):
    """task=diff of a damaged file: one line naming it; task=inspect of a directory holding another
    tool's file and a newer forged one: the forged file is shown, the other named, no traceback."""
    from test_runner_inspect import run_all

    base, good, _, _, other, state = corpus
    data = bytearray(base.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    directory = tmp_path / "dir"
    directory.mkdir()
    shutil.copy(good, directory / "good.pt")
    shutil.copy(other, directory / "other.pt")
    newer = _put(state, ("progress", "global_step"), 10 ** 6)
    atomic_save(_put(newer, ("optimizer", "state", "param_groups"), BAD["deep"]), directory / "forged.pt")
    procs = run_all({
        "diff_damaged": ["task=diff", f"checkpoint.path={base}", f"diff.other={damaged}"],
        "inspect_dir": ["task=inspect", f"checkpoint.path={directory}"],
    }, tmp_path)
    proc = procs["diff_damaged"]
    assert proc.returncode != 0 and str(damaged) in proc.stderr and "checksum mismatch" in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "checksum mismatch" in line]) == 1, proc.stderr
    proc = procs["inspect_dir"]
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {directory / 'forged.pt'}" in proc.stdout
    assert "integrity: checksum verified" in proc.stdout and "malformed records (" in proc.stdout
    assert str(directory / "other.pt") in proc.stderr + proc.stdout
    for name, proc in procs.items():
        assert "Traceback" not in proc.stderr + proc.stdout, (name, proc.stderr)
