"""Golden checkpoints of each released format version load with the code of today, and the migration chain.

``tests/golden/v1_*.pth`` were written by commit b93e82d (format version 1) with
``tests/golden/make_golden.py``; each ``.json`` next to them holds what a user must find after
loading: progress, history, every tensor's sha256 (bit for bit), the optimizer's and EMA's
state, the settings and components, and what one more epoch gave with the writing release.
Only public names are used here, so these tests keep holding while the internals move.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

from nn_handler import NNHandler, NNHandlerWarning
from nn_handler.callbacks import Callback
from nn_handler.checkpointing import IncompatibleCheckpointError, inspect, read_checkpoint, read_info
from nn_handler.checkpointing import format as F
from nn_handler.checkpointing.io import atomic_save

GOLDEN = Path(__file__).parent / "golden"
NAMES = ["v1_classifier", "v1_classifier_mid", "v1_score"]
MAX_BYTES = 200_000


# ---------------------------------------------------------------------------- helpers
def digest(t: torch.Tensor) -> str:
    """The sha256 of a tensor's raw bytes (as make_golden.py computes it)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def resolve(dotted: str) -> Any:
    """The object a dotted path names (the longest importable module, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def expected(name: str) -> Dict[str, Any]:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def same_floats(a: List[float], b: List[float]) -> bool:
    """Equal element by element, bit for bit (NaN equal to NaN)."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def close_floats(a: List[float], b: List[float], exact: int) -> bool:
    """The first ``exact`` values equal bit for bit (they were read from the file), the rest within 1e-6
    relative: values computed here, whose last bits depend on the CPU's kernels (the golden files were
    written on another machine; e.g. a validation batch of another size takes another GEMM path)."""
    return len(a) == len(b) and same_floats(a[:exact], b[:exact]) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y))
        for x, y in zip(a[exact:], b[exact:]))


def assert_history(h: NNHandler, record: Dict[str, Any], exact: int = 10 ** 9) -> None:
    """The history as recorded: bit for bit up to entry ``exact`` (the loaded ones), close after."""
    assert close_floats(h.train_losses, record["train_losses"], exact), (h.train_losses, record["train_losses"])
    assert close_floats(h.val_losses, record["val_losses"], exact), (h.val_losses, record["val_losses"])
    for live, recorded in ((h.train_metrics_history, record["train_metrics"]), (h.val_metrics_history, record["val_metrics"])):
        assert sorted(live) == sorted(recorded)
        for metric, values in recorded.items():
            assert close_floats(live[metric], values, exact), (metric, live[metric], values)


def assert_weights(state: Dict[str, torch.Tensor], record: Dict[str, Any], what: str = "weights") -> None:
    """Every tensor of ``record`` (and no other) in ``state``, bit for bit."""
    assert sorted(state) == sorted(record), (what, sorted(state), sorted(record))
    for key, rec in record.items():
        t = state[key]
        if isinstance(rec, str):  # a bare sha256
            assert digest(t) == rec, f"{what}: {key} differs"
            continue
        assert list(t.shape) == rec["shape"] and str(t.dtype) == rec["dtype"], (what, key)
        flat = t.detach().cpu().reshape(-1)
        assert [float(v) for v in flat[:4].tolist()] == rec["first"], (what, key)
        assert float(flat.double().sum().item()) == rec["sum"], (what, key)
        assert digest(t) == rec["sha256"], f"{what}: {key} differs"


def assert_optimizer(h: NNHandler, record: Dict[str, Any]) -> None:
    assert type(h.optimizer) is resolve(record["class"])
    state = h.optimizer.state_dict()
    assert [g["lr"] for g in state["param_groups"]] == record["lr"]
    for group, options in zip(state["param_groups"], record["param_group_options"]):
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k in options} == options
    per_param = [s for _, s in sorted(state["state"].items())]
    assert [float(s["step"]) for s in per_param] == record["steps"]
    assert [{"exp_avg": digest(s["exp_avg"]), "exp_avg_sq": digest(s["exp_avg_sq"])} for s in per_param] == \
        record["moments"]


