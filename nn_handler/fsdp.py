"""FSDP2: a model sharded with ``torch.distributed.fsdp.fully_shard``, and its state as full or sharded tensors.

``NNHandler(..., strategy="fsdp")`` (or ``strategy=FSDP(wrap=[Block], param_dtype="bfloat16")``)
shards the model over the process group: every module the policy picks gets its own shard group
(``fully_shard``), then the root; the optimizer is built on the sharded parameters, so its state
is sharded too. Without a process group the strategy is a no-op (one process holds everything).

The state of a sharded model comes in two forms, both through ``torch.distributed.checkpoint.
state_dict``: *full* (every tensor whole, on rank 0, for a single-file checkpoint, gathered by a
collective every rank joins) and *sharded* (each rank's DTensor shards, for a DCP directory).
A single file's optimizer state keeps torch's own layout (integer parameter ids in the order of
the model's parameters), whatever the strategy that wrote it, so files move freely between
one process, DDP and FSDP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class FSDP:
    """How to shard a model with FSDP2.

    ``wrap``: module classes (or their names) that each get their own shard group (transformer
    blocks, say); without it every module whose not-yet-wrapped parameters reach ``min_params``
    gets one, bottom-up. ``param_dtype``/``reduce_dtype`` (``"bfloat16"``, ...) turn on FSDP's
    ``MixedPrecisionPolicy``; ``reshard_after_forward=False`` keeps the gathered parameters from the
    forward to the backward (more memory, less communication).
    """

    wrap: Tuple[Union[str, type], ...] = ()
    min_params: int = 100_000
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "wrap", tuple(self.wrap or ()))
        if int(self.min_params) < 1:
            raise ValueError(f"FSDP min_params must be >= 1, got {self.min_params!r}")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if isinstance(value, torch.dtype):
                object.__setattr__(self, name, str(value).replace("torch.", ""))
            elif value is not None and value not in _DTYPES:
                raise ValueError(f"FSDP {name} must be one of {sorted(_DTYPES)}, got {value!r}")

    def record(self) -> Dict[str, Any]:
        """Plain data for a checkpoint's header."""
        return {"strategy": "fsdp", "wrap": [w if isinstance(w, str) else f"{w.__module__}.{w.__qualname__}"
                                             for w in self.wrap],
                "min_params": int(self.min_params), "param_dtype": self.param_dtype,
                "reduce_dtype": self.reduce_dtype, "reshard_after_forward": bool(self.reshard_after_forward)}


def coerce_strategy(strategy: Any) -> Optional[FSDP]:
    """None or "ddp" -> None (replicated); "fsdp" -> the default FSDP policy; an FSDP or a mapping of its fields."""
    if strategy is None or (isinstance(strategy, str) and strategy.lower() in ("ddp", "none", "")):
        return None
    if isinstance(strategy, FSDP):
        return strategy
    if isinstance(strategy, str) and strategy.lower() == "fsdp":
        return FSDP()
    if isinstance(strategy, Mapping):
        options = {k: v for k, v in strategy.items() if k not in ("name", "strategy")}
        name = str(strategy.get("name", strategy.get("strategy", "fsdp"))).lower()
        if name == "ddp":
            return None
        if name != "fsdp":
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {name!r}")
        unknown = sorted(set(options) - {"wrap", "min_params", "param_dtype", "reduce_dtype", "reshard_after_forward"})
        if unknown:
            raise ValueError(f"unknown FSDP option(s) {unknown}; the options are wrap, min_params, param_dtype, "
                             f"reduce_dtype, reshard_after_forward")
        return FSDP(**options)
    raise ValueError(f"strategy must be 'ddp', 'fsdp' or an nn_handler.FSDP, got {strategy!r}")


def _matches(module: nn.Module, wrap: Sequence[Union[str, type]]) -> bool:
    cls = type(module)
    for w in wrap:
        if isinstance(w, type) and isinstance(module, w):
            return True
        if isinstance(w, str) and w in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"):
            return True
    return False


def _targets(root: nn.Module, policy: FSDP) -> List[nn.Module]:
    """The submodules (not the root) that get their own shard group, children before parents."""
    chosen: List[nn.Module] = []
    if policy.wrap:
        for module in root.modules():
            if module is not root and _matches(module, policy.wrap):
                chosen.append(module)
        return list(reversed(chosen))  # modules() is pre-order: reversed, children come first

    def visit(module: nn.Module) -> int:  # parameters of the subtree not yet in a shard group
        pending = sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            pending += visit(child)
        if module is not root and pending >= policy.min_params:
            chosen.append(module)
            return 0
        return pending

    visit(root)
    return chosen


