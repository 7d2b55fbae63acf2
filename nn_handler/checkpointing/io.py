"""Bytes on disk: atomic, checksummed writes and safe, verified reads. Knows nothing about handlers.

The checksum. ``torch.save`` writes a zip archive; its end-of-central-directory record
ends with a comment field, which zip readers (and ``torch.load``) skip. While the archive
is written, its bytes are cut into fixed-size chunks and each chunk's CRC-32C is computed
(hardware CRC, GIL released, chunks hashed in parallel). The zip comment then carries a
fixed-size trailer: a magic, the chunk size, the length covered, the CRC-32C of the table
of chunk CRCs, and the CRC-32C of the trailer itself.

Why that detects every single-bit change (not just with high probability): a single-bit
change inside the covered bytes changes exactly one chunk's CRC (a CRC with more than one
term detects every single-bit error), i.e. it changes one 32-bit word of the CRC table,
a burst of at most 32 bits, which CRC-32C always detects. A change inside the trailer is
caught by the trailer's own CRC or by its magic/length checks; a change that destroys the
magic makes the file look foreign, and a payload that says it is a handler checkpoint but
carries no valid trailer is refused by the loader.

CRC-32C rather than a cryptographic hash: the threat here is damage, not forgery (a forger
can rewrite any checksum stored beside the data; safety against hostile files comes from
``pickle_scan``, which checks the archive and its pickle before anything is unpickled, and
``weights_only=True``), and CRC-32C runs at about 6 GB/s per core here against about
1.5 GB/s for sha256 (see the README for what verification costs a load).
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import errno
import mmap
import os
import pickle
import socket
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import crc32c
import torch

from .errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError
from .pickle_scan import pread as _pread
from .pickle_scan import scan as _scan_pickles

PathLike = Union[str, os.PathLike]

_ZIP_MAGIC = b"PK\x03\x04"
_EOCD_MAGIC = b"PK\x05\x06"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save(_use_new_zipfile_serialization=False)

CHUNK_SIZE = 16 * 1024 * 1024
_TRAILER_MAGIC = b"NNHCK1c32c"  # 10 bytes: trailer format 1, algorithm crc32c
_TRAILER = struct.Struct("<10sQQII")  # magic, chunk size, covered length, table crc, trailer crc
TRAILER_SIZE = _TRAILER.size
_PARALLEL_MIN = 4 * 1024 * 1024  # below this a write is hashed inline
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_MAP_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)  # (not on Windows)


def _crc(data, value: int = 0) -> int:
    return crc32c.crc32c(data, value)


class _ChunkedCRCWriter:
    """A write-only file object that CRCs what passes through, per fixed-size chunk."""

    def __init__(self, f, pool: futures.Executor):
        self._f = f
        self._pool = pool
        self.crcs: List[int] = []  # one per chunk; the last may be partial
        self.offset = 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n == 0:
            return 0
        # Split the write at chunk boundaries: every piece belongs to a different chunk, so
        # the pieces hash independently (in parallel) while the bytes go to the file.
        pieces: List[Tuple[int, memoryview]] = []
        pos, offset = 0, self.offset
        while pos < n:
            index = offset // CHUNK_SIZE
            take = min(n - pos, CHUNK_SIZE - offset % CHUNK_SIZE)
            pieces.append((index, view[pos:pos + take]))
            pos += take
            offset += take
        while len(self.crcs) <= pieces[-1][0]:
            self.crcs.append(0)
        if n >= _PARALLEL_MIN:
            jobs = [(index, self._pool.submit(_crc, piece, self.crcs[index])) for index, piece in pieces]
            self._write_all(view)
            for index, job in jobs:
                self.crcs[index] = job.result()
        else:
            for index, piece in pieces:
                self.crcs[index] = _crc(piece, self.crcs[index])
            self._write_all(view)
        self.offset += n
        return n

    def _write_all(self, view: memoryview) -> None:
        try:
            self._write_some(view)
        except OSError as exc:  # torch's writer would replace it by an opaque RuntimeError
            self.error = exc
            raise

    def _write_some(self, view: memoryview) -> None:
        written = self._f.write(view)
        if written is not None and written != view.nbytes:  # raw files may write short
            rest = view[written:]
            while rest.nbytes:
                done = self._f.write(rest)
                rest = rest[done:]

    def flush(self) -> None:
        self._f.flush()


def _table_crc(crcs: List[int]) -> int:
    return _crc(struct.pack(f"<{len(crcs)}I", *crcs))


def _pack_trailer(chunk_size: int, covered: int, table_crc: int) -> bytes:
    head = _TRAILER.pack(_TRAILER_MAGIC, chunk_size, covered, table_crc, 0)[:-4]
    return head + struct.pack("<I", _crc(head))


# ---------------------------------------------------------------------------- writing
def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _clean_stale_temporaries(path: Path) -> None:
    """Remove temporary files that killed saves on this host left in ``path``'s directory.

    Any target's, not only ``path``'s: a run that saves under new names (step checkpoints)
    would otherwise never clean up after a killed save.
    """
    marker = f".{socket.gethostname()}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp") and marker in name):
            continue
        try:
            pid = int(name.rsplit(marker, 1)[1].split(".", 1)[0])
            os.kill(pid, 0)
            continue  # its writer is still running: a concurrent save, leave it
        except ProcessLookupError:
            pass  # its writer is gone
        except (ValueError, PermissionError):
            continue
        try:
            os.unlink(path.parent / name)
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_with_trailer(obj: Any, f) -> None:
    """``torch.save`` into ``f`` through the chunked CRC writer, then the checksum trailer."""
    with futures.ThreadPoolExecutor(_WORKERS) as pool:
        writer = _ChunkedCRCWriter(f, pool)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
    size = writer.offset
    f.seek(size - 22)
    if f.read(4) != _EOCD_MAGIC:
        raise RuntimeError("torch.save did not end the archive with a plain end-of-central-directory record")
    # The covered bytes end with the zip comment length, written as 0 by torch.save and set
    # here to the trailer's length: the verifier hashes it as 0.
    f.seek(size - 2)
    f.write(struct.pack("<H", TRAILER_SIZE) + _pack_trailer(CHUNK_SIZE, size, _table_crc(writer.crcs)))


def atomic_save(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is always the old complete file or the new one.

    The bytes go to a temporary file in the same directory (checksummed on the way, see
    the module docstring), are flushed and fsynced, and the temporary file replaces
    ``path`` in one rename; the directory is fsynced after. On any error the temporary
    file is removed and the previous checkpoint is untouched.
    """
    def write(fd: int, tmp_name: str) -> None:
        with os.fdopen(fd, "w+b", closefd=False) as f:
            _save_with_trailer(obj, f)
            f.flush()

    return atomic_write(path, write, "checkpoint ")


