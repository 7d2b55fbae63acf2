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


# ---------------------------------------------------------------------------- forging archives (bounded reading)
class Reducer:
    """Pickles to a call ``func(*args)`` (what a forger writes into a checkpoint's pickle)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def big_alloc(n: int = 2 ** 31) -> Reducer:
    """Pickles to ``bytearray(n)``: allowed by ``weights_only``, and unpickling it allocates n bytes."""
    return Reducer(bytearray, n)


class FakeStorage:
    """A storage reference in a forged pickle: record ``data/<key>``, claiming ``numel`` elements of its type."""

    def __init__(self, key: str, numel: int, type_name: str = "FloatStorage"):
        self.key, self.numel, self.type_name = key, numel, type_name


class FakeTensor:
    """A tensor in a forged pickle, rebuilt from ``storage`` with the offset, size and stride it claims."""

    def __init__(self, storage: FakeStorage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        import collections

        import torch
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def forged_pickle(obj, protocol: int = 2) -> bytes:
    """``obj`` pickled as torch.save pickles a checkpoint (FakeStorage objects become storage references)."""
    import io
    import pickle

    import torch

    def persistent_id(value):
        if isinstance(value, FakeStorage):
            return ("storage", getattr(torch, value.type_name), value.key, "cpu", value.numel)
        return None
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=protocol)
    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buf.getvalue()


def with_trailer(data: bytes) -> bytes:
    """A torch.save archive's bytes with a valid nn_handler checksum trailer, as ``atomic_save`` adds it."""
    import struct

    from nn_handler.checkpointing import io as ckpt_io

    assert data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\x00\x00", "not a comment-less zip archive"
    chunk = ckpt_io.CHUNK_SIZE
    crcs = [ckpt_io._crc(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return data[:-2] + struct.pack("<H", ckpt_io.TRAILER_SIZE) + \
        ckpt_io._pack_trailer(chunk, len(data), ckpt_io._table_crc(crcs))


def forge_archive(path, pickle_bytes: bytes, records=None, trailer: bool = True) -> Path:
    """Write a torch.save-layout archive (torch's own zip writer) holding ``pickle_bytes`` as its data.pkl
    and ``records`` ({key: bytes}) as its data/<key> records; checksummed like ours if ``trailer``."""
    import tempfile

    import torch

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "archive.pt"
        writer = torch._C.PyTorchFileWriter(str(raw))
        writer.write_record("data.pkl", pickle_bytes, len(pickle_bytes))
        writer.write_record(".format_version", b"1", 1)
        writer.write_record("byteorder", sys.byteorder.encode(), len(sys.byteorder))
        for key, data in (records or {}).items():
            writer.write_record(f"data/{key}", data, len(data))
        writer.write_end_of_file()
        del writer
        data = raw.read_bytes()
    path.write_bytes(with_trailer(data) if trailer else data)
    return path


def rezip(src, dst, compress=()) -> Path:
    """``src`` (a torch.save archive) rewritten by Python's zipfile, the records named in ``compress`` deflated."""
    import zipfile

    with zipfile.ZipFile(src) as archive:
        items = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(dst, "w") as out:
        for name, data in items:
            method = zipfile.ZIP_DEFLATED if name.split("/", 1)[-1] in compress else zipfile.ZIP_STORED
            out.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return Path(dst)
