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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

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