def atomic_write(path: PathLike, write: Callable[[int, str], None], what: str = "") -> Path:
    """Create or replace ``path`` so that a crash at any moment leaves the old file or the new one.

    ``write(fd, tmp_name)`` fills a temporary file in the same directory (created with the usual
    permissions); it is then fsynced, renamed over ``path``, and the directory fsynced. On any
    error the temporary file is removed and an ``OSError`` names ``path`` and says the previous
    file is intact. ``what`` prefixes the path in messages ("checkpoint ").
    """
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the directory for {what}{path}: {exc.strerror}") from exc
    _clean_stale_temporaries(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_tmp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {what}{path}: {exc.strerror}") from exc
    try:
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
            write(fd, tmp_name)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"writing {what}{path} failed: {exc.strerror}; "
                                     f"the previous file at that path is intact") from exc
        raise
    _fsync_dir(directory)
    return path


# ---------------------------------------------------------------------------- reading
def file_checksum(path: PathLike) -> Optional[str]:
    """The checksum a file written by ``atomic_save`` carries (read from its trailer only), or None."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER_SIZE + 24:
            return None
        f.seek(size - TRAILER_SIZE)
        trailer = f.read(TRAILER_SIZE)
    if len(trailer) != TRAILER_SIZE or not trailer.startswith(_TRAILER_MAGIC):
        return None
    _, chunk_size, covered, table_crc, _ = _TRAILER.unpack(trailer)
    return f"crc32c:{covered}:{chunk_size}:{table_crc:08x}"


def pinned_name(fd: int, path: str) -> str:
    """A name that opens the very file behind ``fd`` (Linux: /proc/self/fd/N), else ``path`` itself."""
    name = f"/proc/self/fd/{fd}"
    return name if os.path.exists(name) else path


def check_readable_file(path: PathLike) -> Path:
    """Raise the right error for a path that is missing, a directory, or empty."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
    if path.is_dir():
        raise NotACheckpointError(path, "expected a checkpoint file, found a directory")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(path, "the file is empty (an interrupted write?)")
    return path


