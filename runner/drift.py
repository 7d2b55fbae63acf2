"""Config drift: how the config of a resumed (or fine-tuned) run differs from the one stored
in its checkpoint, each difference classified by what it does to the run.

- ``harmless``: bookkeeping (epochs, logging, output paths, progress bar, checkpoint.path,
  launcher, load flags, device, metrics). Noted in the log.
- ``risky``: changes what training computes (learning rate and every other optimizer or
  scheduler setting, loss, batch size and the data specs, world size, seed, model_type, the
  train settings: EMA, AMP, accumulation, clipping). One warning table; the run goes on.
- ``fatal``: the model's class or any of its constructor kwargs. A resume refuses them
  (``resume.allow_drift=true`` lets them through, the warning kept).

For ``finetune`` a new optimizer and scheduler are the point of the task: they are noted,
not warned, and a changed model is warned instead of refused (its weights load under
``load.strict``).

The rules are pure functions of two plain dicts (``OmegaConf.to_container`` of the two
configs) so that they can be tested without running anything. A key that is null (or
absent) in the current config means "as recorded" (the runner's resume semantics: null
loader options, null ``train.*`` settings, ``model: {}`` all inherit the checkpoint's), so
it is not a difference.

``Drift`` applies these rules to a load-based task: the config of the run against the run config
its checkpoint records (read_info's ``metadata``: the file is not read again), and reports them.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Protocol, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from nn_handler import specs
from nn_handler.distributed import env_topology

from .context import RunContext
from .errors import RunnerError

log = logging.getLogger("runner")

HARMLESS, RISKY, FATAL = "harmless", "risky", "fatal"
LEVELS = (FATAL, RISKY, HARMLESS)  # most serious first
UNSET = "<unset>"

# Never compared: they say what this command does, not how the run trains.
IGNORED: Tuple[str, ...] = ("task", "inspect", "diff", "resume", "hydra")

# (dotted prefix, level, reason); the longest matching prefix wins.
RULES: Tuple[Tuple[str, str, str], ...] = (
    ("model", FATAL, "the architecture"),
    ("model_type", RISKY, "the loss and metrics follow the model type"),
    ("optimizer", RISKY, "optimizer hyperparameter"),
    ("scheduler", RISKY, "learning-rate schedule"),
    ("loss", RISKY, "the objective"),
    ("data", RISKY, "the data or how it is batched"),
    ("data.num_workers", HARMLESS, "loader performance only"),
    ("data.pin_memory", HARMLESS, "loader performance only"),
    ("data.val_batch_size", HARMLESS, "validation batching only"),
    ("logger", HARMLESS, "experiment logging"),
    ("objective", HARMLESS, "what a sweep optimises"),
    ("seed", RISKY, "the random streams"),
    ("world_size", RISKY, "the effective batch size and the data shards"),
    ("train", RISKY, "a training setting"),
    ("train.epochs", HARMLESS, "how long to train"),
    ("train.progress_bar", HARMLESS, "display"),
    ("train.validate_every", HARMLESS, "how often to validate"),
    ("metrics", HARMLESS, "what is measured"),
    ("checkpoint", HARMLESS, "paths and saving"),
    ("save", HARMLESS, "how often checkpoints are saved and how many are kept"),
    ("auto_resume", HARMLESS, "how a re-run command starts"),
    ("sample", HARMLESS, "sampling settings (pictures, task=sample)"),
    ("sde", RISKY, "the diffusion process the score is learnt for"),
    ("launcher", HARMLESS, "how processes are started (world size is compared on its own)"),
    ("load", HARMLESS, "the load policy of this command"),
    ("device", HARMLESS, "placement"),
    ("logging", HARMLESS, "logging"),
)

# What fine-tuning changes on purpose: (prefix, level, reason).
FINETUNE_RULES: Tuple[Tuple[str, str, str], ...] = (
    ("optimizer", HARMLESS, "fine-tuning takes the optimizer from the config"),
    ("scheduler", HARMLESS, "fine-tuning takes the scheduler from the config"),
    ("model", RISKY, "fine-tuning builds the configured model; weights that do not fit are not loaded"),
)


@dataclass(frozen=True)
class Difference:
    key: str  # dotted, e.g. "optimizer.lr"
    stored: Any  # in the checkpoint's run config (UNSET when absent)
    current: Any  # in this run's config
    level: str  # harmless | risky | fatal
    reason: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``. Lists are leaves (compared whole); an empty dict is nothing."""
    if isinstance(value, Mapping):
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: _normal(value)} if prefix else {}


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    return value


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def level_of(key: str, task: str = "resume") -> Tuple[str, str]:
    """``(level, reason)`` of a difference at dotted ``key`` for ``task``. Unknown keys are risky."""
    rules: Sequence[Tuple[str, str, str]] = RULES
    if task == "finetune":
        rules = tuple(RULES) + tuple(FINETUNE_RULES)
    best: Tuple[int, str, str] = (-1, RISKY, "not classified: treated as risky")
    for prefix, level, reason in rules:
        if _matches(key, prefix) and len(prefix) >= best[0]:
            best = (len(prefix), level, reason)
    return best[1], best[2]


