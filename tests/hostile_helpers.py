"""The hostile corpus's building blocks: real handler checkpoints, forged slots, attack payloads.

An attacker only hands over a file. Here the file is a real handler checkpoint (every slot in
use) read back with ``torch.load(weights_only=True)``, one recorded spec replaced by a payload,
and written again with ``nn_handler.checkpointing.atomic_save`` (so the checksum is valid: it
guards against damage, not forgery). Every payload, if it ever ran, would create a marker
file or change a victim file that lies outside the run; the tests look for both.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import pickle
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

IN, OUT = 6, 3
MODEL_KWARGS: Dict[str, Any] = {"in_features": IN, "out_features": OUT, "hidden": [8]}
SYNTH = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 32, "in_features": IN,
         "num_classes": OUT, "seed": 0}
# Nested specs in kwargs (and a list of them), as a user's config may hold them.
TRAIN_SPEC = {"_target_": "torch.utils.data.Subset", "dataset": SYNTH, "indices": list(range(24))}
VAL_SPEC = {"_target_": "torch.utils.data.ConcatDataset",
            "datasets": [{**SYNTH, "n": 8, "seed": 1}, {**SYNTH, "n": 8, "seed": 2}]}


# ---------------------------------------------------------------------------- legitimate checkpoints
def build_base(path: Path, workdir: Path) -> Path:
    """A classification handler with every slot in use, trained one epoch and saved to ``path``.

    Model (MLP), optimizer, scheduler, loss, a metric, ModelCheckpoint and EarlyStopping
    callbacks, an SDE and a sampler, EMA, train and val datasets as (nested) specs.
    ModelCheckpoint writes into ``ckpt`` relative to the working directory (``workdir`` here).
    """
    from nn_handler import NNHandler
    from nn_handler.callbacks import EarlyStopping, ModelCheckpoint
    from nn_handler.metrics import accuracy
    from nn_handler.models import MLP
    from nn_handler.sampler import EulerMaruyama
    from nn_handler.sde import VPSDE

    with contextlib.chdir(workdir):
        h = NNHandler(MLP, device="cpu", **MODEL_KWARGS)
        h.set_optimizer(torch.optim.Adam, lr=1e-3)
        h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)
        h.set_loss_fn(torch.nn.CrossEntropyLoss)
        h.add_metric("accuracy", accuracy)
        h.add_callback(ModelCheckpoint(dirpath="ckpt", filename="e{epoch}.pt", monitor="loss", save_top_k=1))
        h.add_callback(EarlyStopping(monitor="loss", patience=3))
        h.set_sde(VPSDE, beta_min=0.1, beta_max=10.0)
        h.set_sampler(EulerMaruyama, snr=0.1)
        h.set_train_loader(TRAIN_SPEC, batch_size=8, shuffle=True)
        h.set_val_loader(VAL_SPEC, batch_size=8)
        h.train(epochs=1, ema_decay=0.9, seed=0, progress_bar=False)
        h.save(path)
    return path


GEN_MODEL_KWARGS: Dict[str, Any] = {"shape": [2], "hidden": 16, "layers": 1, "embed_dim": 8, "beta_min": 0.1,
                                    "beta_max": 10.0}
GEN_DATA = {"_target_": "nn_handler.datasets.synthetic_regression", "n": 64, "in_features": 2, "seed": 0}


def build_generative(path: Path, workdir: Path) -> Path:
    """A score-based handler (nn_handler.models.ScoreMLP, VP SDE, EulerMaruyama, EMA), one epoch, saved."""
    from nn_handler import ModelType, NNHandler
    from nn_handler.models import ScoreMLP
    from nn_handler.sampler import EulerMaruyama
    from nn_handler.sde import VPSDE

    with contextlib.chdir(workdir):
        h = NNHandler(ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, **GEN_MODEL_KWARGS)
        h.set_sde(VPSDE, beta_min=0.1, beta_max=10.0)
        h.set_sampler(EulerMaruyama, snr=0.1)
        h.set_optimizer(torch.optim.Adam, lr=1e-3)
        h.set_train_loader(GEN_DATA, batch_size=32, shuffle=True)
        h.train(epochs=1, ema_decay=0.9, seed=0, progress_bar=False)
        h.save(path)
    return path


def read_state(path: Path) -> Dict[str, Any]:
    """What an attacker sees: the file read as plain data."""
    return torch.load(path, weights_only=True)


def write_forged(state: Dict[str, Any], path: Path) -> Path:
    """Re-save with the library's own atomic_save: the checksum trailer is valid."""
    from nn_handler.checkpointing import atomic_save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path)
    return path


