"""Bounded reading: before anything is unpickled, a checkpoint's archive and pickle are scanned.

Forged files carry valid checksums (the attacker recomputes them), so every refusal here
comes from the scan, not from the integrity check. ``torch.load`` is replaced by a tripwire
where the point is that the file was refused before any unpickling.
"""
import collections
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import helpers_core as hc
import pytest
import torch
from safety_helpers import FakeStorage, FakeTensor, Reducer, big_alloc, forge_archive, forged_pickle, mapped_from, rezip

from nn_handler import NNHandler
from nn_handler.checkpointing import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
    diff,
    find_latest,
    inspect,
    pickle_scan,
    read_checkpoint,
    read_info,
)
from nn_handler.checkpointing import io as ckpt_io
from nn_handler.models import MLP

TESTS = Path(__file__).resolve().parent
FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
_torch_load = torch.load  # (the tests' own reads, while the tripwire below replaces torch.load)


class Unpickled(BaseException):
    """Raised by the tripwire (a BaseException: no ``except Exception`` in the library can swallow it)."""


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load must never be reached for a forged file (the scan refuses first); legitimate ones are named good*."""
    def tripwire(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.basename(os.path.realpath(f)).startswith("good"):
            return _torch_load(f, *args, **kwargs)
        raise Unpickled(f"torch.load was called on {f}, which the scan should have refused")
    monkeypatch.setattr(torch, "load", tripwire)


def _handler_state(path: Path) -> dict:
    """A real handler checkpoint's contents (optimizer, scheduler, loss, metric, data specs)."""
    h = hc.classification_handler()
    h.save(path)
    return _torch_load(path, weights_only=True)


def _all_readers(path: Path):
    """Every library entry point that reads a file, as (name, call)."""
    return [
        ("load", lambda: NNHandler.load(path)),
        ("load mmap", lambda: NNHandler.load(path, mmap=True)),
        ("initialize_from_checkpoint", lambda: NNHandler.initialize_from_checkpoint(path, MLP, **hc.MODEL_KWARGS)),
        ("read_info", lambda: read_info(path)),
        ("read_checkpoint", lambda: read_checkpoint(path)),
    ]


# ---------------------------------------------------------------------------- the memory bomb
_BOMB_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, warnings
    sys.path.insert(0, sys.argv[1])
    warnings.simplefilter("ignore")
    import torch
    import helpers_core as hc
    from safety_helpers import big_alloc
    from nn_handler import NNHandler
    from nn_handler.checkpointing import CheckpointError, diff, find_latest, inspect, read_info
    from nn_handler.checkpointing.io import atomic_save
    from nn_handler.models import MLP

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)

    work = sys.argv[2]
    good, bomb = os.path.join(work, "run", "good.pt"), os.path.join(work, "run", "bomb.pt")
    h = hc.classification_handler()
    h.save(good)
    state = torch.load(good, weights_only=True)
    legit = sum(t.numel() * t.element_size() for t in state["model_state_dict"].values())

    def readers(path, other):
        return [
            ("load", lambda: NNHandler.load(path)),
            ("load mmap", lambda: NNHandler.load(path, mmap=True)),
            ("initialize_from_checkpoint", lambda: NNHandler.initialize_from_checkpoint(path, MLP, **hc.MODEL_KWARGS)),
            ("read_info", lambda: read_info(path)),
            ("inspect", lambda: inspect(path)),
            ("diff", lambda: diff(other, path)),
            ("find_latest", lambda: find_latest(os.path.dirname(path))),
        ]

    for name, call in readers(good, good):  # the legitimate reads first: their peak is the baseline
        call()
    baseline = peak()
    state["metadata"]["cache"] = big_alloc()   # 2 GiB on unpickling, 31 bytes in the file
    state["progress"]["global_step"] = 10 ** 6  # find_latest would rank it first
    atomic_save(state, bomb)                    # a valid checksum: a forgery, not damage
    results = {}
    for name, call in readers(bomb, good):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = call()
            if name == "inspect":
                results[name] = {"kind": "report", "message": str(value.get("error"))}
            else:
                results[name] = {"kind": "returned", "message": str(value),
                                 "warnings": [str(w.message) for w in caught]}
        except CheckpointError as exc:
            results[name] = {"kind": type(exc).__name__, "message": str(exc), "path": exc.path}
        except BaseException as exc:
            results[name] = {"kind": "raw " + type(exc).__name__, "message": str(exc)}
    print(json.dumps({"baseline": baseline, "peak": peak(), "legit": legit,
                      "size": os.path.getsize(bomb), "results": results, "good": good, "bomb": bomb}))