def assert_ema(h: NNHandler, record: Dict[str, Any]) -> None:
    assert h.ema is not None
    assert h.ema.decay == record["decay"] and h.ema.num_updates == record["num_updates"]
    assert_weights(h.ema.module.state_dict(), record["weights"], "EMA weights")


def assert_settings(h: NNHandler, record: Dict[str, Any], **changed: Any) -> None:
    """Every recorded setting as recorded (settings added since may have any value)."""
    settings = h.settings
    for key, value in {**record, **changed}.items():
        assert settings[key] == value, (key, settings[key], value)


def assert_components(h: NNHandler, exp: Dict[str, Any]) -> None:
    """Scheduler, loss, metrics, callbacks, SDE and data as the writing release left them."""
    if "scheduler" in exp:
        rec = exp["scheduler"]
        assert type(h.scheduler) is resolve(rec["class"])
        assert h.scheduler.state_dict()["last_epoch"] == rec["last_epoch"]
        assert list(h.scheduler.get_last_lr()) == rec["last_lr"]
        for key, value in rec["kwargs"].items():
            assert getattr(h.scheduler, key) == value, key
    else:
        assert h.scheduler is None
    if "class" in exp["loss_fn"]:
        assert type(h.loss_fn) is resolve(exp["loss_fn"]["class"])
    else:
        assert h.loss_fn is resolve(exp["loss_fn"]["function"])
    assert h.metrics == {k: resolve(v) for k, v in exp.get("metrics", {}).items()}
    callbacks = exp.get("callbacks", [])
    assert [type(cb) for cb in h.callbacks] == [resolve(c["class"]) for c in callbacks]
    for cb, rec in zip(h.callbacks, callbacks):
        assert cb.init_kwargs == rec["kwargs"], (cb, rec["kwargs"])
        assert json.loads(json.dumps(cb.state_dict())) == rec["state"], (cb, rec["state"])
    if "sde" in exp:
        assert type(h.sde) is resolve(exp["sde"]["class"])
        assert h.sde.state_dict() == exp["sde"]["state"]
    for name, loader in (("train", h.train_loader), ("val", h.val_loader)):
        rec = exp["data"].get(name)
        if rec is None:
            assert loader is None, name
            continue
        spec = dict(rec["dataset"])
        fresh = resolve(spec.pop("_target_"))(**spec)
        assert len(loader.dataset) == len(fresh) and loader.batch_size == rec["options"]["batch_size"], name
        for got, want in zip(loader.dataset.tensors, fresh.tensors):
            assert torch.equal(got, want), name


def batches_per_epoch(exp: Dict[str, Any]) -> int:
    data = exp["data"]["train"]
    return math.ceil(data["dataset"]["n"] / data["options"]["batch_size"])


