"""The fast path for model weights: build on the meta device, assign the loaded tensors.

When a checkpoint holds every tensor a model has, with the same shapes and dtypes,
initialising the model's weights and then copying the checkpoint over them is wasted
work and a second copy in memory. Instead the model is built on the meta device (no
memory, no initialisation) and ``load_state_dict(assign=True)`` makes the loaded
(memory-mapped) tensors its parameters. Anything that does not fit that pattern (missing
or extra keys, other dtypes, tied weights, non-persistent buffers, a constructor that
cannot run on meta) returns None and the caller takes the ordinary path.

Memory-mapped tensors are private mappings of the file's inode. ``save`` never rewrites a
file in place (it writes a new file and renames it over the old one), so a later save to
the same path cannot change a loaded handler's state; the first optimizer step turns the
mapped pages into the process's own memory page by page (copy on write).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

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
    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()):
        return None
    return module


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` ("cuda" matches the current CUDA device)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or tensor.device.index == torch.cuda.current_device()
    return tensor.device.index == device.index
