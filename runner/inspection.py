"""``task=inspect`` and ``task=diff``: the reports of ``nn_handler.checkpointing.inspect`` /
``diff`` as readable text (or, with ``format=json``, exactly the dict as JSON).

The formatting functions are pure (a report dict in, a string out) so that they can be
tested without running anything.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

FORMATS = ("text", "json")

# Implementation switches of torch optimizers: not hyperparameters, left out of the text.
_OPTIMIZER_FLAGS = ("foreach", "capturable", "differentiable", "fused")


# ---------------------------------------------------------------------------- small helpers
def size(num_bytes: Optional[int]) -> str:
    if num_bytes is None:
        return "?"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def value_text(value: Any) -> str:
    """A compact rendering: floats with 6 significant digits, lists and dicts inline."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 8 else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def kwargs_text(kwargs: Optional[Mapping[str, Any]]) -> str:
    if not kwargs:
        return "(none)"
    if not isinstance(kwargs, Mapping):
        return value_text(kwargs)
    return ", ".join(f"{k}={value_text(v)}" for k, v in kwargs.items())


def spec_text(spec: Optional[Mapping[str, Any]]) -> str:
    """``{"target": T, "kwargs": {...}}`` or ``{"_target_": T, ...}`` as ``T(k=v, ...)``."""
    if not spec:
        return "none"
    if not isinstance(spec, Mapping):
        return value_text(spec)
    if "target" in spec:
        target, kwargs = spec.get("target"), spec.get("kwargs") or {}
    else:
        target, kwargs = spec.get("_target_"), {k: v for k, v in spec.items() if k != "_target_"}
    return f"{target}({kwargs_text(kwargs) if kwargs else ''})"


def columns(rows: Sequence[Sequence[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell
                               for i, cell in enumerate(row)).rstrip() for row in rows]


def to_json(report: Dict[str, Any]) -> str:
    """Exactly the dict (tuples become lists, as JSON has only lists)."""
    return json.dumps(report, indent=2, default=str)


def damage(report: Mapping[str, Any]) -> Optional[str]:
    """Why the file cannot be trusted (damaged or unreadable), or None."""
    integrity = report.get("integrity") or {}
    if isinstance(integrity, Mapping) and integrity.get("damaged"):  # the cause of any read error after it
        return str(integrity.get("reason") or "damaged")
    if report.get("error"):
        return str(report["error"])
    return None


# ---------------------------------------------------------------------------- inspect
def _integrity_line(integrity: Mapping[str, Any]) -> str:
    if not integrity:
        return "not checked"
    if not isinstance(integrity, Mapping):
        return value_text(integrity)
    if integrity.get("damaged"):
        return f"DAMAGED: {integrity.get('reason')}"
    if integrity.get("verified"):
        return f"checksum verified ({integrity.get('checksum')})"
    return f"not verified: {integrity.get('reason') or 'no checksum'}"


def _tensor_lines(report: Mapping[str, Any]) -> List[str]:
    count = report.get("tensor_count") or 0
    lines = [f"tensors ({count}, {size(report.get('tensor_bytes'))})"]
    if report.get("tensors") is not None:
        rows = [("name", "shape", "dtype", "numel", "size")]
        rows += [(r["name"], "x".join(str(d) for d in r["shape"]) or "scalar", r["dtype"], f"{r['numel']:,}",
                  size(r["bytes"])) for r in report["tensors"]]
        lines += columns(rows) if len(rows) > 1 else ["  (none)"]
    elif report.get("tensor_groups") is not None:
        lines[0] += ": grouped by module"
        rows = [("module", "tensors", "numel", "size", "dtypes")]
        rows += [(g["prefix"], str(g["tensors"]), f"{g['numel']:,}", size(g["bytes"]), ",".join(g["dtypes"]))
                 for g in report["tensor_groups"]]
        lines += columns(rows)
    return lines


def _optimizer_lines(optimizer: Optional[Mapping[str, Any]]) -> List[str]:
    if not optimizer:
        return ["optimizer: none"]
    lines = [f"optimizer: {optimizer.get('target')}", f"  kwargs: {kwargs_text(optimizer.get('kwargs'))}"]
    for i, group in enumerate(optimizer.get("param_groups") or []):
        if not isinstance(group, Mapping):
            lines.append(f"  param group {i}: {value_text(group)}")
            continue
        shown = {k: v for k, v in group.items() if k != "num_params" and k not in _OPTIMIZER_FLAGS and v is not None}
        lines.append(f"  param group {i} ({group.get('num_params', '?')} tensors): {kwargs_text(shown)}")
    lines.append(f"  state entries: {optimizer.get('state_entries', 0)}")
    return lines


def _scheduler_lines(scheduler: Optional[Mapping[str, Any]]) -> List[str]:
    if not scheduler:
        return ["scheduler: none"]
    lines = [f"scheduler: {scheduler.get('target')}", f"  kwargs: {kwargs_text(scheduler.get('kwargs'))}"]
    if scheduler.get("state"):
        lines.append(f"  state: {kwargs_text(scheduler['state'])}")
    return lines


def _history_line(history: Mapping[str, Any]) -> str:
    last = {**(history.get("last") or {}), **(history.get("last_metrics") or {})}
    values = kwargs_text({k: v for k, v in last.items() if v is not None}) if last else "(empty)"
    return f"history ({history.get('epochs', 0)} epochs), last values: {values}"


def _data_lines(data: Mapping[str, Any]) -> List[str]:
    if not data:
        return ["data: not recorded"]
    lines = ["data"]
    for name, entry in data.items():
        if not isinstance(entry, Mapping):
            lines.append(f"  {name}: {value_text(entry)}")
            continue
        dataset = entry.get("dataset")
        options = entry.get("options") or {}
        lines.append(f"  {name}: {spec_text(dataset) if dataset else 'not recorded'}"
                     + (f"; loader: {kwargs_text(options)}" if options else ""))
    return lines


def _lineage_lines(lineage: Any) -> List[str]:
    if not lineage:
        return ["lineage: none recorded"]
    if isinstance(lineage, Mapping):
        lines = [f"lineage: run {lineage.get('run_id')}"]
        parent = lineage.get("parent")
        if isinstance(parent, Mapping):
            lines.append(f"  continues from: {parent.get('path')} ({parent.get('checksum')}, run {parent.get('run_id')})")
        elif parent is None:
            lines.append("  continues from: nothing (a fresh run)")
        rest = {k: v for k, v in lineage.items() if k not in ("run_id", "parent")}
        if rest:
            lines.append(f"  {kwargs_text(rest)}")
        return lines
    if not isinstance(lineage, list):
        return [f"lineage: {value_text(lineage)}"]
    lines = ["lineage (oldest first)"]
    for i, entry in enumerate(lineage):
        lines.append(f"  {i}. {kwargs_text(entry) if isinstance(entry, Mapping) else value_text(entry)}")
    return lines


def _config_lines(run_config: Any) -> List[str]:
    if not run_config:
        return ["run config: none recorded (not written by the runner)"]
    try:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(run_config)).rstrip()
    except Exception:
        text = json.dumps(run_config, indent=2, default=str)
    return ["run config (resolved)"] + ["  " + line for line in text.splitlines()]