# ---------------------------------------------------------------------------- slots
# Each slot: (how the message may name it, where in the state the payload goes).
def _set_entry_spec(key: str) -> Callable[[Dict[str, Any], Dict[str, Any]], None]:
    def forge(state: Dict[str, Any], payload: Dict[str, Any]) -> None:
        state[key]["spec"] = payload
    return forge


def _forge_metric(state, payload):
    state["metrics"]["accuracy"] = payload


def _forge_callback(index):
    def forge(state, payload):
        state["callbacks"][index]["spec"] = payload
    return forge


def _forge_dataset(name):
    def forge(state, payload):
        state["data"][name]["dataset"] = payload
    return forge


def _forge_nested_kwarg(state, payload):  # a spec inside a trusted spec's kwargs
    state["data"]["train"]["dataset"]["dataset"] = payload


def _forge_nested_list(state, payload):  # a spec inside a list inside a trusted spec's kwargs
    state["data"]["val"]["dataset"]["datasets"][1] = payload


def _forge_nested_args(state, payload):  # a spec inside a trusted spec's _args_
    state["data"]["train"]["dataset"] = {"_target_": "torch.utils.data.Subset", "_args_": [payload, [0, 1, 2, 3]]}


def _forge_partial_loss(state, payload):  # _partial_: nothing is called now, the loss is called while training
    state["loss_fn"]["spec"] = {**payload, "_partial_": True}


def _forge_partial_nested(state, payload):  # a _partial_ spec nested in a dataset spec
    state["data"]["train"]["dataset"]["dataset"] = {**payload, "_partial_": True}


def _forge_model_kwarg(state, payload):  # a spec inside the model spec's kwargs
    state["model"]["spec"]["hidden"] = payload


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    names: Tuple[str, ...]  # how a refusal may name the slot (any one, case-insensitive)
    forge: Callable[[Dict[str, Any], Dict[str, Any]], None]
    strict: bool = True  # False: any CheckpointError naming the path is a refusal (not necessarily "unsafe")


SLOTS: Dict[str, Slot] = {s.name: s for s in [
    Slot("model", ("model",), _set_entry_spec("model")),
    Slot("optimizer", ("optimizer",), _set_entry_spec("optimizer")),
    Slot("scheduler", ("scheduler",), _set_entry_spec("scheduler")),
    Slot("loss_fn", ("loss",), _set_entry_spec("loss_fn")),
    Slot("metric", ("metric", "accuracy"), _forge_metric),
    Slot("callback.ModelCheckpoint", ("callback",), _forge_callback(0)),
    Slot("callback.EarlyStopping", ("callback",), _forge_callback(1)),
    Slot("sde", ("sde",), _set_entry_spec("sde")),
    Slot("sampler", ("sampler",), _set_entry_spec("sampler")),
    Slot("data.train", ("train",), _forge_dataset("train")),
    Slot("data.val", ("val",), _forge_dataset("val")),
    Slot("nested.kwarg", ("train",), _forge_nested_kwarg),
    Slot("nested.list", ("val",), _forge_nested_list),
    Slot("nested._args_", ("train",), _forge_nested_args),
    Slot("_partial_.loss", ("loss",), _forge_partial_loss),
    Slot("_partial_.nested", ("train",), _forge_partial_nested),
    Slot("nested.model_kwarg", ("model",), _forge_model_kwarg, strict=False),
]}


def forged(base: Dict[str, Any], slots: Iterable[str], payload: Dict[str, Any]) -> Dict[str, Any]:
    state = copy.deepcopy(base)
    for name in slots:
        SLOTS[name].forge(state, copy.deepcopy(payload))
    return state


