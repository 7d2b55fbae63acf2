"""Under torchrun --max-restarts=1: rank 1 dies after the group formed; the restarted ranks form it again (issue 16).

    python -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=1 tests/cluster_restart_script.py [torch]

In the second attempt rank 1 joins late, so rank 0 looks up rank 1's address first, while the store
torchrun's agent keeps across attempts still holds the dead rank's. With ``torch`` the group is
formed by ``dist.init_process_group`` alone (the plain ``env://`` rendezvous), else by
``nn_handler.distributed.setup``. Prints FORMED on each rank that formed the second attempt's group.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from nn_handler import distributed as ndist


def main(plain: bool) -> None:
    attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    if attempt == 1 and rank == 1:
        time.sleep(3)
    if plain:
        dist.init_process_group("gloo")
    else:
        ndist.setup(None)
    total = torch.ones(1)
    dist.all_reduce(total)
    if attempt == 0:
        if rank == 1:
            os._exit(1)  # a worker dies: torchrun stops the other one and restarts both
        time.sleep(120)
    print(f"FORMED attempt={attempt} rank={rank} sum={total.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:] == ["torch"])
