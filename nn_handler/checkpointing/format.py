"""The checkpoint format: top-level keys, version, migrations, and how a file is recognised."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from .errors import IncompatibleCheckpointError, NotACheckpointError

FORMAT_NAME = "nn_handler"
FORMAT_VERSION = 1

# Top-level keys of a handler checkpoint.
FORMAT = "format"
VERSION = "format_version"
VERSIONS = "versions"  # library and torch versions that wrote the file
CREATED = "created"
WORLD_SIZE = "world_size"
MODEL = "model"  # {"spec": ..., "model_type": ...}
MODEL_STATE = "model_state_dict"  # canonical keys: no "module." or "_orig_mod."
OPTIMIZER = "optimizer"  # {"spec": ..., "state": ...} or None
SCHEDULER = "scheduler"
GRAD_SCALER = "grad_scaler"
LOSS = "loss_fn"  # {"spec": ...} or None
METRICS = "metrics"  # name -> spec or None
HISTORY = "history"
CALLBACKS = "callbacks"  # [{"spec": ..., "state": ...}] in order
SDE = "sde"
SAMPLER = "sampler"
EMA = "ema"
SETTINGS = "train_settings"
PROGRESS = "progress"  # {"epoch", "global_step", "data_seed"}
DATA = "data"  # {"train": {"dataset": spec or None, "options": {...}}, "val": ...}
RNG = "rng"
UNRECORDED = "unrecorded"  # component -> why it could not be recorded
METADATA = "metadata"  # plain data about the run: run id, lineage, the resolved run config (h.metadata)
SHARDED = "sharded"  # a sharded checkpoint's header only: its shard files and DCP's index (checkpointing.sharded)
SHARDED_VERSION = 2  # a sharded checkpoint's header: older releases, which cannot read its shards, refuse it
STRATEGY = "strategy"  # how the model was distributed when saved: {"strategy": "ddp"} or FSDP's policy

# ---------------------------------------------------------------------------- migrations
# MIGRATIONS[v] upgrades the whole state of a file of format version v to version v + 1.
# ``check_and_migrate`` runs the steps in order (v, v + 1, ... up to FORMAT_VERSION) on every
# load, ``read_info`` and ``initialize_from_checkpoint`` of a handler file, and sets
# ``state[VERSION]`` to v + 1 after each step. A file newer than FORMAT_VERSION is refused
# (upgrade nn_handler); a version below FORMAT_VERSION without its step is refused too
# (IncompatibleCheckpointError naming the missing step): nothing is ever loaded half-upgraded.
#
# What a step ``MIGRATIONS[v] = fn`` must do:
#   - take the state dict exactly as a file of version v holds it (already checksummed, but
#     its content is still a file's: any key may be missing, None, or of the wrong type; the
#     readers after it check types) and return the state of version v + 1 (it may change the
#     dict in place and return it). It is plain data in, plain data out: no imports of the
#     handler, the training loop or callbacks, no component built, no file read or written,
#     no randomness; under DDP every rank runs it on its own copy and all must agree;
#   - handle every file that release could write: optional components absent (None), no
#     position outside an epoch, and so on; for a record it cannot upgrade it raises an
#     exception whose message says which record and why (check_and_migrate turns any error
#     of a step, and a result that is not a dict, into IncompatibleCheckpointError naming the
#     file and the step);
#   - leave tensors as they are (no copies, no dtype or device changes: they may be memory-
#     mapped from the file) and not set ``state[VERSION]`` (check_and_migrate does);
#   - stay forever: a step is never removed or changed once released, since a file of any
#     past version loads through the whole chain.
#
# Bumping the format (FORMAT_VERSION v -> v + 1), in one change:
#   1. the golden files of version v exist in tests/golden/ (``v<v>_*.pth`` and their
#      ``.json``), written by ``tests/golden/make_golden.py`` with the last release that
#      writes v, before any code change; they are committed and never regenerated;
#   2. change the writer (the function that builds the saved state) and the readers
#      (``restore``, ``read_info``, ``inspect``) to the new layout, set FORMAT_VERSION = v + 1,
#      and register MIGRATIONS[v];
#   3. add a test to tests/test_format_golden.py that loads each v-file through the chain
#      and checks what the step changed (the tests of the older golden files keep passing
#      unchanged: they check only what a user sees after loading);
#   4. once released, run make_golden.py with that release to add the ``v<v + 1>_*`` files.
MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {}


def is_handler_state(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get(FORMAT) == FORMAT_NAME and VERSION in obj


def check_and_migrate(obj: Any, path: str) -> Dict[str, Any]:
    """The file's state upgraded to the current version, or the error that says why it cannot be."""
    if not is_handler_state(obj):
        if isinstance(obj, dict) and (MODEL_STATE in obj or _looks_like_state_dict(obj)):
            raise NotACheckpointError(
                path, "this file holds model weights but no handler state (it was not written by NNHandler.save): "
                      "load it with NNHandler.initialize_from_checkpoint(path, model_class=..., **model_kwargs)")
        raise NotACheckpointError(path, f"not an nn_handler checkpoint (a {type(obj).__name__} without "
                                        f"'{FORMAT}': '{FORMAT_NAME}')")
    version = obj[VERSION]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IncompatibleCheckpointError(path, f"invalid format version {short(version)}")
    if version == SHARDED_VERSION and SHARDED in obj:
        return obj  # (a sharded checkpoint's header: the current layout, its shards read by checkpointing.sharded)
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            path, f"format version {version} was written by a newer nn_handler (this one reads up to "
                  f"{FORMAT_VERSION}); upgrade nn_handler to load it")
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise IncompatibleCheckpointError(
                path, f"format version {version} cannot be upgraded to {version + 1}: this nn_handler (format "
                      f"version {FORMAT_VERSION}) has no migration step for it (nn_handler.checkpointing.format."
                      f"MIGRATIONS[{version}] is missing); load it with the release that wrote it")
        try:
            upgraded = step(obj)
        except Exception as exc:  # a step's failure is about this file: name it and the step
            raise IncompatibleCheckpointError(
                path, f"upgrading format version {version} to {version + 1} failed: {type(exc).__name__}: "
                      f"{str(exc)[:300]}") from exc
        if not isinstance(upgraded, dict):
            raise IncompatibleCheckpointError(
                path, f"upgrading format version {version} to {version + 1} gave {short(upgraded)}, not a dict")
        obj = upgraded
        version += 1
        obj[VERSION] = version
    return obj


