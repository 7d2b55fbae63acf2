"""The structured config: dataclasses registered in Hydra's ConfigStore.

``conf/config.yaml`` starts its defaults list with ``runner_schema``, so every YAML file
and every command-line override is merged into these dataclasses: a misspelled key or a
value of the wrong type fails while the config is composed, before any work, naming the
key. Component groups (``model``, ``optimizer``, ``scheduler``, ``loss``, the dataset specs)
are open mappings: a ``_target_`` plus whatever keyword arguments the target takes, checked
when the runner builds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

SCHEMA_NAME = "runner_schema"


@dataclass
class CheckpointConf:
    # The file to load (resume, finetune, infer, sample), or a directory: its newest complete,
    # verified checkpoint (searched recursively, ordered by training progress; damaged files skipped).
    # A relative path is relative to the directory the command was launched from.
    path: Optional[str] = None
    # Deprecated alias of save.every_n_epochs (used when that is not set); 0: off.
    save_every: int = 0


@dataclass
class SaveConf:
    """Checkpoints a training task writes into ``<run dir>/checkpoints/`` (a CheckpointStore):
    ``ckpt-eEEEE-sSSSSSSSSS[-tag].pth`` by progress, ``last.pth`` a link to the newest."""

    every_n_steps: Optional[int] = None  # also every this many optimizer steps (mid-epoch: exact resume)
    every_n_epochs: Optional[int] = None  # also every this many epochs
    keep_last: Optional[int] = None  # keep only the newest N (null: keep all)
    keep_best: Optional[int] = None  # and the best N by `monitor` (needs monitor)
    monitor: Optional[str] = None  # e.g. val_loss, train_loss, val_accuracy
    mode: str = "min"  # min | max
    # save.async=true: each checkpoint is written in the background while training goes on (the key is
    # the Python keyword "async": see _keyword_key)
    async_: bool = False
    # DCP directories (ckpt-....dcp, each rank its shards); null: sharded under strategy=fsdp
    sharded: Optional[bool] = None


@dataclass
class LoadConf:
    """Passed straight to ``NNHandler.load`` (``strict`` is ``strict_load``)."""

    strict: bool = False
    skip_optimizer: bool = False
    skip_scheduler: bool = False
    skip_history: bool = False
    skip_callbacks: bool = False
    skip_sampler_sde: bool = False
    skip_ema: bool = False
    # Packages, modules or objects a checkpoint may name besides what this config names
    # (NNHandler.load's trusted_packages), e.g. [mypkg] or [mypkg.data.build].
    trusted_packages: List[str] = field(default_factory=list)


@dataclass
class TrainConf:
    """``NNHandler.train`` arguments. None keeps what the handler has (after a load: what was saved)."""

    epochs: int = 10
    validate_every: Optional[int] = None
    ema_decay: Optional[float] = None
    use_amp: Optional[bool] = None
    gradient_accumulation_steps: Optional[int] = None
    gradient_clipping_norm: Optional[float] = None
    progress_bar: bool = True  # a tqdm bar per epoch on rank 0, shown only on a terminal


@dataclass
class DataConf:
    """Dataset specs (``_target_`` + kwargs building a torch Dataset) and loader options.

    Left as null, ``train``/``val`` mean "the datasets recorded in the checkpoint" (resume,
    finetune, infer), and the loader options mean "the recorded ones" (or the defaults:
    batch_size 64, num_workers 0).
    """

    train: Optional[Dict[str, Any]] = None
    val: Optional[Dict[str, Any]] = None
    predict: Optional[Dict[str, Any]] = None
    batch_size: Optional[int] = None
    val_batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None
    drop_last: Optional[bool] = None


@dataclass
class LauncherConf:
    # More than 1: start this many local workers through torch.distributed's elastic launch.
    nproc_per_node: int = 1


@dataclass
class InspectConf:
    """``task=inspect``: print what ``checkpoint.path`` records."""

    format: str = "text"  # text | json (json: exactly the dict of nn_handler.checkpointing.inspect)


@dataclass
class DiffConf:
    """``task=diff``: what differs between ``checkpoint.path`` (a) and ``diff.other`` (b)."""

    other: Optional[str] = None  # the second checkpoint (file or run directory), relative to the launch directory
    format: str = "text"  # text | json (json: exactly the dict of nn_handler.checkpointing.diff)
    top: int = 10  # text: how many of the tensors with the largest absolute difference to list


@dataclass
class SampleConf:
    """``task=sample`` (and the sample grids written while training a generative model)."""

    n: int = 64  # how many samples
    steps: int = 500  # predictor steps of the SDE solver
    corrector_steps: int = 0  # Langevin corrector steps per time
    shape: Optional[List[int]] = None  # one sample's shape; null: the model's `shape` kwarg, else the data's
    value_range: Optional[List[float]] = None  # PNG: [lo, hi] -> black..white; null: the samples' min..max
    every_n_epochs: int = 0  # training: a PNG grid in <run dir>/samples/ every N epochs (0: off)
    seed: Optional[int] = 0  # training grids: fixed noise, so successive pictures are comparable


@dataclass
class StrategyConf:
    """How the model is spread over the ranks (``strategy=auto|ddp|fsdp``): ``NNHandler(strategy=...)``."""

    name: str = "auto"  # auto: as the checkpoint was (FSDP if it was sharded with FSDP), else ddp
    wrap: List[str] = field(default_factory=list)  # fsdp: module class names that get their own shard group
    min_params: int = 100_000  # fsdp, without wrap: a shard group per module holding this many parameters
    param_dtype: Optional[str] = None  # fsdp mixed precision: bfloat16 | float16 | float32
    reduce_dtype: Optional[str] = None
    reshard_after_forward: bool = True


@dataclass
class ConvertConf:
    """``task=convert``: ``checkpoint.path`` consolidated into one file, or sharded (``convert.to`` ending in .dcp)."""

    to: Optional[str] = None  # null: <run dir>/converted.pth for a sharded source, <run dir>/converted.dcp else


@dataclass
class ExportConf:
    """``task=export``: the checkpoint's weights as ``<run dir>/model.safetensors``."""

    ema: bool = True  # the EMA weights when the checkpoint has them; false: the live weights


