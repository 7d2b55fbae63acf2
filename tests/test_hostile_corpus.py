"""The hostile corpus: forged checkpoints against every entry point (issue 13).

Each forged file is a real handler checkpoint (every slot in use) with one recorded spec
replaced by a payload and its checksum recomputed (``hostile_helpers``). Every payload would
create a marker file or change a victim file outside the run. What must hold:
- no marker is ever created and no file outside the run changes (checked after every case,
  and once more at the end for payloads that start a child process);
- a refusal is ONE error naming the checkpoint path: in the library an
  ``UnsafeCheckpointError`` naming the slot and the target, with the hint how to trust it
  (``trusted_packages=[...]``); in the runner a non-zero exit, no traceback, the path named;
- the readers (``inspect``, ``read_info``, ``diff``, ``find_latest``, ``initialize_from_checkpoint``)
  build nothing a file records, so they never run a payload;
- the legitimate paths stay green: a user's own package, trusted or passed as ``model_class``,
  loads and resumes; the runner's printed next-step commands work verbatim for a
  ``--config-dir`` package.

In-process cases are fast (a few ms each). The runner part (``python -m runner`` subprocesses,
~3-5 s each) is marked ``slow runner`` in the test names and kept to ~25 processes.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
from hostile_helpers import (
    ATTACK,
    ATTACKS,
    BOMB_CHILD,
    MODEL_KWARGS,
    SLOTS,
    Bomb,
    Scene,
    build_base,
    build_generative,
    forged,
    forget_modules,
    poisoned,
    read_state,
    setup_py,
    snapshot,
    targets_in,
    user_package,
    write_forged,
)

from nn_handler import NNHandler
from nn_handler.checkpointing import CheckpointError, UnsafeCheckpointError, diff, find_latest, inspect, read_info
from nn_handler.models import MLP

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCENES: List[Scene] = []  # every scene, checked once more at the end


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Dict[str, Any]:
    d = tmp_path_factory.mktemp("hostile-base")
    base = build_base(d / "base.pt", d)
    gen = build_generative(d / "gen.pt", d)
    return {"dir": d, "base": base, "gen": gen, "state": read_state(base), "gen_state": read_state(gen)}


@pytest.fixture(autouse=True)
def _unpoisoned():
    """A successful dunder-globals payload would leak into later tests: undo it (after recording it)."""
    yield
    import nn_handler.models
    vars(nn_handler.models).pop("__hostile_poison__", None)


@pytest.fixture(scope="module", autouse=True)
def _markers(tmp_path_factory):
    """One directory for every marker of this module (kept to the end: late markers are looked for there)."""
    global MARKERS
    MARKERS = tmp_path_factory.mktemp("hostile-markers")
    yield MARKERS


MARKERS: Optional[Path] = None


def scene_for(tmp_path: Path, name: str) -> Scene:
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
    scene = Scene(tmp_path, f"{len(SCENES):04d}-{safe}", markers=MARKERS)
    SCENES.append(scene)
    return scene


def attempt(fn):
    """``(result, exception)``; warnings are recorded, not raised (a refusal must be an error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None, caught
        except Exception as exc:  # noqa: BLE001 (any raw exception is a finding too)
            return None, exc, caught


def train_after(h: NNHandler) -> Optional[BaseException]:
    """What an accepted file leads to: training runs callbacks, the loss, metrics and the data."""
    _, exc, _ = attempt(lambda: h.train(epochs=1, progress_bar=False))
    return exc


def damage_of(scene: Scene, settle: float) -> List[str]:
    out = scene.damage(settle)
    if poisoned():
        out.append("nn_handler.models' globals were rewritten")
    return out


def assert_refusal(exc: Optional[BaseException], path: Path, slot_names, targets, *, unsafe: bool = True,
                   hint: bool = True) -> None:
    """One clear CheckpointError naming the path, the slot and the target (and how to trust it)."""
    assert exc is not None, f"the forged file loaded: {targets} was not refused"
    kind = UnsafeCheckpointError if unsafe else CheckpointError
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    assert str(path) in message, f"the path is not named: {message}"
    if unsafe:
        assert any(t in message for t in targets), f"no target of {targets} is named: {message}"
        assert any(n in message.lower() for n in slot_names), f"the slot ({slot_names}) is not named: {message}"
        if hint:
            assert "trusted_packages" in message, f"no hint how to trust it: {message}"


def payload_and_file(bases, scene: Scene, attack, slots, name: str = "forged.pt"):
    payload = attack.make(scene)
    path = write_forged(forged(bases["state"], slots, payload), scene.run / name)
    return payload, path


# ---------------------------------------------------------------------------- NNHandler.load: every slot
# Every attack in the core slots (one of each builder: model, loss, callbacks, datasets, nested _args_),
# and every slot under the strongest attacks; each (attack, slot) is its own forged file.
CORE_SLOTS = ["model", "loss_fn", "callback.ModelCheckpoint", "data.train", "nested._args_"]
STRONG = ["walk-F-os.system", "subprocess.Popen", "builtins.exec", "numpy.memmap", "runner.tasks.fit.os.system",
          "dunder-globals.update", "yaml.unsafe_load"]


def load_case(bases, tmp_path: Path, attack, slot: str) -> Optional[str]:
    """Forge ``slot`` with ``attack``, load, train if it loaded: what went wrong, or None."""
    import nn_handler.models
    scene = scene_for(tmp_path / slot, f"{attack.name}@{slot}")
    payload, path = payload_and_file(bases, scene, attack, [slot])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(scene.run)
        h, exc, caught = attempt(lambda: NNHandler.load(path, device="cpu"))
        train_exc = train_after(h) if h is not None else None
    refused = isinstance(exc, UnsafeCheckpointError)
    damage = damage_of(scene, 0 if refused else attack.settle)
    vars(nn_handler.models).pop("__hostile_poison__", None)
    if damage:
        return (f"RAN ({'load accepted the file' if h is not None else 'during load'}"
                f"{f'; training then raised {train_exc!r}' if train_exc else ''}): {damage}")
    try:
        assert_refusal(exc, path, SLOTS[slot].names, targets_in(payload), unsafe=SLOTS[slot].strict,
                       hint=attack.allowable)
    except AssertionError as failure:
        return f"not refused as it must be: {str(failure).splitlines()[0]}"
    said_twice = [str(w.message) for w in caught if any(t in str(w.message) for t in targets_in(payload))]
    if said_twice:  # the refusal is said once: not also as a warning
        return f"refused, but also warned: {said_twice[0][:200]}"
    return None


def report(problems: Dict[str, str]) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in problems.items())


