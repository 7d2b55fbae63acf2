"""Weights from other tools' files in, safetensors out.

**In** (``NNHandler.initialize_from_checkpoint``, and ``NNHandler.load(..., model_class=...)``
for a file that holds weights but no handler state):

* a handler file (its ``model_state_dict``), a bare state_dict, ``{"model_state_dict": sd}``;
* a PyTorch Lightning checkpoint (``.ckpt``: the weights under ``state_dict``, every key
  usually carrying the LightningModule's attribute prefix such as ``model.``);
* ``{"state_dict": sd}`` and ``{"model": sd}`` dicts of other tools;
* a safetensors file (the ``safetensors`` package), our own exports included.

Every torch file goes through the one verified, scanned, ``weights_only`` read that handler
files take (``CheckpointFile``: ``io.safe_load`` after ``pickle_scan.scan``), with the
scan's allow-list unchanged: a Lightning file whose ``hyper_parameters`` hold an OmegaConf
config (``save_hyperparameters(cfg)`` with a ``DictConfig``) asks the unpickler for
``omegaconf`` classes and is refused, with a message saying how to re-save it. (Lightning
2.x writes its own ``AttributeDict`` hyperparameters as a plain ``dict``, so a Lightning file
otherwise holds only tensors and plain containers.) Nothing a file names is imported or
called to read its weights.

A safetensors file holds no pickle: an 8-byte header length, a JSON header (each tensor's
dtype, shape and ``data_offsets``; an optional ``__metadata__`` of strings), then the raw
bytes. Before anything is read past the length, the header length is checked against the
file's size (and ``MAX_HEADER``); the header is then parsed and every tensor's offsets are
checked against the data the file holds (inside it, not overlapping, exactly ``numel x
itemsize`` bytes) before the ``safetensors`` package reads them; the tensors are then copied
into the process's own memory (``safetensors`` returns views of a mapping of the file, which
a rewrite in place would change).

Prefixes: with ``prefix="model."`` the weights under that prefix are taken (the prefix
removed, the other keys left out); without one, a Lightning file's keys lose a first
component they all share (``model.``) when the model's own keys do not carry it, and a
``{"state_dict": ...}``/``{"model": ...}`` file's likewise when that makes more keys match
the model. The strict/non-strict check then names missing and unexpected keys as for any file.

**Out**: ``export(handler, path, ema=True)`` (``NNHandler.export``) writes the model's weights
(the EMA weights when the handler has them, unless ``ema=False``) as safetensors, atomically
(a temporary file in the same directory, fsynced, ``os.replace``, the directory fsynced).
``__metadata__`` holds ``format`` (``EXPORT_FORMAT``) and ``nn_handler``: JSON with the format
version, the model's spec (``_target_`` plus kwargs), ``model_type``, which weights were
written, and each tensor's CRC-32C (verified when the file is read here). Reading an export
back without ``model_class`` rebuilds the recorded model only under ``load``'s trust rules
(``specs.resolve`` via the recorded-model check: never a plain import).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import crc32c
import torch
from torch import nn

from . import distributed
from .checkpointing import format as F
from .checkpointing import io as _io
from .checkpointing.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from .checkpointing.st_header import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MAX_HEADER,  # noqa: F401 (the reader's bound, documented above)
    META_KEY,
    export_record,
    read_header,
)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpointing.file import CheckpointFile
    from .handler import NNHandler

PathLike = Union[str, os.PathLike]
logger = logging.getLogger("nn_handler")

_LIGHTNING_VERSION_KEYS = ("pytorch-lightning_version", "lightning_version")

def _safetensors():
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover (an optional extra)
        raise ImportError("reading or writing safetensors files needs the safetensors package: "
                          "pip install 'nn-handler[interop]' (or pip install safetensors)") from exc
    return safetensors


# ---------------------------------------------------------------------------- what a file holds
@dataclass
class FoundWeights:
    """A file's model weights: ``kind`` says where they came from; ``recorded`` is the model the file
    records ({"spec": {...}, "model_type": ...}: a handler file or our export), else None."""

    weights: Dict[str, Any]
    kind: str  # handler | model_state_dict | lightning | state_dict | model | bare | safetensors | export
    recorded: Optional[Dict[str, Any]] = None
    # A handler file whose model class could only be named (a ``__main__`` class): its model entry
    # ({"name", "kwargs"}, read through ``checkpointing.models``' checks) and why it was not recorded.
    unnamed: Optional[Tuple[Dict[str, Any], str]] = None


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` looks like a safetensors file (8-byte header length, then ``{``); reads 9 bytes.

    A missing or unreadable path is not (the ordinary reader then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # A torch zip starts with "PK\x03\x04" (byte 8 is 0), a legacy file with "\x80\x02".
    return len(head) == 9 and head[8:9] == b"{" and head[:2] != b"PK"


def _is_weights(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)
            and any(isinstance(v, torch.Tensor) for v in value.values()))


def holds_weights(obj: Any) -> bool:
    """Whether a (loaded) non-handler file is one of the weight files ``weights_of`` reads."""
    if not isinstance(obj, dict):
        return False
    return (isinstance(obj.get(F.MODEL_STATE), dict) or _is_weights(obj.get("state_dict"))
            or _is_weights(obj.get("model")) or F._looks_like_state_dict(obj))


def weights_of(obj: Any, path: str) -> FoundWeights:
    """The model weights a loaded torch file holds, with where they came from. Raises CheckpointErrors."""
    if F.is_handler_state(obj):  # its format version must be one this library reads
        state = F.check_and_migrate(obj, path)
        weights = F.mapping(state.get(F.MODEL_STATE), F.MODEL_STATE, path, optional=False)
        entry = F.mapping(state.get(F.MODEL), F.MODEL, path)
        spec = F.spec(entry.get("spec"), "model.spec", path)
        recorded = None if spec is None else {
            "spec": spec, "model_type": F.text(entry.get("model_type"), "model.model_type", path)}
        found = FoundWeights(weights, "handler", recorded)
        if spec is None:
            why = (state.get(F.UNRECORDED) or {}).get("model") if isinstance(state.get(F.UNRECORDED), dict) else None
            found.unnamed = (dict(entry), str(why or "unknown reason")[:500])
    elif isinstance(obj, dict) and isinstance(obj.get(F.MODEL_STATE), dict):
        found = FoundWeights(obj[F.MODEL_STATE], "model_state_dict")
    elif isinstance(obj, dict) and _is_weights(obj.get("state_dict")):
        lightning = any(isinstance(obj.get(k), str) for k in _LIGHTNING_VERSION_KEYS)
        found = FoundWeights(dict(obj["state_dict"]), "lightning" if lightning else "state_dict")
    elif isinstance(obj, dict) and _is_weights(obj.get("model")):
        found = FoundWeights(dict(obj["model"]), "model")
    elif isinstance(obj, dict) and F._looks_like_state_dict(obj):
        found = FoundWeights(obj, "bare")
    else:
        keys = f" (its keys: {sorted(map(str, obj))[:8]})" if isinstance(obj, dict) else ""
        raise NotACheckpointError(path, "no model weights found: expected a state_dict, a handler file, a dict with "
                                        f"'{F.MODEL_STATE}', 'state_dict' (a Lightning checkpoint) or 'model', or a "
                                        f"safetensors file{keys}")
    odd = [k for k in found.weights if not isinstance(k, str)]
    if odd:
        raise F.malformed(path, "the model weights", odd[0], "a state_dict with string keys")
    return found


def read_weights(path: Union[PathLike, "CheckpointFile"], device: torch.device,
                 info: "distributed.DistInfo") -> FoundWeights:
    """The weights in ``path`` (any form above) on every rank, onto ``device``, read through one
    verified ``CheckpointFile`` (the caller's, or one opened here). Any rank's failure is raised on every rank."""
    from .checkpointing.file import CheckpointFile, named_after

    ckpt = CheckpointFile.open(path, info)  # raises on every rank if any fails
    try:
        path_str = ckpt.path
        found, error = None, None
        if ckpt.safetensors:
            try:
                found = read_safetensors(path_str, fd=ckpt.fileno())
                if torch.device(device).type != "cpu":
                    found.weights = {k: v.to(device) for k, v in found.weights.items()}
            except (CheckpointError, FileNotFoundError, ImportError) as exc:
                error = named_after(exc, path_str)
            except Exception as exc:  # noqa: BLE001 (the file's fault: one clear error naming it)
                error = CorruptCheckpointError(path_str, f"the safetensors file cannot be read "
                                                         f"({type(exc).__name__}: {str(exc)[:300]})")
            distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
            return found
        try:
            obj = ckpt.state(device)  # verified, scanned, weights_only; agreed on every rank
        except UnsafeCheckpointError as exc:
            if "omegaconf." in exc.message:
                raise UnsafeCheckpointError(path_str, exc.message + "; a Lightning checkpoint whose hyper_parameters "
                                            "are an OmegaConf config needs omegaconf's classes to unpickle, which a "
                                            "file may never ask for: save the hyperparameters as plain data "
                                            "(save_hyperparameters(OmegaConf.to_container(cfg, resolve=True))), or, "
                                            "in an environment where you trust the file, re-save only its weights: "
                                            "torch.save(torch.load(path, weights_only=False)['state_dict'], "
                                            "'weights.pt')") from None
            raise
        try:
            found = weights_of(obj, path_str)
        except Exception as exc:  # noqa: BLE001
            error = exc
        distributed.agree(error, info, f"reading checkpoint {path_str}", path_str)
        return found
    finally:
        if ckpt is not path:
            ckpt.close()


# ---------------------------------------------------------------------------- safetensors in
def _tensor_crc(name: str, tensor: torch.Tensor) -> str:
    """CRC-32C of a tensor's name, dtype, shape and bytes (what an export records per tensor)."""
    value = crc32c.crc32c(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{crc32c.crc32c(data, value):08x}"


def read_safetensors(path: PathLike, fd: Optional[int] = None) -> FoundWeights:
    """The tensors of a safetensors file, checked as the module docstring says, in private memory
    (read through ``fd`` when the caller has the file open)."""
    st = _safetensors()
    path_str = os.fspath(path)
    own = fd is None
    if own:
        _io.check_readable_file(path)
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        entries, metadata, _ = read_header(fd, size, path_str)
        record = export_record(metadata, path_str)
        weights: Dict[str, torch.Tensor] = {}
        # The very file checked above (a save replacing ``path`` meanwhile cannot swap it).
        with st.safe_open(_io.pinned_name(fd, path_str), framework="pt", device="cpu") as f:
            if set(f.keys()) != set(entries):
                raise CorruptCheckpointError(path_str, "the file changed while it was being read")
            for name, (dtype, shape, _, _) in entries.items():
                mapped = f.get_tensor(name)
                if mapped.dtype != dtype or list(mapped.shape) != shape:
                    raise CorruptCheckpointError(path_str, "the file changed while it was being read")
                weights[name] = mapped.clone()  # own memory: not a view of the file's mapping
                del mapped
    finally:
        if own:
            os.close(fd)
    if record is None:
        logger.info("%s carries no checksum (a safetensors file not written by nn_handler): loaded without "
                    "verification", path_str)
        return FoundWeights(weights, "safetensors")
    crcs = record["crc32c"]
    bad = sorted(n for n, t in weights.items() if crcs.get(n) != _tensor_crc(n, t)) + sorted(set(crcs) - set(weights))
    if bad:
        raise CorruptCheckpointError(path_str, f"checksum mismatch in the exported tensors {bad[:5]}: the file was "
                                               f"changed or damaged after it was written")
    recorded = None
    spec = record.get("model")
    if spec is not None:
        spec = F.spec(spec, "model", path_str)
        recorded = {"spec": spec, "model_type": F.text(record.get("model_type"), "model_type", path_str)}
    return FoundWeights(weights, "export", recorded)


# ---------------------------------------------------------------------------- prefixes
def _meta_keys(model_class: Any, model_kwargs: Dict[str, Any]) -> Optional[set]:
    """The state_dict keys ``model_class(**model_kwargs)`` has, built on the meta device; None if it cannot be."""
    try:
        with torch.device("meta"):
            module = model_class(**model_kwargs)
    except Exception:  # noqa: BLE001 (the real build reports its own error)
        return None
    return set(module.state_dict()) if isinstance(module, nn.Module) else None


def select_weights(found: FoundWeights, prefix: Optional[str], model_class: Any, model_kwargs: Dict[str, Any],
                   path: str) -> Dict[str, Any]:
    """The weights to load into the model: under ``prefix`` when given, else with a Lightning
    module's attribute prefix removed (see the module docstring)."""
    weights = found.weights
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"prefix must be a key prefix such as 'model.', got {prefix!r}")
        prefix = prefix if prefix.endswith(".") else prefix + "."
        chosen = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not chosen:
            raise IncompatibleCheckpointError(path, f"no weight key starts with {prefix!r} (the keys start "
                                                    f"{sorted({k.split('.', 1)[0] + '.' for k in weights})[:8]})")
        left = len(weights) - len(chosen)
        if left:
            logger.info("%s: took the %d weights under %r, left out %d others", path, len(chosen), prefix, left)
        return chosen
    if found.kind not in ("lightning", "state_dict", "model") or not all("." in k for k in weights):
        return weights
    firsts = {k.split(".", 1)[0] for k in weights}
    if len(firsts) != 1:
        return weights
    common = firsts.pop() + "."
    stripped = {k[len(common):]: v for k, v in weights.items()}
    own = _meta_keys(model_class, model_kwargs)
    if own is None:  # only a Lightning file's prefix is removed blind (its keys are its attributes')
        return stripped if found.kind == "lightning" else weights
    if len(set(stripped) & own) > len(set(weights) & own):
        logger.info("%s: removed the prefix %r that every weight key carries (pass prefix= to choose)", path, common)
        return stripped
    return weights


# ---------------------------------------------------------------------------- the model to build
def model_for(handler_class: type, found: FoundWeights, model_class: Any, model_kwargs: Dict[str, Any],
              model_type: Any, trusted_packages: Sequence[str], path: str) -> Tuple[Any, Dict[str, Any], Any]:
    """``(model_class, model_kwargs, model_type)``: the caller's, or the model the file records,
    resolved under ``load``'s trust rules and size bound (never a plain import)."""
    from . import specs
    from .checkpointing.models import (
        recorded_model_class,
        recorded_model_problem,
        recorded_unnamed_kwargs,
        unnamed_model_message,
        weight_elements,
    )
    if model_class is not None:
        if not model_kwargs and found.unnamed is not None:  # the kwargs of a class the file could only name
            model_kwargs = recorded_unnamed_kwargs(found.unnamed[0], model_class, path)
            problem = model_kwargs and recorded_model_problem(handler_class, model_class, model_kwargs,
                                                              weight_elements(found.weights))
            if problem:
                raise UnsafeCheckpointError(path, problem)
        return model_class, model_kwargs, model_type
    if found.recorded is None:
        if found.unnamed is not None:
            raise IncompatibleCheckpointError(path, unnamed_model_message(
                found.unnamed[0], found.unnamed[1], "NNHandler.initialize_from_checkpoint(path", "loads its weights"))
        raise IncompatibleCheckpointError(path, "this file does not record its model class: pass model_class= "
                                                "(and its kwargs)")
    try:
        cls, recorded_kwargs = recorded_model_class({"spec": found.recorded["spec"]}, path,
                                                    specs.Trust.of(trusted_packages))
    except specs.SpecError as exc:
        raise IncompatibleCheckpointError(path, f"cannot rebuild the model: {exc}") from None
    if not model_kwargs:  # the file's kwargs: to the model only, within a size bound
        model_kwargs = recorded_kwargs
        problem = recorded_model_problem(handler_class, cls, model_kwargs, weight_elements(found.weights))
        if problem:
            raise UnsafeCheckpointError(path, problem)
    if model_type is None and found.recorded.get("model_type") is not None:
        from .enums import coerce_model_type
        try:
            model_type = coerce_model_type(found.recorded["model_type"])
        except ValueError as exc:
            raise IncompatibleCheckpointError(path, f"the recorded model_type is not one this library knows "
                                                    f"({exc})") from None
    return cls, model_kwargs, model_type


# ---------------------------------------------------------------------------- safetensors out
def _export_tensors(handler: "NNHandler", ema: bool) -> Tuple[Dict[str, torch.Tensor], str]:
    from .checkpointing.models import canonical_state_dict
    use_ema = bool(ema) and handler.ema is not None
    source = handler.ema.module if use_ema else handler.module
    tensors: Dict[str, torch.Tensor] = {}
    for name, value in canonical_state_dict(source.state_dict()).items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot export {name!r}: a {type(value).__name__}, not a tensor (safetensors holds "
                            f"tensors only)")
        if value.layout != torch.strided:
            raise TypeError(f"cannot export {name!r}: a {value.layout} tensor (safetensors holds dense tensors "
                            f"only)")
        # A private, contiguous CPU copy: shared (tied) storages are written once per name.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, ("ema" if use_ema else "live")


def _export_metadata(handler: "NNHandler", tensors: Dict[str, torch.Tensor], which: str) -> Dict[str, str]:
    from .version import __version__
    spec, reason = handler._records.get("model", (None, None))
    if spec is not None:
        try:
            json.dumps(spec, allow_nan=False)
        except (TypeError, ValueError) as exc:
            spec, reason = None, f"its kwargs are not JSON data ({exc})"
    if spec is None:
        handler._warn(f"the model cannot be recorded in the export ({reason}); load it with model_class=")
    record = {"format_version": EXPORT_VERSION, "model": spec, "model_type": str(handler.model_type),
              "weights": which, "versions": {"nn_handler": __version__, "torch": str(torch.__version__)},
              "crc32c": {name: _tensor_crc(name, t) for name, t in tensors.items()}}
    return {"format": EXPORT_FORMAT, META_KEY: json.dumps(record, sort_keys=True)}


def _write_atomic(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], path: Path) -> None:
    _safetensors()
    import safetensors.torch

    def write(fd: int, tmp_name: str) -> None:  # save_file writes through its own descriptor; fd is fsynced
        try:
            safetensors.torch.save_file(tensors, tmp_name, metadata=metadata)
        except Exception as exc:
            if type(exc).__module__.startswith("safetensors"):
                raise OSError(f"writing {path} failed: {exc}; the previous file at that path is intact") from exc
            raise

    _io.atomic_write(path, write)


def export(handler: "NNHandler", path: PathLike, ema: bool = True) -> Path:
    """Write the handler's model weights to ``path`` as safetensors (see the module docstring).

    Under DDP every rank calls it; rank 0 writes and the others wait; an error is raised on every rank.
    """
    path = Path(path)
    info = handler._dist
    error: Optional[BaseException] = None
    if info.is_main:
        try:
            tensors, which = _export_tensors(handler, ema)
            _write_atomic(tensors, _export_metadata(handler, tensors, which), path)
            logger.info("exported the %s weights (%d tensors) to %s", which, len(tensors), path)
        except Exception as exc:  # noqa: BLE001 (raised on every rank below)
            error = exc
    distributed.agree(error, info, f"exporting {path}", os.fspath(path))
    return path
