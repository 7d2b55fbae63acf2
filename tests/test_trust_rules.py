"""The rules for what a spec read from a checkpoint may name (nn_handler.specs.resolve).

Closed resolution: only objects defined in a trusted module, checked on the dotted path before
anything is imported; each slot takes only its kind; the user's own model module is trusted only
where someone who hands over a file cannot have written it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from nn_handler import NNHandler, specs
from nn_handler.callbacks import Callback
from nn_handler.checkpointing import UnsafeCheckpointError
from nn_handler.checkpointing import io as ckpt_io
from nn_handler.models import MLP

ROUTES = [
    "torch.nn.functional.torch.os.system", "nn_handler.datasets.torch.os.system", "torch.nn.functional.torch.load",
    "torch.hub.load", "torch.utils.collect_env.run", "torch.load", "torch.jit.load", "torch.nn.modules.module.torch.os.system",
    "matplotlib.subprocess.Popen", "numpy.memmap", "numpy.save", "scipy.io.FortranFile", "os.system", "posix.system",
    "subprocess.Popen", "builtins.eval", "builtins.exec", "pathlib.Path.write_text", "shutil.rmtree",
    "runner.tasks.fit.os.system", "nn_handler.models.MLP.__init__", "torch.nn.Module.__subclasses__",
    "nn_handler.models.torch.os.system", "nn_handler.checkpointing.io.atomic_save", "nn_handler.specs.import_object",
    "nn_handler.train.loop.run", "torch.optim.Adam.__init__", "torch.nn.Module._apply",
]


@pytest.mark.parametrize("path", ROUTES)
def test_a_dangerous_target_is_refused_by_every_slot_kind(path):
    for expected, functions in ((None, True), (nn.Module, True), (torch.optim.Optimizer, False), (Callback, False)):
        with pytest.raises(specs.UntrustedTarget) as caught:
            specs.resolve(path, "slot", expected=expected, functions=functions)
        assert caught.value.target == path and path in str(caught.value)


def test_nothing_is_imported_before_the_target_is_trusted(tmp_path, monkeypatch):
    """A `setup.py` (or any module) next to the user is never imported by naming it in a file."""
    marker = tmp_path / "ran"
    (tmp_path / "setup.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef main(): pass\n")
    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("setup.main", "evilpkg.Model", "evilpkg.sub.fn"):
        with pytest.raises(specs.UntrustedTarget):
            specs.resolve(path, "model", expected=nn.Module)
        assert specs.model_module_trust(path, tmp_path) == ()  # found in the working directory: not trusted
    assert not marker.exists() and "setup" not in sys.modules and "evilpkg" not in sys.modules


def test_trusting_a_package_trusts_what_it_defines_never_what_it_imports():
    trusted = ["matplotlib"]
    for path in ("matplotlib.os.system", "matplotlib.subprocess.Popen", "matplotlib.pyplot.np.save"):
        with pytest.raises(specs.UntrustedTarget, match="goes through the module"):
            specs.resolve(path, "x", trusted=trusted)
    import matplotlib.colors
    assert specs.resolve("matplotlib.colors.to_rgb", "x", trusted=trusted) is matplotlib.colors.to_rgb
    # A single object can be trusted, not its neighbours.
    assert specs.resolve("matplotlib.colors.to_rgb", "x", trusted=["matplotlib.colors.to_rgb"]) is not None
    with pytest.raises(specs.UntrustedTarget):
        specs.resolve("matplotlib.colors.to_hex", "x", trusted=["matplotlib.colors.to_rgb"])


def test_each_slot_takes_only_its_kind():
    with pytest.raises(specs.UntrustedTarget, match="Optimizer subclass"):
        specs.resolve("torch.nn.Linear", "optimizer", expected=torch.optim.Optimizer, functions=False)
    with pytest.raises(specs.UntrustedTarget, match="Callback subclass"):
        specs.resolve("torch.optim.SGD", "callback", expected=Callback, functions=False)
    with pytest.raises(specs.UntrustedTarget, match="not a function"):
        specs.resolve("nn_handler.datasets.digits", "optimizer", expected=torch.optim.Optimizer, functions=False)
    # Functions only from the modules meant to hold them; classes of the right kind from the library.
    assert specs.resolve("torch.nn.functional.mse_loss", "loss", expected=nn.Module) is torch.nn.functional.mse_loss
    assert specs.resolve("torch.optim.Adam", "optimizer", expected=torch.optim.Optimizer, functions=False) \
        is torch.optim.Adam
    with pytest.raises(specs.UntrustedTarget):
        specs.resolve("torch.nn.init.uniform_", "loss", expected=nn.Module)  # torch, but not a loss module
    # Files written before the loss moved out of the training loop still name it there.
    from nn_handler.losses import denoising_score_matching
    assert specs.resolve("nn_handler.training.denoising_score_matching", "loss", expected=nn.Module) \
        is denoising_score_matching


def _user_package(root, name="userpkg"):
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import os
        import torch
        from nn_handler.callbacks import Callback

        class Net(torch.nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.fc = torch.nn.Linear(width, 2)

            def forward(self, x):
                return self.fc(x)

        class Counter(Callback):
            def __init__(self, start=0):
                self.count = start

        def dangerous(**kwargs):  # defined in the model's own module: trusted with it
            return None
    """))
    (pkg / "other.py").write_text("class Hook:\n    pass\n")
    return pkg