@pytest.mark.parametrize("name", [a.name for a in ATTACKS])
def test_load_refuses_every_attack_in_the_core_slots(bases, tmp_path, name):
    attack = ATTACK[name]
    problems = {slot: p for slot in CORE_SLOTS if (p := load_case(bases, tmp_path, attack, slot))}
    assert not problems, f"{name}:\n{report(problems)}"


@pytest.mark.parametrize("slot", [s for s in SLOTS if s not in CORE_SLOTS])
def test_load_refuses_the_strongest_attacks_in_every_other_slot(bases, tmp_path, slot):
    problems = {name: p for name in STRONG if (p := load_case(bases, tmp_path, ATTACK[name], slot))}
    assert not problems, f"{slot}:\n{report(problems)}"


# Loading with the skip flags on must not run what the skipped slots name either.
SKIPPABLE = ["optimizer", "scheduler", "callback.ModelCheckpoint", "callback.EarlyStopping", "sde", "sampler"]


@pytest.mark.parametrize("name", ["walk-F-os.system", "subprocess.Popen", "collect_env.run", "numpy.memmap"])
def test_load_with_skip_flags_runs_nothing_the_skipped_slots_name(bases, tmp_path, monkeypatch, name):
    attack = ATTACK[name]
    scene = scene_for(tmp_path, f"skip-{name}")
    _, path = payload_and_file(bases, scene, attack, SKIPPABLE)
    monkeypatch.chdir(scene.run)
    h, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu", skip_optimizer=True, skip_scheduler=True,
                                               skip_callbacks=True, skip_sampler_sde=True))
    if h is not None:
        h.set_optimizer(torch.optim.SGD, lr=0.01)
        train_after(h)
    assert not damage_of(scene, attack.settle)
    assert exc is None or (isinstance(exc, CheckpointError) and str(path) in str(exc)), repr(exc)


