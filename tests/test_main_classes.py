"""A model class defined in a ``__main__`` script (the usual first script), in real processes: ``save``
warns and says what ``load`` will need; a second script (the same class in its own ``__main__``) is
told by ``load`` exactly to pass ``model_class=<Name>``, and with it gets everything back (weights,
optimizer, scheduler, history, progress, the recorded kwargs reused)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.checkpointing import IncompatibleCheckpointError, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]

MODEL = '''
import json, sys, warnings
import torch
from torch import nn
from nn_handler import NNHandler
from nn_handler.metrics import accuracy


class MyNet(nn.Module):
    def __init__(self, width, depth=1, act="relu"):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 8, "num_classes": 3}
'''

SAVE = MODEL + '''
torch.manual_seed(0)
h = NNHandler(MyNet, device="cpu", width=12, depth=2, act="relu")
h.set_optimizer(torch.optim.Adam, lr=1e-2)
h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
h.set_loss_fn(torch.nn.CrossEntropyLoss())
h.add_metric("accuracy", accuracy)
h.set_train_loader(DATA, batch_size=16, shuffle=True)
h.train(1, progress_bar=False, seed=0, ema_decay=0.9)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    h.save(sys.argv[1])
torch.save({"weights": h.module.state_dict(), "exp_avg": h.optimizer.state_dict()["state"][0]["exp_avg"]},
           sys.argv[1] + ".expected")
print(json.dumps({"warnings": [str(w.message) for w in caught], "epoch": h.epoch, "global_step": h.global_step,
                  "train_losses": h.train_losses, "lr": h.optimizer.param_groups[0]["lr"]}))
'''

LOAD = MODEL + '''
path = sys.argv[1]
out = {}
try:
    NNHandler.load(path)
except Exception as exc:
    out["without"] = f"{type(exc).__name__}: {exc}"
try:
    NNHandler.initialize_from_checkpoint(path)
except Exception as exc:
    out["init_without"] = f"{type(exc).__name__}: {exc}"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    h = NNHandler.load(path, model_class=MyNet)
out["warnings"] = [str(w.message) for w in caught]
expected = torch.load(path + ".expected")
out["weights_equal"] = all(torch.equal(v, expected["weights"][k]) for k, v in h.module.state_dict().items())
out["depth"] = len(h.module.hidden)
out["exp_avg_equal"] = torch.equal(h.optimizer.state_dict()["state"][0]["exp_avg"], expected["exp_avg"])
out.update(epoch=h.epoch, global_step=h.global_step, train_losses=list(h.train_losses),
           lr=h.optimizer.param_groups[0]["lr"], scheduler=type(h.scheduler).__name__,
           scheduler_epoch=h.scheduler.last_epoch, loss=type(h.loss_fn).__name__, ema=h.ema is not None,
           metrics=sorted(h.train_metrics_history))
h.train(1, progress_bar=False)  # and training goes on from there
out["after"] = {"epoch": h.epoch, "global_step": h.global_step, "lr": h.optimizer.param_groups[0]["lr"]}
init = NNHandler.initialize_from_checkpoint(path, model_class=MyNet)
out["init_weights_equal"] = all(torch.equal(v, expected["weights"][k]) for k, v in init.module.state_dict().items())
print(json.dumps(out))
'''


def _script(tmp_path: Path, name: str, text: str, *args: str) -> dict:
    script = tmp_path / name
    script.write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_main_class_saves_with_a_warning_and_loads_everything_with_model_class(tmp_path):
    ckpt = str(tmp_path / "run.pth")
    saved = _script(tmp_path, "train.py", SAVE, ckpt)
    told = [w for w in saved["warnings"] if w.startswith("model cannot be recorded")]
    assert len(told) == 1, saved["warnings"]
    assert "MyNet is defined in the __main__ script" in told[0]
    assert "NNHandler.load(path, model_class=MyNet)" in told[0]  # what load will need
    assert not [w for w in saved["warnings"] if w.startswith("loss_fn")]  # a built torch loss is recorded

    loaded = _script(tmp_path, "resume.py", LOAD, ckpt)
    assert loaded["without"].startswith("IncompatibleCheckpointError")
    assert "pass model_class=MyNet" in loaded["without"]
    assert "NNHandler.load(path, model_class=MyNet)" in loaded["without"]
    assert "'width': 12" in loaded["without"]  # the recorded kwargs, reused
    assert "pass model_class=MyNet" in loaded["init_without"]
    assert loaded["warnings"] == []  # everything restored: nothing to tell
    assert loaded["weights_equal"] and loaded["depth"] == 2  # depth=2 came from the file's kwargs
    assert loaded["exp_avg_equal"]
    assert loaded["epoch"] == saved["epoch"] == 1 and loaded["global_step"] == saved["global_step"] == 4
    assert loaded["train_losses"] == saved["train_losses"]
    assert loaded["lr"] == saved["lr"] == 5e-3
    assert loaded["scheduler"] == "StepLR" and loaded["scheduler_epoch"] == 1
    assert loaded["loss"] == "CrossEntropyLoss" and loaded["ema"] and loaded["metrics"] == ["accuracy"]
    assert loaded["after"] == {"epoch": 2, "global_step": 8, "lr": 2.5e-3}
    assert loaded["init_weights_equal"]


# ---------------------------------------------------------------------------- hostile recorded kwargs
class Net(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = torch.nn.Linear(2, width)


def _forged(tmp_path: Path, model_entry: dict) -> Path:
    """A handler file whose model entry is ``model_entry`` (re-saved with a valid checksum)."""
    from nn_handler.checkpointing import atomic_save, read_checkpoint
    h = NNHandler(Net, device="cpu", width=4)
    path = tmp_path / "a.pth"
    h.save(path)
    state = read_checkpoint(path)
    state["model"] = {**state["model"], **model_entry}
    atomic_save(state, path)
    return path


@pytest.mark.parametrize("kwargs, why", [
    ({"width": {"_target_": "os.system"}}, "model.kwargs"),
    ({"width": "x" * 20_000}, "model.kwargs"),
    ({"width": [[[[[[[[[[[[[1]]]]]]]]]]]]]}, "model.kwargs"),
    ({"width": list(range(5000))}, "model.kwargs"),
    ({"width": torch.zeros(3)}, "model.kwargs"),
    ("not a mapping", "model.kwargs"),
])
def test_recorded_kwargs_of_an_unnamed_class_are_reused_only_when_plain_and_bounded(tmp_path, kwargs, why):
    path = _forged(tmp_path, {"spec": None, "name": "Net", "kwargs": kwargs})
    with pytest.raises(IncompatibleCheckpointError, match=why):
        NNHandler.load(path, model_class=Net)
    assert NNHandler.load(path, model_class=Net, model_kwargs={"width": 4}).module.fc.out_features == 4


def test_recorded_kwargs_are_reused_for_the_class_of_that_name_only_and_stay_within_the_size_bound(tmp_path):
    path = _forged(tmp_path, {"spec": None, "name": "Net", "kwargs": {"width": 4}})
    assert NNHandler.load(path, model_class=Net).module.fc.out_features == 4
    huge = _forged(tmp_path, {"spec": None, "name": "Net", "kwargs": {"width": 1 << 24}})
    with pytest.raises(UnsafeCheckpointError, match="weight elements"):
        NNHandler.load(huge, model_class=Net)
    odd = _forged(tmp_path, {"spec": None, "name": "os.system; rm -rf /", "kwargs": {"width": 4}})
    with pytest.raises(IncompatibleCheckpointError, match=r"model_class=YourModel"):
        NNHandler.load(odd)
