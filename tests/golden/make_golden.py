"""Write the golden checkpoints of the current format version, and the values a test checks in them.

    cd /work/main && PYTHONPATH=<a checkout of the release> .venv/bin/python tests/golden/make_golden.py

Run it once per format version, with the release that writes that version, and commit what it
writes into ``tests/golden/``: ``v<N>_<name>.pth`` and, next to each, ``v<N>_<name>.json`` (the
expected values). Files of an old version are never regenerated: they stand for what users'
files of that version look like, and ``tests/test_format_golden.py`` loads them with the code
of today. The v1 files were written with commit b93e82d.

Only the public API is used (``NNHandler``, its ``set_*``/``add_*``/``train``/``save``, the
public ``nn_handler.checkpointing`` readers), so this script documents how each file was made.
Everything is seeded and on the CPU; the files differ between runs only in their creation
time and run id, never in a tensor or a recorded value.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

import torch

from nn_handler import ModelType, NNHandler
from nn_handler.callbacks import EarlyStopping, ModelCheckpoint
from nn_handler.checkpointing import inspect, read_info
from nn_handler.losses import denoising_score_matching
from nn_handler.metrics import accuracy
from nn_handler.models import MLP, ScoreMLP
from nn_handler.sde import VPSDE

VERSION = 1
HERE = Path(__file__).resolve().parent
MAX_BYTES = 200_000

CLASSIFICATION_DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 48, "in_features": 8,
                       "num_classes": 3, "seed": 0}
VAL_DATA = {**CLASSIFICATION_DATA, "n": 24, "sample_seed": 1}
SCORE_DATA = {"_target_": "nn_handler.datasets.synthetic_regression", "n": 32, "in_features": 2, "out_features": 1,
              "seed": 0}
MODEL_KWARGS = {"in_features": 8, "out_features": 3, "hidden": [16]}
SCORE_KWARGS = {"shape": [2], "hidden": 16, "layers": 1, "embed_dim": 8, "beta_min": 0.1, "beta_max": 20.0}
SDE_KWARGS = {"beta_min": 0.1, "beta_max": 20.0}
# 48 samples in batches of 8: 6 batches an epoch; 2 batches an optimizer step: 3 steps an epoch.
TRAIN_KWARGS = {"seed": 0, "ema_decay": 0.9, "gradient_accumulation_steps": 2, "progress_bar": False}
MID_EPOCH_FILE = "ckpt-e0001-s000000004.pth"  # epoch 1 after its first optimizer step: batch 2 of 6 is next


def digest(t: torch.Tensor) -> str:
    """The sha256 of a tensor's raw bytes (contiguous, on the CPU)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def tensor_record(t: torch.Tensor) -> Dict[str, Any]:
    """Shape, dtype, sha256, sum and the first few elements of ``t``."""
    flat = t.detach().cpu().reshape(-1)
    return {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": digest(t),
            "sum": float(flat.double().sum().item()), "first": [float(v) for v in flat[:4].tolist()]}