# ---------------------------------------------------------------------------- scene
class _Touch:
    """Pickles to ``os.system('touch <marker>')`` (the planted pickle files' payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@dataclasses.dataclass
class Scene:
    """One attack's world: the run (where the forged file lies and the process works), a victim
    directory outside it, files an attacker planted elsewhere, and the marker the payload would
    create."""

    root: Path
    name: str
    markers: Optional[Path] = None  # shared by many scenes (the names are unique): checked again at the end

    def __post_init__(self) -> None:
        self.run = self.root / "run"
        self.victims = self.root / "victims"  # outside the run
        self.planted = self.root / "planted"  # outside the run: what a payload may point a loader at
        self.markers = self.markers or self.root / "markers"
        for d in (self.run, self.victims / "sub", self.planted / "hub", self.markers):
            d.mkdir(parents=True, exist_ok=True)
        self.marker = self.markers / f"marker-{self.name}"
        self.victim = self.victims / "precious.txt"
        self.victim.write_text("precious data\n")
        self.victim_npy = self.victims / "data.npy"
        self.victim_npy.write_bytes(b"not really numpy, but precious\n")
        (self.victims / "sub" / "nested.txt").write_text("nested precious data\n")
        self.cmd = f"touch {self.marker}"
        self.code = f"__import__('os').system({self.cmd!r})"
        self.pickle = self.planted / "evil.pkl"
        self.pickle.write_bytes(pickle.dumps(_Touch(self.cmd)))
        (self.planted / "hub" / "hubconf.py").write_text(
            f"import os\nos.system({self.cmd!r})\n\ndef entry(**kwargs):\n    return None\n")
        self.script = self.planted / "evil_script.py"
        self.script.write_text(f"import os\nos.system({self.cmd!r})\n")
        self.before = snapshot(self.victims, self.planted)

    def markers_created(self) -> List[str]:
        return sorted(p.name for p in self.markers.iterdir() if p.name.startswith(self.marker.name))

    def outside_changes(self) -> List[str]:
        after = snapshot(self.victims, self.planted)
        changed = [k for k in self.before if after.get(k) != self.before[k]]
        added = [k for k in after if k not in self.before]
        return [f"changed or deleted: {k}" for k in changed] + [f"created: {k}" for k in added]

    def damage(self, settle: float = 0.0) -> List[str]:
        """Markers and outside changes (``settle`` seconds for a child process to do its work)."""
        if settle:
            import time
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline and not self.markers_created():
                time.sleep(0.02)
        return [f"marker created: {m}" for m in self.markers_created()] + self.outside_changes()


def snapshot(*dirs: Path) -> Dict[str, Optional[str]]:
    """path -> sha256 of every file (and directory, as None) under ``dirs``."""
    out: Dict[str, Optional[str]] = {}
    for top in dirs:
        if not top.exists():
            continue
        for p in sorted(top.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


# ---------------------------------------------------------------------------- attacks
@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[Scene], Dict[str, Any]]  # the payload spec
    why: str
    settle: float = 0.0  # the payload starts a child process: give it this long to act

    @property
    def walk(self) -> bool:
        """Goes through another module object or a dunder: no trust can allow it, so no hint is owed."""
        return self.name.startswith(("walk-", "matplotlib.", "sklearn-", "runner.", "dunder-"))

    @property
    def allowable(self) -> bool:
        """Defined in a third-party package: trusting that package would allow it, so the refusal must say
        how (the standard library, walks and dunders can never be allowed; torch's own modules are listed)."""
        top = self.name.split(".", 1)[0]
        return not self.walk and top in ("numpy", "scipy", "joblib", "tqdm", "yaml", "sympy")


def _args(target: str, *args: Any, **kwargs: Any) -> Callable[[Scene], Dict[str, Any]]:
    """A payload ``target(*args, **kwargs)``; string args/kwargs are formatted with the scene."""
    def fmt(value, s):
        if isinstance(value, str):
            return value.format(s=s)
        if isinstance(value, list):
            return [fmt(v, s) for v in value]
        if isinstance(value, dict):
            return {k: fmt(v, s) for k, v in value.items()}
        return value

    def make(s: Scene) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"_target_": target}
        if args:
            spec["_args_"] = fmt(list(args), s)
        spec.update(fmt(dict(kwargs), s))
        return spec
    return make


CMD, CODE = "{s.cmd}", "{s.code}"
PATH = {"_target_": "pathlib.Path", "_args_": ["{s.victim}"]}

