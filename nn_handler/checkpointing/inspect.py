"""What a checkpoint records, without building anything; and what differs between two.

``inspect(path)`` reads the file memory-mapped (tensor data is not read, only the
checksum pass touches every byte) and reports: integrity, versions, model, a table of
tensors, optimizer, scheduler, progress, history, callbacks, EMA, SDE, sampler, data,
lineage and the run config. A damaged file is reported, not raised.
``diff(a, b)`` compares two such reports and the tensors present in both.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .. import specs
from . import format as F
from .errors import CheckpointError
from .io import PathLike, file_checksum, safe_load, verify

_MAX_TENSOR_ROWS = 40  # above this, the table is summarised by module prefix


def _tensor_rows(weights: Mapping[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for name, value in weights.items():
        if isinstance(value, torch.Tensor):
            rows.append({"name": name, "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                         "numel": value.numel(), "bytes": value.numel() * value.element_size()})
    return rows


def _group_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows summed per module prefix (the name up to its last two components)."""
    groups: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for row in rows:
        parts = row["name"].split(".")
        prefix = ".".join(parts[:-2]) if len(parts) > 2 else parts[0]
        group = groups.setdefault(prefix, {"prefix": prefix, "tensors": 0, "numel": 0, "bytes": 0, "dtypes": []})
        group["tensors"] += 1
        group["numel"] += row["numel"]
        group["bytes"] += row["bytes"]
        if row["dtype"] not in group["dtypes"]:
            group["dtypes"].append(row["dtype"])
    return list(groups.values())


