"""task=finetune: ``NNHandler.load`` into the configured (or recorded) model, the optimizer and scheduler
from the config (the saved ones skipped by default), then trained."""
from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler import rng

from ..context import RunContext
from ..drift import Drift
from .build import (
    ModelChoice,
    from_weights,
    keep_recorded_objective,
    load_handler,
    set_data,
    set_optimizer,
    set_scheduler,
)
from .checkpoints import checkpoint_info, open_checkpoint
from .fit import fit_and_save


def finetune_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """The checkpoint's weights (and what the load flags keep), trained with the config's optimizer."""
    ckpt = open_checkpoint(cfg, ctx)  # opened and verified once: its header here, its state for the load
    path = ckpt.path
    info = checkpoint_info(ckpt, cfg.checkpoint.path)
    choice = ModelChoice(cfg, info, cfg.checkpoint.path, path, ctx)
    check = Drift(cfg, ctx, info, choice)
    check.report([], allow=True)
    if cfg.seed is not None:
        rng.seed_everything(int(cfg.seed))
    if info["kind"] != "handler":
        # A bare state_dict: the configured model with those weights, everything else from the config.
        h = from_weights(ckpt, cfg, choice)
    else:
        h = load_handler(ckpt, cfg, choice, configured=choice.configured)
    if cfg.load.skip_optimizer or h.optimizer is None:
        set_optimizer(h, cfg)
    if cfg.load.skip_scheduler or h.scheduler is None:
        set_scheduler(h, cfg)
    # The recorded loss and metrics stay unless given on the command line (bare weights: the config's).
    keep_recorded_objective(h, cfg, ctx, recorded=info["kind"] == "handler")
    set_data(h, cfg, info if info["kind"] == "handler" else None, require_train=True)
    return fit_and_save(h, cfg, ctx, checkpoint_read=path, run_config=check.effective)
