"""Sharded checkpoints: a directory of ``torch.distributed.checkpoint`` shards plus a header file, committed by one rename.

    ckpt-e0003-s000000120.dcp/
        header.pth        everything but the sharded tensors: a normal checkpoint file (checksummed),
                          with the shard files' sizes and CRC-32C and DCP's index as plain data
        __0_0.distcp ...  each rank's shards, written by DCP's FileSystemWriter (fsynced)
        .metadata         DCP's own index, a pickle: written by DCP, never read here

Saving: every rank writes its shards into ``.NAME.partial-TOKEN`` beside the target, hashes the
files it wrote, rank 0 writes the header into the same directory and renames the directory to
its name (an existing checkpoint of that name is swapped out atomically with
``renameat2(RENAME_EXCHANGE)`` and removed after). A kill at any moment leaves either the old
directory or the new one, complete; a partial directory has a hidden name that nothing lists.

Loading: the header is opened and verified like any checkpoint; then every shard file is
hashed (split over the ranks that read the very same directory; a rank with a copy of its own
hashes all of it) and every rank raises if any file differs from the header's record. DCP's
index is rebuilt from the header's plain record, checked against the shard files' sizes and
names, so nothing in the directory is unpickled except the tensors themselves
(``torch.load(weights_only=True)`` on ranges that were just verified). Resharding (N ranks ->
M ranks, FSDP <-> DDP <-> one process) is DCP's: each rank reads the pieces of the shards that
its own layout needs.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import crc32c
import torch
import torch.distributed as dist

from .. import distributed
from . import format as F
from .errors import CheckpointError, CorruptCheckpointError, IncompatibleCheckpointError

PathLike = Union[str, os.PathLike]
HEADER = "header.pth"
SUFFIX = ".dcp"
SEP = "/"  # between a part's name and its tensor's key in the DCP state dict: "optimizer/0.weight/exp_avg"
_SHARD = re.compile(r"^__(\d{1,6})_(\d{1,6})\.distcp$")
_PARTIAL = ".partial-"
_READ = 16 * 1024 * 1024
_MAX_ENTRIES = 10_000_000
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool, torch.complex64, torch.complex128)}


def is_sharded(path: PathLike) -> bool:
    """``path`` is a sharded checkpoint directory (a real directory holding a header file)."""
    p = Path(path)
    try:
        return p.is_dir() and (p / HEADER).is_file() and not (p / HEADER).is_symlink()
    except OSError:
        return False


def header_path(path: PathLike) -> str:
    return os.path.join(os.fspath(path), HEADER)


def is_partial(name: str) -> bool:
    """A directory a save was still writing (or was killed while writing)."""
    return name.startswith(".") and _PARTIAL in name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP's note that one process with no process group loads alone: that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


# ---------------------------------------------------------------------------- writing
def file_crc(path: PathLike) -> Tuple[int, int]:
    """(size, CRC-32C) of a file, read once in large pieces."""
    value, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_READ)
            if not block:
                break
            value = crc32c.crc32c(block, value)
            size += len(block)
    return size, value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def commit(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` the checkpoint ``target``, in one atomic step."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(errno.EEXIST, "not replacing something that is not a sharded checkpoint", str(target))
    if target.exists():
        if not is_sharded(target):
            raise FileExistsError(errno.EEXIST, "not replacing a directory that is not a sharded checkpoint",
                                  str(target))
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # (now the old checkpoint)
        else:  # two renames: a kill between them leaves the old one under a hidden name, never a torn one
            old = target.with_name(f".{target.name}{_PARTIAL}old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


def sweep_partials(directory: PathLike, name: Optional[str] = None) -> List[Path]:
    """Remove the partial directories of killed saves in ``directory`` (those of ``name`` only, when given)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not is_partial(entry.name) or (name is not None and not entry.name.startswith(f".{name}{_PARTIAL}")):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def encode_index(metadata: Any) -> Dict[str, Any]:
    """DCP's ``Metadata`` as plain data (kept in the header): tensors with their chunks, and where each chunk lies."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    tensors = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise TypeError(f"{fqn!r} is not a tensor: a sharded checkpoint holds only tensors")
        tensors[fqn] = [str(entry.properties.dtype).replace("torch.", ""), list(entry.size),
                        [[list(c.offsets), list(c.sizes)] for c in entry.chunks]]
    storage = []
    for index, where in metadata.storage_data.items():
        if where.transform_descriptors:
            raise TypeError(f"{index.fqn!r} was written with transforms {where.transform_descriptors}")
        storage.append([index.fqn, list(index.offset or []), where.relative_path, int(where.offset), int(where.length)])
    return {"tensors": tensors, "storage": storage}


class Snapshot:
    """What one save writes: the header state (rank 0; every rank's view otherwise), the tensors by DCP key."""

    def __init__(self, state: Dict[str, Any], tensors: Dict[str, torch.Tensor], parts: List[str]):
        self.state, self.tensors, self.parts = state, tensors, parts


def write(snapshot: Snapshot, path: PathLike, info: distributed.DistInfo, group: Any = None) -> Path:
    """Write ``snapshot`` as the sharded checkpoint ``path`` on every rank of ``group`` (the default group when
    None); returns the committed path. Every rank raises if any rank failed; nothing partial is left visible."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from .io import atomic_save
    target = Path(os.path.abspath(os.fspath(path)))
    what = f"saving sharded checkpoint {target}"
    token = uuid.uuid4().hex[:12] if info.is_main else None
    token = distributed.all_gather_object(token, info, group)[0]
    tmp = target.with_name(f".{target.name}{_PARTIAL}{socket.gethostname()}-{token}")
    error: Optional[BaseException] = None
    try:
        if info.is_main:
            target.parent.mkdir(parents=True, exist_ok=True)
            sweep_partials(target.parent, target.name)
            tmp.mkdir()
    except Exception as exc:
        error = exc
    distributed.agree(error, info, what, str(target), group)
    try:
        metadata, error = None, None
        try:
            writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, thread_count=1)
            with _quiet():
                metadata = dcp.save(snapshot.tensors, storage_writer=writer, process_group=group,
                                    no_dist=not (info.enabled and dist.is_initialized()))
            mine = {}
            for name in sorted(os.listdir(tmp)):
                m = _SHARD.match(name)
                if m and int(m.group(1)) == info.rank:
                    mine[name] = list(file_crc(tmp / name))
        except Exception as exc:
            error, mine = exc, {}
        distributed.agree(error, info, what, str(target), group)
        files: Dict[str, List[int]] = {}
        for part in distributed.all_gather_object(mine, info, group):
            files.update(part)
        error = None
        if info.is_main:
            try:
                index = encode_index(metadata)
                missing = sorted({entry[2] for entry in index["storage"]} - set(files))
                if missing:
                    raise CorruptCheckpointError(str(target), f"shard files {missing} were not written")
                state = dict(snapshot.state)
                state[F.SHARDED] = {"format": "dcp", "parts": list(snapshot.parts), "files": files, "index": index}
                atomic_save(state, tmp / HEADER)
                _fsync_dir(tmp)
                commit(tmp, target)
            except Exception as exc:
                error = exc
        distributed.agree(error, info, what, str(target), group)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------- reading
def _ints(value: Any, field: str, path: str, length: Optional[int] = None) -> List[int]:
    if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) > 16 or \
            any(type(v) is not int or not 0 <= v < 2 ** 62 for v in value):
        raise F.malformed(path, field, value, "a short list of whole numbers >= 0")
    return value


def checked_record(record: Any, path: str) -> Dict[str, Any]:
    """The header's ``sharded`` record, every field checked for its type and bounds (the file is hostile)."""
    record = F.mapping(record, F.SHARDED, path, optional=False)
    if record.get("format") != "dcp":
        raise IncompatibleCheckpointError(path, f"unknown sharded format {F.short(record.get('format'))}")
    files = F.mapping(record.get("files"), f"{F.SHARDED}.files", path, optional=False)
    if len(files) > 100_000:
        raise F.malformed(path, f"{F.SHARDED}.files", f"{len(files)} entries", "at most 100000 shard files")
    for name, entry in files.items():
        if not isinstance(name, str) or not _SHARD.match(name):
            raise F.malformed(path, f"{F.SHARDED}.files", name, "shard file names like __0_0.distcp")
        _ints(entry, f"{F.SHARDED}.files[{name}]", path, 2)
    parts = record.get("parts")
    if not isinstance(parts, list) or any(not isinstance(p, str) for p in parts):
        raise F.malformed(path, f"{F.SHARDED}.parts", parts, "a list of part names")
    index = F.mapping(record.get("index"), f"{F.SHARDED}.index", path, optional=False)
    tensors = F.mapping(index.get("tensors"), f"{F.SHARDED}.index.tensors", path, optional=False)
    storage = index.get("storage")
    if not isinstance(storage, list) or len(storage) > _MAX_ENTRIES or len(tensors) > _MAX_ENTRIES:
        raise F.malformed(path, f"{F.SHARDED}.index.storage", storage, "a list of chunk locations")
    return record


def decode_index(record: Dict[str, Any], path: str) -> Any:
    """DCP's ``Metadata`` rebuilt from the checked record: dtypes from a fixed list, every chunk inside its
    tensor, every location a range inside a recorded shard file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
    files, index = record["files"], record["index"]
    where = f"{F.SHARDED}.index"
    state_meta, chunks_of = {}, {}
    for fqn, entry in index["tensors"].items():
        if not isinstance(fqn, str) or not isinstance(entry, list) or len(entry) != 3:
            raise F.malformed(path, f"{where}.tensors", fqn, "[dtype, size, chunks]")
        dtype_name, size, chunks = entry
        if dtype_name not in _DTYPES:
            raise F.malformed(path, f"{where}.tensors[{fqn}]", dtype_name, f"one of {sorted(_DTYPES)}")
        size = _ints(size, f"{where}.tensors[{fqn}].size", path)
        if not isinstance(chunks, list) or not chunks or len(chunks) > 100_000:
            raise F.malformed(path, f"{where}.tensors[{fqn}].chunks", chunks, "a list of chunks")
        metas = []
        for chunk in chunks:
            if not isinstance(chunk, list) or len(chunk) != 2:
                raise F.malformed(path, f"{where}.tensors[{fqn}].chunks", chunk, "[offsets, sizes]")
            offsets = _ints(chunk[0], f"{where}.tensors[{fqn}].chunks", path, len(size))
            sizes = _ints(chunk[1], f"{where}.tensors[{fqn}].chunks", path, len(size))
            if any(o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise F.malformed(path, f"{where}.tensors[{fqn}].chunks", chunk, "a chunk inside the tensor")
            metas.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            chunks_of.setdefault(fqn, set()).add(tuple(offsets))
        state_meta[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_DTYPES[dtype_name]),
                                                size=torch.Size(size), chunks=metas)
    storage = {}
    for entry in index["storage"]:
        if not isinstance(entry, list) or len(entry) != 5:
            raise F.malformed(path, f"{where}.storage", entry, "[key, offsets, file, offset, length]")
        fqn, offsets, name, offset, length = entry
        if fqn not in state_meta or not isinstance(offsets, list) or tuple(offsets) not in chunks_of.get(fqn, ()):
            raise F.malformed(path, f"{where}.storage", entry, "the location of a recorded chunk")
        if name not in files:
            raise F.malformed(path, f"{where}.storage", name, "a recorded shard file")
        _ints([offset, length], f"{where}.storage", path, 2)
        if offset + length > files[name][0]:
            raise CorruptCheckpointError(path, f"{fqn} lies past the end of {name}")
        storage[MetadataIndex(fqn=fqn, offset=torch.Size(offsets))] = _StorageInfo(
            relative_path=name, offset=offset, length=length)
    stored: Dict[str, int] = {}
    for index_key, where_ in storage.items():
        stored[index_key.fqn] = stored.get(index_key.fqn, 0) + where_.length
    for fqn, offsets in chunks_of.items():
        for o in offsets:
            if MetadataIndex(fqn=fqn, offset=torch.Size(list(o))) not in storage:
                raise F.malformed(path, f"{where}.storage", fqn, "a location for every chunk")
        meta = state_meta[fqn]
        numel = 1
        for n in meta.size:
            numel *= n
        # what a reader allocates for it is bounded by the bytes the files hold for it
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        if numel * itemsize > stored.get(fqn, 0):
            raise CorruptCheckpointError(path, f"{fqn} says it holds {numel * itemsize} bytes, its shard files "
                                               f"{stored.get(fqn, 0)}")
    return Metadata(state_dict_metadata=state_meta, storage_data=storage, storage_meta=StorageMeta())


def elements(record: Dict[str, Any], part: str) -> int:
    """How many elements the tensors of ``part`` hold, from the checked record."""
    total = 0
    for fqn, entry in record["index"]["tensors"].items():
        if isinstance(fqn, str) and fqn.startswith(part + SEP) and isinstance(entry, list) and len(entry) == 3:
            n = 1
            for s in entry[1] if isinstance(entry[1], list) else []:
                n *= int(s) if type(s) is int else 0
            total += n
    return total


def verify(path: str, record: Dict[str, Any], info: distributed.DistInfo, sharers: List[int], place: int) -> None:
    """Hash every shard file the header records (this rank's share of them when ``sharers`` read the very same
    directory); every rank raises CorruptCheckpointError naming the rank and the file if any differs."""
    names = sorted(record["files"])
    share = names[place::len(sharers)] if sharers else names
    problems: Dict[str, str] = {}
    error: Optional[BaseException] = None
    try:
        for name in share:
            file = os.path.join(path, name)
            try:
                st = os.lstat(file)
            except FileNotFoundError:
                problems[name] = "is missing"
                continue
            if not os.path.isfile(file) or os.path.islink(file):
                problems[name] = "is not a regular file"
                continue
            size, want = record["files"][name]
            if st.st_size != size:
                problems[name] = f"holds {st.st_size} bytes, the header recorded {size}"
                continue
            if file_crc(file) != (size, want):
                problems[name] = "does not match its recorded CRC-32C"
    except Exception as exc:
        error = exc
    distributed.agree(error, info, f"reading sharded checkpoint {path}", path)
    reports = distributed.all_gather_object(problems, info)
    damaged = [(rank, name, why) for rank, report in enumerate(reports) for name, why in sorted(report.items())]
    error = None
    if damaged:
        rank, name, why = damaged[0]
        who = f"rank {rank}'s copy: " if info.enabled else ""
        error = CorruptCheckpointError(path, f"{who}shard {name} {why}" + (
            f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""))
    distributed.agree(error, info, f"reading sharded checkpoint {path}", path)
    if error is not None:
        raise error


def _reader(path: str, metadata: Any) -> Any:
    """DCP's FileSystemReader with the index given (rebuilt from the verified header), never unpickled."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def read_part(path: str, record: Dict[str, Any], part: str, meta: bool = False) -> Dict[str, torch.Tensor]:
    """The whole tensors of one part (``model_state_dict``), read from the shards in this process (``meta``: only
    their shapes and dtypes, nothing read). The sizes come from the checked index, bounded by the files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    metadata = decode_index(record, path)
    prefix = part + SEP
    wanted = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta" if meta else "cpu")
              for k, m in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    if wanted and not meta:
        with _quiet():
            dcp.load(wanted, storage_reader=_reader(path, metadata),
                     planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {k[len(prefix):]: t for k, t in wanted.items()}


def with_weights(state: Any, path: str, meta: bool = False) -> Any:
    """A sharded checkpoint's header state with its model weights in place (``read_part``), for the readers that
    describe or compare weights (inspect, diff)."""
    if not isinstance(state, dict) or state.get(F.SHARDED) is None:
        return state
    record = checked_record(state[F.SHARDED], path)
    return {**state, F.MODEL_STATE: read_part(path, record, F.MODEL_STATE, meta=meta)}


def load(path: str, record: Dict[str, Any], parts: Mapping[str, Any], leave_out: Any, strict: bool,
         warn: Callable[[str], None], info: distributed.DistInfo, state: Mapping[str, Any]) -> None:
    """Load the sharded tensors of every part in ``parts`` that the record holds (minus ``leave_out``) into the
    tensors each part gives (``sharded_targets``), resharding as the parts' layout needs, and hand them to the
    part with its plain state from the header (``state[name]``); every rank joins."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    metadata = decode_index(record, path)
    available = set(metadata.state_dict_metadata)
    wanted: Dict[str, torch.Tensor] = {}
    chosen: List[str] = []
    for name in record["parts"]:
        part = parts.get(name)
        if part is None or name in leave_out or not callable(getattr(part, "sharded_targets", None)):  # (ShardedPart)
            continue
        targets = part.sharded_targets()
        if not targets:
            continue
        keys = {f"{name}{SEP}{k}": t for k, t in targets.items()}
        held = {k for k in available if k.startswith(name + SEP)}
        missing, unexpected = sorted(set(keys) - held), sorted(held - set(keys))
        if missing or unexpected:
            short = lambda ks: ", ".join(k.split(SEP, 1)[1] for k in ks[:5]) + (" ..." if len(ks) > 5 else "")  # noqa: E731
            text = "; ".join(filter(None, [f"missing in the checkpoint: {short(missing)}" if missing else "",
                                           f"not in this model: {short(unexpected)}" if unexpected else ""]))
            if name != F.MODEL_STATE or strict:
                raise IncompatibleCheckpointError(path, f"the {name} tensors do not fit ({text})")
            warn(f"loading {path} with strict_load=False: {text}")
            keys = {k: t for k, t in keys.items() if k in held}
        for key, t in keys.items():
            meta = metadata.state_dict_metadata[key]
            if tuple(meta.size) != tuple(t.shape):
                raise IncompatibleCheckpointError(path, f"{key} has shape {tuple(meta.size)} in the checkpoint, "
                                                        f"{tuple(t.shape)} here")
        wanted.update(keys)
        chosen.append(name)
    if wanted:
        try:
            with _quiet():
                dcp.load(wanted, storage_reader=_reader(path, metadata),
                         planner=DefaultLoadPlanner(allow_partial_load=True),
                         no_dist=not (info.enabled and dist.is_initialized()))
        except CheckpointError:
            raise
        except Exception as exc:
            raise IncompatibleCheckpointError(path, f"cannot read its shards ({type(exc).__name__}: "
                                                    f"{str(exc)[:300]})") from exc
    for name in chosen:
        prefix = name + SEP
        parts[name].load_sharded({k[len(prefix):]: t for k, t in wanted.items() if k.startswith(prefix)},
                                 state.get(name))
