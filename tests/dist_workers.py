"""Worker scenarios for tests/test_distributed.py, run under torchrun (one process per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_workers.py SCENARIO OUT [ARGS]

Each rank writes what the test checks to OUT/rank<r>.pt (tensors) or OUT/rank<r>.json.
"""
import json
import os
import sys
import time
import traceback

import torch

from nn_handler import NNHandler
from nn_handler.metrics import accuracy
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 90, "in_features": 8, "num_classes": 3}
VAL = {**DATA, "n": 13}  # not a multiple of the world size


class RankBatches(torch.utils.data.IterableDataset):
    """Five batches that differ per rank, with no length: the loop cannot know the last group."""

    def __init__(self, rank: int):
        self.rank = rank

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for _ in range(5):
            yield torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def make() -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, device="cpu", in_features=8, out_features=3, hidden=[16], dropout=0.2)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.8)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.set_train_loader(DATA, batch_size=8, shuffle=True)
    h.set_val_loader(VAL, batch_size=4)
    return h


def fingerprint(h: NNHandler, out: str) -> None:
    torch.save({"weights": h.module.state_dict(), "ema": h.ema.module.state_dict() if h.ema else None,
                "optimizer": h.optimizer.state_dict()["state"], "train_losses": list(h.train_losses),
                "val_losses": list(h.val_losses), "epoch": h.epoch, "world_size": h.world_size,
                "is_distributed": h.is_distributed, "device": str(h.device),
                "model_is_ddp": isinstance(h.model, torch.nn.parallel.DistributedDataParallel),
                "sampler": type(h.train_loader.sampler).__name__},
               os.path.join(out, f"rank{h.rank}.pt"))


def report_error(out: str, exc: BaseException, started: float) -> None:
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"type": type(exc).__name__, "message": str(exc), "elapsed": time.time() - started,
                   "is_file_not_found": isinstance(exc, FileNotFoundError)}, f)


def main(scenario: str, out: str, *args: str) -> None:
    started = time.time()
    if scenario == "train":  # args: epochs [save_path]
        h = make()
        h.train(int(args[0]), seed=0, ema_decay=0.9, gradient_accumulation_steps=2, progress_bar=False)
        if len(args) > 1:
            h.save(args[1])
        fingerprint(h, out)
    elif scenario == "resume":  # args: path epochs
        h = NNHandler.load(args[0])
        h.train(int(args[1]), progress_bar=False)
        fingerprint(h, out)
    elif scenario == "load_fail":  # args: path template with {rank}
        try:
            NNHandler.load(args[0].format(rank=os.environ["RANK"]))
        except Exception as exc:
            report_error(out, exc, started)
            sys.exit(3)
    elif scenario == "init_fail":  # args: path template with {rank}: weights only
        try:
            NNHandler.initialize_from_checkpoint(args[0].format(rank=os.environ["RANK"]), MLP, in_features=8,
                                                 out_features=3, hidden=[16], dropout=0.2)
        except Exception as exc:
            report_error(out, exc, started)
            sys.exit(3)
    elif scenario == "save_fail":  # args: unwritable path
        h = make()
        try:
            h.save(args[0])
        except Exception as exc:
            report_error(out, exc, started)
            sys.exit(3)
    elif scenario == "predict":
        h = make()
        h.train(1, seed=0, progress_bar=False)
        x = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))
        from nn_handler.datasets import synthetic_classification
        from nn_handler.train import evaluate
        val = synthetic_classification(**{k: v for k, v in VAL.items() if k != "_target_"})
        loss, metrics = evaluate(h._loop_context(), h.val_loader)
        h.module.eval()
        with torch.no_grad():
            expected_val = torch.nn.functional.cross_entropy(h.module(val.tensors[0]), val.tensors[1]).item()
            torch.save({"tensor": h.predict(x), "dataset": h.predict(val), "expected": h.module(x),
                        "expected_dataset": h.module(val.tensors[0]), "val_loss": loss,
                        "expected_val_loss": expected_val}, os.path.join(out, f"rank{h.rank}.pt"))
    elif scenario == "sample":  # args: seed; h.sample with that seed, then with seed=None
        import helpers_generative as hg

        from nn_handler.sde import VPSDE
        torch.manual_seed(0)  # every rank alike: seed=None must still give the ranks different shares
        h = NNHandler(hg.ExactMixtureScore, device="cpu", model_type="score_based", **hg.SDE_KWARGS)
        h.set_sde(VPSDE, **hg.SDE_KWARGS)
        torch.save({"seeded": h.sample((7, 2), steps=20, seed=int(args[0])),
                    "global": h.sample((7, 2), steps=20), "world_size": h.world_size},
                   os.path.join(out, f"rank{h.rank}.pt"))
    elif scenario == "iterable":  # an iterable dataset of unknown length, accumulation 2, 5 batches per rank
        torch.manual_seed(0)
        h = NNHandler(MLP, device="cpu", in_features=8, out_features=3, hidden=[16])
        h.set_optimizer(torch.optim.SGD, lr=0.1)
        h.set_loss_fn(torch.nn.CrossEntropyLoss)
        h.set_train_loader(RankBatches(h.rank), batch_size=None)
        h.train(1, gradient_accumulation_steps=2, progress_bar=False)
        torch.save({"weights": h.module.state_dict()}, os.path.join(out, f"rank{h.rank}.pt"))
    elif scenario == "signal_one_rank":  # args: checkpoint dir; rank 1 alone gets SIGTERM at step 3
        import signal

        from nn_handler import Preempted
        from nn_handler.callbacks import Callback

        class SignalRankOne(Callback):
            recorded = False

            def on_batch_end(self, handler, batch, logs):
                if handler.rank == 1 and handler.global_step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)

        h = make()
        h.add_callback(SignalRankOne())
        try:
            h.train(3, seed=0, progress_bar=False, checkpoint_dir=args[0])
        except Preempted as exc:
            with open(os.path.join(out, f"rank{h.rank}.json"), "w") as f:
                json.dump({"signal": exc.signum, "global_step": h.global_step, "path": exc.checkpoint}, f)
            raise
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