def format_inspect(report: Mapping[str, Any]) -> str:
    """The report of ``nn_handler.checkpointing.inspect`` as readable text (never raises: a part that
    cannot be shown as text is shown as JSON)."""
    lines: List[str] = []
    try:
        _inspect_lines(report, lines)
    except Exception as exc:  # noqa: BLE001 (a report with fields of unexpected types)
        lines.append(f"(the rest of the report cannot be shown as text: {type(exc).__name__}: {exc}; as JSON:)")
        lines.append(to_json(dict(report)))
    return "\n".join(lines)


def _problem_lines(problems: Any) -> List[str]:
    if not problems:
        return []
    problems = problems if isinstance(problems, list) else [problems]
    return [f"malformed records ({len(problems)}), shown as empty:"] + [f"  {value_text(p)}" for p in problems]


def _inspect_lines(report: Mapping[str, Any], lines: List[str]) -> None:
    lines.append(f"checkpoint: {report.get('path')} ({size(report.get('file_bytes'))})")
    if "integrity" in report:
        lines.append(f"integrity: {_integrity_line(report['integrity'])}")
    kind = report.get("kind")
    if report.get("error"):
        lines.append(f"ERROR: {report['error']}")
    if kind == "weights":
        other = report.get("other_keys") or []
        lines.append("kind: model weights only" + (f" (a dict with model_state_dict; other keys: {', '.join(other)})"
                                                   if other else " (a bare state_dict)"))
        lines.append(f"parameters: {report.get('parameters', 0):,}")
        lines += _tensor_lines(report)
    if kind in ("export", "safetensors"):  # the header alone (nn_handler.checkpointing.inspect)
        model = report.get("model") or {}
        lines.append("kind: " + (f"nn_handler export (format version {report.get('format_version')}, "
                                 f"{report.get('weights')} weights)" if kind == "export" else "safetensors weights"))
        lines += _problem_lines(report.get("problems"))
        if kind == "export":
            lines.append(f"model: {model.get('target') or 'not recorded'} ({model.get('model_type') or '-'})")
            lines.append(f"  kwargs: {kwargs_text(model.get('kwargs'))}")
        lines.append(f"parameters: {report.get('parameters', 0):,} ({size(report.get('tensor_bytes'))} of tensors)")
        lines.append(f"metadata: {kwargs_text(report.get('metadata'))}")
        lines += _tensor_lines(report)
    if kind != "handler":
        return
    versions = report.get("versions") or {}
    model = report.get("model") or {}
    ema = report.get("ema")
    lines.append(f"kind: nn_handler checkpoint, format version {report.get('format_version')}")
    lines += _problem_lines(report.get("problems"))
    lines += [
        f"versions: {kwargs_text(versions) if versions else 'not recorded'}",
        f"created: {report.get('created') or 'not recorded'}",
        f"world size: {report.get('world_size')}",
        f"model: {model.get('target')} ({model.get('model_type') or 'model type not recorded'})",
        f"  kwargs: {kwargs_text(model.get('kwargs'))}",
        f"  parameters: {report.get('parameters', 0):,}",
    ]
    lines += _tensor_lines(report)
    lines += _optimizer_lines(report.get("optimizer"))
    lines += _scheduler_lines(report.get("scheduler"))
    lines.append(f"loss: {spec_text(report.get('loss_fn'))}")
    lines.append(f"metrics: {kwargs_text(report.get('metrics'))}")
    progress = report.get("progress") or {}
    lines.append(f"progress: epoch {progress.get('epoch')}, global step {progress.get('global_step')}"
                 + (f" ({kwargs_text({k: v for k, v in progress.items() if k not in ('epoch', 'global_step')})})"
                    if set(progress) - {"epoch", "global_step"} else ""))
    lines.append(f"train settings: {kwargs_text(report.get('train_settings'))}")
    lines.append(_history_line(report.get("history") or {}))
    callbacks = report.get("callbacks") or []
    lines.append(f"callbacks: {'none' if not callbacks else len(callbacks)}")
    for cb in callbacks:
        lines.append(f"  {spec_text(cb)}" + (f"; state: {value_text(cb['state'])}" if cb.get("state") else ""))
    lines.append("ema: none" if not ema else f"ema: decay {value_text(ema.get('decay'))}, "
                                                 f"{ema.get('num_updates')} updates")
    lines.append(f"sde: {spec_text(report.get('sde'))}")
    lines.append(f"sampler: {spec_text(report.get('sampler'))}")
    lines += _data_lines(report.get("data") or {})
    if report.get("unrecorded"):
        lines.append(f"not recorded (set again after loading): {kwargs_text(report['unrecorded'])}")
    lines += _lineage_lines(report.get("lineage"))
    lines += _config_lines(report.get("run_config"))
    if report.get("metadata_keys"):
        lines.append(f"metadata keys: {', '.join(map(str, report['metadata_keys']))}")


