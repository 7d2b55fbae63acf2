"""A training run for tests/test_never_lose_a_run.py, killed by signals from the test.

    python preempt_worker.py CHECKPOINT_DIR EPOCHS [STEP_SLEEP]

Prints "step <global step>" after every batch so the test knows training is under way.
"""
import sys
import time

import torch

from nn_handler import NNHandler
from nn_handler.callbacks import Callback
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 240, "in_features": 8, "num_classes": 3}


class Announce(Callback):
    recorded = False

    def __init__(self, sleep: float = 0.0):
        self.sleep = sleep

    def on_batch_end(self, handler, batch, logs):
        print(f"step {handler.global_step}", flush=True)
        time.sleep(self.sleep)


def make() -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, in_features=8, out_features=3, hidden=[32], dropout=0.2)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(DATA, batch_size=8, shuffle=True)
    h.set_val_loader({**DATA, "n": 40}, batch_size=20)
    return h


def train(h: NNHandler, epochs: int, **kwargs) -> None:
    h.train(epochs, seed=0, ema_decay=0.9, gradient_accumulation_steps=2, progress_bar=False, **kwargs)


if __name__ == "__main__":
    directory, epochs = sys.argv[1], int(sys.argv[2])
    h = make()
    h.add_callback(Announce(float(sys.argv[3]) if len(sys.argv) > 3 else 0.01))
    train(h, epochs, checkpoint_dir=directory, save_every_n_steps=4, keep_last=2)
    print("finished", flush=True)
