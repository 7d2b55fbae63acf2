"""task=train: a fresh handler from the config, trained; and auto_resume's continuation of a run from its own checkpoint."""
from __future__ import annotations

import logging
from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler import NNHandler, rng, specs

from ..context import RunContext
from .build import (
    complete_from_config,
    component,
    new_handler,
    set_data,
    set_loss,
    set_metrics,
    set_optimizer,
    set_scheduler,
    set_sde,
    strategy_of,
    trusted_packages_of,
)
from .checkpoints import checkpoint_info
from .fit import fit_and_save

log = logging.getLogger("runner")

MAX_RECORDED_EPOCHS = 10 ** 6  # a recorded runner.target_epoch beyond the file's epoch + this is ignored


def train_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """A new handler built from the config (model, loss, SDE, metrics, optimizer, scheduler, data), trained."""
    cls, kwargs = component(cfg.model, "model")
    if cfg.seed is not None:
        rng.seed_everything(int(cfg.seed))  # the initial weights too
    h = new_handler(cfg.model[specs.TARGET], kwargs, lambda: NNHandler(
        cls, device=cfg.device, model_type=cfg.model_type or "classification", strategy=strategy_of(cfg), **kwargs))
    set_loss(h, cfg)
    set_sde(h, cfg)
    set_metrics(h, cfg)
    set_optimizer(h, cfg)
    set_scheduler(h, cfg)
    set_data(h, cfg, None, require_train=True)
    return fit_and_save(h, cfg, ctx, checkpoint_read=None)


def continue_run(cfg: DictConfig, ctx: RunContext, path: str) -> Dict[str, Any]:
    """auto_resume: this run directory already holds ``path``; go on from it up to the run's total.

    ``task=train``: ``train.epochs`` is the total. A requeued ``resume``/``finetune`` trains up to
    the epoch its first attempt aimed at (recorded in the checkpoint). Everything comes back from
    the file (the run's own): weights, optimizer, scheduler, EMA, data, random streams, position.
    """
    h = NNHandler.load(path, device=cfg.device, model_type=cfg.model_type, trusted_packages=trusted_packages_of(cfg),
                       strategy=strategy_of(cfg))
    complete_from_config(h, cfg, ctx)
    recorded = h.metadata.get("runner")
    recorded_target = recorded.get("target_epoch") if isinstance(recorded, dict) else None
    if recorded_target is not None and not (isinstance(recorded_target, int) and not isinstance(recorded_target, bool)
                                            and 0 <= recorded_target <= h.epoch + MAX_RECORDED_EPOCHS):
        if h.rank == 0:
            log.warning("auto_resume: ignoring the target epoch %s recorded in %s (not an epoch from 0 to %d); "
                        "training up to train.epochs=%s", str(recorded_target)[:40], path,
                        h.epoch + MAX_RECORDED_EPOCHS, cfg.train.epochs)
        recorded_target = None
    target = int(cfg.train.epochs) if str(cfg.task) == "train" or not recorded_target else recorded_target
    if h.train_loader is None:
        set_data(h, cfg, checkpoint_info(path, path), require_train=True)
    position = " (inside epoch %d)" % (h.epoch + 1) if h.resumes_inside_epoch else ""
    if h.rank == 0:
        log.info("auto_resume: continuing from %s: epoch %d%s, step %d, of %d epoch(s) in all", path, h.epoch,
                 position, h.global_step, target)
    epochs = max(0, target - h.epoch)
    if epochs == 0 and h.resumes_inside_epoch:
        epochs = 1
    return fit_and_save(h, cfg, ctx, checkpoint_read=path, run_config=h.metadata.get("run_config"), epochs=epochs,
                        seed=None)