ATTACKS: List[Attack] = [
    # Keyword payloads where the callee takes keywords (every slot's builder passes kwargs); some
    # positional ones (_args_) too.
    # attribute walks from allowed modules
    Attack("walk-F-os.system", _args("torch.nn.functional.torch.os.system", command=CMD), "walk from torch.nn.functional"),
    Attack("walk-datasets-os.system", _args("nn_handler.datasets.torch.os.system", command=CMD),
           "walk from nn_handler.datasets"),
    Attack("walk-models-os.system", _args("nn_handler.models.torch.os.system", command=CMD), "walk from nn_handler.models"),
    Attack("walk-metrics-collect_env.run", _args("nn_handler.metrics.torch.utils.collect_env.run", command=CMD),
           "walk from nn_handler.metrics to a function that runs a command"),
    Attack("walk-F-torch.load", _args("torch.nn.functional.torch.load", f="{s.pickle}", weights_only=False),
           "walk to torch.load with weights_only=False on a planted pickle"),
    Attack("walk-F-hub.load", _args("torch.nn.functional.torch.hub.load", repo_or_dir="{s.planted}/hub",
                                    model="entry", source="local", trust_repo=True),
           "walk to torch.hub.load (runs hubconf.py)"),
    Attack("walk-F-torch.save", _args("torch.nn.functional.torch.save", obj=[], f="{s.victim}"),
           "walk to torch.save over a victim file"),
    Attack("torch.hub.load", _args("torch.hub.load", "{s.planted}/hub", "entry", source="local"),
           "torch.hub.load runs a hubconf.py"),
    Attack("collect_env.run", _args("torch.utils.collect_env.run", command=CMD),
           "torch.utils.collect_env.run runs a command"),
    Attack("benchmark.Timer.timeit", _args("torch.utils.benchmark.Timer.timeit",
                                           self={"_target_": "torch.utils.benchmark.Timer", "stmt": CODE}, number=1),
           "a class attribute path inside torch, with a nested instance: runs a statement"),
    # the standard library
    Attack("os.system", _args("os.system", command=CMD), "stdlib"),
    Attack("os.system-args", _args("os.system", CMD), "stdlib, positional"),
    Attack("os.popen", _args("os.popen", cmd=CMD), "stdlib", settle=0.5),
    Attack("posix.system", _args("posix.system", command=CMD), "stdlib under another name"),
    Attack("subprocess.Popen", _args("subprocess.Popen", args=["touch", "{s.marker}"]), "stdlib class", settle=0.5),
    Attack("subprocess.run", _args("subprocess.run", args=["touch", "{s.marker}"]), "stdlib"),
    Attack("builtins.exec", _args("builtins.exec", CODE), "stdlib (positional only)"),
    Attack("builtins.eval", _args("builtins.eval", CODE), "stdlib (positional only)"),
    Attack("timeit.timeit", _args("timeit.timeit", stmt=CODE, number=1), "runs a statement string"),
    Attack("cProfile.run", _args("cProfile.run", statement=CODE), "runs a statement string"),
    Attack("runpy.run_path", _args("runpy.run_path", path_name="{s.script}"), "runs a planted script"),
    Attack("code.InteractiveInterpreter.runsource",
           _args("code.InteractiveInterpreter.runsource", self={"_target_": "code.InteractiveInterpreter"},
                 source=CODE), "a class attribute path with a nested instance: runs a statement"),
    Attack("pathlib.Path.write_text", _args("pathlib.Path.write_text", PATH, "pwned"),
           "class attribute path, nested spec in _args_: overwrites a victim"),
    Attack("shutil.rmtree", _args("shutil.rmtree", path="{s.victims}/sub"), "deletes a victim directory"),
    Attack("shutil.copyfile", _args("shutil.copyfile", src="{s.script}", dst="{s.victim}"), "overwrites a victim"),
    Attack("builtins.open", _args("builtins.open", file="{s.victim}", mode="w"), "truncates a victim"),
    Attack("os.remove", _args("os.remove", path="{s.victim}"), "deletes a victim"),
    # other installed packages
    Attack("matplotlib.subprocess.Popen", _args("matplotlib.subprocess.Popen", args=["touch", "{s.marker}"]),
           "a stdlib class through an installed package", settle=0.5),
    Attack("matplotlib.os.system", _args("matplotlib.os.system", command=CMD), "stdlib through an installed package"),
    Attack("numpy.memmap", _args("numpy.memmap", filename="{s.victim}", mode="w+", shape=[4]), "truncates a victim"),
    Attack("numpy.save", _args("numpy.save", file="{s.victim_npy}", arr=[1, 2, 3]), "overwrites a victim"),
    Attack("numpy.load", _args("numpy.load", file="{s.pickle}", allow_pickle=True), "unpickles a planted file"),
    Attack("scipy.io.FortranFile", _args("scipy.io.FortranFile", filename="{s.victim}", mode="w"),
           "truncates a victim"),
    Attack("scipy.io.savemat", _args("scipy.io.savemat", file_name="{s.victim}", mdict={}), "overwrites a victim"),
    Attack("joblib.load", _args("joblib.load", filename="{s.pickle}"), "unpickles a planted file"),
    Attack("sklearn-joblib.load", _args("sklearn.utils.parallel.joblib.load", filename="{s.pickle}"),
           "joblib through scikit-learn"),
    Attack("tqdm.tqdm-file", _args("tqdm.tqdm", iterable=[1, 2],
                                   file={"_target_": "io.open", "_args_": ["{s.victim}", "w"]}),
           "a progress bar handed a victim file object"),
    Attack("yaml.unsafe_load", _args("yaml.unsafe_load", stream="!!python/object/apply:os.system [{s.cmd!r}]"),
           "evaluates YAML python tags"),
    Attack("sympy.sympify", _args("sympy.sympify", a=CODE), "evaluates a string"),
    Attack("sympy.Poly", _args("sympy.Poly", rep=CODE), "evaluates a string"),
    # dunder walks
    Attack("dunder-globals.update", _args("nn_handler.models.MLP.__init__.__globals__.update",
                                          __hostile_poison__="{s.name}"),
           "rewrites nn_handler.models' globals"),
    Attack("dunder-subclasses", _args("torch.nn.Module.__subclasses__"), "a dunder walk from an allowed class"),
    # the runner's own package
    Attack("runner.tasks.fit.os.system", _args("runner.tasks.fit.os.system", command=CMD), "the runner route"),
]
ATTACK = {a.name: a for a in ATTACKS}