def _spec_view(entry: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if not entry or entry.get("spec") is None:
        return None
    target, kwargs = specs.split(entry["spec"])
    return {"target": target, "kwargs": kwargs}


def _plain(value: Any) -> Any:
    """JSON-friendly: tensors become short descriptions, floats stay floats (NaN as None)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _optimizer_view(entry: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    view = _spec_view(entry)
    if view is None:
        return None
    groups = (entry.get("state") or {}).get("param_groups") or []
    view["param_groups"] = [_plain({k: v for k, v in g.items() if k != "params"} | {"num_params": len(g.get("params", []))})
                            for g in groups]
    view["state_entries"] = len((entry.get("state") or {}).get("state") or {})
    return view


def _scheduler_view(entry: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    view = _spec_view(entry)
    if view is None:
        return None
    state = entry.get("state") or {}
    view["state"] = _plain({k: v for k, v in state.items()
                            if isinstance(v, (int, float, str, bool, list)) and not k.startswith("_") or k == "_last_lr"})
    return view


def inspect(path: PathLike) -> Dict[str, Any]:
    """A report of what ``path`` records, as plain JSON-friendly data. Never raises for a damaged file."""
    path_str = os.fspath(path)
    report: Dict[str, Any] = {"path": path_str}
    try:
        report["file_bytes"] = os.path.getsize(path_str)
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    integrity: Dict[str, Any] = {}
    try:
        verification = verify(path_str)
        integrity["verified"] = verification.checksum
        integrity["checksum"] = file_checksum(path_str) if verification.checksum else None
        if not verification.checksum:
            integrity["reason"] = "the file carries no checksum (not written by nn_handler)"
    except CheckpointError as exc:
        integrity.update(verified=False, damaged=True, reason=str(exc))
    report["integrity"] = integrity
    try:
        obj = safe_load(path_str, map_location="cpu", mmap=True)
    except CheckpointError as exc:
        report["error"] = str(exc)
        return report
    if not F.is_handler_state(obj):
        weights = obj.get(F.MODEL_STATE) if isinstance(obj, dict) and isinstance(obj.get(F.MODEL_STATE), dict) else obj
        if isinstance(weights, dict) and any(isinstance(v, torch.Tensor) for v in weights.values()):
            rows = _tensor_rows(weights)
            report.update(kind="weights", parameters=sum(r["numel"] for r in rows),
                          tensor_bytes=sum(r["bytes"] for r in rows), **_table(rows),
                          other_keys=sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
                          if isinstance(obj, dict) and weights is obj else
                          sorted(str(k) for k in obj if k != F.MODEL_STATE) if isinstance(obj, dict) else [])
        else:
            report.update(kind="unknown", error=f"not a checkpoint with model weights (a {type(obj).__name__})")
        return report
    if integrity.get("verified") is False and not integrity.get("damaged"):
        integrity.update(damaged=True, reason="an nn_handler checkpoint whose checksum record is missing or damaged")
    state = obj
    rows = _tensor_rows(state.get(F.MODEL_STATE) or {})
    model = state.get(F.MODEL) or {}
    history = state.get(F.HISTORY) or {}
    ema = state.get(F.EMA)
    report.update({
        "kind": "handler",
        "format_version": state.get(F.VERSION),
        "versions": dict(state.get(F.VERSIONS) or {}),
        "created": state.get(F.CREATED),
        "world_size": state.get(F.WORLD_SIZE),
        "model": {**(_spec_view(model) or {"target": None, "kwargs": None}), "model_type": model.get("model_type")},
        "parameters": sum(r["numel"] for r in rows),
        "tensor_bytes": sum(r["bytes"] for r in rows),
        **_table(rows),
        "optimizer": _optimizer_view(state.get(F.OPTIMIZER)),
        "scheduler": _scheduler_view(state.get(F.SCHEDULER)),
        "loss_fn": _spec_view(state.get(F.LOSS)),
        "metrics": {name: (spec or {}).get(specs.TARGET) for name, spec in (state.get(F.METRICS) or {}).items()},
        "progress": {k: v for k, v in (state.get(F.PROGRESS) or {}).items() if k != "data_seed"},
        "train_settings": dict(state.get(F.SETTINGS) or {}),
        "history": {"epochs": len(history.get("train_losses") or []),
                    "last": _plain({k: (v[-1] if v else None) for k, v in history.items() if isinstance(v, list)}),
                    "last_metrics": _plain({f"{side}_{name}": (vals[-1] if vals else None)
                                            for side in ("train", "val")
                                            for name, vals in (history.get(f"{side}_metrics") or {}).items()})},
        "callbacks": [{**_spec_view(entry), "state": _plain(entry.get("state"))} for entry in state.get(F.CALLBACKS) or []],
        "ema": None if ema is None else {"decay": ema.get("decay"), "num_updates": ema.get("num_updates")},
        "sde": _spec_view(state.get(F.SDE)),
        "sampler": _spec_view(state.get(F.SAMPLER)),
        "data": _plain(state.get(F.DATA) or {}),
        "unrecorded": dict(state.get(F.UNRECORDED) or {}),
        "lineage": _plain((state.get(F.METADATA) or {}).get("lineage")),
        "run_config": _plain((state.get(F.METADATA) or {}).get("run_config")),
        "metadata_keys": sorted((state.get(F.METADATA) or {}).keys()),
    })
    return report


def _table(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    if len(rows) <= _MAX_TENSOR_ROWS:
        return {"tensors": rows, "tensor_groups": None, "tensor_count": len(rows)}
    return {"tensors": None, "tensor_groups": _group_rows(rows), "tensor_count": len(rows)}


# ---------------------------------------------------------------------------- diff
def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}, "g": [{"lr": 2}]}`` -> ``{"a.b": 1, "g.0.lr": 2}`` (lists of plain values stay whole)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _changes(a: Any, b: Any) -> Dict[str, Tuple[Any, Any]]:
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _weights(path: str) -> Dict[str, torch.Tensor]:
    obj = safe_load(path, map_location="cpu", mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get(F.MODEL_STATE), dict):
        obj = obj[F.MODEL_STATE]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}


def diff(a: PathLike, b: PathLike) -> Dict[str, Any]:
    """What differs between checkpoints ``a`` and ``b``: config, model, keys, shapes, hyperparameters, progress, values."""
    ra, rb = inspect(a), inspect(b)
    for report in (ra, rb):
        if report.get("error"):
            raise CheckpointError(report["path"], f"cannot compare: {report['error']}")
    wa, wb = _weights(os.fspath(a)), _weights(os.fspath(b))
    only_a, only_b = sorted(set(wa) - set(wb)), sorted(set(wb) - set(wa))
    shape_changes, value_changes = [], []
    for key in sorted(set(wa) & set(wb)):
        ta, tb = wa[key], wb[key]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            shape_changes.append({"name": key, "a": [list(ta.shape), str(ta.dtype)], "b": [list(tb.shape), str(tb.dtype)]})
            continue
        if ta.numel() == 0:
            continue
        if ta.is_floating_point() or ta.is_complex():
            delta = (ta.double() - tb.double()).abs().max().item()
        else:
            delta = float((ta.long() - tb.long()).abs().max().item())
        if delta != 0:
            value_changes.append({"name": key, "max_abs_diff": delta})
    value_changes.sort(key=lambda row: -row["max_abs_diff"])

    def pick(report: Dict[str, Any], key: str) -> Any:
        return report.get(key)

    def hyper(report: Dict[str, Any]) -> Dict[str, Any]:
        opt = report.get("optimizer") or {}
        return {"optimizer": {"target": opt.get("target"), **(opt.get("kwargs") or {}),
                              "param_groups": opt.get("param_groups")},
                "scheduler": report.get("scheduler"), "loss_fn": report.get("loss_fn"),
                "train_settings": report.get("train_settings")}

    return {
        "a": ra["path"], "b": rb["path"],
        "kind": (ra.get("kind"), rb.get("kind")),
        "model_target": None if (ra.get("model") or {}).get("target") == (rb.get("model") or {}).get("target")
        else ((ra.get("model") or {}).get("target"), (rb.get("model") or {}).get("target")),
        "model_kwargs": _changes((ra.get("model") or {}).get("kwargs"), (rb.get("model") or {}).get("kwargs")),
        "config": _changes(pick(ra, "run_config"), pick(rb, "run_config")),
        "hyperparameters": _changes(_plain(hyper(ra)), _plain(hyper(rb))),
        "progress": _changes(pick(ra, "progress"), pick(rb, "progress")),
        "data": _changes(pick(ra, "data"), pick(rb, "data")),
        "only_in_a": only_a, "only_in_b": only_b,
        "shape_or_dtype": shape_changes,
        "values": value_changes,
        "identical_tensors": len(set(wa) & set(wb)) - len(shape_changes) - len(value_changes),
    }
