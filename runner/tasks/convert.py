"""task=convert: ``NNHandler.convert``: a sharded checkpoint consolidated into one file, or one file sharded."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler import NNHandler
from nn_handler.checkpointing import sharded

from .. import reporting
from ..context import RunContext
from ..errors import RunnerError
from .build import trusted_packages_of
from .checkpoints import checkpoint_info, open_checkpoint

log = logging.getLogger("runner")


def convert_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``checkpoint.path`` (a file or a ``.dcp`` directory, verified) in the other form, at ``convert.to``
    (default ``<run dir>/converted.pth`` for a sharded source, ``converted.dcp`` for a file)."""
    ckpt = open_checkpoint(cfg, ctx)
    info = checkpoint_info(ckpt, cfg.checkpoint.path)
    if info.get("kind") != "handler":
        raise RunnerError(f"checkpoint.path={cfg.checkpoint.path}: only NNHandler checkpoints convert "
                          f"(this holds {info.get('kind')}); task=export writes a model's weights")
    target = cfg.convert.to or os.path.join(ctx.output_dir, "converted.pth" if ckpt.sharded else
                                            "converted" + sharded.SUFFIX)
    target = os.path.abspath(os.path.expanduser(str(target)))
    if os.path.exists(target):
        raise RunnerError(f"convert.to={target} exists: not overwriting it (choose another path)")
    written = NNHandler.convert(ckpt, target, trusted_packages=trusted_packages_of(cfg))
    record: Dict[str, Any] = {"task": "convert", "epoch": (info.get("progress") or {}).get("epoch"),
                              "train_loss": None, "val_loss": None, "world_size": 1,
                              "checkpoint_read": ckpt.path, "checkpoint_written": written,
                              "sharded": os.fspath(written).endswith(sharded.SUFFIX)}
    reporting.write_metrics(ctx.output_dir, record)
    log.info("converted %s to %s", ckpt.path, written)
    print(f"converted: {written}", flush=True)
    return record
