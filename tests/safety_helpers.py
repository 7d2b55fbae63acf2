"""Hostile payloads and a save loop for the integrity tests (importable, so pickling works)."""
import os
import sys
from pathlib import Path


def mapped_from(tensor, path) -> bool:
    """Whether ``tensor``'s memory is a mapping of the file ``path`` (Linux: /proc/self/maps)."""
    ptr = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[-1] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


class Payload:
    """Pickles to a call of os.system: unpickling it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_forever(path: str) -> None:
    """Save version 0, 1, 2, ... of a ~24 MB handler-free checkpoint to ``path`` until killed."""
    import torch

    from nn_handler.checkpointing.io import atomic_save

    version = 0
    while True:
        state = {"format": "integrity-test", "version": version,
                 "weights": torch.full((6_000_000,), float(version))}
        atomic_save(state, path)
        if version == 0:
            print("ready", flush=True)
        version += 1


if __name__ == "__main__":
    save_forever(sys.argv[1])


def tiny_dataset(n: int):
    """A user's own dataset builder, named by a checkpoint's data spec."""
    import torch
    from torch.utils.data import TensorDataset
    return TensorDataset(torch.zeros(n, 8), torch.zeros(n, dtype=torch.long))