# ---------------------------------------------------------------------------- trust is closed
TRUST_CASES = [
    # (trusted_packages, attack, slot): trusting a package never trusts what it imports
    (["matplotlib"], "matplotlib.os.system", "loss_fn"),
    (["matplotlib"], "matplotlib.os.system", "data.train"),
    (["matplotlib"], "matplotlib.subprocess.Popen", "callback.EarlyStopping"),
    (["matplotlib"], "matplotlib.subprocess.Popen", "model"),
    (["runner"], "runner.tasks.fit.os.system", "data.val"),
    (["sklearn"], "sklearn-joblib.load", "nested.kwarg"),
    (["nn_handler"], "walk-datasets-os.system", "data.train"),
    (["torch"], "walk-F-os.system", "loss_fn"),
]


@pytest.mark.parametrize("trusted,name,slot", TRUST_CASES, ids=[f"{t[0][0]}:{t[1]}@{t[2]}" for t in TRUST_CASES])
def test_trusting_a_package_does_not_trust_what_it_imports(bases, tmp_path, monkeypatch, trusted, name, slot):
    attack = ATTACK[name]
    scene = scene_for(tmp_path, f"trust-{name}@{slot}")
    payload, path = payload_and_file(bases, scene, attack, [slot])
    target = payload["_target_"]
    monkeypatch.chdir(scene.run)
    h, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu", trusted_packages=trusted))
    if h is not None:
        train_after(h)
    assert not damage_of(scene, attack.settle)
    assert_refusal(exc, path, SLOTS[slot].names, [target], hint=False)


# ---------------------------------------------------------------------------- modules imported before the check
@pytest.mark.parametrize("target,slot", [("setup.main", "model"), ("setup.EvilCallback", "callback.EarlyStopping"),
                                         ("setup.main", "data.train"), ("setup.main", "nested._args_")])
@pytest.mark.parametrize("where", ["working directory", "checkpoint directory"])
def test_a_setup_py_next_to_the_user_or_the_file_is_never_imported(bases, tmp_path, monkeypatch, target, slot, where):
    scene = scene_for(tmp_path, f"setup-{where.split()[0]}-{slot}")
    payload = {"_target_": target}
    if where == "working directory":  # `python -c`/`python -m` put the working directory first on sys.path
        launch = tmp_path / "launch"
        launch.mkdir()
        (launch / "setup.py").write_text(setup_py(scene.marker))
        path = write_forged(forged(bases["state"], [slot], payload), scene.run / "forged.pt")
        monkeypatch.chdir(launch)
        monkeypatch.setattr(sys, "path", [""] + sys.path)
    else:  # a script run from the directory the file was downloaded into: that directory is sys.path[0]
        (scene.run / "setup.py").write_text(setup_py(scene.marker))
        path = write_forged(forged(bases["state"], [slot], payload), scene.run / "forged.pt")
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(scene.run))
    forget_modules("setup")
    try:
        h, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu"))
        if h is not None:
            train_after(h)
        for reader in (lambda: inspect(path), lambda: read_info(path)):
            attempt(reader)
    finally:
        forget_modules("setup")
    assert not damage_of(scene, 0)
    assert_refusal(exc, path, SLOTS[slot].names, [target])


# ---------------------------------------------------------------------------- the readers build nothing
READER_ATTACKS = ["walk-F-os.system", "walk-F-torch.load", "os.system", "subprocess.Popen", "builtins.exec",
                  "pathlib.Path.write_text", "shutil.rmtree", "numpy.memmap", "scipy.io.FortranFile", "joblib.load",
                  "yaml.unsafe_load", "sympy.sympify", "dunder-globals.update", "runner.tasks.fit.os.system"]