def targets_in(spec: Any) -> List[str]:
    """Every ``_target_`` in a (nested) spec."""
    out: List[str] = []
    if isinstance(spec, dict):
        if isinstance(spec.get("_target_"), str):
            out.append(spec["_target_"])
        for v in spec.values():
            out.extend(targets_in(v))
    elif isinstance(spec, (list, tuple)):
        for v in spec:
            out.extend(targets_in(v))
    return out


def poisoned() -> bool:
    """Whether a payload rewrote nn_handler.models' globals (dunder-globals.update)."""
    import nn_handler.models
    return "__hostile_poison__" in vars(nn_handler.models)


# ---------------------------------------------------------------------------- planted modules
def setup_py(marker: Path) -> str:
    """A ``setup.py`` whose import creates ``marker``; it also defines what a spec may name."""
    return textwrap.dedent(f"""\
        import os
        os.system({f"touch {marker}"!r})
        from nn_handler.callbacks import Callback

        def main(**kwargs):
            os.system({f"touch {marker}-called"!r})

        class EvilCallback(Callback):
            pass
        """)


def user_package(root: Path, name: str = "mypkg", data_in_model_module: bool = True) -> Path:
    """A user's own model package under ``root``: ``<name>.nets`` (Net, SmoothLoss; imports os) and
    ``<name>.data`` (build). ``root`` goes on the import path (PYTHONPATH or sys.path)."""
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    data_fn = textwrap.dedent("""\

        def build(n=32, seed=0):
            from nn_handler.datasets import synthetic_classification
            return synthetic_classification(n=n, in_features=6, num_classes=3, seed=seed)
        """)
    (pkg / "nets.py").write_text(textwrap.dedent("""\
        import os
        import subprocess

        import torch
        from torch import nn


        class Net(nn.Module):
            def __init__(self, width=8):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))

            def forward(self, x):
                return self.body(x)


        class SmoothLoss(nn.Module):
            def __init__(self, smoothing=0.1):
                super().__init__()
                self.inner = nn.CrossEntropyLoss(label_smoothing=smoothing)

            def forward(self, out, y):
                return self.inner(out, y)
        """) + (data_fn if data_in_model_module else ""))
    (pkg / "data.py").write_text(data_fn)
    return root


def forget_modules(*prefixes: str) -> None:
    """Drop modules (and their submodules) from sys.modules so a later import runs them again."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


# ---------------------------------------------------------------------------- memory bomb
class Bomb:
    """Pickles to ``bytearray(n)``: a few bytes in the file, ``n`` bytes when read."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


BOMB_CHILD = textwrap.dedent("""\
    import json, os, resource, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from nn_handler import NNHandler
    from nn_handler.checkpointing import diff, find_latest, inspect, read_info

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path, other = sys.argv[1], sys.argv[2]
    out = {"baseline": peak()}
    calls = [("load", lambda: NNHandler.load(path, device="cpu")), ("inspect", lambda: inspect(path)),
             ("read_info", lambda: read_info(path)), ("diff", lambda: diff(path, other)),
             ("find_latest", lambda: find_latest(os.path.dirname(path)))]
    for name, call in calls:
        try:
            call()
            outcome = "returned"
        except Exception as exc:
            outcome = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        out[name] = {"peak": peak(), "outcome": outcome}
    print(json.dumps(out))
    """)