SCRIPT = textwrap.dedent("""
    import sys, torch
    from nn_handler import NNHandler
    from nn_handler.checkpointing import UnsafeCheckpointError
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "save":
        from userpkg.nets import Net, Counter
        h = NNHandler(Net, device="cpu", width=4)
        h.set_optimizer(torch.optim.SGD, lr=0.1)
        h.add_callback(Counter(start=3))
        h.save(path)
    else:
        try:
            h = NNHandler.load(path)
        except UnsafeCheckpointError as exc:
            print("REFUSED", exc)
        else:
            print("LOADED", type(h.module).__module__, [type(c).__name__ for c in h.callbacks])
        print("imported" if "userpkg" in sys.modules else "not imported")
""")


def _run(args, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_users_own_model_package_loads_when_installed_and_is_refused_when_next_to_the_user(tmp_path):
    site = tmp_path / "site"
    _user_package(site)
    ckpt = tmp_path / "runs" / "a.pth"
    ckpt.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(["save", str(ckpt)], elsewhere, str(site))
    # On the import path (PYTHONPATH), not in the working directory: the documented plain load works,
    # the callback defined in the model's own module included.
    out = _run(["load", str(ckpt)], elsewhere, str(site))
    assert "LOADED userpkg.nets ['Counter']" in out, out
    # The same package lying in the working directory (a file handed over with a package beside it):
    # refused, and never imported.
    out = _run(["load", str(ckpt)], str(site), "")
    assert "REFUSED" in out and "trusted_packages=['userpkg']" in out and "not imported" in out, out


def test_the_model_modules_trust_does_not_extend_to_its_package_or_its_imports(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _user_package(site, "userpkg2")
    monkeypatch.syspath_prepend(str(site))
    import importlib
    nets = importlib.import_module("userpkg2.nets")
    h = NNHandler(nets.Net, device="cpu", width=4)
    state = h.state_dict()
    for slot, spec in (("callback", {"_target_": "userpkg2.other.Hook"}),
                       ("callback", {"_target_": "userpkg2.nets.os.system", "command": "true"}),
                       ("callback", {"_target_": "userpkg2.nets.torch.load"})):
        forged = dict(state, callbacks=[{"spec": spec, "state": {}}])
        path = tmp_path / "forged.pt"
        ckpt_io.atomic_save(forged, path)
        with pytest.raises(UnsafeCheckpointError) as caught:
            NNHandler.load(path)
        assert str(path) in str(caught.value) and spec["_target_"] in str(caught.value)
        assert "skip_callbacks=True" in str(caught.value)
    # What the model's module defines is trusted with it (a Callback subclass there loads).
    ckpt_io.atomic_save(dict(state, callbacks=[{"spec": {"_target_": "userpkg2.nets.Counter", "start": 2},
                                                  "state": {}}]), tmp_path / "ok.pt")
    assert [type(c).__name__ for c in NNHandler.load(tmp_path / "ok.pt").callbacks] == ["Counter"]


def test_a_recorded_model_that_is_not_a_module_class_is_refused_before_it_is_called(tmp_path):
    marker = tmp_path / "ran"
    h = NNHandler(MLP, device="cpu", in_features=4, out_features=2)
    state = h.state_dict()
    for target in ("torch.utils.collect_env.run", "nn_handler.datasets.synthetic_classification",
                   "torch.optim.SGD"):
        state["model"]["spec"] = {"_target_": target, "command": f"touch {marker}"}
        path = tmp_path / "m.pt"
        ckpt_io.atomic_save(state, path)
        with pytest.raises(UnsafeCheckpointError, match="model") as caught:
            NNHandler.load(path)
        assert str(path) in str(caught.value)
    assert not marker.exists()


def _forged(tmp_path, change, name="forged.pt"):
    h = NNHandler(MLP, device="cpu", in_features=4, out_features=2, hidden=[8])
    state = h.state_dict()
    change(state)
    path = tmp_path / name
    ckpt_io.atomic_save(state, path)
    return path


def test_a_library_model_does_not_widen_trust_to_its_modules_functions(tmp_path):
    """A model spec naming torch's own Module cannot make torch.nn.modules.module's functions (process-wide
    hook registration) callable from other slots; methods reached through a class never resolve."""
    hook = {"_target_": "torch.nn.modules.module.register_module_forward_hook",
            "hook": {"_target_": "torch.nn.functional.relu", "_partial_": True}}

    def change(state):
        state["model"]["spec"] = {"_target_": "torch.nn.modules.module.Module"}
        state["model_state_dict"] = {}
        state["data"]["train"] = {"dataset": hook, "options": {}}
    path = _forged(tmp_path, change)
    with pytest.raises(UnsafeCheckpointError, match="register_module_forward_hook"):
        NNHandler.load(path)
    assert not torch.nn.modules.module._global_forward_hooks
    for target in ("torch.nn.Module.register_forward_hook", "nn_handler.models.MLP.forward"):
        with pytest.raises(specs.UntrustedTarget, match="method of a class"):
            specs.resolve(target, "x", trusted=["nn_handler.models", "torch.nn"])


def test_the_files_model_kwargs_reach_the_model_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _forged(tmp_path, lambda s: s["model"]["spec"].update(logger_mode="file"))
    with pytest.raises(UnsafeCheckpointError, match="logger_mode"):
        NNHandler.load(path)
    assert not (tmp_path / "nn_handler.log").exists()


def test_a_small_file_cannot_make_load_build_a_huge_model_or_dataset(tmp_path):
    def huge_model(state):
        state["model"]["spec"] = {"_target_": "nn_handler.models.MLP", "in_features": 4, "out_features": 2,
                                  "hidden": [8192, 8192, 8192]}
    with pytest.raises(UnsafeCheckpointError, match="far more than"):
        NNHandler.load(_forged(tmp_path, huge_model, "model.pt"))

    def huge_data(state):
        state["data"]["train"] = {"dataset": {"_target_": "nn_handler.datasets.synthetic_classification",
                                              "n": 2**26, "in_features": 8}, "options": {}}
    from nn_handler import NNHandlerWarning
    with pytest.warns(NNHandlerWarning, match="elements of synthetic data"):
        h = NNHandler.load(_forged(tmp_path, huge_data, "data.pt"))
    assert h.train_loader is None
    # What the caller asks for is the caller's: a model_class with its kwargs builds as given.
    mine = NNHandler.load(_forged(tmp_path, huge_model, "model.pt"), model_class=MLP,
                          model_kwargs={"in_features": 4, "out_features": 2, "hidden": [8]})
    assert mine.module.net[0].out_features == 8
