"""Worker scenarios for tests/test_fsdp.py: one process per rank under torchrun, or one plain process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_workers.py SCENARIO OUT [ARGS]

Each scenario writes what the test checks to OUT/<tag>-rank<r>.pt: the model's and the EMA's whole
weights and the optimizer's whole state (gathered over the ranks: the same on every strategy), the
history and the progress, so that runs under different world sizes and strategies compare directly.
"""
import json
import os
import sys
import time
import traceback

import torch

from nn_handler import NNHandler
from nn_handler.fsdp import optimizer_state

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 8, "num_classes": 3}
VAL = {**DATA, "n": 9}  # on 2 ranks 5 and 4 samples: 2 batches of 4 on one, 1 on the other


class Net(torch.nn.Module):
    """Two blocks that FSDP wraps on their own (``wrap=["Block"]``), plus a head in the root's group."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(8, width), Block(width, width))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


class Block(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out)
        self.norm = torch.nn.LayerNorm(n_out)

    def forward(self, x):
        return torch.relu(self.norm(self.linear(x)))


def strategy(name: str):
    return {"fsdp": {"name": "fsdp", "wrap": ["Block"]}, "ddp": "ddp", "none": None}[name]


def make(strat: str) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(Net, device="cpu", strategy=strategy(strat), width=16)
    h.set_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.8)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(DATA, batch_size=8, shuffle=True)
    h.set_val_loader(VAL, batch_size=4)
    return h


def whole(h: NNHandler) -> dict:
    """Everything a test compares, whole (a collective under FSDP: every rank calls it)."""
    from nn_handler.fsdp import model_state
    weights = model_state(h.module, full=True)
    ema = h.ema.state_dict()["weights"] if h.ema is not None else None
    optim = optimizer_state(h.module, h.optimizer, full=True) if h.optimizer is not None else None
    return {"weights": weights, "ema": ema, "optimizer": optim["state"] if optim else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
            if optim else None,
            "train_losses": list(h.train_losses), "val_losses": list(h.val_losses), "epoch": h.epoch,
            "global_step": h.global_step, "strategy": h.strategy, "world_size": h.world_size,
            "sharded_params": type(next(h.module.parameters())).__name__}


def dump(h: NNHandler, out: str, tag: str) -> None:
    record = whole(h)
    if h.rank == 0:
        torch.save(record, os.path.join(out, f"{tag}-rank0.pt"))


def train_and_save(out: str, strat: str, epochs: str, ckpts: str, *flags: str) -> None:
    """Train ``epochs`` with EMA, save to each of ``ckpts`` (comma-separated; a ``.dcp`` path: sharded) and
    record the state."""
    h = make(strat)
    h.train(int(epochs), ema_decay=0.9, seed=3, progress_bar=False)
    for ckpt in ckpts.split(","):
        h.save(ckpt, asynchronous="async" in flags)
    h.wait_for_save()
    dump(h, out, "saved")
    if "more" in flags:  # the uninterrupted run: as many epochs again
        h.train(int(epochs), progress_bar=False)
        dump(h, out, "uninterrupted")


def load_and_record(out: str, strat: str, ckpt: str, *flags: str) -> None:
    """Load ``ckpt`` under ``strat`` on this job's ranks, record; with ``more``, train on as in train_and_save."""
    h = NNHandler.load(ckpt, device="cpu", strategy=strategy(strat), trusted_packages=["fsdp_workers"])
    dump(h, out, "loaded")
    if "more" in flags:
        h.train(int(flags[flags.index("more") + 1]), progress_bar=False)
        dump(h, out, "resumed")
    if "save" in flags:
        h.save(flags[flags.index("save") + 1])


def load_each(out: str, *entries: str) -> None:
    """Each ``TAG=STRATEGY=PATH[=EPOCHS]``: load PATH under STRATEGY, record as TAG-loaded; with EPOCHS, train
    them and record as TAG-resumed."""
    for entry in entries:
        tag, strat, path, *more = entry.split("=")
        h = NNHandler.load(path, device="cpu", strategy=strategy(strat), trusted_packages=["fsdp_workers"])
        dump(h, out, f"{tag}-loaded")
        if more:
            h.train(int(more[0]), progress_bar=False)
            dump(h, out, f"{tag}-resumed")