""")


def test_a_small_file_asking_for_a_huge_bytearray_is_refused_by_every_reader_without_allocating(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, str(TESTS), str(tmp_path)], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["size"] < 1 << 20  # a small file (about 100 KiB)
    results = report["results"]
    for name in ("load", "load mmap", "initialize_from_checkpoint", "read_info", "diff"):
        assert results[name]["kind"] == "UnsafeCheckpointError", (name, results[name])
        assert "builtins.bytearray" in results[name]["message"] and report["bomb"] in results[name]["message"], name
    assert "builtins.bytearray" in results["inspect"]["message"]  # inspect reports, never raises
    # find_latest skips the bomb (naming it) and returns the legitimate file
    assert results["find_latest"]["kind"] == "returned" and results["find_latest"]["message"] == report["good"]
    assert any(report["bomb"] in w for w in results["find_latest"]["warnings"])
    # nothing allocated for it: the peak stays where the legitimate reads left it
    grown = report["peak"] - report["baseline"]
    assert grown < max(2 * report["legit"], 16 << 20), f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert report["peak"] < 1 << 30


# ---------------------------------------------------------------------------- forbidden globals
@pytest.mark.parametrize("payload, named", [
    (lambda marker: Reducer(os.system, f"touch {marker}"), "posix.system"),
    (lambda marker: Reducer(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    (lambda marker: big_alloc(), "builtins.bytearray"),
    (lambda marker: Reducer(torch._utils._rebuild_meta_tensor_no_storage, torch.float32, (2 ** 20,), (1,), False),
     "torch._utils._rebuild_meta_tensor_no_storage"),
    (lambda marker: Reducer(collections.Counter, "ab"), "collections.Counter"),  # allowed by weights_only
])
def test_a_forbidden_global_in_a_handler_file_is_refused_before_unpickling_and_named(
        tmp_path, payload, named, no_unpickling):
    marker = tmp_path / "marker"
    state = _handler_state(tmp_path / "good.pt")
    state["metadata"]["x"] = payload(marker)
    path = ckpt_io.atomic_save(state, tmp_path / "forged.pt")
    # even a process that widened torch's own allow-list for this global refuses it from a file
    with torch.serialization.safe_globals([os.system, eval, bytearray]):
        for name, call in _all_readers(path):
            with pytest.raises(UnsafeCheckpointError) as info:
                call()
            assert named in str(info.value) and info.value.path == str(path), name
        assert "nothing was unpickled" in str(info.value)
        assert named in inspect(path)["error"]
        with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")):
            diff(tmp_path / "good.pt", path)
        with pytest.warns(Warning, match=re.escape(str(path))):
            assert find_latest(tmp_path) == tmp_path / "good.pt"
    assert not marker.exists()


def test_without_the_scan_weights_only_alone_would_allocate_and_honour_process_wide_globals(tmp_path, monkeypatch):
    """The control for the test above: what ``torch.load(weights_only=True)`` alone does with these files."""
    marker = tmp_path / "marker"
    path = ckpt_io.atomic_save({"x": big_alloc(1 << 20), "y": Reducer(eval, f"open({str(marker)!r}, 'w').close()")},
                               tmp_path / "forged.pt")
    with torch.serialization.safe_globals([eval]):
        with pytest.raises(UnsafeCheckpointError):
            read_checkpoint(path)
        assert not marker.exists()
        monkeypatch.setattr(ckpt_io, "_scan_pickles", lambda *args: None)
        loaded = read_checkpoint(path)
    assert marker.exists()  # the file ran code
    assert type(loaded["x"]) is bytearray and len(loaded["x"]) == 1 << 20  # and allocated what it claimed


def _raw_pickle(*ops: bytes) -> bytes:
    return b"".join(ops)


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


@pytest.mark.parametrize("pickle_bytes, named", [
    # protocol 4 attribute walking from an allowed module: STACK_GLOBAL with a dotted name
    (_raw_pickle(b"\x80\x04", _str("torch.nn.functional"), _str("torch.os.system"), b"\x93", _str("true"),
                 b"\x85R."), "torch.nn.functional.torch.os.system"),
    # a global whose name is computed at unpickling time (here by an allowed call)
    (_raw_pickle(b"\x80\x04", _str("torch"), b"c_codecs\nencode\n", _str("Size"), _str("latin1"), b"\x86R",
                 b"\x93."), "computed"),
    # protocol 0 instantiation
    (b"(S'true'\nios\nsystem\n.", "INST"),
    # NEWOBJ of an allowed class (its __new__ is not a checked call)
    (_raw_pickle(b"\x80\x02", b"ccollections\nOrderedDict\n", b")\x81."), "NEWOBJ"),
    # a tensor carrying a backward hook
    (None, "backward hooks"),
    # APPEND onto an object that is not a list (would call its append method)
    (_raw_pickle(b"\x80\x02", b"ccollections\nOrderedDict\n", b")R", b"K\x01a."), "not a plain container"),
])
def test_pickles_that_ask_for_more_than_plain_data_are_refused(tmp_path, pickle_bytes, named, no_unpickling):
    records = {}
    if pickle_bytes is None:
        hooks = Reducer(OrderedDict, [(0, Reducer(torch.device, "cpu"))])
        tensor = Reducer(torch._utils._rebuild_tensor_v2, FakeStorage("0", 4), 0, (4,), (1,), False, hooks)
        pickle_bytes, records = forged_pickle({"w": tensor}), {"0": FLOATS}
    path = forge_archive(tmp_path / "forged.pt", pickle_bytes, records)
    for call in (lambda: read_checkpoint(path), lambda: read_checkpoint(path, mmap=True), lambda: read_info(path)):
        with pytest.raises(UnsafeCheckpointError) as info:
            call()
        assert named in str(info.value) and info.value.path == str(path)


# ---------------------------------------------------------------------------- sizes the file does not hold
def test_a_consistent_forged_archive_loads(tmp_path):
    """The forging tool writes archives torch reads: the refusals below come from the checks, not the tool."""
    storage = FakeStorage("0", 4)
    path = forge_archive(tmp_path / "ok.pt", forged_pickle({"w": FakeTensor(storage, 1, (3,), (1,))}), {"0": FLOATS})
    for kwargs in ({}, {"mmap": True}, {"map_location": lambda s, _: s}):
        assert read_checkpoint(path, **kwargs)["w"].tolist() == [2.0, 3.0, 4.0]


def test_a_storage_claiming_more_bytes_than_its_record_is_refused(tmp_path, no_unpickling):
    # 1 GiB claimed, 16 bytes held (a mapped load would otherwise hand out a storage reaching past the file)
    tensor = FakeTensor(FakeStorage("0", 2 ** 28), 0, (4,), (1,))
    path = forge_archive(tmp_path / "claim.pt", forged_pickle({"w": tensor}), {"0": FLOATS})
    for kwargs in ({}, {"mmap": True}, {"map_location": lambda s, _: s}):
        with pytest.raises(CorruptCheckpointError, match=r"claims 1073741824 bytes .* record holds 16") as info:
            read_checkpoint(path, **kwargs)
        assert info.value.path == str(path)
    missing = forge_archive(tmp_path / "missing.pt", forged_pickle({"w": tensor}), {})
    with pytest.raises(CorruptCheckpointError, match="lacks"):
        read_checkpoint(missing)


@pytest.mark.parametrize("offset, size, stride, message", [
    (0, (2 ** 28,), (1,), "reaches element"),
    (3, (2,), (1,), "reaches element"),
    (0, (2, 2), (3, 1), "reaches element"),
    (0, (4,), (-1,), "negative"),
    (-1, (1,), (1,), "negative"),
    (0, (2 ** 62, 2 ** 62), (1, 1), "reaches element"),
])
def test_a_tensor_reaching_past_its_storage_is_refused_before_allocation(tmp_path, offset, size, stride, message,
                                                                          no_unpickling):
    tensor = FakeTensor(FakeStorage("0", 4), offset, size, stride)
    path = forge_archive(tmp_path / "extent.pt", forged_pickle({"w": tensor}), {"0": FLOATS})
    for kwargs in ({}, {"mmap": True}, {"map_location": lambda s, _: s}):
        with pytest.raises(CorruptCheckpointError, match=message):
            read_checkpoint(path, **kwargs)


@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_a_deflated_zip_record_a_zip_bomb_is_refused(tmp_path, record, no_unpickling):
    # 16 MiB of zeros deflate to ~16 KiB: torch's reader would inflate the record in memory
    src = tmp_path / "src.pt"
    if record == "data.pkl":
        torch.save({"w": torch.zeros(4), "pad": "\x00" * (16 << 20)}, src)
    else:
        torch.save({"w": torch.zeros(4 << 20)}, src)
    bomb = rezip(src, tmp_path / "bomb.pt", compress={record})
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UnsafeCheckpointError, match="compressed") as info:
        read_checkpoint(bomb)
    assert info.value.path == str(bomb) and record in str(info.value)
    assert "compressed" in inspect(bomb)["error"]


def test_a_python_zipfile_rewrite_without_compression_still_loads(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(10.0)}, src)
    stored = rezip(src, tmp_path / "stored.pt")
    assert read_checkpoint(stored)["w"].tolist() == list(range(10))


def test_zip_records_outside_the_file_or_overlapping_are_refused(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(10.0)}, src)
    data = bytearray(src.read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack_from("<I", data, eocd + 16)[0]
    # the first central entry's compressed and uncompressed sizes: claim 1 GiB
    bad = bytearray(data)
    struct.pack_into("<II", bad, cd_offset + 20, 1 << 30, 1 << 30)
    (tmp_path / "huge.pt").write_bytes(bad)
    with pytest.raises(CorruptCheckpointError, match="past the end"):
        read_checkpoint(tmp_path / "huge.pt")
    # the central directory itself pointing past the end (in the zip64 end record too, where torch writes one)
    bad = bytearray(data)
    struct.pack_into("<I", bad, eocd + 16, len(data) + 100)
    if b"PK\x06\x06" in data:
        struct.pack_into("<Q", bad, data.rindex(b"PK\x06\x06") + 48, len(data) + 100)
    (tmp_path / "cd.pt").write_bytes(bad)
    with pytest.raises(CorruptCheckpointError, match="central directory"):
        read_checkpoint(tmp_path / "cd.pt")


def test_a_legacy_file_claiming_more_storage_than_it_holds_is_refused(tmp_path, no_unpickling):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # the storage reference: location "cpu" (memoized), then 4 elements; claim 2**28 (1 GiB) instead, which
    # torch's legacy reader allocates before it reads the data
    honest = re.compile(rb"(X\x03\x00\x00\x00cpuq.)K\x04", re.S)
    assert len(honest.findall(data)) == 1
    path.write_bytes(honest.sub(lambda m: m.group(1) + b"J\x00\x00\x00\x10", data))
    with pytest.raises(CorruptCheckpointError, match="claim") as info:
        read_checkpoint(path)
    assert info.value.path == str(path)


# ---------------------------------------------------------------------------- what must still load
def test_plain_files_of_other_tools_still_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    files = {
        "bare": model.state_dict(),
        "model_state_dict": {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                             "epoch": 3},
        "lightning": {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                      "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                      "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}},
                      "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "x.ckpt"}},
                      "hyper_parameters": {"lr": 0.1, "tag": b"\x00\xffraw", "ids": {1, 2}, "z": 1 + 2j,
                                           "device": torch.device("cpu"), "dtype": torch.bfloat16}},
        "parameters": list(model.parameters()),
    }
    for name, obj in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        for mmap in (False, True):
            loaded = read_checkpoint(path, mmap=mmap)
            if name == "parameters":
                assert all(torch.equal(a, b) for a, b in zip(loaded, obj))
            else:
                hc.assert_same(torch.load(path, weights_only=True), loaded, name)
    lightning = read_checkpoint(tmp_path / "lightning.pt")
    assert lightning["hyper_parameters"]["tag"] == b"\x00\xffraw" and lightning["hyper_parameters"]["ids"] == {1, 2}
    legacy = tmp_path / "legacy.pt"
    torch.save(files["model_state_dict"], legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["model_state_dict"]["0.weight"], model.state_dict()["0.weight"])
    pickle_scan.scan(legacy)


def test_every_dtype_view_and_container_our_saves_emit_passes_the_scan(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {"f32": base, "view": base[2:4], "t": base.t(), "bf16": base.bfloat16(), "f16": base.half(),
             "f64": base.double(), "i8": torch.ones(3, dtype=torch.int8), "u8": torch.ones(3, dtype=torch.uint8),
             "u16": torch.ones(3, dtype=torch.uint16), "f8": base.to(torch.float8_e4m3fn), "bool": base > 0,
             "c64": torch.ones(2, dtype=torch.complex64), "i64": torch.arange(5), "empty": torch.empty(0, 3),
             "scalar": torch.tensor(1.5), "size": torch.Size([2, 3]), "dtype": torch.float16,
             "od": OrderedDict(a=1), "nested": [(1, 2.5, "x", None, True)]}
    path = ckpt_io.atomic_save(state, tmp_path / "all.pt")
    pickle_scan.scan(path)
    loaded = read_checkpoint(path)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key].float(), value.float()), key
    assert loaded["size"] == torch.Size([2, 3]) and loaded["dtype"] is torch.float16


# ---------------------------------------------------------------------------- sparse tensors
def _sparse_handler():
    h = hc.classification_handler()
    h.metadata["adj"] = torch.eye(3).to_sparse()
    h.metadata["csr"] = (torch.arange(12.0).reshape(3, 4) * (torch.arange(12).reshape(3, 4) % 3 == 0)).to_sparse_csr()
    h.metadata["csc"] = torch.eye(4).to_sparse_csc()
    return h


@pytest.mark.parametrize("mmap", [False, True])
def test_sparse_tensors_in_the_state_round_trip(tmp_path, mmap):
    h = _sparse_handler()
    path = tmp_path / "sparse.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch: "sparse CSR support is in beta")
        h.save(path)
        loaded = NNHandler.load(path, mmap=mmap)
    for key in ("adj", "csr", "csc"):
        a, b = h.metadata[key], loaded.metadata[key]
        assert b.layout == a.layout and b.shape == a.shape, key
        assert torch.equal(b.to_dense(), a.to_dense()), key
    if not mmap:  # copied out of the file like every other tensor
        coo = loaded.metadata["adj"]
        assert not mapped_from(coo._indices(), path) and not mapped_from(coo._values(), path)
        assert not mapped_from(loaded.metadata["csr"].values(), path)
    state = read_checkpoint(path, mmap=mmap)
    assert torch.equal(state["metadata"]["adj"].to_dense(), torch.eye(3))
    info = read_info(path)
    assert info["kind"] == "handler"
    report = inspect(path)
    assert "error" not in report and report["integrity"]["verified"] is True


def test_a_sparse_tensor_with_a_damaged_part_is_refused_not_raw(tmp_path):
    indices = FakeTensor(FakeStorage("0", 2, "LongStorage"), 0, (2, 1), (1, 1))
    values = FakeTensor(FakeStorage("1", 1), 0, (1,), (1,))
    sparse = Reducer(torch._utils._rebuild_sparse_tensor, torch.sparse_coo, (indices, values, (3, 3)))
    records = {"0": struct.pack("<2q", 7, 0), "1": struct.pack("<f", 1.0)}  # row 7 of a 3 x 3 matrix
    path = forge_archive(tmp_path / "sparse.pt", forged_pickle({"adj": sparse}), records)
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(path)


# ---------------------------------------------------------------------------- a file changing under the reader
def test_a_file_cut_short_during_the_trailer_read_is_a_checkpoint_error(tmp_path, monkeypatch):
    path = ckpt_io.atomic_save({"w": torch.zeros(1000)}, tmp_path / "a.pt")
    original = ckpt_io._check_signature

    def truncate_meanwhile(p, head):  # runs after the size was taken, before the trailer is read
        original(p, head)
        with open(p, "r+b") as f:
            f.truncate(100)
    monkeypatch.setattr(ckpt_io, "_check_signature", truncate_meanwhile)
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt_io.read_trailer(path)
    assert info.value.path == str(path)
    path = ckpt_io.atomic_save({"w": torch.zeros(1000)}, tmp_path / "a.pt")
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(path)
    assert info.value.path == str(path)


def test_structure_reads_of_a_file_rewritten_in_place_raise_only_checkpoint_errors(tmp_path):
    path = tmp_path / "live.pt"
    versions = [ckpt_io.atomic_save({"w": torch.full((n,), float(n))}, tmp_path / f"v{n}.pt").read_bytes()
                for n in (10, 5000, 200000)]
    path.write_bytes(versions[0])
    stop = threading.Event()

    def rewrite_in_place():  # as a plain torch.save to the same path does: truncate, then write
        i = 0
        while not stop.is_set():
            with open(path, "r+b") as f:
                f.truncate(0)
                data = versions[i % len(versions)]
                f.write(data[:len(data) // 2])
                f.flush()
                f.write(data[len(data) // 2:])
            i += 1
    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    raw = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for call in (ckpt_io.read_trailer, pickle_scan.scan, ckpt_io.file_checksum):
                try:
                    call(path)
                except CheckpointError as exc:
                    assert exc.path == str(path)
                except Exception as exc:  # noqa: BLE001 - exactly what must not happen
                    raw.append(f"{call.__name__}: {type(exc).__name__}: {exc}")
    finally:
        stop.set()
        writer.join(10)
    assert not raw, raw[:5]


# ---------------------------------------------------------------------------- cost
def test_the_scan_is_cheap_next_to_the_load(tmp_path):
    state = {f"layer{i}.{kind}": torch.randn(64, 64) for i in range(150) for kind in ("weight", "bias", "m", "v")}
    path = ckpt_io.atomic_save(state, tmp_path / "many.pt")
    start = time.perf_counter()
    for _ in range(5):
        pickle_scan.scan(path)
    per_scan = (time.perf_counter() - start) / 5
    assert per_scan < 0.25, f"scanning 600 tensors took {per_scan * 1e3:.0f} ms"


def test_another_programs_zip_archive_is_not_a_checkpoint_whatever_its_compression(tmp_path):
    import zipfile
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("docs/readme.txt", "hello " * 1000)
    with pytest.raises(NotACheckpointError) as info:
        read_checkpoint(path)
    assert info.value.path == str(path)


# ---------------------------------------------------------------------------- shared references and cycles
def _doubling(depth: int) -> list:
    value = [0]
    for _ in range(depth):
        value = [value, value]  # a few bytes a level in the file (the pickler memoizes it), 2**depth when walked
    return value


def _fan_out(width: int, depth: int) -> list:
    value = [0]
    for _ in range(depth):
        value = [value] * width
    return value


def _self_containing() -> list:
    value = [1, 2]
    value.append(value)
    return value


def _deep(depth: int) -> list:
    value = [0]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("make, message", [
    (lambda: _doubling(24), "expands to more than"),                    # 2**24 leaves from a ~20 KB file
    (lambda: _fan_out(150, 3), "expands to more than"),                 # 3.4 million nodes
    (lambda: {"a": _self_containing()}, "contains itself"),             # readers would recurse forever
    (lambda: [{"x": _self_containing()}, 3], "contains itself"),
    (lambda: _deep(500), "nested more than"),                           # RecursionError in every walker
])
def test_structures_that_expand_or_cycle_when_walked_are_refused_quickly_by_every_reader(
        tmp_path, make, message, no_unpickling):
    state = _handler_state(tmp_path / "good.pt")
    state["metadata"]["x"] = make()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))  # (torch.save itself recurses through a deep structure)
    try:
        path = ckpt_io.atomic_save(state, tmp_path / "forged.pt")
    finally:
        sys.setrecursionlimit(limit)
    assert path.stat().st_size < 1 << 20
    calls = _all_readers(path) + [("diff", lambda: diff(tmp_path / "good.pt", path)),
                                  ("diff reversed", lambda: diff(path, tmp_path / "good.pt"))]
    for name, call in calls:
        start = time.perf_counter()
        with pytest.raises(UnsafeCheckpointError) as info:
            call()
        elapsed = time.perf_counter() - start
        assert message in str(info.value) and info.value.path == str(path), (name, str(info.value))
        assert "nothing was unpickled" in str(info.value)
        assert elapsed < 2.0, f"{name} took {elapsed:.1f} s to refuse"
    start = time.perf_counter()
    report = inspect(path)  # reports, never raises
    assert message in report["error"] and time.perf_counter() - start < 2.0
    with pytest.warns(Warning, match=re.escape(str(path))):
        assert find_latest(tmp_path) == tmp_path / "good.pt"


def test_a_structure_that_expands_too_far_is_refused_wherever_it_sits_in_the_state(tmp_path, no_unpickling):
    state = _handler_state(tmp_path / "good.pt")
    state["optimizer"]["state_dict"] = {"state": {0: {"x": _doubling(20)}}, "param_groups": []}  # not only metadata
    path = ckpt_io.atomic_save(state, tmp_path / "forged.pt")
    with pytest.raises(UnsafeCheckpointError, match="expands to more than"):
        NNHandler.load(path)
    # a tuple chain (tuples are measured like lists) and a dict chain
    for value in ((lambda: _tuple_doubling(22)), (lambda: _dict_doubling(22))):
        path = ckpt_io.atomic_save({"x": value()}, tmp_path / "plain.pt")
        with pytest.raises(UnsafeCheckpointError, match="expands to more than"):
            read_checkpoint(path)


def _tuple_doubling(depth: int) -> tuple:
    value: tuple = (0,)
    for _ in range(depth):
        value = (value, value)
    return value


def _dict_doubling(depth: int) -> dict:
    value: dict = {"leaf": 0}
    for _ in range(depth):
        value = {"a": value, "b": value}
    return value


@pytest.mark.parametrize("pickle_bytes", [
    # a list changed after it was placed in another ([] memoized, put in an outer list, which is dropped,
    # then grown): how a file would otherwise make its measured sizes too small
    b"\x80\x02]q\x00]q\x01h\x00a0K\x01a.",
    # a dict that is its own value, written by hand
    b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.",
])
def test_hand_written_cycles_and_late_changes_are_refused(tmp_path, pickle_bytes, no_unpickling):
    path = forge_archive(tmp_path / "forged.pt", pickle_bytes)
    with pytest.raises(UnsafeCheckpointError, match="contains itself, or is changed after"):
        read_checkpoint(path)


def test_a_large_legitimate_checkpoint_with_history_and_shared_values_still_loads(tmp_path):
    h = hc.classification_handler()
    h.train(epochs=1, ema_decay=0.9, seed=0, progress_bar=False)
    for i in range(1000):
        h._history.append(1.0 / (i + 1), {"accuracy": 0.5}, 0.9, {"accuracy": 0.6})
    classes = [f"class {i}" for i in range(500)]
    h.metadata["classes"] = classes          # the same list in several places (memo references)
    h.metadata["splits"] = {"train": classes, "val": classes, "test": classes}
    h.metadata["nested"] = _deep(60)         # deep, but far from the limit
    h.metadata["shared_small"] = _doubling(12)  # 8,192 leaves: legitimate sharing within the budget
    path = tmp_path / "big.pt"
    h.save(path)
    loaded = NNHandler.load(path)
    assert len(loaded.train_losses) == 1001 and loaded.metadata["splits"]["val"] == classes
    assert loaded.ema is not None
    assert NNHandler.initialize_from_checkpoint(path, MLP, **hc.MODEL_KWARGS) is not None
    assert "error" not in inspect(path) or not inspect(path)["error"]
    diff(path, path)
    read_info(path)