def _chunk_crc(buf, start: int, end: int, zero_from: int) -> int:
    """CRC of ``buf[start:end]`` with the bytes from ``zero_from`` on read as zeros."""
    if zero_from >= end:
        return _crc(buf[start:end])
    value = _crc(buf[start:zero_from]) if zero_from > start else 0
    return _crc(b"\x00" * (end - max(start, zero_from)), value)


@dataclass(frozen=True)
class Trailer:
    """A file's checksum record: the bytes covered, the chunk size and the CRC of the chunk-CRC table."""

    covered: int
    chunk_size: int
    table_crc: int

    @property
    def chunks(self) -> int:
        return (self.covered + self.chunk_size - 1) // self.chunk_size


def read_trailer(path: PathLike) -> Optional[Trailer]:
    """The file's checksum record (reading only its last bytes), None if it has none; raises if damaged.

    The size is taken from the open file and every read is checked for length, so a file cut
    short or rewritten in place meanwhile is a CorruptCheckpointError, not a raw error.
    """
    path = check_readable_file(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_signature(path, f.read(4))
            if size < TRAILER_SIZE + 2 + 22:
                return None
            f.seek(size - TRAILER_SIZE - 2)
            tail = f.read(TRAILER_SIZE + 2)
        if len(tail) != TRAILER_SIZE + 2:
            raise CorruptCheckpointError(path, "the file was cut short while it was being read (rewritten in place?)")
        comment_length, trailer = struct.unpack("<H", tail[:2])[0], tail[2:]
        if not trailer.startswith(_TRAILER_MAGIC):
            return None
        _, chunk_size, covered, table_crc, trailer_crc = _TRAILER.unpack(trailer)
    except CheckpointError:
        raise
    except (OSError, struct.error, ValueError) as exc:
        raise CorruptCheckpointError(path, f"the checksum record cannot be read ({type(exc).__name__}: "
                                           f"{_first_line(exc)}); the file changed while it was being read?") from None
    if _crc(trailer[:-4]) != trailer_crc:
        raise CorruptCheckpointError(path, "the checksum record is damaged")
    if comment_length != TRAILER_SIZE or covered != size - TRAILER_SIZE or chunk_size <= 0:
        raise CorruptCheckpointError(path, f"the checksum record does not match the file (covers {covered} "
                                           f"bytes, file has {size - TRAILER_SIZE}): truncated or extended")
    return Trailer(covered, chunk_size, table_crc)


def chunk_crcs(path: PathLike, trailer: Trailer, indices: Optional[List[int]] = None) -> Dict[int, int]:
    """CRC-32C of the chunks ``indices`` (all by default), hashed in parallel over a read-only mmap."""
    indices = list(range(trailer.chunks)) if indices is None else list(indices)
    if not indices:
        return {}
    zero_from = trailer.covered - 2  # the zip comment length was 0 when hashed
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            def one(i: int) -> int:
                start = i * trailer.chunk_size
                return _chunk_crc(view, start, min(start + trailer.chunk_size, trailer.covered), zero_from)
            if len(indices) > 1 and trailer.covered >= _PARALLEL_MIN:
                with futures.ThreadPoolExecutor(_WORKERS) as pool:
                    values = list(pool.map(one, indices))
            else:
                values = [one(i) for i in indices]
        finally:
            view.release()
    return dict(zip(indices, values))


def check_table(path: PathLike, trailer: Trailer, crcs: Dict[int, int]) -> None:
    """Raise CorruptCheckpointError unless the chunk CRCs match the trailer's table CRC."""
    if _table_crc([crcs[i] for i in range(trailer.chunks)]) != trailer.table_crc:
        raise CorruptCheckpointError(path, "checksum mismatch: the file's contents were changed or damaged "
                                           "after it was written")


def safe_load(path: PathLike, map_location: Optional[Union[str, torch.device]] = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError.

    The file is scanned first (``pickle_scan.scan``: its pickle read as opcodes, nothing
    executed): a global beyond what tensors and plain containers need, a compressed zip
    record, or a size the file's records do not hold is refused before anything is
    unpickled or allocated. Then ``weights_only=True`` unpickles the very file that was
    scanned (opened once; a save replacing ``path`` meanwhile cannot swap it). So no code
    from the file can run and a small file cannot make this allocate much more than its
    size. Callers verify the checksum (``CheckpointFile``).
    """
    path = check_readable_file(path)
    try:
        pin = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CorruptCheckpointError(path, f"the file cannot be opened ({exc.strerror})") from None
    try:
        source = pinned_name(pin, os.fspath(path))
        return _load_scanned(path, source, _pread(pin, 4, 0), map_location, mmap)
    finally:
        os.close(pin)


def _load_scanned(path: Path, source: str, head: bytes, map_location: Any, mmap: bool) -> Any:
    _check_signature(path, head)
    # Before anything is unpickled or allocated: only tensors and plain containers, and sizes
    # that the file's own records hold (see pickle_scan).
    _scan_pickles(source, os.fspath(path))
    mapped = mmap and head == _ZIP_MAGIC
    # A mapping is always private: with MAP_SHARED (a process-wide torch option) an optimizer
    # step would write the new weights into the checkpoint file itself.
    private = torch.serialization.set_default_mmap_options(_MAP_PRIVATE) if mapped and _MAP_PRIVATE is not None \
        else contextlib.nullcontext()
    try:
        # torch skips checking a loaded sparse tensor's indices against its size unless asked;
        # unchecked, a forged index would make the first to_dense() write out of bounds.
        with private, torch.sparse.check_sparse_tensor_invariants(enable=True):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported" in text:
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
            raise UnsafeCheckpointError(
                path, f"refused to load: the file holds pickled objects or code, not only tensors and "
                      f"plain data ({detail[:300]})") from None
        raise CorruptCheckpointError(path, f"the file cannot be unpickled ({_first_line(exc)})") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CorruptCheckpointError(path, f"the file is truncated or damaged ({_first_line(exc)})") from None
    except RuntimeError as exc:
        if _is_foreign_zip(source):
            raise NotACheckpointError(path, f"a zip archive that is not a PyTorch checkpoint ({_first_line(exc)})") from None
        raise CorruptCheckpointError(path, f"the file is truncated or damaged ({_first_line(exc)})") from None
    except MemoryError:
        raise CorruptCheckpointError(path, "the file is damaged (it asks for an impossible allocation)") from None
    except Exception as exc:  # the unpickler on damaged bytes can raise nearly anything
        raise CorruptCheckpointError(path, f"the file is damaged ({type(exc).__name__}: {_first_line(exc)})") from None


_UNSAFE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}


def _check_signature(path: Path, head: bytes) -> None:
    """Only zip-format and legacy torch files go on to ``torch.load``; a raw pickle is refused unread."""
    if head in (_ZIP_MAGIC, _LEGACY_MAGIC):
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # A bare pickle stream: scan its opcodes (nothing is executed) to say what it would run.
        import pickletools
        found = []
        try:
            with open(path, "rb") as f:
                strings: list = []
                for opcode, arg, _ in pickletools.genops(f.read(1 << 20)):
                    if isinstance(arg, str):
                        strings = (strings + [arg])[-2:]
                    if opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                        found.append(f"{strings[0]}.{strings[1]}")
                    elif opcode.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif opcode.name in _UNSAFE_OPCODES and opcode.name != "STACK_GLOBAL":
                        found.append(opcode.name)
                    if len(found) >= 3:
                        break
        except Exception:
            pass
        raise UnsafeCheckpointError(path, "refused to load a raw pickle stream (not a torch.save file)"
                                          + (f": it would run {', '.join(found)}" if found else ""))
    raise NotACheckpointError(path, "not a PyTorch checkpoint (unknown file signature)")


def _is_foreign_zip(path: Path) -> bool:
    """A readable zip archive with no ``data.pkl`` record: some other program's archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("data.pkl") for name in archive.namelist())
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
