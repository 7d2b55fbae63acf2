#!/usr/bin/env python
"""Training-loop overhead benchmark (issue 6).

A tiny MLP over 2,000 steps (one epoch of 64,000 samples, batch 32, shuffled), in three
variants, each in a fresh process, alternating, several times:

  hand         the loop a user writes by hand: DataLoader(shuffle=True), zero_grad, forward,
               loss, backward, step, loss summed per epoch
  handler      NNHandler.train with progress_bar=False
  handler_bar  NNHandler.train with the progress bar on (written to a pipe)

Prints medians and the ratios handler/hand and handler_bar/hand as one JSON line.

    .venv/bin/python scripts/bench_train.py [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

N, IN, OUT, BATCH = 64_000, 32, 4, 32


def _data():
    import torch
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g)
    return TensorDataset(x, (x[:, :OUT].argmax(dim=1)))


def child(variant: str) -> float:
    import torch
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from nn_handler import NNHandler
    from nn_handler.models import MLP
    torch.manual_seed(0)
    data = _data()
    if variant == "hand":
        model = MLP(IN, OUT, hidden=[64])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = torch.nn.CrossEntropyLoss()
        loader = DataLoader(data, batch_size=BATCH, shuffle=True)
        t = time.perf_counter()
        model.train()
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        return time.perf_counter() - t
    h = NNHandler(MLP, device="cpu", in_features=IN, out_features=OUT, hidden=[64])
    h.set_optimizer(torch.optim.SGD, lr=0.01)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(data, batch_size=BATCH, shuffle=True)
    t = time.perf_counter()
    h.train(1, progress_bar=variant == "handler_bar")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    variants = ["hand", "handler", "handler_bar"]
    times = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--child", v], check=True, capture_output=True, text=True,
                                 env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
            times[v].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {v}: {times[v][-1]:.3f}s", file=sys.stderr, flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(json.dumps({"steps": N // BATCH, "median_s": med, "handler_vs_hand": med["handler"] / med["hand"],
                      "handler_bar_vs_hand": med["handler_bar"] / med["hand"]}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(child(sys.argv[2]))
    else:
        main()
