#!/usr/bin/env python
"""Training-loop overhead benchmark (issue 6).

A tiny MLP over 2,000 steps (one epoch of 64,000 samples, batch 32, shuffled), in three
variants, each in a fresh process, alternating, several times:

  hand         the loop a user writes by hand: DataLoader(shuffle=True), zero_grad, forward,
               loss, backward, step, loss summed per epoch
  handler      NNHandler.train with progress_bar=False
  handler_bar  NNHandler.train with the progress bar on, drawn on a terminal: the child's stderr
               is a pseudo-terminal (the bar shows only on a terminal; on a pipe or a file it
               is off, which is the "handler" variant), and this process reads what it draws

Prints medians and the ratios handler/hand and handler_bar/hand as one JSON line, the same of the
fastest run of each (on a shared machine, the least disturbed), and how many bytes the bar drew
(it must draw: a variant whose bar never showed would measure nothing, and the script says so).

    .venv/bin/python scripts/bench_train.py [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
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


def _run_child(variant: str) -> "tuple[float, int]":
    """The variant's time in a fresh process, and the bytes its stderr received. ``handler_bar``: stderr
    is a pseudo-terminal (as a user's terminal is), drained by a thread here so the bar never blocks."""
    argv = [sys.executable, __file__, "--child", variant]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if variant != "handler_bar":
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
        return float(out.stdout.strip().splitlines()[-1]), len(out.stderr)
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0x0: no room for a bar
    drawn = [0]
    tail = bytearray()  # the end of what the child wrote there: its error, if it fails

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal (EIO on Linux)
                return
            if not chunk:
                return
            drawn[0] += len(chunk)
            tail.extend(chunk)
            del tail[:-4096]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, text=True, env=env)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{tail.decode(errors='replace')}")
    return float(proc.stdout.strip().splitlines()[-1]), drawn[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    variants = ["hand", "handler", "handler_bar"]
    times = {v: [] for v in variants}
    bar_bytes = []
    for rep in range(args.reps):
        for v in variants:
            seconds, stderr_bytes = _run_child(v)
            times[v].append(seconds)
            if v == "handler_bar":
                bar_bytes.append(stderr_bytes)
            print(f"rep {rep} {v}: {seconds:.3f}s", file=sys.stderr, flush=True)
    if not all(bar_bytes):
        raise SystemExit(f"the bar drew nothing on the pseudo-terminal ({bar_bytes} bytes): handler_bar measured no bar")
    med = {v: statistics.median(ts) for v, ts in times.items()}
    best = {v: min(ts) for v, ts in times.items()}  # on a shared machine the least disturbed run of each
    print(json.dumps({"steps": N // BATCH, "median_s": med, "handler_vs_hand": med["handler"] / med["hand"],
                      "handler_bar_vs_hand": med["handler_bar"] / med["hand"], "min_s": best,
                      "min_handler_vs_hand": best["handler"] / best["hand"],
                      "min_handler_bar_vs_hand": best["handler_bar"] / best["hand"],
                      "bar_bytes_drawn": statistics.median(bar_bytes)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(child(sys.argv[2]))
    else:
        main()
