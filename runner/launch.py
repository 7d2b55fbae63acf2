"""Where the runner runs: one process, a torchrun rank, or workers it starts itself.

- Under torchrun every rank runs ``python -m runner`` with the same arguments. Before
  Hydra composes anything, the ranks join the process group and take rank 0's clock, so
  the timestamped run directory is ONE directory (``${runner_now:}`` in config.yaml); only
  rank 0 writes Hydra's files (``${runner_hydra_subdir:}``) and each rank logs to its own
  file (``${runner_log_file:}``); the resolvers are ``runner.resolvers``.
- ``launcher.nproc_per_node=N`` (N > 1) in a plain process starts N workers through
  ``torch.distributed``'s elastic launch, per Hydra job: each sweep job of ``-m`` is its
  own distributed run, and the composed config is handed to the workers as it is.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nn_handler.distributed import env_topology, init_process_group, teardown
from nn_handler.train.preemption import Preempted, submitit_signal

from . import resolvers, tasks
from .context import RunContext
from .errors import RunnerError

log = logging.getLogger("runner")

# What the self-launch's agent handles and forwards to its workers (torchrun: --signals-to-handle).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _rank() -> int:
    return env_topology().rank


# ---------------------------------------------------------------------------- process group
def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group() -> None:
    """Join the group torchrun, elastic launch or srun describes, as the library does.

    torchrun's RANK/WORLD_SIZE/MASTER_ADDR..., else srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
    with the rendezvous on SLURM_JOB_NODELIST's first host (MASTER_ADDR/MASTER_PORT override);
    a group that does not form within NN_HANDLER_PG_TIMEOUT seconds (default 300) fails the
    attempt with exit code 124 (``nn_handler.distributed.init_process_group``).
    """
    if dist.is_initialized():
        return
    init_process_group(_backend(), env_topology())


def join_torchrun(argv: Optional[List[str]] = None) -> None:
    """Under torchrun: refuse a sweep in every rank, join the group, share rank 0's clock."""
    info = env_topology()
    if not info.enabled:
        return
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-m", "--multirun") for a in argv):
        sys.stderr.write("runner: -m/--multirun under torchrun would run the whole sweep inside every rank; "
                         "run the sweep without torchrun and set launcher.nproc_per_node=N instead "
                         "(each sweep job is then its own distributed run)\n")
        sys.exit(2)
    try:
        _init_process_group()
    except (RuntimeError, ValueError) as exc:  # no rendezvous address, a bad NN_HANDLER_PG_TIMEOUT...
        sys.stderr.write(f"runner: could not join the process group: {exc}\n")
        sys.exit(2)
    box: List[Any] = [time.time()]
    dist.broadcast_object_list(box, src=0)
    resolvers.share_run_time(float(box[0]))


def leave() -> None:
    """Close the process group (every exit path of ``python -m runner``)."""
    teardown()


def join_submitit_job() -> bool:
    """Inside a submitit job of several tasks (``hydra/launcher=submitit_local`` or ``slurm`` with
    ``tasks_per_node`` > 1): export the job's ranks for torch.distributed (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT from submitit's job environment) and join the group, so
    the job is one multi-rank DDP run. True when it joined (the caller leaves after the job)."""
    if "SUBMITIT_EXECUTOR" not in os.environ or dist.is_initialized():
        return False
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
        if submitit.JobEnvironment().num_tasks <= 1:
            return False
    except Exception:  # noqa: BLE001 (not inside a submitit job after all)
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    _init_process_group()
    return True


# ---------------------------------------------------------------------------- logging
# The loggers whose INFO lines are the run's story; every other logger (matplotlib, PIL, urllib3, the
# user's own packages...) says only warnings and errors unless ``hydra.verbose`` names it.
OWN_LOGGERS = ("runner", "nn_handler")


def _verbose_names(verbose: Any) -> List[str]:
    """``hydra.verbose`` as a list of logger names (true: the runner's own loggers)."""
    if isinstance(verbose, bool) or verbose is None:
        return list(OWN_LOGGERS) if verbose else []
    return [str(verbose)] if isinstance(verbose, str) else [str(name) for name in verbose]