@dataclass
class LoggerConf:
    """The experiment logger of a training task (group ``logger``), writing into ``<run dir>/logs/``."""

    name: str = "none"  # none | csv | tensorboard | mlflow
    every_n_steps: int = 50  # the train loss and learning rates every N optimizer steps (0: epoch rows only)
    tracking_uri: Optional[str] = None  # logger=mlflow: where the run goes (null: <run dir>/logs/mlruns)
    experiment_name: str = "nn_handler"  # logger=mlflow: the MLflow experiment


@dataclass
class ResumeConf:
    # Let a resume go on although the model differs from the checkpoint's (class or kwargs);
    # the difference is still reported as a warning.
    allow_drift: bool = False


@dataclass
class RunnerConfig:
    task: str = "train"  # set by the task group: train | resume | finetune | infer | sample | inspect | diff | export
    # The model class as a _target_ plus its constructor kwargs; empty means "the one recorded
    # in the checkpoint" (resume, finetune, infer).
    model: Dict[str, Any] = field(default_factory=dict)
    model_type: Optional[str] = None  # classification | regression | generative | score_based; null: recorded or classification
    data: DataConf = field(default_factory=DataConf)
    optimizer: Dict[str, Any] = field(default_factory=dict)
    scheduler: Optional[Dict[str, Any]] = None
    loss: Optional[Dict[str, Any]] = None
    # name -> import path of fn(predictions, targets) -> float
    metrics: Dict[str, str] = field(default_factory=dict)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    save: SaveConf = field(default_factory=SaveConf)
    # Re-running the same command (same hydra.run.dir) whose run directory already holds
    # checkpoints continues from the newest valid one; train.epochs is then the run's total.
    auto_resume: bool = False
    # The SDE of a score-based model: a _target_ (e.g. nn_handler.sde.VPSDE) plus its kwargs; null: none.
    sde: Optional[Dict[str, Any]] = None
    sample: SampleConf = field(default_factory=SampleConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    load: LoadConf = field(default_factory=LoadConf)
    device: Optional[str] = None  # null: cuda:LOCAL_RANK under DDP, else cuda when available, else cpu
    seed: Optional[int] = 0  # null: do not re-seed (a resume continues the saved random streams)
    train: TrainConf = field(default_factory=TrainConf)
    launcher: LauncherConf = field(default_factory=LauncherConf)
    resume: ResumeConf = field(default_factory=ResumeConf)
    inspect: InspectConf = field(default_factory=InspectConf)
    diff: DiffConf = field(default_factory=DiffConf)
    export: ExportConf = field(default_factory=ExportConf)
    convert: ConvertConf = field(default_factory=ConvertConf)
    strategy: StrategyConf = field(default_factory=StrategyConf)
    # -m with an optimising sweeper (hydra/sweeper=optuna, nevergrad, ax): the metrics.json key each job
    # returns to it as a float, e.g. val_loss; null: jobs return their whole record.
    objective: Optional[str] = None


def _keyword_key(cls: type, attr: str, key: str) -> None:
    """Spell the dataclass field ``attr`` as the Python keyword ``key`` in the config (``save.async``):
    OmegaConf reads a dataclass's fields, annotations and instance attributes by name."""
    f = cls.__dataclass_fields__.pop(attr)
    f.name = key
    cls.__dataclass_fields__[key] = f
    cls.__annotations__[key] = cls.__annotations__.pop(attr)
    init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        value = kwargs.pop(key, f.default)
        init(self, *args, **kwargs)
        setattr(self, key, value)

    cls.__init__ = __init__  # type: ignore[method-assign]


_keyword_key(SaveConf, "async_", "async")


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunnerConfig)