# Every slot at once (those that would overwrite each other left out: nested._args_ replaces data.train).
ALL_SLOTS = ["model", "optimizer", "scheduler", "metric", "callback.ModelCheckpoint", "callback.EarlyStopping", "sde",
             "sampler", "nested.list", "_partial_.loss", "nested._args_"]


@pytest.mark.parametrize("name", READER_ATTACKS)
def test_readers_and_initialize_from_checkpoint_never_build_a_recorded_spec(bases, tmp_path, monkeypatch, name):
    """One file with the payload in every slot at once: inspect, read_info, diff, find_latest and
    initialize_from_checkpoint read it (it is intact) and never run it."""
    attack = ATTACK[name]
    scene = scene_for(tmp_path, f"readers-{name}")
    _, path = payload_and_file(bases, scene, attack, ALL_SLOTS)
    monkeypatch.chdir(scene.run)
    problems = []
    report, exc, _ = attempt(lambda: inspect(path))
    if exc is not None:
        problems.append(f"inspect raised {exc!r}")
    elif report.get("error"):
        problems.append(f"inspect reports an intact forged file as damaged: {report.get('error')}")
    info, exc, _ = attempt(lambda: read_info(path))
    if exc is not None and not (isinstance(exc, CheckpointError) and str(path) in str(exc)):
        problems.append(f"read_info raised {exc!r}")
    _, exc, _ = attempt(lambda: diff(path, bases["base"]))
    if exc is not None and not (isinstance(exc, CheckpointError) and str(path) in str(exc)):
        problems.append(f"diff raised {exc!r}")
    found, exc, _ = attempt(lambda: find_latest(scene.run))
    if exc is not None or Path(found) != path:
        problems.append(f"find_latest: {found!r} {exc!r}")
    h, exc, _ = attempt(lambda: NNHandler.initialize_from_checkpoint(path, model_class=MLP, device="cpu",
                                                                      **MODEL_KWARGS))
    if exc is not None:
        problems.append(f"initialize_from_checkpoint raised {exc!r}")
    else:
        ref = read_state(bases["base"])["model_state_dict"]
        assert all(torch.equal(ref[k], v) for k, v in h.module.state_dict().items())
    assert not damage_of(scene, attack.settle)
    assert not problems, problems


# ---------------------------------------------------------------------------- ModelCheckpoint's recorded paths
def _checkpoint_callback_forgery(state: Dict[str, Any], scene: Scene, case: str) -> None:
    cb = state["callbacks"][0]
    cb["spec"].update(monitor="loss", save_top_k=1, mode="min")
    victim_ckpt = scene.victims / "e1.pt"  # a real checkpoint outside the run, named to fit the pattern
    if case == "best_k_models deletes a victim":
        cb["state"]["best_k_models"] = {str(scene.victim): 1e9}  # the worst: falls out on the first epoch
    elif case == "best_k_models deletes a victim checkpoint":
        write_forged(state, victim_ckpt)
        scene.before = snapshot(scene.victims, scene.planted)
        cb["state"]["best_k_models"] = {str(victim_ckpt): 1e9}
    elif case == "dirpath is a victim directory":
        cb["spec"]["dirpath"] = str(scene.victims)
    elif case == "filename overwrites a victim":
        cb["spec"]["filename"] = str(scene.victim)
        cb["spec"]["save_top_k"] = -1
    elif case == "last_filename escapes the run":
        cb["spec"]["last_filename"] = os.path.relpath(scene.victim, scene.run)
        cb["spec"]["save_last"] = True
    elif case == "last_model_path is a victim":
        cb["state"]["last_model_path"] = str(scene.victim)
        cb["spec"]["save_last"] = True
    else:  # pragma: no cover
        raise AssertionError(case)


@pytest.mark.parametrize("case", ["best_k_models deletes a victim", "best_k_models deletes a victim checkpoint",
                                  "dirpath is a victim directory", "filename overwrites a victim",
                                  "last_filename escapes the run", "last_model_path is a victim"])
