"""``CheckpointFile``: a checkpoint opened once, verified once, with a tensor-free header and the state on demand.

Every reader of a checkpoint goes through one of these: ``NNHandler.load`` and
``initialize_from_checkpoint``, ``read_info``, ``inspect`` and ``diff``, the store's
``find_latest`` and the runner's tasks. The file is opened once and every later read goes
through that descriptor (``/proc/self/fd/N``), so a save that replaces the path meanwhile
cannot mix two files; its checksum is computed once, either on its own (``verify``) or while
the tensors are copied into memory (``state``), and under DDP the ranks that provably read
the very same file split that work.

    with CheckpointFile.open(path) as ckpt:
        ckpt.verify()                  # a damaged file raises CorruptCheckpointError here
        print(ckpt.header()["progress"])
        h = NNHandler.load(ckpt)       # the state, copied without hashing it again
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import distributed
from . import format as _format
from . import io as _io
from . import sharded as _sharded
from .copyload import read_copied
from .errors import CheckpointError, CorruptCheckpointError, IncompatibleCheckpointError, NotACheckpointError

logger = logging.getLogger("nn_handler")
PathLike = Union[str, os.PathLike]
_LOCAL = distributed.DistInfo(enabled=False)


class CheckpointFile:
    """One opened checkpoint file. Build it with :meth:`open`; close it (or use ``with``) when done.

    ``contents()`` is the file's object with its tensors memory-mapped (no tensor data read):
    the plain records (``header()``) come from it. ``verify()`` checks the checksum once.
    ``state(device)`` is the verified object on ``device``, its CPU tensors in the process's
    own memory (hashed while they are copied, unless ``verify`` ran already).
    """

    def __init__(self, path: str, fd: int, source: str, trailer: Optional[_io.Trailer], info: distributed.DistInfo,
                 sharers: List[int], place: int):
        self.path = path
        self._fd: Optional[int] = fd
        self._source = source  # a name that opens the very file behind fd
        self.trailer = trailer
        self._info = info
        self._sharers, self._place = sharers, place  # the ranks that read this very file, and our place among them
        self.verified = False  # the checksum was checked (always False for a file that carries none)
        self.safetensors = False  # a safetensors file (``nn_handler.interop`` reads it; its checksums are per tensor)
        self._contents: Any = None
        self._contents_error: Optional[BaseException] = None
        self._header: Optional[Dict[str, Any]] = None
        self.sharded = False  # a sharded checkpoint directory (``path``); its shard files are verified with it
        self.sharded_record: Optional[Dict[str, Any]] = None  # its checked record, once the shards are verified

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Union[PathLike, "CheckpointFile"], dist: Optional[distributed.DistInfo] = None) -> "CheckpointFile":
        """Open ``path`` on every rank of ``dist`` (this process alone by default); an error on any rank
        is raised on all of them. Reads only the file's last bytes (its checksum record)."""
        if isinstance(path, CheckpointFile):
            return path
        info = dist or _LOCAL
        path_str = os.fspath(path)
        if os.path.basename(path_str) == _sharded.HEADER and _sharded.is_sharded(os.path.dirname(path_str) or "."):
            path_str = os.path.dirname(path_str) or "."  # a sharded checkpoint's header: the checkpoint is its directory
        what = f"reading checkpoint {path_str}"
        fd, source, trailer, identity, error, safetensors = None, path_str, None, None, None, False
        is_dir = _sharded.is_sharded(path_str)  # a sharded checkpoint: its header file is what is opened
        read_path = _sharded.header_path(path_str) if is_dir else path_str
        try:
            _io.check_readable_file(read_path)
            fd = os.open(read_path, os.O_RDONLY)
            source = _io.pinned_name(fd, path_str)
            # A safetensors file: 8 bytes of header length, then "{" (a torch zip starts "PK", a legacy file "\x80").
            head = os.pread(fd, 9, 0)
            safetensors = len(head) == 9 and head[8:9] == b"{" and head[:2] != b"PK"
            trailer = _io.read_trailer(source) if not safetensors else None
            identity = _identity(fd)
        except Exception as exc:
            error = named_after(exc, path_str)
        try:
            distributed.agree(error, info, what, path_str)
            sharers, place = [info.rank], 0
            if info.enabled:
                seen = distributed.all_gather_object((trailer, identity), info)
                error = None
                if any(t != seen[0][0] for t, _ in seen):
                    error = CorruptCheckpointError(path_str, "the file differs between ranks (different checksum "
                                                             "records)")
                distributed.agree(error, info, what, path_str)
                # Only ranks that provably read the same file (same host, device, inode, size and
                # mtime) split the hashing; a rank whose copy is its own verifies every chunk of it.
                sharers = [r for r, (_, ident) in enumerate(seen) if ident == identity]
                place = sharers.index(info.rank)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        ckpt = cls(path_str, fd, source, trailer, info, sharers, place)
        ckpt.safetensors = safetensors
        ckpt.sharded = is_dir
        return ckpt

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CheckpointFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close must not leak the descriptor
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def __repr__(self) -> str:
        return f"CheckpointFile({self.path!r}, verified={self.verified})"

    @property
    def checksum(self) -> Optional[str]:
        """The file's checksum as lineage records it (from its checksum record), or None."""
        t = self.trailer
        return None if t is None else f"crc32c:{t.covered}:{t.chunk_size}:{t.table_crc:08x}"

    def fileno(self) -> int:
        """The open descriptor (every read of this file goes through it)."""
        self._open_source()
        return self._fd

    def _open_source(self) -> str:
        if self._fd is None:
            raise ValueError(f"the checkpoint {self.path} is closed")
        return self._source

    # ------------------------------------------------------------------ plain records
    def contents(self) -> Any:
        """The file's object, tensors memory-mapped from it (their data is not read): for its plain
        records. Scanned and loaded ``weights_only`` (nothing in it runs); not verified unless
        ``verify`` ran. Loaded once; a failure is raised again on every call."""
        if self._contents is None and self._contents_error is None:
            try:
                self._contents = _io.safe_load(self._open_source(), map_location="cpu", mmap=True)
            except CheckpointError as exc:
                self._contents_error = named_after(exc, self.path)
        if self._contents_error is not None:
            raise self._contents_error
        return self._contents

    def header(self) -> Dict[str, Any]:
        """What the checkpoint records, without its tensors' data: ``read_info``'s dict (format and
        library versions, specs, progress, history, metadata with lineage and run config)."""
        if self._header is None:
            self._header = info_of(self.contents(), self.path)
        return self._header

    # ------------------------------------------------------------------ verification and state
    def verify(self) -> "CheckpointFile":
        """Check the checksum (once; the ranks reading this very file split the work). A damaged
        file raises CorruptCheckpointError on every rank; a file without a checksum passes unless it
        says it is an nn_handler checkpoint."""
        if self.verified or self.safetensors:  # (a safetensors file's checksums are per tensor: its reader checks them)
            return self
        source, what = self._open_source(), f"reading checkpoint {self.path}"
        mine, error = {}, None
        try:
            if self.trailer is not None:
                mine = _io.chunk_crcs(source, self.trailer, self._my_chunks())
        except Exception as exc:
            error = named_after(exc, self.path)
        distributed.agree(error, self._info, what, self.path)
        self._check(mine, None)
        self._verify_shards(None)
        return self

    def state(self, device: Any = "cpu", mmap: bool = False) -> Any:
        """The verified object on ``device``. On the CPU its tensors are copied into the process's own
        memory (checksummed on the way when ``verify`` has not run), unless ``mmap=True`` keeps them
        mapped from the file (no copy). Every rank gets it or every rank raises."""
        source, what = self._open_source(), f"reading checkpoint {self.path}"
        device = torch.device(device)
        copy = not mmap and device.type == "cpu"
        hash_now = self.trailer is not None and not self.verified
        indices = self._my_chunks() if hash_now else []
        obj, mine, error = None, {}, None
        try:
            if device.type == "cpu" and self._contents is not None:
                obj = self._contents  # already mapped (a header was read): no second unpickling
            else:
                obj = _io.safe_load(source, map_location=device, mmap=True)
            if copy:
                obj, mine = read_copied(obj, source, self.trailer, indices)
            elif hash_now:
                mine = _io.chunk_crcs(source, self.trailer, indices)
        except CheckpointError as exc:
            error = self._damage_or(named_after(exc, self.path))
        except Exception as exc:
            error = exc
        distributed.agree(error, self._info, what, self.path)
        if hash_now or not self.verified:
            self._check(mine if hash_now else None, obj)
        self._verify_shards(obj)
        return obj

    def _verify_shards(self, obj: Any) -> None:
        """A sharded checkpoint's shard files, hashed against the (verified) header's record, once."""
        if not self.sharded or self.sharded_record is not None:
            return
        record, error = None, None
        try:
            state = obj if obj is not None else self.contents()
            record = _sharded.checked_record(state.get(_format.SHARDED) if isinstance(state, dict) else None,
                                             self.path)
        except Exception as exc:
            error = exc
        distributed.agree(error, self._info, f"reading checkpoint {self.path}", self.path)
        _sharded.verify(self.path, record, self._info, self._sharers, self._place)
        self.sharded_record = record

    def _my_chunks(self) -> List[int]:
        t = self.trailer
        return list(range(self._place, t.chunks, len(self._sharers))) if t is not None else []

    def _check(self, mine: Optional[Dict[int, int]], obj: Any) -> None:
        """Gather the ranks' chunk CRCs (``mine``: None when nothing was hashed now) and check the table;
        a file without a checksum that says it is an nn_handler checkpoint is damaged."""
        info, what = self._info, f"reading checkpoint {self.path}"
        crcs: Dict[int, int] = {}
        if mine is not None:
            for rank, part in enumerate(distributed.all_gather_object(mine, info)):
                if rank in self._sharers:  # only the hashes of this very file
                    crcs.update(part)
        error = None
        try:
            if mine is not None and self.trailer is not None:
                try:
                    _io.check_table(self.path, self.trailer, crcs)
                except CorruptCheckpointError as exc:
                    if info.enabled:
                        raise CorruptCheckpointError(self.path, f"rank {info.rank}'s copy: {exc.message}") from None
                    raise
                self.verified = True
            elif self.trailer is None:
                probe = obj if obj is not None else self._contents
                if probe is None:
                    probe = self.contents()
                if _format.is_handler_state(probe):
                    raise CorruptCheckpointError(self.path, "the file says it is an nn_handler checkpoint but its "
                                                            "checksum record is missing or damaged")
                logger.info("%s carries no checksum (not written by nn_handler): loaded without verification",
                            self.path)
        except Exception as exc:
            error = exc
        distributed.agree(error, info, what, self.path)

    def _damage_or(self, error: BaseException) -> BaseException:
        """A damaged file: its checksum says so more precisely than the unpickler."""
        if self.trailer is None:
            return error
        try:
            _io.check_table(self.path, self.trailer, _io.chunk_crcs(self._source, self.trailer))
        except CorruptCheckpointError as corrupt:
            return corrupt
        except Exception:  # noqa: BLE001 (e.g. the file is gone or empty now): the first error stands
            pass
        return error