@pytest.fixture(params=NAMES)
def golden(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[Path, Dict[str, Any]]:
    """A copy of one golden file in ``tmp_path`` (the working directory: its callbacks write there)."""
    name = request.param
    path = tmp_path / f"{name}.pth"
    shutil.copyfile(GOLDEN / f"{name}.pth", path)
    monkeypatch.chdir(tmp_path)
    return path, expected(name)


@pytest.fixture(autouse=True)
def _golden_untouched():
    """No test writes into tests/golden/."""
    before = {p.name: p.stat().st_mtime_ns for p in GOLDEN.iterdir()}
    yield
    assert {p.name: p.stat().st_mtime_ns for p in GOLDEN.iterdir()} == before


def load_quietly(loader: Callable[[], NNHandler]) -> NNHandler:
    """``loader()`` with every NNHandlerWarning an error: a golden file loads whole, without complaint."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNHandlerWarning)
        return loader()


# ---------------------------------------------------------------------------- the files themselves
@pytest.mark.parametrize("name", NAMES)
def test_golden_file_is_small_verified_and_of_its_version(name: str) -> None:
    path = GOLDEN / f"{name}.pth"
    exp = expected(name)
    assert path.stat().st_size < MAX_BYTES and path.stat().st_size == exp["file_bytes"]
    raw = read_checkpoint(path)  # checksum verified; the raw, unmigrated contents
    assert raw["format"] == "nn_handler" and raw["format_version"] == exp["format_version"] == 1
    assert F.FORMAT_VERSION >= 1


def test_the_mid_epoch_file_is_inside_an_epoch() -> None:
    exp = expected("v1_classifier_mid")
    assert exp["position"] == {"epoch": exp["epoch"], "step_in_epoch": 2}
    assert 0 < exp["position"]["step_in_epoch"] < batches_per_epoch(exp)
    assert expected("v1_classifier")["position"] is None


# ---------------------------------------------------------------------------- loading
def test_load_restores_every_recorded_value(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    h = load_quietly(lambda: NNHandler.load(path, device="cpu"))
    assert type(h.module) is resolve(exp["model"]["class"])
    assert str(h.model_type) == exp["model"]["model_type"]
    assert h.epoch == exp["epoch"] and h.global_step == exp["global_step"]
    assert_history(h, exp["history"])
    assert_weights(h.module.state_dict(), exp["weights"])
    assert_optimizer(h, exp["optimizer"])
    assert_ema(h, exp["ema"])
    assert_settings(h, exp["settings"])
    assert_components(h, exp)


def test_load_with_skip_optimizer_leaves_the_optimizer_fresh(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    if "scheduler" in exp:  # a scheduler needs the optimizer: it is left out, with a warning that says so
        with pytest.warns(NNHandlerWarning, match="scheduler"):
            h = NNHandler.load(path, device="cpu", skip_optimizer=True)
    else:
        h = load_quietly(lambda: NNHandler.load(path, device="cpu", skip_optimizer=True))
    assert h.optimizer is None and h.scheduler is None
    assert h.epoch == exp["epoch"] and h.global_step == exp["global_step"]
    assert_weights(h.module.state_dict(), exp["weights"])
    assert_ema(h, exp["ema"])
    assert_history(h, exp["history"])


def test_load_with_skip_ema_leaves_ema_off(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    h = load_quietly(lambda: NNHandler.load(path, device="cpu", skip_ema=True))
    assert h.ema is None
    assert_settings(h, exp["settings"], ema_decay=None)
    assert_weights(h.module.state_dict(), exp["weights"])
    assert_optimizer(h, exp["optimizer"])
    with pytest.raises(RuntimeError, match="EMA"):
        with h.ema_weights():
            pass


def test_initialize_from_checkpoint_takes_the_weights_only(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    h = load_quietly(lambda: NNHandler.initialize_from_checkpoint(path, device="cpu"))
    assert type(h.module) is resolve(exp["model"]["class"])
    assert str(h.model_type) == exp["model"]["model_type"]
    assert_weights(h.module.state_dict(), exp["weights"])
    assert h.optimizer is None and h.ema is None and h.epoch == 0 and h.global_step == 0 and h.train_losses == []


class _Seen(Callback):
    """Records the epochs and batch indexes the loop runs (left out of checkpoints)."""

    recorded = False

    def __init__(self) -> None:
        self.epochs: List[int] = []
        self.batches: List[int] = []

    def on_epoch_begin(self, handler: NNHandler, epoch: int) -> None:
        self.epochs.append(epoch)

    def on_batch_begin(self, handler: NNHandler, batch: int) -> None:
        self.batches.append(batch)


def assert_continued_weights(state: Dict[str, torch.Tensor], digests: Dict[str, str], close: Dict[str, Any],
                             what: str = "weights") -> None:
    """Weights computed here after loading: bit for bit the writing machine's (``digests``) when this CPU's
    kernels round alike, else within 1e-5 of the same continuation on another CPU (``close``: its first
    values and sum), so that a wrong restore (data order, optimizer state, EMA) still fails."""
    assert sorted(state) == sorted(digests) == sorted(close), (what, sorted(state))
    if all(digest(state[k]) == v for k, v in digests.items()):
        return
    for key, rec in close.items():
        t = state[key].detach().cpu()
        assert list(t.shape) == rec["shape"] and str(t.dtype) == rec["dtype"], (what, key)
        flat = t.reshape(-1).double()
        first = [float(v) for v in flat[:4].tolist()]
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(first, rec["first"])), (what, key)
        assert math.isclose(float(flat.sum().item()), rec["sum"], rel_tol=1e-5, abs_tol=1e-6), (what, key)


def test_one_more_epoch_goes_on_from_the_recorded_progress(golden: Tuple[Path, Dict[str, Any]], tmp_path: Path) -> None:
    path, exp = golden
    h = load_quietly(lambda: NNHandler.load(path, device="cpu"))
    seen = _Seen()
    h.add_callback(seen)
    load_quietly(lambda: h.train(1, progress_bar=False))
    start = exp["position"]["step_in_epoch"] if exp["position"] else 0
    assert seen.epochs == [exp["epoch"]]
    assert seen.batches == list(range(start, batches_per_epoch(exp)))  # a mid-epoch file goes on with its next batch
    cont = exp["continued"]
    assert h.epoch == cont["epoch"] == exp["epoch"] + 1
    assert h.global_step == cont["global_step"]
    # What the writing release computed from the same file: data order, random streams, partial
    # epoch sums, optimizer, scheduler and EMA all restored (the loaded history bit for bit; the new
    # epoch's values as this CPU's kernels compute them, see close_floats).
    assert_history(h, cont["history"], exact=exp["epoch"])
    assert_continued_weights(h.module.state_dict(), cont["weights"], cont["weights_close"])
    assert_continued_weights(h.ema.module.state_dict(), cont["ema_weights"], cont["ema_weights_close"], "EMA weights")
    assert h.optimizer.param_groups[0]["lr"] == cont["lr"]
    if any(c["class"].endswith("ModelCheckpoint") for c in exp.get("callbacks", [])):
        assert (tmp_path / "checkpoints" / "last.pt").is_file()  # the restored callback wrote, confined to the copy's directory


def test_resuming_the_mid_epoch_file_gives_the_uninterrupted_run() -> None:
    """The mid-epoch file resumed for one epoch is bit for bit the run that was never interrupted."""
    mid, full = expected("v1_classifier_mid"), expected("v1_classifier")
    assert mid["continued"]["weights"] == {k: v["sha256"] for k, v in full["weights"].items()}
    assert mid["continued"]["history"] == full["history"]
    assert (mid["continued"]["epoch"], mid["continued"]["global_step"]) == (full["epoch"], full["global_step"])


def test_the_score_model_samples_as_it_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = expected("v1_score")
    monkeypatch.chdir(tmp_path)
    h = load_quietly(lambda: NNHandler.load(GOLDEN / "v1_score.pth", device="cpu"))
    rec = exp["sample"]
    samples = h.sample(tuple(rec["shape"]), steps=rec["steps"], seed=rec["seed"], progress_bar=False)
    values = [float(v) for v in samples.reshape(-1).tolist()]
    # Bit for bit on the writing machine's CPU; elsewhere within 1e-5 (the seeded noise is the same,
    # the network's last bits follow the CPU's kernels): a wrong restore of the model, SDE or sampler
    # moves samples by far more.
    assert len(values) == len(rec["values"])
    assert values == rec["values"] or all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                                          for a, b in zip(values, rec["values"])), (values, rec["values"])


# ---------------------------------------------------------------------------- readers
def test_read_info_reads_it(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    info = read_info(path)
    assert info["kind"] == "handler" and info["format_version"] == F.FORMAT_VERSION
    assert resolve(info["model"]["target"]) is resolve(exp["model"]["class"])
    assert info["model"]["kwargs"] == exp["model"]["kwargs"]
    assert info["model"]["model_type"] == exp["model"]["model_type"]
    assert info["parameters"] == exp["model"]["parameters"]
    assert info["progress"]["epoch"] == exp["epoch"] and info["progress"]["global_step"] == exp["global_step"]
    if exp["position"]:
        position = info["progress"]["position"]
        assert (position["epoch"], position["step_in_epoch"]) == (exp["position"]["epoch"],
                                                                  exp["position"]["step_in_epoch"])
    else:
        assert "position" not in info["progress"]
    for key in ("train_losses", "val_losses"):  # the last value of each, None when there is none
        values = exp["history"][key]
        if values:
            assert same_floats([info["history"][key]], values[-1:]), key
        else:
            assert info["history"].get(key) is None, key
    assert [resolve(t) for t in info["callbacks"]] == [resolve(c["class"]) for c in exp.get("callbacks", [])]
    optimizer = dict(info["optimizer"])
    assert resolve(optimizer.pop("_target_")) is resolve(exp["optimizer"]["class"])
    assert optimizer == exp["optimizer"]["kwargs"]
    loss = exp["loss_fn"].get("class") or exp["loss_fn"]["function"]
    assert resolve(info["loss_fn"]["_target_"]) is resolve(loss)
    if "scheduler" in exp:
        assert resolve(info["scheduler"]["_target_"]) is resolve(exp["scheduler"]["class"])
    else:
        assert info["scheduler"] is None
    assert info["ema"] == exp["ema"]["decay"]
    for key, value in exp["settings"].items():
        assert info["train_settings"][key] == value, key
    assert sorted(info["data"]) == sorted(exp["data"])
    for name, rec in exp["data"].items():
        spec, want = dict(info["data"][name]["dataset"]), dict(rec["dataset"])
        assert resolve(spec.pop("_target_")) is resolve(want.pop("_target_")) and spec == want, name
        assert info["data"][name]["options"] == rec["options"], name


def test_inspect_reads_it(golden: Tuple[Path, Dict[str, Any]]) -> None:
    path, exp = golden
    report = inspect(path)
    assert "error" not in report, report.get("error")
    assert report["kind"] == "handler" and report["integrity"]["verified"] is True
    assert report["file_bytes"] == exp["file_bytes"]
    assert report["parameters"] == exp["model"]["parameters"]
    assert report["progress"]["epoch"] == exp["epoch"] and report["progress"]["global_step"] == exp["global_step"]
    if exp["position"]:
        assert report["progress"]["position"]["step_in_epoch"] == exp["position"]["step_in_epoch"]
    assert report["ema"]["decay"] == exp["ema"]["decay"]
    assert not report.get("problems"), report.get("problems")


# ---------------------------------------------------------------------------- the migration chain
# The tests below pretend the format moved one version on: FORMAT_VERSION + 1, with a step
# from today's version registered in MIGRATIONS. Today that is the step 1 -> 2 applied to the
# v1 golden files; once real steps exist they run first, as they would for a user's v1 file.
def v1_state() -> Dict[str, Any]:
    return read_checkpoint(GOLDEN / "v1_classifier.pth")


def pretend_next_version(monkeypatch: pytest.MonkeyPatch, step: Any = None) -> int:
    """FORMAT_VERSION one higher; ``step`` (None: no step) registered for today's version. Returns today's."""
    today = F.FORMAT_VERSION
    monkeypatch.setattr(F, "FORMAT_VERSION", today + 1)
    if step is None:
        monkeypatch.delitem(F.MIGRATIONS, today, raising=False)
    else:
        monkeypatch.setitem(F.MIGRATIONS, today, step)
    return today


class _Renaming:
    """A step that renames ``metadata`` to ``run_metadata`` and counts its calls."""

    def __init__(self) -> None:
        self.calls: List[int] = []

    def __call__(self, state: Dict[str, Any]) -> Dict[str, Any]:
        self.calls.append(state[F.VERSION])
        state["run_metadata"] = state.pop("metadata")
        return state


def test_a_registered_step_is_applied_exactly_once_and_sets_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    step = _Renaming()
    today = pretend_next_version(monkeypatch, step)
    state = v1_state()
    metadata = state["metadata"]
    upgraded = F.check_and_migrate(state, str(GOLDEN / "v1_classifier.pth"))
    assert step.calls == [today]  # once, given the state of the version it upgrades
    assert upgraded[F.VERSION] == today + 1
    assert "metadata" not in upgraded and upgraded["run_metadata"] == metadata
    again = F.check_and_migrate(upgraded, str(GOLDEN / "v1_classifier.pth"))  # already current: nothing runs
    assert step.calls == [today] and again[F.VERSION] == today + 1


def test_load_goes_through_the_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: List[int] = []

    def step(state: Dict[str, Any]) -> Dict[str, Any]:
        calls.append(state[F.VERSION])
        state["metadata"] = {**(state.get("metadata") or {}), "migrated": "by the test step"}
        return state

    today = pretend_next_version(monkeypatch, step)
    monkeypatch.chdir(tmp_path)
    h = NNHandler.load(GOLDEN / "v1_classifier.pth", device="cpu")
    assert calls and set(calls) == {today} and h.metadata["migrated"] == "by the test step"
    assert_weights(h.module.state_dict(), expected("v1_classifier")["weights"])
    del calls[:]
    assert read_info(GOLDEN / "v1_classifier.pth")["format_version"] == today + 1
    assert calls and set(calls) == {today}


def test_a_missing_step_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    today = pretend_next_version(monkeypatch)
    path = str(GOLDEN / "v1_classifier.pth")
    with pytest.raises(IncompatibleCheckpointError, match=f"format version {today} cannot be upgraded to {today + 1}") \
            as caught:
        F.check_and_migrate(v1_state(), path)
    assert caught.value.path == path and f"MIGRATIONS[{today}]" in str(caught.value)
    with pytest.raises(IncompatibleCheckpointError, match=f"MIGRATIONS\\[{today}\\] is missing"):
        NNHandler.load(path, device="cpu")
    with pytest.raises(IncompatibleCheckpointError, match=f"MIGRATIONS\\[{today}\\] is missing"):
        read_info(path)


def test_a_gap_in_the_chain_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    step = _Renaming()
    today = F.FORMAT_VERSION
    monkeypatch.setattr(F, "FORMAT_VERSION", today + 2)
    monkeypatch.setitem(F.MIGRATIONS, today, step)
    monkeypatch.delitem(F.MIGRATIONS, today + 1, raising=False)
    with pytest.raises(IncompatibleCheckpointError, match=f"format version {today + 1} cannot be upgraded"):
        F.check_and_migrate(v1_state(), "v1_classifier.pth")
    assert step.calls == [today]


@pytest.mark.parametrize("outcome", ["raises", "returns None"])
def test_a_failing_step_names_the_file_and_the_step(monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    def step(state: Dict[str, Any]) -> Any:
        if outcome == "raises":
            raise KeyError("history")
        return None

    today = pretend_next_version(monkeypatch, step)
    with pytest.raises(IncompatibleCheckpointError, match=f"upgrading format version {today} to {today + 1}") as caught:
        F.check_and_migrate(v1_state(), "some/file.pth")
    assert caught.value.path == "some/file.pth"


def test_a_file_newer_than_this_library_is_refused(tmp_path: Path) -> None:
    state = v1_state()
    state[F.VERSION] = F.FORMAT_VERSION + 1
    with pytest.raises(IncompatibleCheckpointError, match="newer nn_handler"):
        F.check_and_migrate(dict(state), "newer.pth")
    newer = tmp_path / "newer.pth"
    atomic_save(state, newer)  # with a valid checksum: only its version is wrong
    message = f"format version {F.FORMAT_VERSION + 1} was written by a newer nn_handler"
    for reader in (lambda: NNHandler.load(newer, device="cpu"), lambda: read_info(newer),
                   lambda: NNHandler.initialize_from_checkpoint(newer, device="cpu")):
        with pytest.raises(IncompatibleCheckpointError, match=message):
            reader()
