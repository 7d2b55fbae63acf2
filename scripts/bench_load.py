#!/usr/bin/env python
"""Checkpoint load/save benchmark (issues 5 and 6).

Builds a ~1.2 GB handler checkpoint (6 Linear layers of 4096x4096 and their Adam state),
then runs each variant in a fresh process, alternating, several times:

  read           read the file's bytes (page cache) into memory
  naive          torch.load + build the model + load_state_dict + Adam load_state_dict
  handler        NNHandler.load (checksum verified while the tensors are copied into the process's own memory)
  handler_noverify  the same with verification switched off
  handler_mmap   NNHandler.load(mmap=True): the file's mapped tensors adopted, no copy
  handler_mmap_noverify  the same with verification switched off
  fresh          a freshly built handler (no load), for the memory baseline
  torch_save     torch.save of the same state + fsync
  handler_save   NNHandler.save (checksum, fsync, atomic replace)
  handler_save_nochecksum  the same without the checksum
  ddp2           NNHandler.load in each of 2 ranks (torchrun, gloo), wall time of the slowest
  ddp2_mmap      the same with mmap=True

Each load variant then runs one training step; peak RSS (ru_maxrss) covers load plus step.
Prints medians and the ratios of issues 5 and 6 as one JSON line at the end.

    .venv/bin/python scripts/bench_load.py [--reps 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS, WIDTH, BATCH = 6, 4096, 16


def Linear6():
    from nn_handler.models import LinearStack
    return LinearStack(WIDTH, LAYERS)


def _batch():
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def _step(model, optimizer):
    import torch
    x, y = _batch()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _handler_for_step(h):
    from torch.utils.data import TensorDataset
    x, y = _batch()
    h.set_train_loader(TensorDataset(x, y), batch_size=BATCH)
    h.train(1, progress_bar=False)


def make_checkpoint(path: str) -> None:
    import torch

    from nn_handler import NNHandler
    from nn_handler.models import LinearStack
    torch.manual_seed(0)
    h = NNHandler(LinearStack, device="cpu", model_type="regression", width=WIDTH, layers=LAYERS)
    h.set_optimizer(torch.optim.Adam, lr=1e-4)
    h.set_loss_fn(torch.nn.MSELoss)
    _handler_for_step(h)
    h.save(path)


def _warm_up() -> None:
    """Pay one-off process costs before any timer starts, in every variant alike.

    The first torch.optim optimizer of a process imports torch._dynamo (about 2.7 s here),
    which would otherwise swamp every load figure.
    """
    import torch
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def child(variant: str, path: str, out: str) -> None:
    import torch
    torch.set_num_threads(2)
    from nn_handler import NNHandler
    from nn_handler.checkpointing import io as ckpt_io
    _warm_up()
    result = {}
    if variant == "read":
        # The file's bytes from the page cache, 16 MiB at a time into one reused buffer.
        t = time.perf_counter()
        buf = bytearray(16 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        result["time"] = time.perf_counter() - t
    elif variant == "naive":
        t = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = Linear6()
        model.load_state_dict(state["model_state_dict"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        opt.load_state_dict(state["optimizer"]["state"])
        result["time"] = time.perf_counter() - t
        _step(model, opt)
        result["time_step"] = time.perf_counter() - t
    elif variant in ("handler", "handler_noverify", "handler_mmap", "handler_mmap_noverify"):
        if variant.endswith("noverify"):  # what the checksum costs: this process hashes and checks nothing
            from nn_handler.checkpointing.file import CheckpointFile
            CheckpointFile._my_chunks = lambda self: []
            CheckpointFile._check = lambda self, mine, obj: setattr(self, "verified", True)
        t = time.perf_counter()
        h = NNHandler.load(path, device="cpu", mmap=variant.startswith("handler_mmap"))
        result["time"] = time.perf_counter() - t
        _step(h.model, h.optimizer)
        result["time_step"] = time.perf_counter() - t
    elif variant == "fresh":
        from nn_handler.models import LinearStack
        h = NNHandler(LinearStack, device="cpu", model_type="regression", width=WIDTH, layers=LAYERS)
        h.set_optimizer(torch.optim.Adam, lr=1e-4)
        _step(h.model, h.optimizer)
    elif variant in ("torch_save", "handler_save", "handler_save_nochecksum"):
        h = NNHandler.load(path, device="cpu")
        target = path + f".{variant}.out"
        state = h.state_dict()
        if variant == "handler_save_nochecksum":  # what the checksum costs: a plain torch.save, still atomic
            ckpt_io._save_with_trailer = lambda obj, f: torch.save(obj, f)
        t = time.perf_counter()
        if variant == "torch_save":
            with open(target, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            h.save(target)
        result["time"] = time.perf_counter() - t
        os.unlink(target)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out, "w") as f:
        json.dump(result, f)


def ddp_child(path: str, out: str, use_mmap: bool = False) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from nn_handler import NNHandler
    _warm_up()
    dist.init_process_group("gloo")
    dist.barrier()
    t = time.perf_counter()
    NNHandler.load(path, device="cpu", mmap=use_mmap)
    dist.barrier()
    elapsed = time.perf_counter() - t
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"time": elapsed}, f)
    dist.destroy_process_group()


def run(variant: str, path: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{variant}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1" if variant.startswith("ddp2") else "2"}
    if variant.startswith("ddp2"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--ddp-child", path, out, "mmap" if variant == "ddp2_mmap" else "copy"]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, path, out]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the ~1.2 GB checkpoint (default: a temp dir)")
    parser.add_argument("--variants", default="read,naive,handler,handler_noverify,handler_mmap,handler_mmap_noverify,"
                                                "fresh,torch_save,handler_save,handler_save_nochecksum,ddp2,ddp2_mmap")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(dir=args.dir, prefix="bench_load_")
    path = os.path.join(workdir, "big.pt")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--make", path], check=True)
    size = os.path.getsize(path)
    variants = args.variants.split(",")
    results = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            results[v].append(run(v, path, workdir))
            print(f"rep {rep} {v}: {results[v][-1]}", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    summary = {"file_gb": round(size / 1e9, 3), "medians": med}
    if {"handler", "naive", "read"} <= set(med):
        summary["load_vs_naive"] = med["handler"]["time"] / med["naive"]["time"]
        summary["load_vs_read"] = med["handler"]["time"] / med["read"]["time"]
        summary["load_step_vs_naive_load_step"] = med["handler"]["time_step"] / med["naive"]["time_step"]
    if {"handler_mmap", "naive", "read"} <= set(med):
        summary["mmap_load_vs_naive"] = med["handler_mmap"]["time"] / med["naive"]["time"]
        summary["mmap_load_vs_read"] = med["handler_mmap"]["time"] / med["read"]["time"]
        summary["mmap_load_step_vs_naive_load_step"] = med["handler_mmap"]["time_step"] / med["naive"]["time_step"]
    if {"handler_mmap", "fresh"} <= set(med):
        summary["mmap_extra_peak_rss_fraction_of_file"] = \
            (med["handler_mmap"]["peak_rss_mb"] - med["fresh"]["peak_rss_mb"]) * 1024 * 1024 / os.path.getsize(path) \
            if os.path.exists(path) else None
    if {"handler_mmap", "handler_mmap_noverify"} <= set(med):
        summary["mmap_load_verify_overhead"] = med["handler_mmap"]["time"] / med["handler_mmap_noverify"]["time"] - 1
        summary["mmap_load_step_verify_overhead"] = \
            med["handler_mmap"]["time_step"] / med["handler_mmap_noverify"]["time_step"] - 1
    if {"handler", "handler_noverify"} <= set(med):
        summary["load_step_verify_overhead"] = med["handler"]["time_step"] / med["handler_noverify"]["time_step"] - 1
    if {"handler", "fresh"} <= set(med):
        summary["extra_peak_rss_fraction_of_file"] = (med["handler"]["peak_rss_mb"] - med["fresh"]["peak_rss_mb"]) \
            * 1024 * 1024 / size
    if {"handler", "handler_noverify"} <= set(med):
        summary["load_verify_overhead"] = med["handler"]["time"] / med["handler_noverify"]["time"] - 1
    if {"handler_save", "torch_save"} <= set(med):
        summary["save_vs_torch_save_fsync"] = med["handler_save"]["time"] / med["torch_save"]["time"]
    if {"handler_save", "handler_save_nochecksum"} <= set(med):
        summary["save_checksum_overhead"] = med["handler_save"]["time"] / med["handler_save_nochecksum"]["time"] - 1
    if {"ddp2", "handler"} <= set(med):
        summary["ddp2_load_vs_single"] = med["ddp2"]["time"] / med["handler"]["time"]
    if {"ddp2_mmap", "handler_mmap"} <= set(med):
        summary["ddp2_mmap_load_vs_single"] = med["ddp2_mmap"]["time"] / med["handler_mmap"]["time"]
    os.unlink(path)
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1:2] == ["--ddp-child"]:
        ddp_child(sys.argv[2], sys.argv[3], sys.argv[4:5] == ["mmap"])
    elif sys.argv[1:2] == ["--make"]:
        make_checkpoint(sys.argv[2])
    else:
        main()
