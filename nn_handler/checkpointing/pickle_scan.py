"""What a checkpoint file may ask of the unpickler, checked before anything is unpickled or allocated.

``torch.load(weights_only=True)`` already refuses arbitrary classes, but it still accepts
things that are not tensors or plain containers (``bytearray(2**31)`` allocates 2 GiB from a
file of a few KiB), trusts the sizes a file claims (a storage "of 8 GiB" backed by a record
of 12 bytes, a tensor whose size and strides reach far past its storage, which ``set_``
answers by growing the storage), and decompresses whatever the zip archive holds (a
deflated record of zeros is a zip bomb). ``scan`` closes all of that by construction,
reading the file without executing or allocating anything the file chooses:

* **The archive.** Every zip record (central directory and local header) must be STORED
  (``torch.save`` never compresses), unencrypted, and lie inside the file, records not
  overlapping; names are unique (case-insensitively, as torch's reader looks them up). The
  pickle torch will read is ``<first record's folder>/data.pkl``, as in torch's reader.
* **The pickle** is walked with ``pickletools.genops`` (a parser: nothing runs) while a
  symbolic stack follows what each opcode would build. Only the opcodes of plain data are
  accepted, and a global only if it is in ``ALLOWED_CALLS`` (what may be called, each with
  a check of the arguments it gets) or ``ALLOWED_VALUES`` (dtypes and storage types, never
  called). ``STACK_GLOBAL`` must name its global with strings the scan can see.
* **The shape.** What a reader will walk is measured as the pickle builds it: memo references
  count their full size each time they are used, so a structure that expands past
  ``max(MIN_NODE_BUDGET, NODES_PER_OPCODE * opcodes)`` nodes (``a = [a, a]`` repeated: 2**depth
  nodes from a few bytes a level), a cycle (a list that contains itself), or nesting deeper
  than ``MAX_DEPTH`` (readers recurse) is refused.
* **The sizes.** Each storage reference (persistent id) claims ``numel * element_size``
  bytes, which must equal the size of its record (a legacy file: the storages together must
  fit in the file, and each one's on-disk header must agree); each tensor rebuild must stay
  inside its storage (offset, sizes, strides; no negative values); tensors carry no
  backward hooks. So nothing a reader allocates can exceed what the file holds.

The allow-list is derived from what ``torch.save`` emits for our own handler checkpoints
(tensors of every dtype, views, sparse COO/CSR/CSC tensors, ``torch.Size``, dtypes,
``OrderedDict`` state dicts with their ``_metadata``) and for other tools' plain files
(parameters, ``torch.device``, ``bytes``, ``set`` and ``complex`` values). Anything else --
``bytearray``, subclasses rebuilt through ``_rebuild_from_type_v2``, numpy arrays, meta
and wrapper tensors, quantized tensors -- is refused with ``UnsafeCheckpointError`` naming
the global.

The list is this module's own: globals a process added to torch's allow-list
(``torch.serialization.add_safe_globals``) do not widen what a checkpoint file may call.
Sparse tensors' indices are checked against their sizes by ``safe_load`` (torch skips that
by default), since they are only known once unpickled.

Legacy (non-zip, ``_use_new_zipfile_serialization=False``) files are scanned the same way:
each of their pickles with the same allow-list, the storages they declare against the bytes
that follow them (torch's legacy reader allocates each claim before reading its data), and
each storage's on-disk element count against its claim.

Cost: one pass over the (small) pickle and one small read per zip record; the tensor data
is never read. A 107 MB handler checkpoint (MLP with Adam state: 89 records, an 8 KB
pickle of ~2,900 opcodes) scans in about 5 ms, against 50-80 ms for its mapped load and
about 250 ms for its default copying load.
"""
from __future__ import annotations

import io
import os
import pickletools
import struct
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from typing import Any, BinaryIO, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .errors import CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError

# ---------------------------------------------------------------------------- the allow-list
_DTYPES: Dict[str, torch.dtype] = {f"torch.{name}": value for name, value in vars(torch).items()
                                   if isinstance(value, torch.dtype)}
_STORAGE_TYPES: Dict[str, torch.dtype] = {"torch.storage.UntypedStorage": torch.uint8,
                                          "torch.UntypedStorage": torch.uint8}
