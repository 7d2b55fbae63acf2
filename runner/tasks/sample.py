"""task=sample: ``h.sample`` from a trained generative model, as its training run sampled: ``samples.pt`` and ``samples.png``."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from nn_handler import ModelType, NNHandler
from nn_handler.callbacks import SampleGrid

from .. import reporting
from ..context import RunContext
from ..errors import RunnerError
from .build import handler_checkpoint, load_handler, sample_shape, set_sde

log = logging.getLogger("runner")

SAMPLES_FILE = "samples.pt"
SAMPLES_PNG = "samples.png"
SAMPLE_SETTINGS = ("steps", "corrector_steps", "value_range")
MAX_RECORDED_STEPS = 100_000  # sample.steps / corrector_steps taken from a checkpoint's run config


def _recorded_sample_settings(h: NNHandler, cfg: DictConfig, ctx: RunContext, path: str,
                              info: Dict[str, Any]) -> Dict[str, Any]:
    """``sample.steps``, ``sample.corrector_steps`` and ``sample.value_range`` for task=sample: each one
    given on the command line, else the one the training run used (its recorded run config's
    ``sample.*``, read from ``info``'s metadata, else its SampleGrid callback's), else the config's. So
    the samples of a run trained with ``experiment=...`` come out as its grids did (same solver, same
    black..white range)."""
    run_config = (info.get("metadata") or {}).get("run_config")
    recorded = run_config.get("sample") if isinstance(run_config, dict) else None
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    grid = next((cb for cb in h.callbacks if isinstance(cb, SampleGrid)), None)
    settings: Dict[str, Any] = {}
    for key in SAMPLE_SETTINGS:
        value = cfg.sample[key]
        if not ctx.given(f"sample.{key}"):
            stored = recorded.get(key)
            if stored is None and grid is not None:
                stored = getattr(grid, key, None)
            if stored is not None:
                value = _recorded_sample_setting(key, stored, path)
        settings[key] = list(value) if key == "value_range" and value is not None else value
    inherited = {k: v for k, v in settings.items() if not ctx.given(f"sample.{k}") and v != cfg.sample[k]}
    if inherited and h.rank == 0:
        log.info("task=sample: as the training run sampled: %s (give sample.<key>=... to change)",
                 ", ".join(f"sample.{k}={v}" for k, v in inherited.items()))
    return settings


def _recorded_sample_setting(key: str, value: Any, path: str) -> Any:
    """A ``sample.<key>`` the checkpoint records, if sane: steps 1..MAX_RECORDED_STEPS, corrector
    steps 0..MAX_RECORDED_STEPS, value_range two finite numbers; else a RunnerError asking for it."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "value_range":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    else:
        low = 1 if key == "steps" else 0
        ok = number and math.isfinite(value) and float(value).is_integer() and low <= value <= MAX_RECORDED_STEPS
        value = int(value) if ok else value
    if not ok:
        rule = "two finite numbers [lo, hi]" if key == "value_range" else \
            f"a whole number from {1 if key == 'steps' else 0} to {MAX_RECORDED_STEPS}"
        raise RunnerError(f"the checkpoint {path} records sample.{key}={str(value)[:80]}, which is not used from a "
                          f"file (it must be {rule}); give sample.{key}=... on the command line")
    return value


def _lacks_sampler_or_sde(h: NNHandler) -> bool:
    """Whether ``h.sample`` refuses for want of a sampler (a generative model) or an SDE (a score-based one)."""
    if h.sampler is not None:
        return False
    return h.model_type is ModelType.GENERATIVE or (h.model_type is ModelType.SCORE_BASED and h.sde is None)


def sample_task(cfg: DictConfig, ctx: RunContext) -> Dict[str, Any]:
    """``h.sample`` from a trained generative model: ``samples.pt`` (the tensor) and ``samples.png``.

    The EMA weights are used when the checkpoint has them, unless ``load.skip_ema=true`` (then the
    live weights). ``seed`` fixes the noise (null: the global random stream).
    """
    ckpt, info, choice = handler_checkpoint(cfg, ctx, "task=sample needs a checkpoint of a trained generative "
                                                      "model (with its SDE or sampler)")
    with ckpt:
        path = ckpt.path
        h = load_handler(ckpt, cfg, choice, configured=choice.configured)
    if h.sde is None or ctx.given("sde"):
        set_sde(h, cfg)
    shape = sample_shape(h, cfg, info)
    settings = _recorded_sample_settings(h, cfg, ctx, path, info)
    n, steps, corrector_steps = int(cfg.sample.n), int(settings["steps"]), int(settings["corrector_steps"])
    if n < 1 or steps < 1 or corrector_steps < 0:
        raise RunnerError(f"sample.n and sample.steps must be >= 1 and sample.corrector_steps >= 0, got {n}, "
                          f"{steps} and {corrector_steps}")
    use_ema = not bool(cfg.load.skip_ema)
    h.eval()
    missing = _lacks_sampler_or_sde(h)
    try:
        samples = h.sample([n, *shape], steps, corrector_steps=corrector_steps,
                           seed=None if cfg.seed is None else int(cfg.seed), use_ema=use_ema)
    except RuntimeError as exc:
        if missing:  # the library's message says what to set
            raise RunnerError(f"task=sample: {exc}") from None
        raise
    weights = "ema" if use_ema and h.ema is not None else "live"
    record: Dict[str, Any] = {"task": "sample", "epoch": h.epoch, "train_loss": None, "val_loss": None,
                              "samples": n, "shape": [n, *shape], "steps": steps, "seed": cfg.seed,
                              "weights": weights, "world_size": h.world_size, "checkpoint_read": path,
                              "checkpoint_written": None}
    if h.rank == 0:
        from nn_handler.plotting import save_samples_png

        out = os.path.join(ctx.output_dir, SAMPLES_FILE)
        torch.save(samples, out)
        value_range = list(settings["value_range"]) if settings["value_range"] else None
        png = save_samples_png(samples, os.path.join(ctx.output_dir, SAMPLES_PNG), value_range=value_range,
                               title=f"{n} samples, {steps} steps, {weights} weights, epoch {h.epoch}")
        reporting.write_metrics(ctx.output_dir, record)
        log.info("sampled %d x %s from %s (%s weights)", n, shape, path, weights)
        print(f"samples: {out}\npicture: {png}", flush=True)
    return record
