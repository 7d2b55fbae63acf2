"""Counting how often a process opens a checkpoint by name and how many bytes it checksums.

``watch(path)`` records every ``open`` audit event (Python's ``open``/``os.open``) whose name
resolves to ``path``, and every byte a read checksums (whatever file it comes from: watch one
checkpoint at a time for byte counts; a save's checksum is not counted), until the block ends.
Reopening the pinned descriptor (``/proc/self/fd/N``) is not a new open by name:
it cannot reach another file. Used in-process by the library tests and, through
``python tests/checkpoint_reads.py FILE -- ARGS``, around a real ``python -m runner`` run
(the counts go to stderr as one JSON line starting with ``READS``).
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Dict, Iterator

_WATCHED: Dict[str, Dict[str, int]] = {}
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _WATCHED or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    name = os.fsdecode(args[0])
    if name.startswith("/proc/self/fd/"):
        return
    try:
        real = os.path.realpath(name)
    except Exception:  # noqa: BLE001
        return
    counts = _WATCHED.get(real)
    if counts is not None:
        counts["opens"] += 1


def _install() -> None:
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    sys.addaudithook(_audit)
    from nn_handler.checkpointing import copyload
    from nn_handler.checkpointing import io as ckpt_io

    # The two places a read hashes file bytes: a chunk hashed on its own (verify) and a piece
    # hashed while it is copied into memory (load). A save's hashing is not counted.
    chunk, piece = ckpt_io._chunk_crc, copyload._crc_piece

    def counting_chunk(buf, start: int, end: int, zero_from: int) -> int:
        _count(end - start)
        return chunk(buf, start, end, zero_from)

    def counting_piece(buf, at: int, zero_from: int, value: int) -> int:
        _count(memoryview(buf).nbytes)
        return piece(buf, at, zero_from, value)

    ckpt_io._chunk_crc, copyload._crc_piece = counting_chunk, counting_piece


def _count(size: int) -> None:
    for counts in _WATCHED.values():
        counts["hashed"] += size


@contextmanager
def watch(path: str) -> Iterator[Dict[str, int]]:
    """Counts for ``path`` while the block runs: ``opens`` (by name) and ``hashed`` (bytes checksummed)."""
    _install()
    counts = {"opens": 0, "hashed": 0}
    _WATCHED[os.path.realpath(path)] = counts
    try:
        yield counts
    finally:
        _WATCHED.pop(os.path.realpath(path), None)


def covered_bytes(path: str) -> int:
    """The bytes a checkpoint's checksum covers (from its checksum record)."""
    from nn_handler.checkpointing import io as ckpt_io
    return ckpt_io.read_trailer(path).covered


if __name__ == "__main__":  # python tests/checkpoint_reads.py FILE -- python -m runner ARGS...
    import atexit
    import runpy

    target, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    context = watch(target)
    counts = context.__enter__()
    atexit.register(lambda: print("READS " + json.dumps(counts), file=sys.stderr, flush=True))
    sys.argv = ["runner", *argv]
    runpy.run_module("runner", run_name="__main__", alter_sys=True)
