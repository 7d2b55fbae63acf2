"""task=resume: ``NNHandler.load`` with the load flags, the recorded model (drift refused), training continued."""
from __future__ import annotations

import logging
from typing import Any, Dict

from omegaconf import DictConfig

from nn_handler import NNHandler, specs

from .. import drift
from ..context import RunContext
from ..drift import Drift
from ..errors import RunnerError
from .build import complete_from_config, component, handler_checkpoint, load_handler, set_data, set_optimizer, set_scheduler
from .fit import fit_and_save

log = logging.getLogger("runner")


def kwargs_text(values: Dict[str, Any]) -> str:
    """``a=1, b=(0.9, 0.99)``: keyword arguments as the log shows them."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def apply_resume_overrides(h: NNHandler, cfg: DictConfig, ctx: RunContext) -> None:
    """``optimizer.*`` / ``scheduler.*`` given to a resume take effect on the restored components.

    The same optimizer class: ``h.update_optimizer`` changes the given hyperparameters in place
    (moments, step counts and the scheduler's state continue). Another class, or a scheduler:
    built afresh from the config.
    """
    if ctx.given("optimizer") and not cfg.load.skip_optimizer and h.optimizer is not None:
        cls, kwargs = component(cfg.optimizer, "optimizer")
        if type(h.optimizer) is not cls:
            log.warning("optimizer changed to %s: it starts with a fresh state", cfg.optimizer[specs.TARGET])
            set_optimizer(h, cfg)
        else:
            try:
                changed = h.update_optimizer(**kwargs)
            except (TypeError, ValueError) as exc:
                raise RunnerError(f"optimizer ({cfg.optimizer[specs.TARGET]}): {exc}") from None
            if changed:
                log.info("resume: optimizer state restored, with %s from the config", kwargs_text(changed))
    if ctx.given("scheduler") and not cfg.load.skip_scheduler and h.optimizer is not None:
        log.info("resume: scheduler from the config (its schedule starts afresh)")
        set_scheduler(h, cfg)


def resume_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """The checkpoint's whole training state, trained on for ``train.epochs`` more epochs."""
    ckpt, info, choice = handler_checkpoint(cfg, ctx, "not a training state to resume: use task=finetune "
                                                      "model=... (or task=infer)")
    with ckpt:  # opened and verified once: the drift check read its header, the load reads its state
        path = ckpt.path
        model_differences = choice.differences()
        check = Drift(cfg, ctx, info, choice)
        check.report(model_differences, allow=bool(cfg.resume.allow_drift))
        if model_differences or drift.by_level(check.differences, drift.FATAL):
            # allowed drift: the configured model, with the checkpoint's weights under load.strict
            h = load_handler(ckpt, cfg, choice)
        else:
            h = load_handler(ckpt, cfg, choice, configured=False)
    complete_from_config(h, cfg, ctx)
    apply_resume_overrides(h, cfg, ctx)
    set_data(h, cfg, info, require_train=True)
    return fit_and_save(h, cfg, ctx, checkpoint_read=path, run_config=check.effective)
