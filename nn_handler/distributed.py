"""Where this process stands in a distributed job: detection, process group, device, barriers."""
from __future__ import annotations

import atexit
import datetime
import errno
import gc
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    enabled: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def env_topology() -> DistInfo:
    """Rank, local rank and world size from torchrun's variables or, under srun, SLURM's."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    rank = _env_int("RANK", "SLURM_PROCID")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if world is None or rank is None:
        return DistInfo(enabled=False)
    return DistInfo(enabled=world > 1, rank=rank, local_rank=local or 0, world_size=world)


def setup(use_distributed: Optional[bool]) -> DistInfo:
    """Join (or create) the process group when the environment asks for it.

    ``use_distributed=None`` follows the environment; ``False`` opts out; ``True``
    requires a distributed environment.
    """
    if use_distributed is False:
        return DistInfo(enabled=False)
    if dist.is_available() and dist.is_initialized():
        _drain_at_exit()  # a group the user formed: the same clean exit
        return DistInfo(enabled=dist.get_world_size() > 1 or bool(use_distributed),
                        rank=dist.get_rank(),
                        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID") or 0,
                        world_size=dist.get_world_size())
    info = env_topology()
    if not info.enabled:
        if use_distributed:
            raise RuntimeError("use_distributed=True but no distributed environment was found: "
                               "launch with torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or srun")
        return info
    init_process_group("nccl" if torch.cuda.is_available() else "gloo", info)
    return info


# ---------------------------------------------------------------------------- forming the group
PG_TIMEOUT_ENV = "NN_HANDLER_PG_TIMEOUT"
DEFAULT_FORMATION_TIMEOUT_S = 300.0
FORMATION_EXIT_CODE = 124  # as timeout(1): the attempt ran out of time
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # one collective (a rank-0 save's barrier...), not formation


def formation_timeout() -> Optional[float]:
    """Seconds a process group may take to form (``NN_HANDLER_PG_TIMEOUT``; 0 or ``none``: no bound)."""
    raw = os.environ.get(PG_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_FORMATION_TIMEOUT_S
    if raw.lower() in ("none", "off", "inf", "infinite"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{PG_TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0 (0 or 'none': no bound)")
    return None if value == 0 or math.isinf(value) else value


def rendezvous_env(info: DistInfo) -> None:
    """Fill in the ``env://`` variables that torchrun sets, from what srun sets (as ``setup`` does).

    RANK, WORLD_SIZE and LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID;
    MASTER_ADDR is the first host of SLURM_JOB_NODELIST and MASTER_PORT 15000 + SLURM_JOB_ID
    mod 20000. Variables already set (torchrun's, or the user's MASTER_ADDR/MASTER_PORT) win.
    """
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not os.environ.get("MASTER_ADDR") and nodelist:
        # Launched by srun without torchrun: rendezvous on the job's first node.
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
    if not os.environ.get("MASTER_PORT") and nodelist:
        os.environ["MASTER_PORT"] = str(15000 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 20000)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"rank {info.rank} of {info.world_size}: no rendezvous address: set "
                           f"{' and '.join(missing)} (torchrun and srun's SLURM_JOB_NODELIST provide them)")


class _FormationWatchdog:
    """Ends this process if the group has not formed in time: a rank stuck in the C++ rendezvous
    (a peer that never comes, a torch-level race) cannot be interrupted any other way. The exit
    fails this attempt, so a launcher with restarts left (torchrun --max-restarts) tries again."""

    def __init__(self, seconds: float, info: DistInfo) -> None:
        self._seconds = seconds
        self._info = info
        self._timer = threading.Timer(seconds, self._expired)
        self._timer.daemon = True
        self._timer.name = "nn_handler-pg-formation-watchdog"
        self._timer.start()

    def _expired(self) -> None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            sys.stderr.write(
                f"nn_handler: rank {self._info.rank} of {self._info.world_size}: the process group did not form "
                f"within {self._seconds:g} s (rendezvous {where}); this attempt fails with exit code "
                f"{FORMATION_EXIT_CODE} (set {PG_TIMEOUT_ENV}=<seconds> to change the bound, 0 for none)\n")
            sys.stderr.flush()
        finally:
            os._exit(FORMATION_EXIT_CODE)

    def stop(self) -> None:
        self._timer.cancel()
        self._timer.join()


def attempt_store(info: DistInfo) -> Optional[Any]:
    """Under torchrun on one node with restarts, the rendezvous store as this attempt's alone.

    torchrun's agent keeps ONE TCPStore for every attempt (``TORCHELASTIC_USE_AGENT_STORE``) and
    the ``env://`` rendezvous uses it without a per-attempt prefix, so after a restart the keys the
    previous attempt's ranks wrote (gloo's addresses of each rank) are still there: a restarted rank
    can read a dead rank's address and fail with "Connection refused" (or wait), again on every
    restart (issue 16). Keyed by ``TORCHELASTIC_RESTART_COUNT``, which every rank of the job shares
    when one agent starts them all (``LOCAL_WORLD_SIZE == WORLD_SIZE``); on several nodes the agents'
    counts may differ, so there the plain rendezvous is kept (launch torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: a fresh store per attempt). None: the plain ``env://``.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if _env_int("LOCAL_WORLD_SIZE") != info.world_size:
        return None
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT") or 0
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                           is_master=False, timeout=COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(f"nn_handler/attempt_{attempt}/default_pg", client)


