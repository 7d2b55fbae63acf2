"""The default read: every tensor copied out of the file into the process's own memory, checksummed on the way.

``torch.load(mmap=True)`` parses the archive and hands back tensors that view a private
mapping of the file, without touching their bytes. This module then gives each storage
fresh memory and fills it with ``preadv`` straight from the file (the kernel copies from the
page cache; the mapping is never faulted in, so it costs no resident memory), walking the
file in the checksum's chunks on a few threads. A chunk whose CRC this process is to
compute is read whole -- storage bytes into their destinations, the bytes between them
(zip headers, the pickle) into a small scratch buffer -- and hashed from those buffers
while they are still in cache, so verification is not a second pass over the file.

Why copy at all: the loaded state is then not tied to the file. Our own ``save`` replaces a
file rather than rewriting it, but a plain ``torch.save`` to the same path truncates and
rewrites it in place, which would change (or, by SIGBUS, crash) tensors still mapped from it.

Anything that does not fit -- a legacy (non-zip) file, a byte order to swap, a storage that
cannot be matched to its record, a tensor subclass -- takes the plain route: ``clone``, with
the mapped pages released right after (``materialize``), and a separate checksum pass.
"""
from __future__ import annotations

import bisect
import concurrent.futures as futures
import ctypes
import errno
import mmap as _mmap
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from . import io as _io
from .errors import CorruptCheckpointError
from .fastload import map_tensors, materialize, tensors_in

_BLOCK = 1 << 20  # one preadv + hash step: small enough to stay in cache between the two
_PREADV = hasattr(os, "preadv")  # (not on Windows: there every load takes the plain route)
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # buffers one preadv accepts (1024 on Linux)
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024
_PAGE = _mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; elsewhere the call fails harmlessly and pages fault in one by one
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _record_offsets(path: str) -> Optional[List[int]]:
    """The file offsets of the archive's tensor-data records, sorted; None if their bytes must not be copied raw."""
    with open(path, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        records = reader.get_all_records()
        prefix = next((name[:-len("data.pkl")] for name in records if name.endswith("data.pkl")), None)
        if prefix is None:
            return None
        if prefix + "byteorder" in records:
            order = bytes(reader.get_record(prefix + "byteorder")).decode(errors="replace")
            if order != sys.byteorder:
                return None  # torch.load swapped these bytes in memory: the file's are not the tensors'
        return sorted(reader.get_record_offset(name) for name in records if name.startswith(prefix + "data/"))


def _copyable(t: torch.Tensor) -> bool:
    # (conjugate and negative views carry a bit beside their storage that a rebuilt tensor would drop)
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided and \
        not t.is_quantized and not t.is_conj() and not t.is_neg()


class _Plan:
    """Where each mapped storage's bytes lie in the file, and the fresh storage they go to."""

    def __init__(self, segments: List[Tuple[int, int, memoryview]]):
        self.segments = sorted(segments, key=lambda s: s[0])  # (file offset, nbytes, destination bytes)
        self.starts = [s[0] for s in self.segments]

    def overlapping(self, start: int, end: int) -> Iterable[Tuple[int, int, memoryview]]:
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.segments) and self.segments[i][0] < end:
            offset, nbytes, dest = self.segments[i]
            if offset + nbytes > start:
                yield offset, nbytes, dest
            i += 1


def _match(tensors: List[torch.Tensor], offsets: List[int], file_size: int):
    """Map each tensor's storage to its record offset; None unless the pairing is certain.

    torch maps the whole file once and slices each storage out of it, so pointer - offset is
    the same base for all of them. The pairing is certain when every data record is the
    storage of exactly one loaded tensor: then the lowest storage is the lowest record, which
    fixes the base, and every other storage must then land exactly on a record. (A record that
    no tensor uses could shift that anchor; such files take the plain route.)
    """
    storages: Dict[int, int] = {}  # data pointer -> nbytes
    for t in tensors:
        if not _copyable(t):
            return None
        storage = t.untyped_storage()
        if storage.data_ptr() == 0:
            return None
        storages.setdefault(storage.data_ptr(), storage.nbytes())
    if not storages:
        return {}
    if len(storages) != len(offsets):
        return None
    base = min(storages) - offsets[0]
    known = set(offsets)
    placed = {}
    for ptr, nbytes in storages.items():
        offset = ptr - base
        if offset not in known or offset + nbytes > file_size:
            return None
        if nbytes:
            placed[ptr] = (offset, nbytes)
    ends = sorted(placed.values())
    if any(a_off + a_n > b_off for (a_off, a_n), (b_off, _) in zip(ends, ends[1:])):
        return None  # overlapping records: not the archive we think it is
    return placed


