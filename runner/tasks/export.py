"""task=export: ``h.export``: a checkpoint's model weights as ``<run dir>/model.safetensors``, its spec in the metadata."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler import NNHandler

from .. import reporting
from ..context import RunContext
from .build import ModelChoice, from_weights, load_flags, new_handler
from .checkpoints import checkpoint_info, open_checkpoint

log = logging.getLogger("runner")

EXPORT_FILE = "model.safetensors"


def export_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``h.export``: the checkpoint's model weights (the EMA weights when it has them, unless
    ``export.ema=false``) as ``<run dir>/model.safetensors``, the model's spec in its metadata."""
    ckpt = open_checkpoint(cfg, ctx)  # opened and verified once: its header here, its state for the load
    path = ckpt.path
    info = checkpoint_info(ckpt, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path)
    use_ema = bool(cfg.export.ema)
    if info["kind"] == "handler":  # the model and its EMA weights only: nothing else is built
        flags = {**load_flags(cfg), "skip_optimizer": True, "skip_scheduler": True, "skip_history": True,
                 "skip_callbacks": True, "skip_sampler_sde": True, "skip_ema": not use_ema}
        extra = dict(model_class=choice.cls, model_kwargs=choice.kwargs) if choice.configured else {}
        h = new_handler(choice.target, choice.kwargs, lambda: NNHandler.load(
            ckpt, **flags, model_type=choice.model_type, **extra))
    else:
        h = from_weights(ckpt, cfg, choice)
    out = os.path.join(ctx.output_dir, EXPORT_FILE)
    h.export(out, ema=use_ema)
    weights = "ema" if use_ema and h.ema is not None else "live"
    record: Dict[str, Any] = {"task": "export", "epoch": (info.get("progress") or {}).get("epoch"),
                              "train_loss": None, "val_loss": None, "weights": weights, "world_size": h.world_size,
                              "checkpoint_read": path, "checkpoint_written": out}
    if h.rank == 0:
        reporting.write_metrics(ctx.output_dir, record)
        log.info("exported the %s weights of %s to %s", weights, path, out)
        print(f"exported: {out}", flush=True)
    return record
