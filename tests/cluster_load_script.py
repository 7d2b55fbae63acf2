"""Under torchrun: load a checkpoint on every rank, close the process group, exit (issue 16).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/cluster_load_script.py CKPT

Exits 0 when it loaded; the test checks that it does so every time (no abort at interpreter exit).
"""
import sys

import torch
import torch.distributed as dist

from nn_handler import NNHandler
from nn_handler.models import MLP


def main(path: str) -> None:
    h = NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", in_features=8, out_features=3, hidden=[16])
    h2 = NNHandler.load(path, device="cpu")
    assert h.is_distributed and h2.is_distributed, "not a distributed run"
    total = torch.tensor([float(sum(p.sum() for p in h.module.parameters()))])
    dist.all_reduce(total)
    print(f"LOADED rank={dist.get_rank()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