def init_process_group(backend: str, info: DistInfo) -> None:
    """Join the group the environment describes, bounded in time (``formation_timeout``).

    The bound covers ``init_process_group`` and a first collective (under nccl the connections
    are made there); collectives afterwards keep the 30-minute timeout.
    """
    rendezvous_env(info)
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(info.local_rank)
    bound = formation_timeout()
    watchdog = _FormationWatchdog(bound, info) if bound is not None else None
    _drain_at_exit()
    try:
        store = attempt_store(info)
        if store is None:
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
        on_gpu = backend == "nccl"  # nccl alone; "cpu:gloo,cuda:nccl" probes its CPU (gloo) part
        probe = torch.zeros(1, device=torch.device("cuda", info.local_rank) if on_gpu else "cpu")
        dist.all_reduce(probe)
    finally:
        if watchdog is not None:
            watchdog.stop()


def teardown() -> None:
    """Close the process group (and the control group made for it); a no-op when none is open.

    Then wait, without the GIL, until torch's collective threads have finished with their last
    work (``drain_collective_threads``).
    """
    global _CONTROL_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        drain_collective_threads()
    _CONTROL_GROUP = None


# ---------------------------------------------------------------------------- a clean exit
# Why (issue 16; seen as "terminate called without an active exception", SIGABRT, on a rank that had
# finished): a gloo worker thread (c10d::ProcessGroupGloo::runLoop) destroys each finished work after
# the caller's wait() has returned; the work holds the collective's tensors, and dropping a tensor that
# has a Python object takes the GIL. If that thread asks for the GIL only once the interpreter is
# finalizing, Python 3.11 ends it with pthread_exit, whose forced unwind crosses the noexcept
# ~AsyncWork: std::terminate. The group's threads are joined only when the last reference to the
# ProcessGroupGloo goes, and torch keeps references after destroy_process_group once a DDP module was
# built, so they live until exit. The fix: before finalization (teardown, and an atexit hook for
# scripts that call dist.destroy_process_group themselves or nothing at all), release the GIL until
# every other thread of the process is idle, so a pending cleanup runs while it still can.
DRAIN_MIN_S = 0.005  # a GIL waiter is woken when the GIL is released; give it this long at least
DRAIN_MAX_S = 1.0  # never hold an exit longer than this
_DRAIN_REGISTERED = False


