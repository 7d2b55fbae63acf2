"""task=infer: ``NNHandler.initialize_from_checkpoint``; predictions on the data and, with targets, the loss and metrics."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from nn_handler import specs

from .. import reporting
from ..context import RunContext
from ..errors import RunnerError
from .build import ModelChoice, component, from_weights, import_target, plain, trusted_packages_of
from .checkpoints import checkpoint_info, open_checkpoint

log = logging.getLogger("runner")

PREDICTIONS_FILE = "predictions.pt"
GENERATIVE_TYPES = ("score_based", "generative")  # model types that sample instead of predicting


def _targets(dataset: Any) -> Optional[torch.Tensor]:
    """The dataset's targets in order, when its items are (input, target) pairs."""
    try:
        first = dataset[0]
    except Exception:
        return None
    if not (isinstance(first, (list, tuple)) and len(first) >= 2):
        return None
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False)
    return torch.cat([batch[1] for batch in loader])


def infer_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``predictions.pt`` of the checkpoint's model on the data; metrics.json with the loss and metrics."""
    ckpt = open_checkpoint(cfg, ctx)  # opened and verified once: its header here, its state for the load
    path = ckpt.path
    info = checkpoint_info(ckpt, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path, ctx)
    if str(choice.model_type or "") in GENERATIVE_TYPES:
        raise RunnerError(f"task=infer predicts outputs for inputs, but checkpoint.path={cfg.checkpoint.path} holds a "
                          f"{choice.model_type} model, which draws samples: use task=sample "
                          f"checkpoint.path={cfg.checkpoint.path} (sample.n=..., seed=...)")
    h = from_weights(ckpt, cfg, choice)
    # The data: data.predict, else data.val, else the validation set recorded in the checkpoint.
    key, spec, from_file = None, None, False
    for name in ("predict", "val"):
        if cfg.data[name] is not None:
            key, spec = f"data.{name}", plain(cfg.data[name])
            break
    if spec is None:
        recorded = ((info.get("data") or {}).get("val") or {}).get("dataset")
        if recorded is None:
            raise RunnerError("task=infer needs data to predict on: give data.predict={_target_: ...}, data=NAME, "
                              "or a checkpoint that records its validation dataset")
        key, spec, from_file = "the checkpoint's val dataset", recorded, True
    try:
        dataset = specs.instantiate(spec, key, from_file=from_file, trusted=trusted_packages_of(cfg))
    except specs.UntrustedTarget:
        raise
    except specs.SpecError as exc:
        raise RunnerError(f"{key}: {exc}") from None
    batch_size = int(cfg.data.val_batch_size or cfg.data.batch_size or 256)
    h.eval()
    try:
        predictions = h.predict(dataset, batch_size=batch_size)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
        raise RunnerError(f"predicting on {key} ({spec.get(specs.TARGET)}) failed: {type(exc).__name__}: {exc}") from exc
    record: Dict[str, Any] = {"task": "infer", "epoch": (info.get("progress") or {}).get("epoch"),
                              "train_loss": None, "val_loss": None, "samples": int(predictions.shape[0])}
    targets = _targets(dataset)
    if targets is not None:
        if ctx.given("loss") or not info.get("loss_fn"):
            loss_cls, loss_kwargs = component(cfg.loss, "loss")
        else:  # the file's loss: under the file's trust rules (and the model's own module), never a plain import
            trust = specs.Trust.of(trusted_packages_of(cfg)).with_model_module(choice.cls)
            target, kwargs = specs.split(info["loss_fn"])
            loss_cls = specs.resolve(target, "the checkpoint's loss_fn", expected=nn.Module, trusted=trust)
            loss_kwargs = specs.build_from_file(kwargs, "the checkpoint's loss_fn", trust)
        try:
            loss_fn = loss_cls(**loss_kwargs) if isinstance(loss_cls, type) else \
                (lambda out, y: loss_cls(out, y, **loss_kwargs))
            with torch.no_grad():
                record["loss"] = float(loss_fn(predictions, targets))
                for name, target in (plain(cfg.metrics) or {}).items():
                    record[name] = float(import_target(target, f"metrics.{name}")(predictions, targets))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RunnerError(f"task=infer: the loss or a metric cannot be computed on the predictions "
                              f"({type(exc).__name__}: {exc}); give loss=... or metrics=... for this data") from exc
    record.update(world_size=h.world_size, checkpoint_read=path, checkpoint_written=None)
    if h.rank == 0:
        out = os.path.join(ctx.output_dir, PREDICTIONS_FILE)
        torch.save(predictions, out)
        reporting.write_metrics(ctx.output_dir, record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        log.info("predicted %d samples from %s: %s", predictions.shape[0], path, shown or "no targets")
        print(f"predictions: {out}", flush=True)
    return record