for _cls in torch._storage_classes:  # the legacy typed storages (quantized ones excepted)
    if _cls.__module__ == "torch" and _cls.__name__.endswith("Storage") and not _cls.__name__.startswith("Q"):
        _STORAGE_TYPES[f"torch.{_cls.__name__}"] = torch.storage._get_dtype_from_pickle_storage_type(_cls.__name__)

#: Globals a checkpoint may name as plain values (never called): dtypes and storage types.
ALLOWED_VALUES: FrozenSet[str] = frozenset(_DTYPES) | frozenset(_STORAGE_TYPES)


class _Unsafe(Exception):
    """The pickle asks for something beyond tensors and plain containers."""


class _Bad(Exception):
    """The pickle is inconsistent (damaged, or forged with sizes its file does not hold)."""


# Symbolic values: what an opcode would push, as far as the checks need to know.
_MARK = object()


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Obj:
    """A container or an object an allowed call builds; ``items`` only for lists (their contents).

    ``size`` is the number of nodes a reader walking it meets (itself, and each child's size
    once for every time it is placed: a memo reference repeated is counted each time), ``depth``
    its nesting; ``sealed`` once it has been placed in another container (or a tuple, or a
    call's arguments), after which it may not change (see ``_scan_pickle``).
    """

    __slots__ = ("kind", "filled", "items", "size", "depth", "sealed")

    def __init__(self, kind: str, items: Optional[list] = None):
        self.kind, self.filled, self.items = kind, False, items
        self.size, self.depth, self.sealed = 1, 1, False


class _Storage:
    __slots__ = ("key", "dtype", "nbytes")

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int):
        self.key, self.dtype, self.nbytes = key, dtype, nbytes


_TENSOR = "tensor"


def _is_int(value: Any) -> bool:
    return type(value) is int


def _ints(value: Any) -> bool:
    return type(value) is tuple and all(_is_int(v) for v in value)


def _check_extent(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype) -> None:
    if not isinstance(storage, _Storage):
        raise _Unsafe("a tensor rebuilt from something other than a storage of the file")
    if not (_is_int(offset) and _ints(size) and _ints(stride) and len(size) == len(stride)):
        raise _Bad("a tensor with a malformed offset, size or stride")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _Bad(f"a tensor with a negative offset, size or stride (size {size}, stride {stride})")
    itemsize = max(1, dtype.itemsize)
    available = storage.nbytes // itemsize
    if 0 in size:
        if offset > available:
            raise _Bad(f"a tensor starts at element {offset} of a storage of {available}")
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= available:
        raise _Bad(f"a tensor of size {list(size)} (stride {list(stride)}, offset {offset}) reaches element "
                   f"{last} of a storage of {available} {str(dtype).replace('torch.', '')} elements")


def _check_hooks(hooks: Any) -> None:
    if not (isinstance(hooks, _Obj) and hooks.kind == "odict" and not hooks.filled):
        raise _Unsafe("a tensor carrying backward hooks")


def _check_metadata(args: tuple, at: int) -> None:
    if len(args) > at and args[at] is not None and not (isinstance(args[at], _Obj) and args[at].kind == "dict"):
        raise _Bad("a tensor with malformed metadata")


def _rebuild_tensor_v2(args: tuple) -> Any:
    if len(args) not in (6, 7):
        raise _Bad("a tensor rebuild with the wrong number of arguments")
    storage = args[0]
    return _checked_tensor(args, 6, storage.dtype if isinstance(storage, _Storage) else torch.uint8)


def _rebuild_tensor_v3(args: tuple) -> Any:
    if len(args) not in (7, 8):
        raise _Bad("a tensor rebuild with the wrong number of arguments")
    dtype = args[6]
    if not (isinstance(dtype, _Global) and dtype.name in _DTYPES):
        raise _Bad("a tensor rebuild without a dtype")
    return _checked_tensor(args, 7, _DTYPES[dtype.name])


def _checked_tensor(args: tuple, metadata_at: int, dtype: Any) -> Any:
    """The checks both tensor rebuilds share: extent inside the storage, flags, hooks, metadata."""
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    _check_extent(storage, offset, size, stride, dtype)
    if type(requires_grad) is not bool:
        raise _Bad("a tensor with a malformed requires_grad")
    _check_hooks(hooks)
    _check_metadata(args, metadata_at)
    return _Obj(_TENSOR)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, _Obj) and value.kind == _TENSOR