def shard(module: nn.Module, policy: FSDP, device: torch.device, world_size: int) -> nn.Module:
    """``module`` sharded in place with ``fully_shard`` over a 1-D mesh of the process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (int(world_size),))
    options: Dict[str, Any] = {"mesh": mesh, "reshard_after_forward": bool(policy.reshard_after_forward)}
    if policy.param_dtype or policy.reduce_dtype:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES.get(policy.param_dtype or ""),
                                                    reduce_dtype=_DTYPES.get(policy.reduce_dtype or ""))
    for sub in _targets(module, policy):
        fully_shard(sub, **options)
    fully_shard(module, **options)
    return module


def is_sharded(module: Any) -> bool:
    """``module`` is an FSDP2 module (its parameters are DTensor shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (a torch without FSDP2)
        return False
    return isinstance(module, FSDPModule)


def _options(full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


# ---------------------------------------------------------------------------- model
def model_state(module: nn.Module, full: bool) -> Dict[str, torch.Tensor]:
    """The model's state: whole tensors on rank 0 (``full``; {} on the other ranks) or this rank's
    shards as DTensors. Collective for a sharded model: every rank calls it."""
    if not is_sharded(module) and full:
        return dict(module.state_dict())
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_options(full))


def load_model_state(module: nn.Module, state: Mapping[str, torch.Tensor], full: bool, strict: bool = True) -> Any:
    """Put ``state`` (whole tensors on every rank when ``full``, else shards) into ``module``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    options = StateDictOptions(full_state_dict=full, strict=strict)
    return set_model_state_dict(module, dict(state), options=options)


# ---------------------------------------------------------------------------- optimizer
def _names(module: nn.Module) -> List[str]:
    return [name for name, _ in module.named_parameters()]


def by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> Dict[str, Any]:
    """torch's optimizer state (parameter ids) keyed by parameter names, as ``set_optimizer_state_dict`` takes it.

    Ids are given in order over the parameter groups (``Optimizer.state_dict``'s rule); id ``i`` of
    the optimizer ``optimizer`` is the parameter it holds at that place, named by ``module``."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, ids = [], {}
    for group in state["param_groups"]:
        fqns = []
        for pid in group["params"]:
            if not isinstance(pid, int) or not 0 <= pid < len(order):
                raise ValueError(f"the optimizer state names parameter {pid!r}, but the model has {len(order)}")
            fqns.append(order[pid])
            ids[pid] = order[pid]
        groups.append({**group, "params": fqns})
    per_param = {}
    for pid, value in state["state"].items():
        if pid not in ids:
            raise ValueError(f"the optimizer state holds parameter {pid!r}, which no parameter group lists")
        per_param[ids[pid]] = value
    return {"state": per_param, "param_groups": groups}


def by_id(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of ``by_name``: names become ids in order over the parameter groups."""
    ids: Dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for fqn in group["params"]:
            ids.setdefault(fqn, len(ids))
            params.append(ids[fqn])
        groups.append({**group, "params": params})
    return {"state": {ids[fqn]: value for fqn, value in state["state"].items()}, "param_groups": groups}


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> Dict[str, Any]:
    """The optimizer's state: for a single file torch's own layout with whole tensors (rank 0; {} elsewhere),
    else keyed by parameter name with this rank's shards. Collective for a sharded model."""
    if full and not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(module, optimizer, options=_options(full))
    if not full:
        return state
    if not state:  # (not rank 0)
        return {}
    return by_id(state)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                         full: bool) -> None:
    """Put ``state`` into ``optimizer``: torch's layout with whole tensors (``full``, on every rank) or
    shards keyed by parameter name."""
    if full and not is_sharded(module):
        optimizer.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if full:
        state = by_name(module, optimizer, state)
    # torch's loader wants every saved group key in the live groups too (a scheduler's "initial_lr" is
    # added to them only when the scheduler is built, after the optimizer): the saved values go in.
    for live, saved in zip(optimizer.param_groups, state["param_groups"]):
        for key, value in saved.items():
            if key != "params" and key not in live:
                live[key] = value
    kinds = [{k: type(v) for k, v in group.items() if isinstance(v, tuple)} for group in state["param_groups"]]
    set_optimizer_state_dict(module, optimizer, dict(state), options=StateDictOptions(full_state_dict=full))
    for group, tuples in zip(optimizer.param_groups, kinds):  # (torch's loader hands tuples back as lists)
        for key in tuples:
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])


# ---------------------------------------------------------------------------- tensors
def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t`` (a DTensor's local shard, or ``t``)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole (a DTensor gathered: collective), detached on the CPU."""
    gather = getattr(t, "full_tensor", None)
    return (gather() if callable(gather) else t).detach().cpu()


def like(template: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``template``: this rank's shard of it for a DTensor (no communication), else a copy."""
    if hasattr(template, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        placed = distribute_tensor(whole.to(local(template).device, template.dtype), template.device_mesh,
                                   template.placements, src_data_rank=None)
        return placed
    return whole.to(template.device, template.dtype)