def _identity(fd: int) -> Tuple[str, int, int, int, int]:
    """What makes two ranks' open files provably the same file: host, device, inode, size, mtime."""
    st = os.fstat(fd)
    return socket.gethostname(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def named_after(exc: BaseException, path: str) -> BaseException:
    """``exc`` naming ``path`` (the reads went through a pinned /proc/self/fd name)."""
    if isinstance(exc, CheckpointError) and exc.path != path:
        renamed = type(exc)(path, exc.message)
        renamed.__cause__ = exc.__cause__
        return renamed
    return exc


# ---------------------------------------------------------------------------- the header
def info_of(obj: Any, path_str: str) -> Dict[str, Any]:
    """``read_info``'s dict from the loaded ``obj``: every field it passes on checked for its type.

    Only CheckpointError subclasses are raised for anything the file holds.
    """
    try:
        return _info_of(obj, path_str)
    except CheckpointError:
        raise
    except Exception as exc:  # a shape of record that the checks below did not foresee: still the file's fault
        raise IncompatibleCheckpointError(path_str, f"cannot read its records ({type(exc).__name__}: "
                                                    f"{str(exc)[:200]})") from None


def _info_of(obj: Any, path_str: str) -> Dict[str, Any]:
    from ..specs import split as specs_split
    F = _format
    weights = obj.get(F.MODEL_STATE) if isinstance(obj, dict) else None
    if not F.is_handler_state(obj):
        if isinstance(obj, dict) and (F._looks_like_state_dict(obj) or isinstance(weights, dict)):
            weights = weights if isinstance(weights, dict) else obj
            return {"kind": "weights", "model": None,
                    "parameters": sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor))}
        F.check_and_migrate(obj, path_str)  # raises the right error
    state = F.check_and_migrate(obj, path_str)
    model_entry = F.mapping(state.get(F.MODEL), F.MODEL, path_str, optional=False)
    model_spec = F.spec(model_entry.get("spec"), "model.spec", path_str)
    model = None
    if model_spec is not None:
        target, kwargs = specs_split(model_spec)
        model = {"target": target, "kwargs": kwargs,
                 "model_type": F.text(model_entry.get("model_type"), "model.model_type", path_str)}

    data: Dict[str, Any] = {}
    for name, entry in F.mapping(state.get(F.DATA), F.DATA, path_str).items():
        field = f"{F.DATA}.{name}"
        entry = F.mapping(entry, field, path_str, optional=False)
        options = F.mapping(entry.get("options"), f"{field}.options", path_str)
        if any(not isinstance(k, str) for k in options):
            raise F.malformed(path_str, f"{field}.options", options, "loader options with string keys")
        data[str(name)] = {**entry, "dataset": F.spec(entry.get("dataset"), f"{field}.dataset", path_str),
                           "options": options}
    progress = F.mapping(state.get(F.PROGRESS), F.PROGRESS, path_str)
    for key in ("epoch", "global_step"):
        F.count(progress.get(key), f"{F.PROGRESS}.{key}", path_str)
    history = F.mapping(state.get(F.HISTORY), F.HISTORY, path_str)
    callbacks = [F.entry_spec(entry, f"{F.CALLBACKS}[{i}]", path_str)
                 for i, entry in enumerate(F.sequence(state.get(F.CALLBACKS), F.CALLBACKS, path_str))]
    ema = F.mapping(state.get(F.EMA), F.EMA, path_str)
    weights = F.mapping(state.get(F.MODEL_STATE), F.MODEL_STATE, path_str, optional=False)
    parameters = sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor))
    shards = None
    if state.get(F.SHARDED) is not None:
        record = _sharded.checked_record(state[F.SHARDED], path_str)
        parameters = _sharded.elements(record, F.MODEL_STATE)
        shards = {"files": len(record["files"]), "parts": list(record["parts"]),
                  "bytes": sum(size for size, _ in record["files"].values())}
    return {
        "kind": "handler",
        "format_version": state[F.VERSION],
        "versions": F.mapping(state.get(F.VERSIONS), F.VERSIONS, path_str),
        "created": F.text(state.get(F.CREATED), F.CREATED, path_str),
        "world_size": F.count(state.get(F.WORLD_SIZE), F.WORLD_SIZE, path_str),
        "model": model,
        "optimizer": F.entry_spec(state.get(F.OPTIMIZER), F.OPTIMIZER, path_str),
        "scheduler": F.entry_spec(state.get(F.SCHEDULER), F.SCHEDULER, path_str),
        "loss_fn": F.entry_spec(state.get(F.LOSS), F.LOSS, path_str),
        "data": data,
        "progress": {k: v for k, v in progress.items() if k != "data_seed"},
        "train_settings": F.mapping(state.get(F.SETTINGS), F.SETTINGS, path_str),
        "history": {k: (v[-1] if v else None) for k, v in history.items() if isinstance(v, list)},
        "callbacks": [spec["_target_"] for spec in callbacks if spec is not None],
        "ema": F.number(ema.get("decay"), f"{F.EMA}.decay", path_str),
        "unrecorded": F.mapping(state.get(F.UNRECORDED), F.UNRECORDED, path_str),
        "metadata": F.mapping(state.get(F.METADATA), F.METADATA, path_str),
        "parameters": parameters,
        "sharded": shards,
        "strategy": F.text(F.mapping(state.get(F.STRATEGY), F.STRATEGY, path_str).get("strategy"),
                           f"{F.STRATEGY}.strategy", path_str),
    }


def broken_header_is_damage(ckpt_path: str, exc: NotACheckpointError) -> CheckpointError:
    """A file whose contents are not a checkpoint but whose end says ``atomic_save`` wrote it: damage."""
    try:
        written_here = _io.file_checksum(ckpt_path) is not None
    except Exception:  # noqa: BLE001
        written_here = False
    if written_here:
        return CorruptCheckpointError(ckpt_path, f"{exc.message}, although it carries an nn_handler checksum "
                                                 f"record: the file is damaged")
    return exc