def _rebuild_parameter(args: tuple) -> Any:
    if len(args) != 3 or not _is_tensor(args[0]) or type(args[1]) is not bool:
        raise _Bad("a malformed parameter")
    _check_hooks(args[2])
    return _Obj(_TENSOR)


def _rebuild_sparse_tensor(args: tuple) -> Any:
    # Its parts are tensors checked on their own; its claimed size allocates nothing, and torch
    # validates the indices against it once the pickle is read.
    if len(args) != 2 or not (isinstance(args[0], _Obj) and args[0].kind == "layout") or type(args[1]) is not tuple:
        raise _Bad("a malformed sparse tensor")
    if not all(_is_tensor(v) or _ints(v) or v is None or type(v) is bool for v in args[1]):
        raise _Bad("a malformed sparse tensor")
    return _Obj(_TENSOR)


def _get_layout(args: tuple) -> Any:
    if len(args) != 1 or type(args[0]) is not str:
        raise _Bad("a malformed layout")
    return _Obj("layout")


def _size(args: tuple) -> Any:
    if len(args) != 1 or not _ints(args[0]):
        raise _Bad("a malformed torch.Size")
    return args[0]  # a tuple of ints to every check that follows


def _device(args: tuple) -> Any:
    if not (1 <= len(args) <= 2 and type(args[0]) is str and all(_is_int(v) for v in args[1:])):
        raise _Bad("a malformed torch.device")
    return _Obj("device")


def _ordered_dict(args: tuple) -> Any:
    if len(args) > 1 or (args and not (isinstance(args[0], _Obj) and args[0].kind == "list")):
        raise _Bad("a malformed OrderedDict")
    odict = _Obj("odict")
    odict.filled = bool(args and args[0].items)
    return odict


def _set(args: tuple) -> Any:
    if len(args) > 1 or (args and not (isinstance(args[0], _Obj) and args[0].kind == "list")):
        raise _Bad("a malformed set")
    return _Obj("set")


def _complex(args: tuple) -> Any:
    if not (1 <= len(args) <= 2 and all(type(v) in (int, float) for v in args)):
        raise _Bad("a malformed complex number")
    return _Obj("complex")


def _encode(args: tuple) -> Any:
    # How protocol 2 pickles bytes: encode(text, "latin1"); the result is as long as the text.
    if len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
        raise _Unsafe("_codecs.encode used for anything but bytes")
    return _Obj("bytes")


#: Globals a checkpoint may call, each with the check of the arguments it is called with.
ALLOWED_CALLS: Dict[str, Callable[[tuple], Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,  # dtypes without a legacy storage class
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "torch.serialization._get_layout": _get_layout,
    "torch.Size": _size,
    "torch.device": _device,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set,
    "builtins.complex": _complex,
    "_codecs.encode": _encode,
}

_PLAIN = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
          "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "SHORT_BINUNICODE",
          "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT"}


