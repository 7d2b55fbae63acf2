"""What a checkpoint records, without building anything; and what differs between two.

``inspect(path)`` reads the file memory-mapped (tensor data is not read, only the
checksum pass touches every byte) and reports: integrity, versions, model, a table of
tensors, optimizer, scheduler, progress, history, callbacks, EMA, SDE, sampler, data,
lineage and the run config. It never raises: a damaged file is reported (``integrity``),
and so is every record of a wrong type (``problems``: a file can be forged with a valid
checksum and any plain value at any key), next to what could be read.

``diff(a, b)`` reads both files through the verified reader (``CheckpointFile``): a damaged
file is refused with CorruptCheckpointError naming it, never compared (a flipped bit would
otherwise show as a weight change). It then compares the two reports and the tensors present
in both.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .. import specs
from . import format as F
from . import sharded
from .errors import CheckpointError, CorruptCheckpointError, NotACheckpointError
from .file import CheckpointFile, broken_header_is_damage
from .io import PathLike, file_checksum
from .st_header import META_KEY, export_record, read_header

_MAX_TENSOR_ROWS = 40  # above this, the table is summarised by module prefix
# Bounds on what a report repeats of a file's plain records (a report is for reading).
_MAX_ITEMS = 10_000  # entries shown per list or dict
_MAX_DEPTH = 32  # nesting levels shown
_MAX_TEXT = 10_000  # characters shown per string
_MAX_PROBLEMS = 50
_COMPARE_CHUNK = 1 << 22  # elements compared at a time by diff (bounds its extra memory)


# ---------------------------------------------------------------------------- plain, JSON-friendly values
def _tensor_text(value: torch.Tensor) -> Any:
    """A one-element tensor as its number, any other as ``tensor[shape] dtype``."""
    try:
        if value.layout == torch.strided and value.numel() == 1 and not value.is_meta:
            return _plain(value.item())
        layout = "" if value.layout == torch.strided else f" {str(value.layout).replace('torch.', '')}"
        return f"tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}{layout}"
    except Exception:  # noqa: BLE001 (a tensor of a kind that cannot be described)
        return "tensor"


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, torch.Tensor):
        return str(_tensor_text(key))
    try:
        return str(key)[:_MAX_TEXT]
    except Exception:  # noqa: BLE001
        return f"<{type(key).__name__}>"


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-friendly: string keys, tensors as short descriptions, floats as floats (NaN as None), bounded."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, str):
        return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + f"... ({len(value)} characters)"
    if isinstance(value, torch.Tensor):
        return _tensor_text(value)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth >= _MAX_DEPTH:
        return f"<nested deeper than {_MAX_DEPTH} levels>"
    if isinstance(value, Mapping):
        out: Dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i == _MAX_ITEMS:
                out["..."] = f"{len(value) - _MAX_ITEMS} more entries"
                break
            out[_key(k)] = _plain(v, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        shown = [_plain(v, depth + 1) for v in items[:_MAX_ITEMS]]
        return shown + ([f"... {len(items) - _MAX_ITEMS} more"] if len(items) > _MAX_ITEMS else [])
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    return f"<{type(value).__name__}>"


def _kind(value: Any) -> str:
    return F.short(value, limit=40)


class _Reader:
    """Typed access to a hostile record: a wrongly typed field reads as empty and is noted in ``problems``."""

    def __init__(self) -> None:
        self.problems: List[str] = []
        self.more = 0

    def note(self, field: str, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{field}: {text}")
        else:
            self.more += 1

    def mapping(self, value: Any, field: str) -> Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.note(field, f"{_kind(value)}, not a mapping")
            return {}
        return value

    def sequence(self, value: Any, field: str) -> List[Any]:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.note(field, f"{_kind(value)}, not a list")
            return []
        return list(value)

    def spec(self, spec: Any, field: str) -> Optional[Dict[str, Any]]:
        """``{"target", "kwargs"}`` of a ``{"_target_": ...}`` spec; None (noted unless absent) otherwise."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping) or not isinstance(spec.get(specs.TARGET), str):
            self.note(field, f"{_kind(spec)}, not a spec (a mapping with a string {specs.TARGET!r})")
            return None
        return {"target": _plain(spec[specs.TARGET]),
                "kwargs": _plain({k: v for k, v in spec.items() if k != specs.TARGET})}

    def entry(self, entry: Any, field: str) -> Tuple[Optional[Dict[str, Any]], Mapping]:
        """A component entry ``{"spec": ..., "state": ...}``: (its spec view, the entry)."""
        entry = self.mapping(entry, field)
        return self.spec(entry.get("spec"), f"{field}.spec"), entry

    def guarded(self, field: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """``fn()``; a record shaped in a way not foreseen above is noted, never raised."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            self.note(field, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
            return default

    def all_problems(self) -> List[str]:
        return self.problems + ([f"... and {self.more} more"] if self.more else [])


# ---------------------------------------------------------------------------- the report
def _tensor_rows(weights: Mapping[Any, Any]) -> List[Dict[str, Any]]:
    rows = []
    for name, value in weights.items():
        if isinstance(value, torch.Tensor):
            try:
                rows.append({"name": _key(name), "shape": [int(d) for d in value.shape],
                             "dtype": str(value.dtype).replace("torch.", ""),
                             "numel": int(value.numel()), "bytes": int(value.numel() * value.element_size())})
            except Exception:  # noqa: BLE001 (a tensor of a kind that cannot be described)
                rows.append({"name": _key(name), "shape": [], "dtype": "?", "numel": 0, "bytes": 0})
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


def _table(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    if len(rows) <= _MAX_TENSOR_ROWS:
        return {"tensors": rows, "tensor_groups": None, "tensor_count": len(rows)}
    return {"tensors": None, "tensor_groups": _group_rows(rows), "tensor_count": len(rows)}


def _optimizer_view(r: _Reader, entry: Any) -> Optional[Dict[str, Any]]:
    view, entry = r.entry(entry, F.OPTIMIZER)
    if view is None:
        return None
    state = r.mapping(entry.get("state"), "optimizer.state")
    groups = []
    for i, group in enumerate(r.sequence(state.get("param_groups"), "optimizer.state.param_groups")):
        field = f"optimizer.state.param_groups[{i}]"
        if not isinstance(group, Mapping):
            r.note(field, f"{_kind(group)}, not a mapping")
            continue
        params = group.get("params")
        if not isinstance(params, (list, tuple)):
            r.note(f"{field}.params", f"{_kind(params)}, not a list")
        groups.append({**_plain({k: v for k, v in group.items() if k != "params"}),
                       "num_params": len(params) if isinstance(params, (list, tuple)) else None})
    view["param_groups"] = groups
    view["state_entries"] = len(r.mapping(state.get("state"), "optimizer.state.state"))
    return view


def _scheduler_view(r: _Reader, entry: Any) -> Optional[Dict[str, Any]]:
    view, entry = r.entry(entry, F.SCHEDULER)
    if view is None:
        return None
    state = r.mapping(entry.get("state"), "scheduler.state")
    view["state"] = _plain({k: v for k, v in state.items() if isinstance(k, str) and (
        isinstance(v, (int, float, str, bool, list)) and not k.startswith("_") or k == "_last_lr")})
    return view


def _progress_view(r: _Reader, progress: Any) -> Dict[str, Any]:
    progress = r.mapping(progress, F.PROGRESS)
    for key in ("epoch", "global_step"):
        if key in progress and not F.is_count(progress[key]):
            r.note(f"progress.{key}", f"{_kind(progress[key])}, not a whole number from 0 to 2**63 - 1")
    return {_key(k): _plain(v) for k, v in progress.items() if k != "data_seed"}


def _history_view(r: _Reader, history: Any) -> Dict[str, Any]:
    history = r.mapping(history, F.HISTORY)
    last_metrics: Dict[str, Any] = {}
    for side in ("train", "val"):
        for name, values in r.mapping(history.get(f"{side}_metrics"), f"history.{side}_metrics").items():
            last_metrics[f"{side}_{_key(name)}"] = _plain(values[-1]) if isinstance(values, list) and values else None
    return {"epochs": len(r.sequence(history.get("train_losses"), "history.train_losses")),
            "last": {_key(k): (_plain(v[-1]) if v else None) for k, v in history.items() if isinstance(v, list)},
            "last_metrics": last_metrics}


def _callbacks_view(r: _Reader, callbacks: Any) -> List[Dict[str, Any]]:
    out = []
    for i, entry in enumerate(r.sequence(callbacks, F.CALLBACKS)):
        view, entry = r.entry(entry, f"callbacks[{i}]")
        out.append({**(view or {"target": None, "kwargs": None}), "state": _plain(entry.get("state"))})
    return out


def _ema_view(r: _Reader, ema: Any) -> Optional[Dict[str, Any]]:
    if ema is None:
        return None
    if not isinstance(ema, Mapping):
        r.note(F.EMA, f"{_kind(ema)}, not a mapping")
        return None
    return {"decay": _plain(ema.get("decay")), "num_updates": _plain(ema.get("num_updates"))}


def _metrics_view(r: _Reader, metrics: Any) -> Dict[str, Any]:
    out = {}
    for name, spec in r.mapping(metrics, F.METRICS).items():
        view = r.spec(spec, f"metrics.{_key(name)}")
        out[_key(name)] = None if view is None else view["target"]
    return out


def _handler_view(state: Mapping[Any, Any]) -> Dict[str, Any]:
    """The report's fields of a handler checkpoint: each field read for its type, never raising."""
    r = _Reader()
    g = r.guarded
    weights = g(F.MODEL_STATE, lambda: r.mapping(state.get(F.MODEL_STATE), F.MODEL_STATE), {})
    rows = g(F.MODEL_STATE, lambda: _tensor_rows(weights), [])
    model = g(F.MODEL, lambda: r.mapping(state.get(F.MODEL), F.MODEL), {})
    metadata = g(F.METADATA, lambda: r.mapping(state.get(F.METADATA), F.METADATA), {})
    report = {
        "kind": "handler",
        "format_version": _plain(state.get(F.VERSION)),
        "versions": g(F.VERSIONS, lambda: _plain(r.mapping(state.get(F.VERSIONS), F.VERSIONS)), {}),
        "created": _plain(state.get(F.CREATED)),
        "world_size": _plain(state.get(F.WORLD_SIZE)),
        "model": g(F.MODEL, lambda: {**(r.spec(model.get("spec"), "model.spec") or {"target": None, "kwargs": None}),
                                     "model_type": _plain(model.get("model_type"))},
                   {"target": None, "kwargs": None, "model_type": None}),
        "parameters": sum(row["numel"] for row in rows),
        "tensor_bytes": sum(row["bytes"] for row in rows),
        **_table(rows),
        "optimizer": g(F.OPTIMIZER, lambda: _optimizer_view(r, state.get(F.OPTIMIZER))),
        "scheduler": g(F.SCHEDULER, lambda: _scheduler_view(r, state.get(F.SCHEDULER))),
        "loss_fn": g(F.LOSS, lambda: r.entry(state.get(F.LOSS), F.LOSS)[0]),
        "metrics": g(F.METRICS, lambda: _metrics_view(r, state.get(F.METRICS)), {}),
        "progress": g(F.PROGRESS, lambda: _progress_view(r, state.get(F.PROGRESS)), {}),
        "train_settings": g(F.SETTINGS, lambda: _plain(r.mapping(state.get(F.SETTINGS), F.SETTINGS)), {}),
        "history": g(F.HISTORY, lambda: _history_view(r, state.get(F.HISTORY)),
                     {"epochs": 0, "last": {}, "last_metrics": {}}),
        "callbacks": g(F.CALLBACKS, lambda: _callbacks_view(r, state.get(F.CALLBACKS)), []),
        "ema": g(F.EMA, lambda: _ema_view(r, state.get(F.EMA))),
        "sde": g(F.SDE, lambda: r.entry(state.get(F.SDE), F.SDE)[0]),
        "sampler": g(F.SAMPLER, lambda: r.entry(state.get(F.SAMPLER), F.SAMPLER)[0]),
        "data": g(F.DATA, lambda: _plain(r.mapping(state.get(F.DATA), F.DATA)), {}),
        "unrecorded": g(F.UNRECORDED, lambda: _plain(r.mapping(state.get(F.UNRECORDED), F.UNRECORDED)), {}),
        "lineage": _plain(metadata.get("lineage")),
        "run_config": _plain(metadata.get("run_config")),
        "metadata_keys": sorted(_key(k) for k in metadata),
    }
    report["problems"] = r.all_problems()
    return report


def _contents(obj: Any) -> Dict[str, Any]:
    """The report's fields for a loaded file: a handler checkpoint, bare weights, or neither."""
    if F.is_handler_state(obj):
        return _handler_view(obj)
    weights = obj.get(F.MODEL_STATE) if isinstance(obj, dict) and isinstance(obj.get(F.MODEL_STATE), dict) else obj
    if isinstance(weights, dict) and any(isinstance(v, torch.Tensor) for v in weights.values()):
        rows = _tensor_rows(weights)
        if not isinstance(obj, dict):
            other: List[str] = []
        elif weights is obj:
            other = sorted(_key(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        else:
            other = sorted(_key(k) for k in obj if k != F.MODEL_STATE)
        return {"kind": "weights", "parameters": sum(r["numel"] for r in rows),
                "tensor_bytes": sum(r["bytes"] for r in rows), **_table(rows), "other_keys": other}
    return {"kind": "unknown", "error": f"not a checkpoint with model weights (a {type(obj).__name__})"}


# ---------------------------------------------------------------------------- safetensors
_ST_OWN_KEYS = ("format", META_KEY)  # the metadata keys an export's record takes


def _safetensors_view(ckpt: CheckpointFile) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The report's fields for a safetensors file, from its checked header alone (no tensor data is
    read): the export's record (spec, model type, which weights, versions) when it is ours, each
    tensor's name, shape, dtype and size, and the other metadata. A header that does not hold
    together raises CorruptCheckpointError (an export's record of a newer version: Incompatible).
    Returns the report's fields and every tensor's row."""
    fd = ckpt.fileno()
    entries, metadata, data_start = read_header(fd, os.fstat(fd).st_size, ckpt.path)
    record = export_record(metadata, ckpt.path)
    r = _Reader()
    rows = [{"name": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
             "numel": math.prod(shape), "bytes": end - begin} for name, (dtype, shape, begin, end) in entries.items()]
    report: Dict[str, Any] = {"kind": "export" if record is not None else "safetensors",
                              "format_version": None, "versions": {}, "model": None, "weights": None}
    if record is not None:
        spec = r.spec(record.get("model"), "model")
        model_type = record.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            r.note("model_type", f"{_kind(model_type)}, not a string")
            model_type = None
        report.update(format_version=record.get("format_version"),
                      versions=_plain(r.mapping(record.get("versions"), "versions")),
                      model=None if spec is None else {**spec, "model_type": _plain(model_type)},
                      weights=_plain(record.get("weights")))
    report.update({"parameters": sum(row["numel"] for row in rows), "tensor_bytes": sum(row["bytes"] for row in rows),
                   "header_bytes": data_start - 8, **_table(rows),
                   "metadata": _plain({k: v for k, v in metadata.items()
                                       if record is None or k not in _ST_OWN_KEYS}),
                   "problems": r.all_problems()})
    return report, rows


def safetensors_info(ckpt: CheckpointFile) -> Dict[str, Any]:
    """``read_info`` of a safetensors file: ``kind`` ("export" or "safetensors"), ``format_version``,
    ``versions``, ``model`` ({"target", "kwargs", "model_type"} or None), ``weights`` ("ema"/"live"
    or None), ``parameters``, ``tensor_bytes``, ``header_bytes``, ``tensors`` (every tensor's name,
    shape, dtype, numel, bytes), ``metadata`` (the file's other string metadata). Reads the header
    only, bounded by the file's size; a field of the wrong type raises IncompatibleCheckpointError."""
    from .errors import IncompatibleCheckpointError
    view, rows = _safetensors_view(ckpt)
    if view["problems"]:
        raise IncompatibleCheckpointError(ckpt.path, f"the export's record is malformed: {view['problems'][0]}")
    info = {k: v for k, v in view.items() if k not in ("problems", "tensor_groups", "tensor_count")}
    info["tensors"] = rows
    return info


def _safetensors_report(ckpt: CheckpointFile) -> Dict[str, Any]:
    """``inspect``'s fields for a safetensors file: never raises (a bad header is reported as damage)."""
    try:
        view, _ = _safetensors_view(ckpt)
    except CorruptCheckpointError as exc:
        return {"integrity": {"verified": False, "damaged": True, "reason": str(exc)}, "error": str(exc)}
    except CheckpointError as exc:
        return {"integrity": {"verified": False, "checksum": None}, "error": str(exc)}
    reason = ("an nn_handler export: its per-tensor CRC-32C checksums are checked when it is loaded (inspect reads "
              "no tensor data)" if view["kind"] == "export"
              else "a safetensors file not written by nn_handler: it carries no checksum")
    return {"integrity": {"verified": False, "checksum": None, "reason": reason}, **view}


def _has_trailer(path: str) -> bool:
    """Whether the file ends with this library's checksum record (only ``atomic_save`` writes one)."""
    try:
        return file_checksum(path) is not None
    except Exception:  # noqa: BLE001
        return False


def _integrity(ckpt: Optional[CheckpointFile], path: str, opening: Optional[CheckpointError]) -> Dict[str, Any]:
    """Whether ``ckpt``'s checksum holds (``opening``: why it could not even be opened)."""
    integrity: Dict[str, Any] = {}
    try:
        if opening is not None:
            raise opening
        ckpt.verify()
        integrity["verified"] = ckpt.verified
        integrity["checksum"] = ckpt.checksum if ckpt.verified else None
        if not ckpt.verified:
            integrity["reason"] = "the file carries no checksum (not written by nn_handler)"
    except NotACheckpointError as exc:
        if _has_trailer(path):  # its header is broken but its end says atomic_save wrote it: damage
            integrity.update(verified=False, damaged=True,
                             reason=f"{exc.message}, although it carries an nn_handler checksum record: damaged")
        else:
            integrity.update(verified=False, damaged=True, reason=str(exc))
    except CheckpointError as exc:
        integrity.update(verified=False, damaged=True, reason=str(exc))
    return integrity


def inspect(path: Union[PathLike, CheckpointFile]) -> Dict[str, Any]:
    """A report of what ``path`` records, as plain JSON-friendly data. Never raises for a damaged file.

    ``integrity`` says whether the checksum holds; ``error`` why the contents cannot be read at
    all; ``problems`` (handler files) lists each record of a wrong type, shown as empty. The
    file is opened and checksummed once (given an open ``CheckpointFile``, that one).
    """
    given = path if isinstance(path, CheckpointFile) else None
    path_str = given.path if given is not None else os.fspath(path)
    report: Dict[str, Any] = {"path": path_str}
    try:
        report["file_bytes"] = os.path.getsize(path_str)
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    ckpt, opening = given, None
    try:
        if ckpt is None:
            try:
                ckpt = CheckpointFile.open(path_str)
            except CheckpointError as exc:
                opening = exc
        if ckpt is not None and ckpt.safetensors:  # its header alone, checked against the file's size
            report.update(_safetensors_report(ckpt))
            return report
        integrity = _integrity(ckpt, path_str, opening)
        report["integrity"] = integrity
        try:
            if ckpt is None:
                raise opening
            obj = ckpt.contents()
            if ckpt.sharded:  # its weights described from its index (meta tensors: no shard is read)
                obj = sharded.with_weights(obj, ckpt.path, meta=True)
        except CheckpointError as exc:
            report["error"] = str(exc)
            return report
        report.update(_contents(obj))
        if report["kind"] == "handler" and integrity.get("verified") is False and not integrity.get("damaged"):
            integrity.update(damaged=True, reason="an nn_handler checkpoint whose checksum record is missing or "
                                                  "damaged")
    except Exception as exc:  # noqa: BLE001 (the promise: a report, never a raw error)
        report["error"] = f"cannot inspect {path_str}: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        if ckpt is not None and ckpt is not given:
            ckpt.close()
    return report


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


def _verified(path: Union[str, CheckpointFile]) -> Tuple[str, Any]:
    """``(path, contents)`` of a verified ``path`` (tensors mapped): a damaged file raises CorruptCheckpointError."""
    path_str = path.path if isinstance(path, CheckpointFile) else os.fspath(path)
    try:
        ckpt = CheckpointFile.open(path)
        try:
            ckpt.verify()
            if ckpt.sharded:  # its weights read from its (verified) shards
                return path_str, sharded.with_weights(ckpt.contents(), ckpt.path, meta=False)
            return path_str, ckpt.contents()
        finally:
            if ckpt is not path:
                ckpt.close()
    except NotACheckpointError as exc:
        raise broken_header_is_damage(path_str, exc) from None
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 (what the reader did not foresee is still about this file)
        raise CheckpointError(path_str, f"cannot read it ({type(exc).__name__}: {str(exc)[:300]})") from None


def _weights(obj: Any) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get(F.MODEL_STATE), dict):
        obj = obj[F.MODEL_STATE]
    return {_key(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}


def _max_abs_diff(ta: torch.Tensor, tb: torch.Tensor) -> float:
    """The largest absolute difference, compared a chunk at a time (NaN in both places counts as equal)."""
    if ta.layout != torch.strided or tb.layout != torch.strided:
        ta, tb = ta.to_dense(), tb.to_dense()
    fa, fb = ta.reshape(-1), tb.reshape(-1)
    if ta.is_complex():
        wide = torch.complex128
    elif ta.is_floating_point():
        wide = torch.float64
    else:
        wide = torch.int64
    largest = 0.0
    for start in range(0, fa.numel(), _COMPARE_CHUNK):
        x, y = fa[start:start + _COMPARE_CHUNK].to(wide), fb[start:start + _COMPARE_CHUNK].to(wide)
        delta = (x - y).abs()
        if wide != torch.int64:
            both = torch.isnan(x) & torch.isnan(y)
            delta = torch.where(both, torch.zeros_like(delta), torch.nan_to_num(delta, nan=math.inf))
        largest = max(largest, float(delta.max().item()))
    return largest


def _report_of(path: str, obj: Any) -> Dict[str, Any]:
    checksum = file_checksum(path) if _has_trailer(path) else None
    report: Dict[str, Any] = {"path": path, "integrity": {"verified": checksum is not None, "checksum": checksum}}
    report.update(_contents(obj))
    return report


def diff(a: PathLike, b: PathLike) -> Dict[str, Any]:
    """What differs between checkpoints ``a`` and ``b``: config, model, keys, shapes, hyperparameters, progress, values.

    Both files are read through the verified reader: a damaged one raises CorruptCheckpointError
    naming it; a file that holds no model weights raises NotACheckpointError.
    """
    pa, oa = _verified(a)
    pb, ob = _verified(b)
    ra, rb = _report_of(pa, oa), _report_of(pb, ob)
    for report in (ra, rb):
        if report.get("error"):
            raise NotACheckpointError(report["path"], f"cannot compare: {report['error']}")
    wa, wb = _weights(oa), _weights(ob)
    only_a, only_b = sorted(set(wa) - set(wb)), sorted(set(wb) - set(wa))
    shape_changes, value_changes, not_compared = [], [], []
    for key in sorted(set(wa) & set(wb)):
        ta, tb = wa[key], wb[key]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            shape_changes.append({"name": key, "a": [list(ta.shape), str(ta.dtype)], "b": [list(tb.shape), str(tb.dtype)]})
            continue
        if ta.numel() == 0:
            continue
        try:
            delta = _max_abs_diff(ta, tb)
        except Exception as exc:  # noqa: BLE001 (a tensor kind that cannot be subtracted)
            not_compared.append({"name": key, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        if delta != 0:
            value_changes.append({"name": key, "max_abs_diff": delta})
    value_changes.sort(key=lambda row: -row["max_abs_diff"])

    def hyper(report: Dict[str, Any]) -> Dict[str, Any]:
        opt = report.get("optimizer") or {}
        return {"optimizer": {"target": opt.get("target"), **(opt.get("kwargs") or {}),
                              "param_groups": opt.get("param_groups")},
                "scheduler": report.get("scheduler"), "loss_fn": report.get("loss_fn"),
                "train_settings": report.get("train_settings")}

    model_a, model_b = ra.get("model") or {}, rb.get("model") or {}
    return {
        "a": pa, "b": pb,
        "kind": (ra.get("kind"), rb.get("kind")),
        "model_target": None if model_a.get("target") == model_b.get("target")
        else (model_a.get("target"), model_b.get("target")),
        "model_kwargs": _changes(model_a.get("kwargs"), model_b.get("kwargs")),
        "config": _changes(ra.get("run_config"), rb.get("run_config")),
        "hyperparameters": _changes(hyper(ra), hyper(rb)),
        "progress": _changes(ra.get("progress"), rb.get("progress")),
        "data": _changes(ra.get("data"), rb.get("data")),
        "only_in_a": only_a, "only_in_b": only_b,
        "shape_or_dtype": shape_changes,
        "values": value_changes,
        "not_compared": not_compared,
        "identical_tensors": len(set(wa) & set(wb)) - len(shape_changes) - len(value_changes) - len(not_compared),
    }
