"""End-to-end demo: train, save, load, continue; then inference and fine-tuning from the same file.

Run with ``scripts/run`` (or ``python -m nn_handler.demo --out DIR``).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from . import NNHandler
from .metrics import accuracy
from .models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 1024, "in_features": 16, "num_classes": 4}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="directory for the checkpoint (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="nn_handler_demo_")
    path = os.path.join(out, "demo.pt")

    torch.manual_seed(0)
    h = NNHandler(MLP, device=None, in_features=16, out_features=4, hidden=[64, 64])
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.add_metric("accuracy", accuracy)
    h.set_train_loader(DATA, batch_size=64, shuffle=True)
    h.set_val_loader({**DATA, "n": 256, "seed": 0}, batch_size=256)
    h.train(epochs=args.epochs, ema_decay=0.99, seed=0)
    h.save(path)
    print(f"trained {h.epoch} epochs, saved {path}: train loss {h.train_losses[-1]:.4f}, "
          f"val accuracy {h.val_metrics_history['accuracy'][-1]:.3f}")

    resumed = NNHandler.load(path)
    print(f"resuming from epoch {len(resumed.train_losses)} (optimizer, scheduler, EMA, history restored)")
    resumed.train(epochs=args.epochs)
    print(f"after {resumed.epoch} epochs: train losses {[round(v, 4) for v in resumed.train_losses]}")

    inference = NNHandler.initialize_from_checkpoint(path, MLP, in_features=16, out_features=4, hidden=[64, 64])
    inference.eval()
    x = torch.randn(5, 16, device=inference.device)
    with torch.no_grad():
        print(f"predicted classes for 5 random inputs: {inference.model(x).argmax(dim=1).tolist()}")

    finetune = NNHandler.load(path, skip_optimizer=True, skip_scheduler=True)
    finetune.set_optimizer(torch.optim.Adam, lr=1e-5)
    finetune.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=5)
    finetune.train(epochs=1)
    print(f"fine-tuned one epoch at lr 1e-5: val loss {finetune.val_losses[-1]:.4f}")


if __name__ == "__main__":
    main()
