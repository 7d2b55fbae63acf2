"""The fast path for model weights: build on the meta device, assign the loaded tensors.

When a checkpoint holds every tensor a model has, with the same shapes and dtypes,
initialising the model's weights and then copying the checkpoint over them is wasted
work and a second copy in memory. Instead the model is built on the meta device (no
memory, no initialisation) and ``load_state_dict(assign=True)`` makes the loaded
(memory-mapped) tensors its parameters. Anything that does not fit that pattern (missing
or extra keys, other dtypes, tied weights, non-persistent buffers, a constructor that
cannot run on meta) returns None and the caller takes the ordinary path.

By default every tensor is then in the process's own memory (``copyload`` fills fresh
storages straight from the file), so no state stays tied to the file; ``materialize`` is the
fallback for files the raw copy does not fit. ``NNHandler.load(..., mmap=True)`` keeps the
mapped tensors instead (no copy at all; the first optimizer step copies pages on write):
fastest, for files nothing rewrites in place.
"""
from __future__ import annotations

import ctypes
import mmap as _mmap
import sys
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn


def build_module_from_weights(model_class: Callable[..., nn.Module], model_kwargs: Dict[str, Any],
                              weights: Dict[str, Any], device: torch.device) -> Optional[nn.Module]:
    """``model_class(**model_kwargs)`` holding ``weights`` without an initialise-and-copy, or None."""
    if not isinstance(model_class, type) or not isinstance(weights, dict):
        return None
    try:
        with torch.device("meta"):
            module = model_class(**model_kwargs)
    except Exception:
        return None
    if not isinstance(module, nn.Module):
        return None
    if any(m._non_persistent_buffers_set for m in module.modules()):
        return None  # computed in __init__ and not in the file: they would stay on meta
    named = list(module.named_parameters(remove_duplicate=False))
    if len(named) != len(list(module.parameters())):
        return None  # tied weights: assign would untie them
    own = module.state_dict(keep_vars=True)
    if set(own) != set(weights):
        return None
    for key, tensor in own.items():
        loaded = weights[key]
        if not isinstance(loaded, torch.Tensor) or loaded.shape != tensor.shape or loaded.dtype != tensor.dtype \
                or not _on(loaded, device):
            return None
    module.load_state_dict(weights, strict=True, assign=True)
    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()) or \
            any(_holds_meta(vars(m)) for m in module.modules()):
        return None  # e.g. a tensor kept as a plain attribute: only a real constructor makes it
    return module


def _holds_meta(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if depth > 3 or isinstance(value, nn.Module):
        return False
    if isinstance(value, dict):
        return any(_holds_meta(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_meta(v, depth + 1) for v in value)
    return False


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` ("cuda" matches the current CUDA device)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or tensor.device.index == torch.cuda.current_device()
    return tensor.device.index == device.index


_PAGE = _mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _release(tensor: torch.Tensor) -> None:
    """Drop the (unmodified, file-backed) pages under ``tensor`` from this process's memory."""
    if _libc is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    start = (start + _PAGE - 1) // _PAGE * _PAGE
    end = end // _PAGE * _PAGE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_COMPRESSED = {torch.sparse_csr: ("crow_indices", "col_indices"), torch.sparse_csc: ("ccol_indices", "row_indices"),
               torch.sparse_bsr: ("crow_indices", "col_indices"), torch.sparse_bsc: ("ccol_indices", "row_indices")}


def _sparse_parts(tensor: torch.Tensor) -> Optional[list]:
    """The strided tensors a sparse tensor is made of (indices and values), or None if not sparse."""
    if tensor.layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    if tensor.layout in _COMPRESSED:
        compressed, plain = _COMPRESSED[tensor.layout]
        return [getattr(tensor, compressed)(), getattr(tensor, plain)(), tensor.values()]
    return None


def _rebuilt_sparse(tensor: torch.Tensor, parts: list) -> torch.Tensor:
    """A sparse tensor like ``tensor`` made of ``parts`` (as ``_sparse_parts`` lists them)."""
    if tensor.layout == torch.sparse_coo:
        out = torch.sparse_coo_tensor(parts[0], parts[1], tensor.size(), is_coalesced=tensor.is_coalesced(),
                                      check_invariants=False)
    else:
        out = torch.sparse_compressed_tensor(parts[0], parts[1], parts[2], tensor.size(), layout=tensor.layout,
                                             check_invariants=False)
    return out.requires_grad_(tensor.requires_grad)


def tensors_in(obj: Any) -> List[torch.Tensor]:
    """Every strided tensor in ``obj``'s nested dicts, lists and tuples (a sparse tensor's parts included)."""
    found: List[torch.Tensor] = []
    map_tensors(lambda t: found.append(t) or t, obj)
    return found


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in its nested dicts, lists and tuples.

    A sparse tensor (COO, CSR, CSC, BSR, BSC) is rebuilt from ``fn`` applied to its strided
    parts (indices and values), so ``fn`` only ever sees strided tensors. An ``OrderedDict``
    stays one (with a state_dict's ``_metadata``); a ``torch.Size`` holds no tensors and is kept.
    """
    if isinstance(obj, torch.Tensor):
        parts = _sparse_parts(obj) if obj.layout != torch.strided else None
        if parts is not None:
            return _rebuilt_sparse(obj, [fn(part) for part in parts])
        return fn(obj)
    if isinstance(obj, OrderedDict):
        out = OrderedDict((k, map_tensors(fn, v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(fn, v) for v in obj]
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, v) for v in obj)
    return obj


def _private_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        return tensor
    copy = tensor.clone()
    _release(tensor)
    return copy


def materialize(obj: Any) -> Any:
    """``obj`` with every CPU tensor copied into ordinary memory, each source's mapped pages released."""
    return map_tensors(_private_copy, obj)