def classify(stored: Mapping[str, Any], current: Mapping[str, Any], task: str = "resume") -> List[Difference]:
    """Every difference between the stored run config and the current one, classified.

    A current value that is null or absent inherits the stored one (no difference); a key
    only in the current config differs from ``UNSET``. An empty ``stored`` (a checkpoint
    that records no run config) has nothing to compare. Sorted most serious first, then by key.
    """
    if not stored:
        return []
    flat_stored, flat_current = flatten(stored), flatten(current)
    out: List[Difference] = []
    for key in sorted(flat_current):
        value = flat_current[key]
        if value is None or any(_matches(key, p) for p in IGNORED):
            continue
        before = flat_stored.get(key, UNSET)
        if before == value:
            continue
        level, reason = level_of(key, task)
        out.append(Difference(key, before, value, level, reason))
    out.sort(key=lambda d: (LEVELS.index(d.level), d.key))
    return out


def by_level(differences: Iterable[Difference], level: str) -> List[Difference]:
    return [d for d in differences if d.level == level]


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) and value != UNSET else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def table(differences: Sequence[Difference]) -> str:
    """A plain-text table: key, checkpoint value, current value, why it matters."""
    rows = [("key", "checkpoint", "now", "why")] + [(d.key, _show(d.stored), _show(d.current), d.reason)
                                                    for d in differences]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row[:3])) + "  " + row[3])
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 3)
    return "\n".join(lines)


def one_line(differences: Sequence[Difference]) -> str:
    return "; ".join(f"{d.key}: {_show(d.stored)} -> {_show(d.current)}" for d in differences)


def inherit(current: Mapping[str, Any], previous: Mapping[str, Any], keep: Iterable[str] = ()) -> Dict[str, Any]:
    """``current`` with its null values and empty mappings filled from ``previous`` (recursively):
    the config a load-based run actually used, since null means "as recorded". Top-level keys in
    ``keep`` stay as they are (e.g. ``seed``: null on resume means "not re-seeded")."""
    keep = set(keep)

    def fill(cur: Any, prev: Any) -> Any:
        if isinstance(prev, Mapping) and (cur is None or (isinstance(cur, Mapping) and not cur)):
            return _normal(prev)
        if cur is None:
            return _normal(prev)
        if isinstance(cur, Mapping) and isinstance(prev, Mapping):
            out = {k: fill(v, prev.get(k)) for k, v in cur.items()}
            if "_target_" not in cur:
                # a partial spec (no _target_, e.g. +model.dropout=0.1) keeps the previous kwargs it does not set
                for k, v in prev.items():
                    out.setdefault(k, _normal(v))
            return out
        return _normal(cur)

    return {k: (_normal(v) if k in keep else fill(v, previous.get(k))) for k, v in current.items()}


# ---------------------------------------------------------------------------- a load-based run's drift
def normalized(value: Any) -> Any:
    """``value`` with tuples as lists (recursively), for comparing a recorded value with a configured one."""
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