def _global(module: str, qualname: str) -> _Global:
    # Python 2 names, mapped as torch's unpickler maps them (protocol 2 writes __builtin__.set)
    if (module, qualname) in NAME_MAPPING:
        module, qualname = NAME_MAPPING[(module, qualname)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    name = f"{module}.{qualname}"
    if name not in ALLOWED_CALLS and name not in ALLOWED_VALUES:
        raise _Unsafe(f"the global {name}")
    return _Global(name)


#: How deep containers (lists, dicts, tuples, sets, and the objects calls build) may nest. Readers walk
#: them recursively (two or three frames a level); this stays far below Python's recursion limit (1000).
MAX_DEPTH = 100
#: How many nodes the whole structure may expand to when its memo references are followed, whatever the
#: pickle: a reader walking a file of plain data meets at most about one node per opcode (handler
#: checkpoints with Adam, EMA and 1,000 epochs of history: 4,837 nodes from 5,879 opcodes for a 104 MB
#: one; 171,192 from 390,087 for one of 2,402 parameter tensors), so
#: ``NODES_PER_OPCODE`` times the pickle's opcodes, or ``MIN_NODE_BUDGET`` for a small pickle, leaves room
#: for legitimately shared values while a file of a few KiB can no longer stand for millions of nodes.
MIN_NODE_BUDGET = 100_000
NODES_PER_OPCODE = 4
_CAP = 1 << 62  # sizes saturate here (a doubling chain would otherwise make huge integers)
_CYCLE = ("a container that contains itself, or is changed after it was placed in another "
          "(a cycle that readers would follow forever)")


def _scan_pickle(stream: BinaryIO, storage: Callable[[Any], _Storage]) -> Any:
    """Walk one pickle (from ``stream``'s position to its STOP); return the symbolic top-level value.

    Besides what each opcode may build, the walk bounds the *shape* a reader meets: every value
    is measured (``_Obj.size``/``depth``; a tuple's in ``tuples``) as it is placed in another, a
    memo reference counting its full size each time it is used, so a chain ``a = [a, a]`` of a
    few bytes a level is seen as the 2**depth nodes that ``map_tensors``, ``inspect`` or a diff
    would walk. A container placed somewhere is sealed: it may not change afterwards, which is
    never needed for acyclic data (the pickler writes each value whole before using it) and
    makes every cycle -- a list that contains itself, directly or through others -- a refusal,
    and every measured size final.
    """
    stack: List[Any] = []
    memo: Dict[Any, Any] = {}
    tuples: Dict[int, Tuple[tuple, int, int]] = {}  # id -> (the tuple, kept alive; size; depth)
    largest = 0
    ops = 0

    def measure(value: Any) -> Tuple[int, int]:
        if isinstance(value, _Obj):
            return value.size, value.depth
        if type(value) is tuple:
            if not value:
                return 1, 1
            known = tuples.get(id(value))
            return (known[1], known[2]) if known is not None else (1 + len(value), 2)
        return 1, 0

    def place(values: Any, size: int, depth: int, into: Optional[_Obj] = None) -> Tuple[int, int]:
        """The size and depth of a container (``into``, if it exists) once ``values`` are placed in it."""
        for value in values:
            if isinstance(value, _Obj):
                if value is into:
                    raise _Unsafe(_CYCLE)
                s, d = value.size, value.depth
                value.sealed = True
            elif type(value) is tuple:
                s, d = measure(value)
            else:  # a scalar, string, global or storage: one node
                size += 1
                continue
            size += s
            if d >= depth:
                depth = d + 1
        if depth > MAX_DEPTH:
            raise _Unsafe(f"containers nested more than {MAX_DEPTH} deep (readers walk them recursively)")
        return min(size, _CAP), depth

    def new(obj: _Obj, values: Any) -> _Obj:
        nonlocal largest
        obj.size, obj.depth = place(values, obj.size, obj.depth, obj)
        if obj.size > largest:
            largest = obj.size
        return obj

    def new_tuple(items: List[Any]) -> tuple:
        nonlocal largest
        value = tuple(items)
        if value:
            size, depth = place(value, 1, 1)
            tuples[id(value)] = (value, size, depth)
            if size > largest:
                largest = size
        return value

    def grow(target: _Obj, values: Any) -> None:
        if target.sealed:
            raise _Unsafe(_CYCLE)
        new(target, values)

    def pop() -> Any:
        if not stack or stack[-1] is _MARK:
            raise _Bad("the pickle's stack underflows")
        return stack.pop()

    def pop_mark() -> List[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise _Bad("the pickle has no mark where one is needed")

    def top(kinds: Tuple[str, ...]) -> _Obj:
        if not stack or not (isinstance(stack[-1], _Obj) and stack[-1].kind in kinds):
            raise _Unsafe("a container operation applied to an object that is not a plain container")
        return stack[-1]

    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            ops += 1
            if name in _PLAIN:
                stack.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                if not stack or stack[-1] is _MARK:
                    raise _Bad("the pickle memoizes nothing")
                memo[arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                if arg not in memo:
                    raise _Bad("the pickle refers to a value it never stored")
                stack.append(memo[arg])
            elif name == "MEMOIZE":
                if not stack or stack[-1] is _MARK:
                    raise _Bad("the pickle memoizes nothing")
                memo[len(memo)] = stack[-1]
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(new_tuple(items))
            elif name == "TUPLE":
                stack.append(new_tuple(pop_mark()))
            elif name == "EMPTY_LIST":
                stack.append(_Obj("list", []))
            elif name == "LIST":
                items = pop_mark()
                stack.append(new(_Obj("list", items), items))
            elif name == "EMPTY_DICT":
                stack.append(_Obj("dict"))
            elif name == "DICT":
                stack.append(new(_Obj("dict"), pop_mark()))
            elif name == "EMPTY_SET":
                stack.append(_Obj("set"))
            elif name == "FROZENSET":
                stack.append(new(_Obj("set"), pop_mark()))
            elif name == "APPEND":
                value = pop()
                target = top(("list",))
                grow(target, (value,))
                target.items.append(value)
                target.filled = True
            elif name == "APPENDS":
                values = pop_mark()
                target = top(("list",))
                grow(target, values)
                target.items.extend(values)
                target.filled = True
            elif name == "SETITEM":
                value, key = pop(), pop()
                target = top(("dict", "odict"))
                grow(target, (key, value))
                target.filled = True
            elif name == "SETITEMS":
                values = pop_mark()
                target = top(("dict", "odict"))
                grow(target, values)
                target.filled = True
            elif name == "ADDITEMS":
                values = pop_mark()
                target = top(("set",))
                grow(target, values)
                target.filled = True
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name == "POP":
                if not stack:
                    raise _Bad("the pickle's stack underflows")
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                if not stack:
                    raise _Bad("the pickle's stack underflows")
                stack.append(stack[-1])
            elif name == "GLOBAL":
                module, _, qualname = arg.partition(" ")
                stack.append(_global(module, qualname))
            elif name == "STACK_GLOBAL":
                qualname, module = pop(), pop()
                if type(module) is not str or type(qualname) is not str:
                    raise _Unsafe("a global whose name is computed")
                stack.append(_global(module, qualname))
            elif name == "REDUCE":
                args, func = pop(), pop()
                if not isinstance(func, _Global) or func.name not in ALLOWED_CALLS:
                    raise _Unsafe(f"a call of {func.name if isinstance(func, _Global) else 'a non-global'}")
                if type(args) is not tuple:
                    raise _Bad(f"a call of {func.name} with malformed arguments")
                result = ALLOWED_CALLS[func.name](args)
                if isinstance(result, _Obj):  # (torch.Size gives back its tuple, measured already)
                    new(result, (args,))
                stack.append(result)
            elif name == "BUILD":
                state = pop()
                target = top(("odict",))  # an OrderedDict's attributes (a state_dict's _metadata)
                if not (isinstance(state, _Obj) and state.kind == "dict"):
                    raise _Unsafe("an object's state set from something other than a dict")
                grow(target, (state,))
            elif name == "BINPERSID":
                stack.append(storage(pop()))
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                if len(stack) != 1:
                    raise _Bad("the pickle ends with a malformed stack")
                budget = max(MIN_NODE_BUDGET, NODES_PER_OPCODE * ops)
                if largest > budget:
                    shown = f"{largest:,}" if largest < _CAP else f"over {_CAP:,}"
                    raise _Unsafe(f"a structure that expands to more than {budget:,} nodes when its shared (memo) "
                                  f"references are followed ({shown} nodes from {ops:,} pickle opcodes; a reader "
                                  f"walking it would build every copy)")
                return stack[0]
            else:  # INST, OBJ, NEWOBJ(_EX), EXT*, PERSID, BYTEARRAY8, NEXT_BUFFER, READONLY_BUFFER, ...
                raise _Unsafe(f"the pickle opcode {name}")
    except (_Unsafe, _Bad):
        raise
    except Exception as exc:  # genops on damaged bytes: ValueError, struct.error, UnicodeDecodeError, ...
        raise _Bad(f"the pickle is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise _Bad("the pickle ends before its STOP")


# ---------------------------------------------------------------------------- the zip archive
_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_U32, _U16 = 0xFFFFFFFF, 0xFFFF


class _Record:
    __slots__ = ("name", "header", "offset", "size")

    def __init__(self, name: str, header: int, offset: int, size: int):
        self.name, self.header, self.offset, self.size = name, header, offset, size


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of ``fd`` from ``offset`` (``os.pread``; seek and read where it is missing)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - (Windows)
    return os.read(fd, n)  # pragma: no cover


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = pread(fd, n, offset)
    if len(data) != n:
        raise _Bad("the file ends inside a zip record (truncated, or changed while being read)")
    return data


def _zip64_extra(extra: bytes, fields: List[int]) -> List[int]:
    """Replace the 0xFFFFFFFF fields (uncompressed, compressed, header offset) from the zip64 extra field."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + length]
        if tag == 0x0001:
            at = 0
            for i, value in enumerate(fields):
                if value == _U32:
                    if at + 8 > len(body):
                        raise _Bad("a zip64 field is missing")
                    fields[i] = struct.unpack_from("<Q", body, at)[0]
                    at += 8
            return fields
        pos += 4 + length
    if _U32 in fields:
        raise _Bad("a zip64 field is missing")
    return fields


class _Foreign(Exception):
    """A zip archive that torch.save did not write (no ``<folder>/data.pkl``)."""


def _zip_records(fd: int, size: int) -> List[_Record]:
    """Every record of the archive, checked: STORED, unencrypted, inside the file, not overlapping, unique.

    Raises _Foreign first if the archive is not torch.save's (whatever its records hold).
    """
    tail_len = min(size, 0xFFFF + _EOCD.size)
    tail = _pread(fd, tail_len, size - tail_len)
    # torch's reader (miniz) takes the last end record with room for itself after it.
    at = tail.rfind(b"PK\x05\x06", 0, tail_len - _EOCD.size + 4)
    if at < 0:
        raise _Bad("no zip end-of-central-directory record")
    eocd_pos = size - tail_len + at
    _, disk, cd_disk, _, entries, cd_size, cd_offset, comment_len = _EOCD.unpack_from(tail, at)
    if eocd_pos + _EOCD.size + comment_len != size:
        raise _Bad("the zip end record does not end the file")
    end_of_data = eocd_pos
    if eocd_pos >= _ZIP64_LOCATOR.size:
        locator = _pread(fd, _ZIP64_LOCATOR.size, eocd_pos - _ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _, _, z64_pos, _ = _ZIP64_LOCATOR.unpack(locator)
            if z64_pos + _ZIP64_EOCD.size > eocd_pos - _ZIP64_LOCATOR.size:
                raise _Bad("the zip64 end record lies outside the file")
            z64 = _ZIP64_EOCD.unpack(_pread(fd, _ZIP64_EOCD.size, z64_pos))
            if z64[0] != b"PK\x06\x06":
                raise _Bad("the zip64 end record is damaged")
            entries, cd_size, cd_offset = z64[7], z64[8], z64[9]
            end_of_data = z64_pos
    if disk or cd_disk:
        raise _Bad("a multi-disk zip archive")
    if cd_offset + cd_size > end_of_data or entries * _CENTRAL.size > cd_size:
        raise _Bad("the zip central directory lies outside the file")
    directory = _pread(fd, cd_size, cd_offset)
    _check_torch_names(directory, entries)
    records: List[_Record] = []
    seen = set()
    pos = 0
    for _ in range(entries):
        if pos + _CENTRAL.size > len(directory):
            raise _Bad("the zip central directory is cut short")
        (sig, _, _, flags, method, _, _, _, comp, uncomp, name_len, extra_len, comment_len, _, _, _,
         header) = _CENTRAL.unpack_from(directory, pos)
        if sig != b"PK\x01\x02":
            raise _Bad("the zip central directory is damaged")
        name_bytes = directory[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len]
        extra = directory[pos + _CENTRAL.size + name_len:pos + _CENTRAL.size + name_len + extra_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if pos > len(directory):
            raise _Bad("the zip central directory is cut short")
        name = name_bytes.decode("utf-8", errors="replace")
        if method != 0:
            raise _Unsafe(f"the zip record {name!r} is compressed (method {method}); torch.save never compresses, "
                          f"and a compressed record can expand far beyond the file (a zip bomb)")
        if flags & 0x41:
            raise _Unsafe(f"the zip record {name!r} is encrypted")
        uncomp, comp, header = _zip64_extra(extra, [uncomp, comp, header])
        if comp != uncomp:
            raise _Bad(f"the zip record {name!r} claims {uncomp} bytes but stores {comp}")
        folded = name.lower()
        if folded in seen:
            raise _Bad(f"the zip archive holds two records named {name!r}")
        seen.add(folded)
        if header + _LOCAL.size > cd_offset:
            raise _Bad(f"the zip record {name!r} lies outside the file")
        (lsig, _, lflags, lmethod, _, _, _, lcomp, luncomp, lname_len, lextra_len) = _LOCAL.unpack(
            _pread(fd, _LOCAL.size, header))
        if lsig != b"PK\x03\x04":
            raise _Bad(f"the zip record {name!r} has a damaged header")
        if lmethod != 0:
            raise _Unsafe(f"the zip record {name!r} is compressed (method {lmethod}); torch.save never compresses, "
                          f"and a compressed record can expand far beyond the file (a zip bomb)")
        if lflags & 0x41:
            raise _Unsafe(f"the zip record {name!r} is encrypted")
        if not (lflags & 0x08 and lcomp == luncomp == 0) and (lcomp, luncomp) != (comp & _U32, uncomp & _U32) \
                and (lcomp, luncomp) != (_U32, _U32):
            raise _Bad(f"the zip record {name!r} has different sizes in its header and in the directory")
        data_offset = header + _LOCAL.size + lname_len + lextra_len
        if lname_len != name_len or _pread(fd, lname_len, header + _LOCAL.size) != name_bytes:
            raise _Bad(f"the zip record {name!r} has a different name in its header")
        if data_offset + comp > cd_offset:
            raise _Bad(f"the zip record {name!r} ({comp} bytes) reaches past the end of the file's data")
        records.append(_Record(name, header, data_offset, comp))
    spans = sorted((r.header, r.offset + r.size, r.name) for r in records)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if end > start:
            raise _Bad(f"the zip records {a!r} and {b!r} overlap")
    return records


def _names(directory: bytes, entries: int) -> List[str]:
    names, pos = [], 0
    for _ in range(entries):
        if pos + _CENTRAL.size > len(directory) or directory[pos:pos + 4] != b"PK\x01\x02":
            raise _Bad("the zip central directory is damaged")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, pos + 28)
        names.append(directory[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len].decode("utf-8", errors="replace"))
        pos += _CENTRAL.size + name_len + extra_len + comment_len
    return names


def _torch_prefix(names: List[str]) -> Optional[str]:
    """The folder torch's reader takes from the first record, if ``<folder>/data.pkl`` is there."""
    if not names or "/" not in names[0]:
        return None
    prefix = names[0].split("/", 1)[0] + "/"
    wanted = (prefix + "data.pkl").lower()
    return prefix if any(name.lower() == wanted for name in names) else None


def _check_torch_names(directory: bytes, entries: int) -> None:
    if _torch_prefix(_names(directory, entries)) is None:
        raise _Foreign()


def _scan_zip(path: str, fd: int, size: int) -> None:
    records = _zip_records(fd, size)
    prefix = _torch_prefix([r.name for r in records])
    by_name = {r.name.lower(): r for r in records}
    pickle_record = by_name[(prefix + "data.pkl").lower()]
    claimed: Dict[str, Tuple[str, int]] = {}

    def storage(pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Unsafe("a persistent reference that is not a storage of the file")
        _, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, _Global) and storage_type.name in _STORAGE_TYPES):
            raise _Unsafe("a storage of an unknown type")
        if type(key) is not str or type(location) is not str or not _is_int(numel) or numel < 0:
            raise _Bad("a malformed storage reference")
        dtype = _STORAGE_TYPES[storage_type.name]
        nbytes = numel * max(1, dtype.itemsize)
        record = by_name.get(f"{prefix}data/{key}".lower())
        if record is None:
            raise _Bad(f"a storage refers to the record data/{key}, which the archive lacks")
        if nbytes != record.size:
            raise _Bad(f"storage data/{key} claims {nbytes} bytes ({numel} x {dtype}) but its record holds "
                       f"{record.size}")
        if claimed.setdefault(key, (storage_type.name, nbytes)) != (storage_type.name, nbytes):
            raise _Bad(f"storage data/{key} is referred to with two different types")
        return _Storage(key, dtype, nbytes)

    data = _pread(fd, pickle_record.size, pickle_record.offset)
    _scan_pickle(io.BytesIO(data), storage)


class _Bounded:
    """A read-only stream that never reads (nor allocates) past the file's size, nor a line over 64 KiB."""

    def __init__(self, f: BinaryIO, size: int):
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline(1 << 16)

    def tell(self) -> int:
        return self._f.tell()


def _scan_legacy(path: str, fd: int, size: int) -> None:
    """The legacy format: magic, protocol and system-info pickles, the object pickle, the storage-key list,
    then each storage as an int64 element count and its bytes."""
    with os.fdopen(os.dup(fd), "rb") as raw:
        raw.seek(0)
        f = _Bounded(raw, size)

        def no_storage(pid: Any) -> _Storage:
            raise _Unsafe("a persistent reference outside the object pickle")

        for _ in range(3):
            _scan_pickle(f, no_storage)
        roots: Dict[str, Tuple[str, int]] = {}
        views: List[Tuple[str, int, int, int]] = []

        def storage(pid: Any) -> _Storage:
            if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
                raise _Unsafe("a persistent reference that is not a storage of the file")
            _, storage_type, key, location, numel, view = pid
            if not (isinstance(storage_type, _Global) and storage_type.name in _STORAGE_TYPES):
                raise _Unsafe("a storage of an unknown type")
            if type(key) is not str or type(location) is not str or not _is_int(numel) or numel < 0:
                raise _Bad("a malformed storage reference")
            dtype = _STORAGE_TYPES[storage_type.name]
            itemsize = max(1, dtype.itemsize)
            if roots.setdefault(key, (storage_type.name, numel * itemsize)) != (storage_type.name, numel * itemsize):
                raise _Bad(f"storage {key} is referred to with two different sizes or types")
            if view is None:
                return _Storage(key, dtype, numel * itemsize)
            if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str and _is_int(view[1])
                    and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0 and view[1] + view[2] <= numel):
                raise _Bad(f"a storage view outside its storage {key}")
            views.append((key, view[1], view[2], itemsize))
            return _Storage(view[0], dtype, view[2] * itemsize)

        _scan_pickle(f, storage)
        keys = _scan_pickle(f, no_storage)
        if not (isinstance(keys, _Obj) and keys.kind == "list" and all(type(k) is str for k in keys.items)):
            raise _Bad("the list of storages is malformed")
        pos = f.tell()
    if sum(n for _, n in roots.values()) > size - pos:
        raise _Bad(f"its storages claim {sum(n for _, n in roots.values())} bytes but the file holds "
                   f"{size - pos} after its pickles")
    for key in keys.items:
        if key not in roots:
            raise _Bad(f"the list of storages names {key!r}, which nothing uses")
        count = struct.unpack("<q", _pread(fd, 8, pos))[0]
        itemsize = max(1, _STORAGE_TYPES[roots[key][0]].itemsize)
        if count * itemsize != roots[key][1]:
            raise _Bad(f"storage {key} claims {roots[key][1]} bytes but the file records {count * itemsize}")
        pos += 8 + roots[key][1]
        if pos > size:
            raise _Bad(f"storage {key} reaches past the end of the file")


_ZIP_MAGIC = b"PK\x03\x04"


def scan(path: "os.PathLike[str] | str", display: Optional[str] = None) -> None:
    """Raise UnsafeCheckpointError or CorruptCheckpointError unless ``path`` asks only for tensors and plain data.

    Nothing is unpickled and nothing the file claims is allocated. ``display`` is the path
    the errors name (``path`` may be a pinned /proc/self/fd name).
    """
    shown = display if display is not None else os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CorruptCheckpointError(shown, f"the file cannot be read ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        head = pread(fd, 4, 0)
        if head == _ZIP_MAGIC:
            _scan_zip(shown, fd, size)
        else:
            _scan_legacy(shown, fd, size)
    except _Unsafe as exc:
        raise UnsafeCheckpointError(
            shown, f"refused to load: the file asks for {exc}, beyond the tensors and plain containers a "
                   f"checkpoint holds (nothing was unpickled)") from None
    except _Bad as exc:
        raise CorruptCheckpointError(shown, f"the file is damaged or forged: {exc} (nothing was unpickled)") from None
    except _Foreign:
        raise NotACheckpointError(shown, "a zip archive that is not a PyTorch checkpoint (no data.pkl record)") \
            from None
    except OSError as exc:
        raise CorruptCheckpointError(shown, f"the file could not be read ({exc})") from None
    finally:
        os.close(fd)