def train_checkpointed(out: str, strat: str, epochs: str, directory: str) -> None:
    """Train twice with a checkpoint directory (every 2 steps, the newest 3 kept): with synchronous saves into
    DIRECTORY/sync, with asynchronous ones into DIRECTORY/async; record both at the end."""
    for mode in ("sync", "async"):
        h = make(strat)
        h.train(int(epochs), ema_decay=0.9, seed=3, progress_bar=False, checkpoint_dir=os.path.join(directory, mode),
                save_every_n_steps=2, async_save=mode == "async", keep_last=3)
        dump(h, out, f"done-{mode}")


def predict_and_sample(out: str, strat: str) -> None:
    h = make(strat)
    h.train(1, seed=3, progress_bar=False)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(0))
    y = h.predict(x, batch_size=2)  # 7 rows over 2 ranks: 2 batches on one, 2 on the other (4 and 3 rows)
    y1 = h.predict(x[:3], batch_size=1)  # 2 batches on rank 0, 1 on rank 1
    from nn_handler.fsdp import model_state
    weights = model_state(h.module, full=True)
    if h.rank == 0:
        ref = Net(16)
        ref.load_state_dict(weights)
        ref.eval()
        with torch.no_grad():
            reference = ref(x)
        torch.save({"predict": y, "predict_small": y1, "reference": reference, "fp32_losses": list(h.train_losses)},
                   os.path.join(out, "predict-rank0.pt"))
    # FSDP's MixedPrecisionPolicy: bfloat16 compute, float32 sharded parameters and reductions
    torch.manual_seed(0)
    mixed = NNHandler(Net, device="cpu", strategy={"name": "fsdp", "wrap": ["Block"], "param_dtype": "bfloat16",
                                                   "reduce_dtype": "float32"}, width=16)
    mixed.set_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    mixed.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.8)
    mixed.set_loss_fn(torch.nn.CrossEntropyLoss)
    mixed.set_train_loader(DATA, batch_size=8, shuffle=True)
    mixed.train(1, seed=3, progress_bar=False)
    if mixed.rank == 0:
        torch.save({"losses": list(mixed.train_losses), "param_dtype": str(next(mixed.module.parameters()).dtype)},
                   os.path.join(out, "mixed-rank0.pt"))


def score_and_preempt(out: str, directory: str) -> None:
    """A score model under FSDP: train, sample on both ranks (equal to the whole model's sampling), then train
    with a checkpoint directory until a SIGTERM sent by rank 0 to itself after 3 steps pre-empts every rank."""
    import signal

    from nn_handler import ModelType, Preempted
    from nn_handler.callbacks import Callback
    from nn_handler.fsdp import model_state
    from nn_handler.models import ScoreMLP
    from nn_handler.sde import VPSDE
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, strategy=strategy("fsdp"), shape=[2],
                  hidden=32, layers=2)
    h.set_sde(VPSDE)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_train_loader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=8)
    h.train(1, ema_decay=0.9, seed=1, progress_bar=False)
    samples = h.sample((6, 2), steps=5, seed=0, progress_bar=False)  # every rank its share, gathered
    weights, ema = model_state(h.module, full=True), h.ema.state_dict()["weights"]

    class Stop(Callback):
        recorded = False

        def on_after_optimizer_step(self, handler, step):
            if step == handler.global_step and step == 11 and handler.rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    h.add_callback(Stop())
    code = None
    try:
        h.train(5, progress_bar=False, checkpoint_dir=directory, async_save=True, save_every_n_steps=2)
    except Preempted as exc:
        code = exc.code
    if h.rank == 0:
        torch.save({"samples": samples, "weights": weights, "ema": ema, "preempted": code,
                    "step": h.global_step}, os.path.join(out, "score-rank0.pt"))


SCENARIOS = {"score": score_and_preempt, "train_and_save": train_and_save, "load_and_record": load_and_record,
             "load_each": load_each,
             "train_checkpointed": train_checkpointed, "predict": predict_and_sample}


def main() -> None:
    scenario, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    started = time.time()
    try:
        SCENARIOS[scenario](out, *args)
    except BaseException as exc:  # noqa: BLE001 (what the test reads)
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(out, f"error-rank{rank}.json"), "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "elapsed": time.time() - started,
                       "traceback": traceback.format_exc()}, f)
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # the classes above are recorded from the module, not from __main__
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fsdp_workers
    fsdp_workers.main()