# ---------------------------------------------------------------------------- diff
def _change_lines(title: str, changes: Mapping[str, Any]) -> List[str]:
    if not changes:
        return []
    lines = [f"{title} ({len(changes)})"]
    rows = [(key, value_text(a), "->", value_text(b)) for key, (a, b) in changes.items()]
    return lines + columns(rows)


def _names(title: str, names: Iterable[str]) -> List[str]:
    names = list(names)
    return [f"{title} ({len(names)}): {', '.join(names)}"] if names else []


def format_diff(d: Mapping[str, Any], top: int = 10) -> str:
    """The dict of ``nn_handler.checkpointing.diff`` as readable text; ``top`` tensors by largest difference.
    Never raises: a dict that cannot be shown as text is shown as JSON."""
    try:
        return _diff_text(d, top)
    except Exception as exc:  # noqa: BLE001
        return f"a: {d.get('a')}\nb: {d.get('b')}\n(cannot be shown as text: {type(exc).__name__}: {exc}; " \
               f"as JSON:)\n{to_json(dict(d))}"


def _diff_text(d: Mapping[str, Any], top: int) -> str:
    lines = [f"a: {d.get('a')}", f"b: {d.get('b')}"]
    kind = d.get("kind") or (None, None)
    if kind[0] != kind[1]:
        lines.append(f"kind: {kind[0]} -> {kind[1]}")
    body: List[str] = []
    if d.get("model_target"):
        body.append(f"model class: {d['model_target'][0]} -> {d['model_target'][1]}")
    body += _change_lines("model kwargs", d.get("model_kwargs") or {})
    body += _change_lines("config", d.get("config") or {})
    body += _change_lines("hyperparameters", d.get("hyperparameters") or {})
    body += _change_lines("progress", d.get("progress") or {})
    body += _change_lines("data", d.get("data") or {})
    body += _names("tensors only in a", d.get("only_in_a") or [])
    body += _names("tensors only in b", d.get("only_in_b") or [])
    shapes = d.get("shape_or_dtype") or []
    if shapes:
        body.append(f"shape or dtype changes ({len(shapes)})")
        body += columns([(row["name"], "x".join(map(str, row["a"][0])) + f" {row['a'][1].replace('torch.', '')}", "->",
                          "x".join(map(str, row["b"][0])) + f" {row['b'][1].replace('torch.', '')}") for row in shapes])
    values = d.get("values") or []
    if values:
        shown = values[:max(int(top), 0)]
        body.append(f"largest absolute differences of tensors in both ({len(values)} differ, "
                    f"{d.get('identical_tensors', 0)} identical; top {len(shown)})")
        body += columns([(row["name"], f"{row['max_abs_diff']:.6g}") for row in shown]) if shown else []
    elif d.get("identical_tensors"):
        body.append(f"tensors in both: all {d['identical_tensors']} identical")
    not_compared = d.get("not_compared") or []
    if not_compared:
        body.append(f"tensors in both that cannot be compared ({len(not_compared)})")
        body += columns([(str(row.get("name")), str(row.get("reason"))) for row in not_compared])
    return "\n".join(lines + (body or ["no differences"]))