def _other_threads_busy() -> Optional[bool]:
    """Whether a thread of this process other than the caller is running or runnable (Linux /proc);
    None where that cannot be read."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        if tid == str(me):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread has just ended
            continue
        state = stat[stat.rfind(b")") + 2:][:1]
        if state in (b"R", b"D"):
            return True
    return False


def drain_collective_threads(max_s: float = DRAIN_MAX_S) -> float:
    """Sleep (the GIL released) until every other thread is idle twice in a row, at least
    ``DRAIN_MIN_S`` and at most ``max_s`` seconds (a fixed 0.1 s where /proc cannot be read).
    Returns the seconds waited."""
    start = time.monotonic()
    time.sleep(DRAIN_MIN_S)
    idle_polls = 0
    while time.monotonic() - start < max_s:
        busy = _other_threads_busy()
        if busy is None:
            time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))
            break
        idle_polls = 0 if busy else idle_polls + 1
        if idle_polls >= 2:
            break
        time.sleep(0.002)
    return time.monotonic() - start


def _at_exit() -> None:
    global _CONTROL_GROUP
    try:
        # Closing a gloo group is local; an NCCL group is left to the user (torch warns at exit).
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
            _CONTROL_GROUP = None
        gc.collect()  # handlers and DDP modules left in cycles: groups nothing else holds are joined now
        drain_collective_threads()
    except Exception:  # noqa: BLE001 (never fail an exit over this)
        pass


def _drain_at_exit() -> None:
    """Register ``_at_exit`` once, when this process first joins (or finds) a process group."""
    global _DRAIN_REGISTERED
    if not _DRAIN_REGISTERED:
        atexit.register(_at_exit)
        _DRAIN_REGISTERED = True


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[03-05,09],cpu1`` (-> ``gpu03``)."""
    head = nodelist.split(",", 1)[0] if "[" not in nodelist.split(",", 1)[0] else nodelist
    if "[" not in head:
        return head.strip()
    prefix, rest = head.split("[", 1)
    first = rest.split("]", 1)[0].split(",", 1)[0].split("-", 1)[0]
    return prefix.strip() + first


def resolve_device(device: Optional[Union[str, torch.device]], info: DistInfo) -> torch.device:
    """An explicit device wins; None means cuda:LOCAL_RANK (or cpu) under DDP, else cuda if present."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank) if info.enabled else torch.device("cuda")
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return value
    box: List[Any] = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_CONTROL_GROUP: Optional[Any] = None


def control_group() -> Optional[Any]:
    """A CPU (gloo) group for small control messages: the default group if it is gloo, else one made once.

    A vote over NCCL would need a device tensor and a host sync to read it; over gloo it is a
    CPU message that never waits for the GPU's queue. Collective: every rank calls it first
    at the same point.
    """
    global _CONTROL_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


class StopVote:
    """Ranks agreeing on a stop signal once per step without stalling the step.

    ``poll(signum)`` sends this rank's vote asynchronously and returns the agreed result of the
    previous poll (so every rank stops at the same step, one step after the signal arrived);
    ``settle(signum)`` is the blocking form, used between epochs, that leaves nothing in flight.
    """

    def __init__(self) -> None:
        self._pending: Optional[Any] = None

    def poll(self, signum: int) -> int:
        agreed = self._collect()
        if not agreed:
            vote = torch.tensor([signum], dtype=torch.int64)
            self._pending = (dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=control_group(), async_op=True), vote)
        return agreed

    def settle(self, signum: int) -> int:
        agreed = self._collect()
        vote = torch.tensor([signum], dtype=torch.int64)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=control_group())
        return max(agreed, int(vote.item()))

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        work, vote = self._pending
        self._pending = None
        work.wait()
        return int(vote.item())


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(value: Any, info: DistInfo, group: Any = None) -> List[Any]:
    """Every rank's ``value``, in rank order, on every rank (over ``group``; the default group when None)."""
    if not (info.enabled and dist.is_initialized()):
        return [value]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, value, group=group)
    return out


def agree(error: Optional[BaseException], info: DistInfo, what: str, path: Optional[str] = None,
          group: Any = None) -> None:
    """Every rank says whether its part of ``what`` failed; if any did, every rank raises.

    The failing rank raises its own error; the others raise the same kind of error naming
    the rank(s) and their message, so no rank is left waiting at a later collective.
    ``group``: the process group to agree over (a background save's own; the default when None).
    """
    if not (info.enabled and dist.is_initialized()):
        if error is not None:
            raise error
        return
    report = None if error is None else (type(error).__name__, str(error), isinstance(error, FileNotFoundError))
    reports = all_gather_object(report, info, group)
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if not failed:
        return
    if error is not None:
        raise error
    ranks = ", ".join(str(rank) for rank, _ in failed)
    name, message, missing = failed[0][1]
    if missing:
        raise FileNotFoundError(errno.ENOENT, f"{what}: the file is missing on rank(s) {ranks}", path)
    from .errors import CheckpointError
    raise CheckpointError(path, f"{what} failed on rank(s) {ranks}: {name}: {message}")


def gather_rows(local: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """Reassemble outputs computed on ``range(rank, n, world)`` into dataset order, on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return local
    world = info.world_size
    per_rank = (n + world - 1) // world
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # Row i of rank r is sample i * world + r.
    return torch.stack(parts, dim=1).reshape(per_rank * world, *local.shape[1:])[:n]