def weights_record(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    return {name: tensor_record(value) for name, value in state.items()}


def history_record(h: NNHandler) -> Dict[str, Any]:
    return {"train_losses": list(h.train_losses), "val_losses": list(h.val_losses),
            "train_metrics": {k: list(v) for k, v in h.train_metrics_history.items()},
            "val_metrics": {k: list(v) for k, v in h.val_metrics_history.items()}}


def optimizer_record(h: NNHandler, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    state = h.optimizer.state_dict()
    return {"class": "torch.optim.Adam", "kwargs": kwargs, "lr": [g["lr"] for g in state["param_groups"]],
            "param_group_options": [{k: v for k, v in g.items() if k in ("betas", "eps", "weight_decay")}
                                    for g in state["param_groups"]],
            "steps": [float(s["step"]) for _, s in sorted(state["state"].items())],
            "moments": [{"exp_avg": digest(s["exp_avg"]), "exp_avg_sq": digest(s["exp_avg_sq"])}
                        for _, s in sorted(state["state"].items())]}


def ema_record(h: NNHandler) -> Dict[str, Any]:
    return {"decay": h.ema.decay, "num_updates": h.ema.num_updates, "weights": weights_record(h.ema.module.state_dict())}


def continued_record(h: NNHandler) -> Dict[str, Any]:
    """What one more epoch after loading gave with the writing release."""
    return {"epoch": h.epoch, "global_step": h.global_step, "history": history_record(h),
            "weights": {k: digest(v) for k, v in h.module.state_dict().items()},
            "ema_weights": {k: digest(v) for k, v in h.ema.module.state_dict().items()},
            "lr": h.optimizer.param_groups[0]["lr"]}


def common_record(h: NNHandler, path: Path) -> Dict[str, Any]:
    info = read_info(path)
    report = inspect(path)
    position = (report.get("progress") or {}).get("position")
    return {
        "file": path.name,
        "format_version": VERSION,
        "written_by": {"nn_handler": info["versions"].get("nn_handler"), "torch": info["versions"].get("torch"),
                       "commit": os.environ.get("GOLDEN_COMMIT", "b93e82d")},
        "file_bytes": path.stat().st_size,
        "model": {"class": f"{type(h.module).__module__}.{type(h.module).__qualname__}",
                  "target": info["model"]["target"], "kwargs": info["model"]["kwargs"],
                  "model_type": info["model"]["model_type"], "parameters": info["parameters"]},
        "epoch": h.epoch,
        "global_step": h.global_step,
        "position": None if position is None else {"epoch": position["epoch"],
                                                   "step_in_epoch": position["step_in_epoch"]},
        "history": history_record(h),
        "weights": weights_record(h.module.state_dict()),
        "optimizer": optimizer_record(h, {k: v for k, v in info["optimizer"].items() if k != "_target_"}),
        "ema": ema_record(h),
        "settings": h.settings,
        "data": {name: {"dataset": entry["dataset"], "options": entry["options"]} for name, entry in info["data"].items()},
        "targets": {"optimizer": info["optimizer"]["_target_"], "loss_fn": info["loss_fn"]["_target_"],
                    "scheduler": info["scheduler"]["_target_"] if info["scheduler"] else None,
                    "callbacks": info["callbacks"]},
    }


def classifier(directory: Path) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, device="cpu", **MODEL_KWARGS)
    h.set_optimizer(torch.optim.Adam, lr=0.01)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.add_callback(EarlyStopping(monitor="val_loss", patience=5))
    h.add_callback(ModelCheckpoint(dirpath="checkpoints", monitor="val_loss", save_top_k=1))
    h.set_train_loader(CLASSIFICATION_DATA, batch_size=8, shuffle=True)
    h.set_val_loader(VAL_DATA, batch_size=12)
    # Two epochs; a checkpoint after every optimizer step (the mid-epoch files).
    h.train(2, checkpoint_dir=directory / "steps", save_every_n_steps=1, **TRAIN_KWARGS)
    return h


def classifier_extra(h: NNHandler) -> Dict[str, Any]:
    sched = h.scheduler.state_dict()
    return {
        "scheduler": {"class": "torch.optim.lr_scheduler.StepLR", "kwargs": {"step_size": 1, "gamma": 0.5},
                      "last_epoch": sched["last_epoch"], "last_lr": list(h.scheduler.get_last_lr())},
        "loss_fn": {"class": "torch.nn.CrossEntropyLoss"},
        "metrics": {"accuracy": "nn_handler.metrics.accuracy"},
        "callbacks": [{"class": f"nn_handler.callbacks.{type(cb).__name__}", "kwargs": cb.init_kwargs,
                       "state": cb.state_dict()} for cb in h.callbacks],
    }


def continue_one_epoch(path: Path, directory: Path) -> NNHandler:
    """Load a copy of ``path`` in ``directory`` (its callbacks write there) and train one more epoch."""
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / path.name
    shutil.copyfile(path, copy)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        h = NNHandler.load(copy, device="cpu")
        h.train(1, progress_bar=False)
    finally:
        os.chdir(cwd)
    return h


def score(directory: Path) -> NNHandler:
    torch.manual_seed(1)
    h = NNHandler(ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, **SCORE_KWARGS)
    h.set_sde(VPSDE, **SDE_KWARGS)
    h.set_loss_fn(denoising_score_matching)
    h.set_optimizer(torch.optim.Adam, lr=0.005)
    h.set_train_loader(SCORE_DATA, batch_size=8, shuffle=True)
    h.train(1, seed=1, ema_decay=0.8, gradient_accumulation_steps=2, progress_bar=False)
    return h


def write(record: Dict[str, Any], path: Path) -> None:
    path.with_suffix(".json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    size = path.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, more than {MAX_BYTES}")
    print(f"wrote {path} ({size} bytes) and {path.with_suffix('.json').name}")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"make_golden: {what}")


def main(out: Path = HERE) -> None:
    warnings.simplefilter("error")  # a golden file is written without a single warning
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cwd = os.getcwd()
        os.chdir(work)  # ModelCheckpoint's relative dirpath "checkpoints" lands here
        try:
            h = classifier(work)
        finally:
            os.chdir(cwd)

        path = out / f"v{VERSION}_classifier.pth"
        h.save(path)
        record = {**common_record(h, path), **classifier_extra(h)}
        check(record["position"] is None, "the end-of-training file must not record a position")
        again = continue_one_epoch(path, work / "continue-full")
        record["continued"] = continued_record(again)
        write(record, path)

        mid = out / f"v{VERSION}_classifier_mid.pth"
        shutil.copyfile(work / "steps" / MID_EPOCH_FILE, mid)
        loaded = NNHandler.load(mid, device="cpu")
        mid_record = {**common_record(loaded, mid), **classifier_extra(loaded)}
        check(mid_record["position"] == {"epoch": 1, "step_in_epoch": 2},
              f"{MID_EPOCH_FILE} records the position {mid_record['position']}")
        resumed = continue_one_epoch(mid, work / "continue-mid")
        mid_record["continued"] = continued_record(resumed)
        check(mid_record["continued"]["weights"] == {k: v["sha256"] for k, v in record["weights"].items()},
              "resuming the mid-epoch file does not give the uninterrupted run's weights")
        check(mid_record["continued"]["history"] == record["history"],
              "resuming the mid-epoch file does not give the uninterrupted run's history")
        write(mid_record, mid)

        sh = score(work)
        spath = out / f"v{VERSION}_score.pth"
        sh.save(spath)
        srecord = common_record(sh, spath)
        srecord["sde"] = {"class": "nn_handler.sde.VPSDE", "target": inspect(spath)["sde"]["target"],
                          "state": sh.sde.state_dict()}
        srecord["loss_fn"] = {"function": "nn_handler.losses.denoising_score_matching"}
        srecord["sample"] = {"shape": [4, 2], "steps": 5, "seed": 0,
                             "values": [float(v) for v in sh.sample((4, 2), steps=5, seed=0).reshape(-1).tolist()]}
        again = continue_one_epoch(spath, work / "continue-score")
        srecord["continued"] = continued_record(again)
        write(srecord, spath)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