def configure_logging(verbose: Any = False) -> None:
    """The job's logging, set once over what Hydra (or a worker) configured: the root logger at WARNING,
    the runner's and nn_handler's loggers (and Hydra's) at INFO, each logger ``hydra.verbose`` names at
    DEBUG (``hydra.verbose=true``: the runner's and nn_handler's), warnings routed to the log (once),
    and the records marked ``file_only`` (an error Hydra prints itself) kept off the console."""
    names = _verbose_names(verbose)
    logging.getLogger().setLevel(logging.WARNING)
    for name in (*OWN_LOGGERS, "hydra"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # the library's warnings reach runner.log and the console, once
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                not any(isinstance(f, _NotOnConsole) for f in handler.filters):
            handler.addFilter(_NotOnConsole())


def _hydra_verbose() -> Any:
    from hydra.core.hydra_config import HydraConfig

    verbose = HydraConfig.get().verbose
    return verbose if isinstance(verbose, (bool, str)) else [str(name) for name in verbose]


# ---------------------------------------------------------------------------- running a job
def _quiet_console_on_other_ranks() -> None:
    """Ranks other than 0 keep their full log in their own file; the terminal gets warnings only."""
    if _rank() == 0:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def run(cfg: DictConfig) -> Optional[Dict[str, Any]]:
    """The Hydra task function's body: run the task here, or start workers that do (a submitit job
    of several tasks is one DDP run: each task is a rank)."""
    joined = join_submitit_job()
    try:
        return _run_job(cfg)
    except Preempted as exc:
        requeue_submitit_job(exc)
        raise
    finally:
        if joined:
            leave()


def requeue_submitit_job(exc: Preempted) -> None:
    """A submitit job stopped by submitit's own signal (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says
    otherwise): the training loop caught it, every rank saved the pre-emption checkpoint and rank 0
    wrote metrics.json ("preempted"); now submitit's handler, which the loop put back, does what it
    would have done: on rank 0 it resubmits the same Hydra job and requeues it (submitit_local: exit
    144; SLURM: ``scontrol requeue``, then exit 255), elsewhere it returns (the rank exits 128 + the
    signal). The requeued job runs in the same directory: with ``auto_resume=true`` it goes on from
    the pre-emption checkpoint. Other signals (SIGTERM from scancel, SIGUSR1, SIGINT) only stop."""
    sig = submitit_signal()
    if sig is None or exc.signum != sig:
        return
    handler = signal.getsignal(sig)
    if not callable(handler) or handler is signal.default_int_handler:
        log.warning("signal %d: no submitit handler to requeue the job; it stops with exit code %s", sig, exc.code)
        return
    if _rank() == 0:
        log.warning("pre-empted by submitit's signal %d: checkpoint %s; handing over to submitit to requeue the job",
                    sig, exc.checkpoint)
    try:
        handler(sig, None)  # rank 0: requeues and exits (SystemExit); other ranks: returns
    except SystemExit:
        raise
    except Exception as error:  # submitit's own refusal (timed out too many times...): the record stays "preempted"
        log.warning("submitit did not requeue the job: %s", error)
        exc.runner_recorded = True  # type: ignore[attr-defined]
        raise exc from error


def _run_job(cfg: DictConfig) -> Optional[Dict[str, Any]]:
    ctx = RunContext.from_hydra()
    verbose = _hydra_verbose()
    configure_logging(verbose)
    _quiet_console_on_other_ranks()
    log.debug("task=%s in %s (launched from %s), overrides %s; loggers at DEBUG: %s", cfg.task, ctx.output_dir,
              ctx.launch_dir, ctx.overrides, ", ".join(_verbose_names(verbose)) or "none")
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    nproc = int(cfg.launcher.nproc_per_node)
    if nproc < 1:
        raise RunnerError(f"launcher.nproc_per_node must be >= 1, got {nproc}")
    if nproc > 1 and str(cfg.task) not in tasks.READ_ONLY_TASKS:
        if env_topology().enabled:
            log.warning("launcher.nproc_per_node=%d ignored: already running as rank %d of %d under torchrun",
                        nproc, _rank(), env_topology().world_size)
        else:
            try:
                return self_launch(cfg, ctx, nproc, verbose)
            except Exception as exc:
                tasks.record_failure(cfg, ctx, exc, keep_failed=True)  # a failed rank 0 recorded more
                raise
    return tasks.run(cfg, ctx)


# metrics.json keys that are bookkeeping, never an objective.
_NOT_OBJECTIVES = ("epoch", "world_size", "signal", "exit_code", "samples", "checkpoint_read", "checkpoint_written")


def returned_to_hydra(cfg: DictConfig, record: Optional[Dict[str, Any]]) -> Any:
    """What the job returns to Hydra: its record, or with ``objective=<metric>`` that metric as a float,
    which optimising sweepers (Optuna, Nevergrad, Ax) minimise or maximise. A metric with no value
    (null in metrics.json: not run, or NaN/infinite) is NaN, which Optuna counts as a failed trial."""
    name = cfg.get("objective")
    if name is None:
        return record
    numeric = [k for k, v in (record or {}).items()
               if k not in _NOT_OBJECTIVES and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]
    if name not in numeric:
        raise RunnerError(f"objective={name} is not a metric of task={cfg.task}: "
                          f"choose one of {', '.join(numeric) or '(this task records none)'}")
    value = record[name] if record else None
    return float("nan") if value is None else float(value)


def _failure_message(exc: Exception) -> str:
    failures = getattr(exc, "failures", None) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        message = getattr(failure, "message", "")
        if isinstance(message, dict):
            message = message.get("message", "")
        message = str(message).strip()
        if not message or message.startswith("To enable traceback"):
            message = f"exit code {getattr(failure, 'exitcode', '?')}"
        parts.append(f"rank {rank}: {message}")
    return "; ".join(parts) or str(exc)


def _quiet_elastic() -> None:
    """The agent's own logs (and its traceback of a failed worker) stay out of the terminal:
    the RunnerError raised below says what failed. HYDRA_FULL_ERROR=1 keeps them."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class _NotOnConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def self_launch(cfg: DictConfig, ctx: RunContext, nproc: int, verbose: Any = False) -> Optional[Dict[str, Any]]:
    """Run this job as ``nproc`` local workers through torch.distributed's elastic launch."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    container = OmegaConf.to_container(cfg, resolve=True)
    # The agent forwards these to the workers, which pre-empt on SIGTERM, SIGUSR1 and SIGINT.
    # torch's default list lacks SIGUSR1 (SLURM's --signal=USR1@N): without it this process
    # would die of the signal and take the workers with it, nothing saved.
    signals = {"signals_to_handle": FORWARDED_SIGNALS}
    if "signals_to_handle" not in {f.name for f in dataclasses.fields(LaunchConfig)}:  # older torch: the variable
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = FORWARDED_SIGNALS
        signals = {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"runner-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", **signals)
    # As torchrun does: one thread per worker unless told otherwise, or N workers oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet_elastic()
    log.info("starting %d workers (elastic launch); per-rank logs in %s", nproc, ctx.output_dir)
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
    except ImportError:  # pragma: no cover
        SignalException = ()  # type: ignore[assignment]
    try:
        results = elastic_launch(config, _worker)(container, ctx, verbose)
    except SignalException as exc:  # this process was signalled: the agent forwarded it to the workers
        code = 128 + int(getattr(exc, "sigval", 15))
        log.warning("stopped by signal %s: the workers saved a pre-emption checkpoint; exit code %d",
                    getattr(exc, "sigval", "?"), code)
        raise SystemExit(code) from None
    except ChildFailedError as exc:
        codes = {getattr(f, "exitcode", None) for f in (getattr(exc, "failures", None) or {}).values()}
        if len(codes) == 1 and codes <= {130, 138, 143}:  # the workers were pre-empted: same exit code
            code = codes.pop()
            log.warning("the workers stopped on a signal and saved a pre-emption checkpoint; exit code %d", code)
            raise SystemExit(code) from None
        raise RunnerError(f"the distributed run failed ({_failure_message(exc)}); "
                          f"the rank logs are in {ctx.output_dir}") from exc
    return results.get(0) if results else None


def _setup_worker_logging(output_dir: str, rank: int, verbose: Any = False) -> None:
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, resolvers.log_file()))
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(_NotOnConsole())  # a worker's error is told once, by the parent
    root.handlers[:] = [file_handler, console]
    configure_logging(verbose)


def _worker(container: Dict[str, Any], ctx: RunContext, verbose: Any = False) -> Optional[Dict[str, Any]]:
    """One self-launched rank: the composed config, the job's directory, the process group. A failure
    is logged in the rank's file by ``tasks.run``; the parent tells it on the console."""
    _setup_worker_logging(ctx.output_dir, _rank(), verbose)
    cfg = OmegaConf.create(container)
    _init_process_group()
    try:
        return tasks.run(cfg, ctx)
    finally:
        leave()
