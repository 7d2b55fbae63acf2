"""The header of a safetensors file, read and checked without reading any tensor data (a leaf: the
reader, ``nn_handler.interop``, and ``inspect``/``read_info`` both use it).

The layout: an 8-byte little-endian header length, a JSON header (each tensor's ``dtype``,
``shape`` and ``data_offsets``; an optional ``__metadata__`` of strings), then the raw bytes.
The length is checked against the file's size (and ``MAX_HEADER``) before it is read; every
tensor's offsets are checked against the data the file holds (inside it, not overlapping,
exactly ``numel x itemsize`` bytes). ``export_record`` parses the ``nn_handler`` record an export
keeps in its metadata.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import format as F
from .errors import CorruptCheckpointError, IncompatibleCheckpointError
from .pickle_scan import pread as _pread

EXPORT_FORMAT = "nn_handler.export"
EXPORT_VERSION = 1
META_KEY = "nn_handler"
#: The largest safetensors header read (the format's own limit is 100 MB; real files have
#: headers of a few KiB to a few MiB). Checked, with the file's size, before it is read.
MAX_HEADER = 16 * 1024 * 1024

# safetensors dtype names -> torch dtypes (only those this torch has).
ST_DTYPES: Dict[str, torch.dtype] = {}
for _name, _attr in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                     ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
                     ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if isinstance(getattr(torch, _attr, None), torch.dtype):
        ST_DTYPES[_name] = getattr(torch, _attr)


def read_header(fd: int, size: int, path: str) -> Tuple[Dict[str, Tuple[torch.dtype, List[int], int, int]],
                                                    Dict[str, str], int]:
    """The checked header: name -> (dtype, shape, begin, end) (offsets from the data start),
    ``__metadata__``, and the data start. Nothing the file claims is allocated unchecked."""
    if size < 8:
        raise CorruptCheckpointError(path, f"a safetensors file of {size} bytes is too short for its header length")
    (length,) = struct.unpack("<Q", _pread(fd, 8, 0))
    if length > size - 8:
        raise CorruptCheckpointError(path, f"the safetensors header claims {length} bytes but the file holds only "
                                           f"{size - 8} after its length field (truncated or forged)")
    if length > MAX_HEADER:
        raise CorruptCheckpointError(path, f"the safetensors header claims {length} bytes, more than the "
                                           f"{MAX_HEADER} this reader accepts")
    raw = _pread(fd, length, 8)
    if len(raw) != length:
        raise CorruptCheckpointError(path, "the file was cut short while it was being read")

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"the key {key[:80]!r} appears twice")
            out[key] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"the safetensors header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CorruptCheckpointError(path, "the safetensors __metadata__ is not a mapping of strings to strings")
    data_start = 8 + length
    available = size - data_start
    entries: Dict[str, Tuple[torch.dtype, List[int], int, int]] = {}
    for name, entry in header.items():
        where = f"tensor {name[:80]!r}"
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise CorruptCheckpointError(path, f"the safetensors header entry of {where} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise IncompatibleCheckpointError(path, f"{where} has the dtype {str(dtype)[:20]!r}, which this reader "
                                                    f"does not take (one of {', '.join(ST_DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= 64
                and all(type(n) is int and n >= 0 for n in shape)):
            raise CorruptCheckpointError(path, f"{where} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise CorruptCheckpointError(path, f"{where} has malformed data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= available:
            raise CorruptCheckpointError(path, f"{where} lies at bytes {begin}..{end} of the data, outside the "
                                               f"{available} bytes the file holds (truncated or forged)")
        nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if nbytes != end - begin:
            raise CorruptCheckpointError(path, f"{where} of shape {shape} ({dtype}) needs {nbytes} bytes but its "
                                               f"data_offsets span {end - begin}")
        entries[name] = (ST_DTYPES[dtype], shape, begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CorruptCheckpointError(path, f"the data of tensors {a[:80]!r} and {b[:80]!r} overlap")
    return entries, metadata, data_start


def export_record(metadata: Dict[str, str], path: str) -> Optional[Dict[str, Any]]:
    """The parsed ``nn_handler`` record of one of our exports, or None for another tool's file."""
    if metadata.get("format") != EXPORT_FORMAT:
        return None
    try:
        record = json.loads(metadata.get(META_KEY, ""))
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(path, f"the export's '{META_KEY}' metadata is not valid JSON") from None
    if not isinstance(record, dict):
        raise CorruptCheckpointError(path, f"the export's '{META_KEY}' metadata is not a JSON object")
    version = record.get("format_version")
    if not F.is_count(version) or version < 1:
        raise IncompatibleCheckpointError(path, f"invalid export format version {F.short(version)}")
    if version > EXPORT_VERSION:
        raise IncompatibleCheckpointError(path, f"export format version {version} was written by a newer nn_handler "
                                                f"(this one reads up to {EXPORT_VERSION}); upgrade nn_handler")
    crcs = record.get("crc32c")
    if not (isinstance(crcs, dict) and all(isinstance(v, str) for v in crcs.values())):
        raise CorruptCheckpointError(path, "the export's checksum record is missing or damaged")
    return record