def _looks_like_state_dict(obj: Dict[Any, Any]) -> bool:
    import torch
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# ---------------------------------------------------------------------------- typed reading
# Everything read from a file is hostile: a forged file can carry any plain value at any key
# with a valid checksum. The readers that pass records on (``read_info``, ``find_latest``) take
# each field through one of these, which raise IncompatibleCheckpointError naming the file and
# the field instead of letting a wrongly typed value surface later as a raw TypeError.
MAX_COUNT = 2 ** 63  # progress counters are int64 everywhere else


def short(value: Any, limit: int = 60) -> str:
    """``value`` as a short phrase for an error message: its type and the start of its repr."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 (a repr of hostile data may fail)
        text = "?"
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{text} (a {type(value).__name__})"


def malformed(path: str, field: str, value: Any, expected: str) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(path, f"malformed record {field}: {short(value)} where {expected} "
                                             f"was expected")


def mapping(value: Any, field: str, path: str, optional: bool = True) -> Dict[Any, Any]:
    """``value`` as a dict (None -> {} when ``optional``)."""
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise malformed(path, field, value, "a mapping")
    return dict(value)


def sequence(value: Any, field: str, path: str, optional: bool = True) -> List[Any]:
    """``value`` as a list (None -> [] when ``optional``)."""
    if value is None and optional:
        return []
    if not isinstance(value, (list, tuple)):
        raise malformed(path, field, value, "a list")
    return list(value)


def count(value: Any, field: str, path: str, optional: bool = True) -> Optional[int]:
    """A non-negative int64 (epochs, steps, world sizes), or None when ``optional``."""
    if value is None and optional:
        return None
    if not is_count(value):
        raise malformed(path, field, value, "a whole number from 0 to 2**63 - 1")
    return value


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def text(value: Any, field: str, path: str, optional: bool = True) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise malformed(path, field, value, "a string")
    return value


def number(value: Any, field: str, path: str, optional: bool = True) -> Optional[float]:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise malformed(path, field, value, "a number")
    return value


def spec(value: Any, field: str, path: str, optional: bool = True) -> Optional[Dict[str, Any]]:
    """A ``{"_target_": "dotted.path", **kwargs}`` spec with string keys, or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("_target_"), str):
        raise malformed(path, field, value, "a spec (a mapping with a string '_target_')")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise malformed(path, f"{field} (key {short(bad[0])})", value, "a spec with string keys")
    return dict(value)


def entry_spec(value: Any, field: str, path: str) -> Optional[Dict[str, Any]]:
    """The spec of a component entry ``{"spec": ..., "state": ...}`` (None: not recorded)."""
    if value is None:
        return None
    return spec(mapping(value, field, path).get("spec"), f"{field}.spec", path)