def test_a_forged_model_checkpoint_state_never_touches_files_outside_the_run(bases, tmp_path, monkeypatch, case):
    scene = scene_for(tmp_path, "mc-" + case.replace(" ", "-"))
    state = forged(bases["state"], [], {})
    _checkpoint_callback_forgery(state, scene, case)
    path = write_forged(state, scene.run / "forged.pt")
    monkeypatch.chdir(scene.run)
    h, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu"))
    if h is not None:
        train_exc = attempt(lambda: h.train(epochs=2, progress_bar=False))[1]
        assert train_exc is None, f"training after a load with a confined callback failed: {train_exc!r}"
    else:
        assert isinstance(exc, CheckpointError) and str(path) in str(exc), repr(exc)
    assert not damage_of(scene, 0)


def test_recorded_dataloader_workers_are_bounded_by_the_cpu_count(bases, tmp_path, monkeypatch):
    scene = scene_for(tmp_path, "workers")
    state = forged(bases["state"], [], {})
    state["data"]["train"]["options"]["num_workers"] = 24
    state["data"]["val"]["options"]["num_workers"] = 1000
    path = write_forged(state, scene.run / "forged.pt")
    monkeypatch.chdir(scene.run)
    h = NNHandler.load(path, device="cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for loader in (h.train_loader, h.val_loader):
        assert loader.num_workers <= cpus, loader.num_workers


# ---------------------------------------------------------------------------- a user's own package
@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A user's package on the import path (like a PYTHONPATH entry), outside the working directory."""
    site = user_package(tmp_path / "site", "hostile_userpkg")
    monkeypatch.syspath_prepend(str(site))
    forget_modules("hostile_userpkg")
    yield "hostile_userpkg"
    forget_modules("hostile_userpkg")


def _user_handler(pkg: str, data_module: str) -> NNHandler:
    import importlib
    nets = importlib.import_module(f"{pkg}.nets")
    h = NNHandler(nets.Net, device="cpu", width=8)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_loss_fn(nets.SmoothLoss, smoothing=0.1)
    h.set_train_loader({"_target_": f"{pkg}.{data_module}.build", "n": 32}, batch_size=8, shuffle=True)
    h.train(epochs=1, seed=0, progress_bar=False)
    return h


def test_a_users_own_model_module_loads_and_resumes_with_a_plain_load(user_pkg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = _user_handler(user_pkg, "nets")  # the data builder in the model's own module
    h.save(tmp_path / "user.pt")
    forget_modules(user_pkg)  # a fresh process: the package is found on the import path
    h2 = NNHandler.load(tmp_path / "user.pt", device="cpu")
    assert type(h2.module).__module__ == f"{user_pkg}.nets" and h2.loss_fn is not None and h2.train_loader
    h2.train(epochs=1, progress_bar=False)
    assert h2.epoch == 2


def test_a_users_package_loads_and_resumes_when_trusted_or_passed_as_model_class(user_pkg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = _user_handler(user_pkg, "data")  # the data builder in another module of the package
    path = tmp_path / "user.pt"
    h.save(path)
    h2 = NNHandler.load(path, device="cpu", trusted_packages=[user_pkg])
    assert h2.train_loader is not None and h2.loss_fn is not None
    h2.train(epochs=1, progress_bar=False)
    assert h2.epoch == 2
    import importlib
    nets = importlib.import_module(f"{user_pkg}.nets")
    h3 = NNHandler.initialize_from_checkpoint(path, model_class=nets.Net, device="cpu", width=8)
    assert all(torch.equal(a, b) for a, b in zip(h3.module.state_dict().values(), h.module.state_dict().values()))
    h4 = NNHandler.load(path, device="cpu", model_class=nets.Net, model_kwargs={"width": 8},
                        trusted_packages=[user_pkg])
    h4.train(epochs=1, progress_bar=False)
    assert h4.epoch == 2


def test_a_plain_load_trusts_the_model_module_not_the_rest_of_its_package(user_pkg, tmp_path, monkeypatch):
    """Only what is defined in the recorded model's own module comes with it by default; another
    module of the package needs trusted_packages, and the refusal says so."""
    monkeypatch.chdir(tmp_path)
    h = _user_handler(user_pkg, "data")
    path = tmp_path / "user.pt"
    h.save(path)
    _, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu"))
    assert_refusal(exc, path, ("train",), [f"{user_pkg}.data.build"])
    assert f"trusted_packages=['{user_pkg}']" in str(exc) or f'trusted_packages=["{user_pkg}"]' in str(exc), str(exc)


@pytest.mark.parametrize("target", ["nets.os.system", "nets.subprocess.Popen", "nets.torch.os.system",
                                    "nets.torch.utils.collect_env.run"])
@pytest.mark.parametrize("trusted", [False, True])
def test_a_trusted_user_module_does_not_trust_what_it_imports(user_pkg, tmp_path, monkeypatch, target, trusted):
    monkeypatch.chdir(tmp_path)
    scene = scene_for(tmp_path, f"user-{target}-{trusted}")
    h = _user_handler(user_pkg, "nets")
    h.save(scene.run / "user.pt")
    state = read_state(scene.run / "user.pt")
    args = [["touch", str(scene.marker)]] if target.endswith("Popen") else [scene.cmd]
    payload = {"_target_": f"{user_pkg}.{target}", "_args_": args}
    state["data"]["train"]["dataset"] = payload
    path = write_forged(state, scene.run / "forged.pt")
    h2, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu", trusted_packages=[user_pkg] if trusted else []))
    if h2 is not None:
        train_after(h2)
    assert not damage_of(scene, 0.5 if h2 is not None else 0)
    assert_refusal(exc, path, ("train",), [payload["_target_"]], hint=not trusted)


def test_a_package_in_the_working_directory_is_not_trusted_as_the_model_module(bases, tmp_path, monkeypatch):
    """A model package lying in the working directory (where a downloaded archive unpacks) is not
    imported for a file that names it: its __init__ would run."""
    scene = scene_for(tmp_path, "cwd-package")
    launch = tmp_path / "launch"
    pkg = launch / "hostile_cwdpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"import os\nos.system({scene.cmd!r})\nfrom torch.nn import Linear as Net\n")
    state = forged(bases["state"], ["model"], {"_target_": "hostile_cwdpkg.Net", "in_features": 6,
                                                "out_features": 3})
    path = write_forged(state, scene.run / "forged.pt")
    monkeypatch.chdir(launch)
    monkeypatch.setattr(sys, "path", [""] + sys.path)
    forget_modules("hostile_cwdpkg")
    try:
        _, exc, _ = attempt(lambda: NNHandler.load(path, device="cpu"))
    finally:
        forget_modules("hostile_cwdpkg")
    assert not damage_of(scene, 0)
    assert_refusal(exc, path, ("model",), ["hostile_cwdpkg.Net"])


# ---------------------------------------------------------------------------- the memory bomb
def test_a_small_file_claiming_a_huge_bytearray_allocates_no_memory_in_any_reader(bases, tmp_path):
    """A ~100 KiB file whose pickle builds bytearray(1 GiB) (weights_only allows bytearray): load,
    inspect, read_info, diff and find_latest each peak below twice the largest legitimate state
    (the whole file) above the process's baseline, plus a small allowance."""
    state = forged(bases["state"], [], {})
    state["metadata"]["bomb"] = Bomb(2 ** 30)
    run = tmp_path / "run"
    path = write_forged(state, run / "bomb.pt")
    size = path.stat().st_size
    assert size < 1_000_000
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([PYTHON, "-c", BOMB_CHILD, str(path), str(bases["base"])], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    allowance = 2 * size + 64 * 2 ** 20  # twice the file, plus reading noise
    grew = {k: v["peak"] - out["baseline"] for k, v in out.items() if k != "baseline"}
    assert all(g < allowance for g in grew.values()), (grew, {k: v["outcome"] for k, v in out.items() if k != "baseline"})
    for name in ("load", "read_info", "diff"):
        outcome = out[name]["outcome"]
        assert "CheckpointError" in outcome and str(path) in outcome, (name, outcome)


# ---------------------------------------------------------------------------- the runner (slow: subprocesses)
def run_cli(args, cwd, timeout=180, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run([PYTHON, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_runner_refused(proc, path: Path, scene: Scene, settle: float = 0.0) -> None:
    out = proc.stdout + proc.stderr
    assert not damage_of(scene, settle), f"RAN: {damage_of(scene, 0)}\n{out[-3000:]}"
    assert proc.returncode != 0, f"the forged file was accepted (exit 0):\n{out[-3000:]}"
    assert "Traceback" not in out, out[-4000:]
    assert str(path) in out or os.path.relpath(path, scene.root) in out, f"the path is not named:\n{out[-3000:]}"


RUNNER_CASES = [
    # (task, slot, attack, extra args); one slot per file (a refusal at the first slot would hide the others)
    ("resume", "model", "walk-F-os.system", []),
    ("resume", "loss_fn", "runner.tasks.fit.os.system", []),
    ("resume", "callback.ModelCheckpoint", "matplotlib.subprocess.Popen", []),
    ("resume", "data.train", "walk-datasets-os.system", []),
    ("resume", "optimizer", "collect_env.run", []),
    ("resume", "nested.list", "subprocess.Popen", []),
    ("resume", "loss_fn", "matplotlib.os.system", ["load.trusted_packages=[matplotlib]"]),
    # finetune skips the recorded optimizer and scheduler by default: ask for them, so they are built
    ("finetune", "scheduler", "os.system", ["load.skip_optimizer=false", "load.skip_scheduler=false"]),
    ("finetune", "nested._args_", "numpy.memmap", []),
    ("infer", "loss_fn", "subprocess.Popen", []),
    ("infer", "data.val", "builtins.exec", []),
    ("infer", "model", "walk-models-os.system", []),
]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile-runner")


@pytest.mark.parametrize("task,slot,name,extra", RUNNER_CASES,
                         ids=[f"slow-runner-{t}-{n}@{s}" for t, s, n, _ in RUNNER_CASES])
def test_slow_runner_tasks_refuse_a_forged_file(bases, launch, task, slot, name, extra):
    attack = ATTACK[name]
    scene = scene_for(launch / f"{task}-{slot}-{name}", f"runner-{task}-{name}@{slot}")
    payload, path = payload_and_file(bases, scene, attack, [slot], "forged.pth")
    proc = run_cli([f"task={task}", f"checkpoint.path={path}", "train.epochs=1", "train.progress_bar=false",
                    f"hydra.run.dir={scene.root / 'out'}", *extra], cwd=scene.root)
    assert_runner_refused(proc, path, scene, attack.settle)


def test_slow_runner_resume_with_a_setup_py_in_the_launch_directory(bases, launch):
    """`python -m runner` puts the launch directory on sys.path; model=mlp makes the runner compare the
    recorded model class with the configured one, which must not import it either."""
    scene = scene_for(launch / "setup", "runner-setup")
    (scene.root / "setup.py").write_text(setup_py(scene.marker))
    path = write_forged(forged(bases["state"], ["model"], {"_target_": "setup.main", **MODEL_KWARGS}),
                        scene.run / "forged.pth")
    for i, extra in enumerate(([], ["model=mlp", "model.in_features=6", "model.out_features=3",
                                    "model.hidden=[8]"])):
        proc = run_cli(["task=resume", f"checkpoint.path={path}", "train.epochs=1", "train.progress_bar=false",
                        f"hydra.run.dir={scene.root / f'out{i}'}", *extra], cwd=scene.root)
        assert_runner_refused(proc, path, scene)


@pytest.mark.parametrize("slot,name", [("sampler", "walk-F-os.system"), ("sde", "subprocess.Popen")])
def test_slow_runner_sample_refuses_a_forged_generative_file(bases, launch, slot, name):
    attack = ATTACK[name]
    scene = scene_for(launch / f"sample-{slot}", f"runner-sample-{name}@{slot}")
    payload = attack.make(scene)
    state = forged(bases["gen_state"], [], {})
    state[slot]["spec"] = payload
    path = write_forged(state, scene.run / "forged.pth")
    proc = run_cli(["task=sample", f"checkpoint.path={path}", "sample.n=4", "sample.steps=2", "seed=0",
                    f"hydra.run.dir={scene.root / 'out'}"], cwd=scene.root)
    assert_runner_refused(proc, path, scene, attack.settle)


def test_slow_runner_inspect_and_diff_never_build_a_recorded_spec(bases, launch):
    scene = scene_for(launch / "readers", "runner-readers")
    (scene.root / "setup.py").write_text(setup_py(scene.marker))
    state = forged(bases["state"], ALL_SLOTS, ATTACK["os.system"].make(scene))
    state["model"]["spec"] = {"_target_": "setup.main"}
    path = write_forged(state, scene.run / "forged.pth")
    inspected = run_cli(["task=inspect", f"checkpoint.path={path}"], cwd=scene.root)
    diffed = run_cli(["task=diff", f"checkpoint.path={path}", f"diff.other={bases['base']}"], cwd=scene.root)
    assert not damage_of(scene, 0)
    for proc in (inspected, diffed):
        assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert "setup.main" in inspected.stdout, inspected.stderr[-3000:]  # intact: reported (what it names included)


def test_slow_runner_auto_resume_refuses_a_forged_file_in_the_run_directory(bases, launch):
    scene = scene_for(launch / "auto", "runner-auto")
    attack = ATTACK["subprocess.Popen"]
    run_dir = scene.root / "out"
    _, path = payload_and_file(bases, scene, attack, ["callback.EarlyStopping"], "forged.pth")
    target = run_dir / "checkpoints" / "last.pth"
    target.parent.mkdir(parents=True)
    os.replace(path, target)
    proc = run_cli(["data=synthetic", "model.in_features=6", "model.out_features=3", "model.hidden=[8]",
                    "train.epochs=3", "train.progress_bar=false", "auto_resume=true", f"hydra.run.dir={run_dir}"],
                   cwd=scene.root)
    assert_runner_refused(proc, target, scene, attack.settle)


def test_slow_runner_next_commands_work_verbatim_for_a_config_dir_package(tmp_path):
    """A user's package (model in pkg.nets, data in pkg.data, on PYTHONPATH) trained with --config-dir:
    the resume, fine-tune and infer commands the run prints work exactly as printed."""
    site = user_package(tmp_path / "site", "hostile_cfgpkg")
    launch_dir = tmp_path / "launch"
    (launch_dir / "myconf" / "model").mkdir(parents=True)
    (launch_dir / "myconf" / "data").mkdir(parents=True)
    (launch_dir / "myconf" / "model" / "mine.yaml").write_text("_target_: hostile_cfgpkg.nets.Net\nwidth: 8\n")
    (launch_dir / "myconf" / "data" / "mine.yaml").write_text(
        "train: {_target_: hostile_cfgpkg.data.build, n: 64, seed: 0}\n"
        "val: {_target_: hostile_cfgpkg.data.build, n: 32, seed: 1}\nbatch_size: 16\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = run_cli(["--config-dir", "myconf", "model=mine", "data=mine", "train.epochs=1",
                    "train.progress_bar=false", "hydra.run.dir=runs/train"], cwd=launch_dir, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        for label in ("resume:", "fine-tune:", "infer:"):
            if line.startswith(label):
                commands[label.rstrip(":")] = shlex.split(line[len(label):].strip())
    assert set(commands) == {"resume", "fine-tune", "infer"}, proc.stdout
    for label, argv in commands.items():
        assert argv[:3] == ["python", "-m", "runner"], argv
        # verbatim, plus a run directory of its own (two runs in one second would share outputs/<date>/<time>)
        done = run_cli([*argv[3:], f"hydra.run.dir=runs/{label}"], cwd=launch_dir, env_extra=env)
        assert done.returncode == 0, f"{label}: {shlex.join(argv)}\n{done.stderr[-3000:]}"


# ---------------------------------------------------------------------------- once more, at the end
def test_zz_no_marker_appeared_later_and_nothing_outside_any_run_changed():
    """Payloads that start a child process may act after their case was checked."""
    import time
    time.sleep(0.5)
    assert SCENES and MARKERS is not None
    late = sorted(p.name for p in MARKERS.iterdir())
    assert not late, late