def run_config_of(cfg: DictConfig) -> Dict[str, Any]:
    """The fully resolved run config as plain data (the task function's cfg holds no hydra node)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    return specs.to_plain(container)


def _world_size() -> int:
    topology = env_topology()
    return int(topology.world_size) if topology.enabled else 1


class ChosenModel(Protocol):
    """The model a load-based task builds (``runner.tasks.build.ModelChoice``): its target and kwargs."""

    target: str
    kwargs: Dict[str, Any]


class Drift:
    """The config of a load-based run against the run config stored in its checkpoint."""

    def __init__(self, cfg: DictConfig, ctx: RunContext, info: Dict[str, Any], choice: ChosenModel):
        task = str(cfg.task)
        # (``info``: the checkpoint's read_info; its ``metadata`` holds the run config)
        self.previous: Dict[str, Any] = (info.get("metadata") or {}).get("run_config") or {}
        current = run_config_of(cfg)
        # What this run takes from the checkpoint instead of the config (null = "as recorded").
        if task == "resume":
            for key in ("optimizer", "scheduler"):
                if not (ctx.given(key) or cfg.load[f"skip_{key}"]):
                    current[key] = None
        # The recorded loss, metrics and model type stay unless the command line names others (a config
        # default is not the user's choice): the config's stand only where the file records none.
        recorded_type = str(((info.get("model") or {}).get("model_type")) or "")
        if not ctx.given("loss") and (info.get("loss_fn") or recorded_type in ("score_based", "generative")):
            current["loss"] = None
        if not ctx.given("metrics") and info.get("kind") == "handler":
            current["metrics"] = None
        if not ctx.given("model_type") and recorded_type:
            current["model_type"] = None
        keep = ["seed"] + (["optimizer", "scheduler"] if task == "finetune" else [])
        # What this run's checkpoints store: the config it actually ran with.
        # (a checkpoint without a run config still records its optimizer, scheduler and loss specs)
        recorded = {"optimizer": info.get("optimizer"), "scheduler": info.get("scheduler"), "loss": info.get("loss_fn")}
        self.effective = inherit(current, {**recorded, **self.previous}, keep=keep)
        self.effective["model"] = {specs.TARGET: choice.target, **normalized(choice.kwargs)}
        stored = dict(self.previous)
        if stored:
            stored["world_size"] = info.get("world_size")
        self.differences = classify(stored, {**current, "world_size": _world_size()}, task)
        self.task = task

    def report(self, model_differences: List[str], allow: bool) -> None:
        """Log harmless ones, warn risky ones in one table; refuse fatal ones unless ``allow``."""
        harmless = by_level(self.differences, HARMLESS)
        risky = by_level(self.differences, RISKY)
        fatal = by_level(self.differences, FATAL)
        # The model's differences from the recorded one (defaults of the constructor filled in), named
        # as config keys, then any other fatal difference from the stored run config.
        fatal_lines = [("model class" + line[len("class"):]) if line.startswith("class:") else f"model.{line}"
                       for line in model_differences]
        named = {line.split(":", 1)[0] for line in fatal_lines}
        fatal_lines += [f"{d.key}: checkpoint {d.stored!r} vs config {d.current!r}" for d in fatal
                        if d.key not in named and not (d.key == "model._target_" and "model class" in named)]
        rank0 = env_topology().rank == 0
        if not self.previous and rank0:
            log.info("the checkpoint records no run config (not written by the runner): only the model is compared")
        if harmless and rank0:
            log.info("config drift from the checkpoint (harmless): %s", one_line(harmless))
        if risky and rank0:
            log.warning("config drift from the checkpoint: %d risky difference(s); the run goes on\n%s",
                        len(risky), table(risky))
        if not fatal_lines:
            return
        if not allow:
            raise RunnerError(f"task={self.task} needs the architecture of the checkpoint, but the configured model "
                              f"differs: " + "; ".join(fatal_lines) + ". Drop model=... to use the recorded one, use "
                              "task=finetune, or set resume.allow_drift=true to go on anyway")
        if rank0:
            log.warning("config drift from the checkpoint: the model differs (resume.allow_drift=true, going on): %s",
                        "; ".join(fatal_lines))