def read_copied(obj: Any, path: str, trailer: Optional["_io.Trailer"], crc_indices: Iterable[int]
                ) -> Tuple[Any, Dict[int, int]]:
    """``obj`` (from ``torch.load(path, mmap=True)``) with every tensor in fresh memory, and the chunk CRCs asked for.

    The CRCs are those of chunks ``crc_indices`` of ``trailer`` (none without a trailer);
    the caller checks them against the trailer.
    """
    wanted = sorted(set(crc_indices)) if trailer is not None else []
    with open(path, "rb") as f:
        if f.read(4) != _io._ZIP_MAGIC:  # a legacy file: torch.load read it into ordinary memory already
            return obj, (_io.chunk_crcs(path, trailer, wanted) if wanted else {})
    tensors = tensors_in(obj)  # (a sparse tensor's indices and values: each has its own record)
    size = os.path.getsize(path)
    try:
        offsets = _record_offsets(path)
    except Exception as exc:  # torch.load just read this very file: it changed under us
        raise CorruptCheckpointError(path, f"the file changed while it was being read ({exc})") from None
    placed = _match(tensors, offsets, size) if offsets is not None and _PREADV else None
    if placed is None:  # the plain route
        crcs = _io.chunk_crcs(path, trailer, wanted) if wanted else {}
        return materialize(obj), crcs
    dests = {ptr: torch.empty(n, dtype=torch.uint8) for ptr, (_, n) in placed.items()}
    plan = _Plan([(offset, n, memoryview(dests[ptr].numpy())) for ptr, (offset, n) in placed.items()])
    chunk = trailer.chunk_size if trailer is not None else _io.CHUNK_SIZE
    covered = trailer.covered if trailer is not None else size
    hashed = set(wanted)
    # Chunks to visit: every one holding storage bytes, and every one to hash.
    visit = set(wanted)
    for offset, n, _ in plan.segments:
        visit.update(range(offset // chunk, (offset + n - 1) // chunk + 1))
    crcs: Dict[int, int] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(index: int) -> Tuple[int, int]:
            start, end = index * chunk, min((index + 1) * chunk, covered if index in hashed else size)
            return index, _copy_chunk(fd, plan, start, end, index in hashed, covered - 2)
        workers = _io._WORKERS if len(visit) > 1 else 1
        with futures.ThreadPoolExecutor(workers) as pool:
            for index, value in pool.map(one, sorted(visit)):
                if index in hashed:
                    crcs[index] = value
    except OSError as exc:  # (EOFError too: a file cut short while it was read)
        raise CorruptCheckpointError(path, f"the file could not be read: {exc}") from None
    finally:
        os.close(fd)
    copies = {ptr: dest.untyped_storage() for ptr, dest in dests.items()}

    def rebuild(value: torch.Tensor) -> torch.Tensor:
        if not _copyable(value) or not value.untyped_storage().nbytes():
            return materialize(value)
        out = torch.empty(0, dtype=value.dtype)
        out.set_(copies[value.untyped_storage().data_ptr()], value.storage_offset(), value.size(), value.stride())
        return out.requires_grad_(value.requires_grad)
    return map_tensors(rebuild, obj), crcs


def _copy_chunk(fd: int, plan: _Plan, start: int, end: int, hash_it: bool, zero_from: int) -> int:
    """Read file bytes ``[start, end)`` into their storages; if ``hash_it``, read all of them and return their CRC."""
    value = 0
    scratch = memoryview(np.empty(_BLOCK, dtype=np.uint8)) if hash_it else None
    pos = start
    while pos < end:
        stop = min(pos + _BLOCK, end)
        buffers: List[memoryview] = []
        cursor = pos
        for offset, nbytes, dest in plan.overlapping(pos, stop):
            a, b = max(pos, offset), min(stop, offset + nbytes)
            _prefault(dest[a - offset:b - offset])
            if not hash_it:
                _read_into(fd, [dest[a - offset:b - offset]], a)
                continue
            if a > cursor:
                buffers.append(scratch[cursor - pos:a - pos])
            buffers.append(dest[a - offset:b - offset])
            cursor = b
        if hash_it:
            if cursor < stop:
                buffers.append(scratch[cursor - pos:stop - pos])
            _read_into(fd, list(buffers), pos)
            at = pos
            for buf in buffers:
                value = _crc_piece(buf, at, zero_from, value)
                at += buf.nbytes
        pos = stop
    return value


def _prefault(view: memoryview) -> None:
    """Map fresh pages under ``view`` in one call rather than one fault per page (about 15% of the copy here)."""
    if _libc is None:
        return
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    start = address // _PAGE * _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + view.nbytes - start), _MADV_POPULATE_WRITE)


def _read_into(fd: int, buffers: List[memoryview], offset: int) -> None:
    """``preadv`` until every buffer is full; a short file is a truncated file."""
    while buffers:
        got = os.preadv(fd, buffers[:_IOV_MAX], offset)
        if got <= 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {offset} (truncated while being read?)")
        offset += got
        while buffers and got >= buffers[0].nbytes:
            got -= buffers[0].nbytes
            buffers = buffers[1:]
        if got:
            buffers[0] = buffers[0][got:]


def _crc_piece(buf: memoryview, at: int, zero_from: int, value: int) -> int:
    """CRC-32C continued over ``buf`` (file bytes from ``at``), the bytes from ``zero_from`` on read as zeros."""
    end = at + buf.nbytes
    if zero_from >= end:
        return _io._crc(buf, value)
    if zero_from > at:
        value = _io._crc(buf[:zero_from - at], value)
    return _io._crc(b"\x00" * (end - max(at, zero_from)), value)
