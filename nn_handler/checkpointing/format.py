"""The checkpoint format: top-level keys, version, migrations, and how a file is recognised."""
from __future__ import annotations

from typing import Any, Callable, Dict

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

# version -> function upgrading a state of that version to version + 1.
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
    if not isinstance(version, int) or version < 1:
        raise IncompatibleCheckpointError(path, f"invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            path, f"format version {version} was written by a newer nn_handler (this one reads up to "
                  f"{FORMAT_VERSION}); upgrade nn_handler to load it")
    while version < FORMAT_VERSION:
        obj = MIGRATIONS[version](obj)
        version += 1
        obj[VERSION] = version
    return obj


def _looks_like_state_dict(obj: Dict[Any, Any]) -> bool:
    import torch
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
