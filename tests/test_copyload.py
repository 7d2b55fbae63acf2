"""The default read: tensors copied out of the file into fresh memory, checksummed on the way."""
import os
import random

import pytest
import torch
from safety_helpers import mapped_from

from nn_handler.checkpointing import CorruptCheckpointError, copyload, read_checkpoint
from nn_handler.checkpointing import io as ckpt_io


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Checksum chunks of 4 KiB and copy blocks of 1,000 bytes: storages straddle both boundaries."""
    monkeypatch.setattr(ckpt_io, "CHUNK_SIZE", 4096)
    monkeypatch.setattr(ckpt_io, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(copyload, "_BLOCK", 1000)


def _state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 37, generator=g)
    return {
        "base": base,
        "view": base[3:9],  # shares base's storage
        "transposed": base.t(),  # non-contiguous view of it
        "half": torch.randn(1000, generator=g).half(),
        "ints": torch.randint(-10**9, 10**9, (777,), generator=g, dtype=torch.int64),
        "flags": torch.rand(333, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "nested": [{"w": torch.randn(4096, generator=g)}, (torch.arange(5),)],
        "plain": {"lr": 0.1, "name": "x"},
    }


def test_copied_state_equals_the_saved_state_and_keeps_views_shared(tmp_path, tiny_chunks):
    path = tmp_path / "state.pt"
    state = _state()
    ckpt_io.atomic_save(state, path)
    assert ckpt_io.read_trailer(path).chunks > 5
    loaded = read_checkpoint(path)
    for key in ("base", "view", "transposed", "half", "ints", "flags", "scalar", "empty"):
        assert loaded[key].dtype == state[key].dtype and torch.equal(loaded[key], state[key]), key
        assert loaded[key].stride() == state[key].stride(), key
    assert torch.equal(loaded["nested"][0]["w"], state["nested"][0]["w"])
    assert torch.equal(loaded["nested"][1][0], state["nested"][1][0]) and isinstance(loaded["nested"][1], tuple)
    assert loaded["plain"] == state["plain"]
    # views still share one storage, as they did when saved
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    loaded["base"][3, 0] = 123.0
    assert loaded["view"][0, 0] == 123.0 and loaded["transposed"][0, 3] == 123.0
    # and nothing is tied to the file
    assert not any(mapped_from(t, path) for t in (loaded["base"], loaded["half"], loaded["nested"][0]["w"]))


def test_every_flipped_bit_in_a_many_chunk_file_is_caught_by_the_copying_read(tmp_path, tiny_chunks):
    path = tmp_path / "state.pt"
    ckpt_io.atomic_save(_state(), path)
    data = path.read_bytes()
    covered = ckpt_io.read_trailer(path).covered
    rng = random.Random(7)
    for pos in [rng.randrange(covered - 2) for _ in range(40)]:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        target = tmp_path / "flipped.pt"
        target.write_bytes(bytes(damaged))
        with pytest.raises(CorruptCheckpointError):
            read_checkpoint(target)


def test_only_the_asked_chunks_are_hashed_and_they_match_a_separate_pass(tmp_path, tiny_chunks):
    path = tmp_path / "state.pt"
    ckpt_io.atomic_save(_state(), path)
    trailer = ckpt_io.read_trailer(path)
    wanted = list(range(1, trailer.chunks, 3))
    mapped = torch.load(path, mmap=True, weights_only=True)
    loaded, crcs = copyload.read_copied(mapped, str(path), trailer, wanted)
    assert crcs == ckpt_io.chunk_crcs(path, trailer, wanted)
    assert torch.equal(loaded["base"], _state()["base"])


def test_files_that_do_not_fit_the_raw_copy_still_load_into_private_memory(tmp_path):
    legacy = tmp_path / "legacy.pt"
    state = {"w": torch.randn(64, 8)}
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["w"], state["w"])
    foreign = tmp_path / "foreign.pt"  # another tool's zip file: no checksum, copied all the same
    torch.save(state, foreign)
    loaded = read_checkpoint(foreign)
    assert torch.equal(loaded["w"], state["w"]) and not mapped_from(loaded["w"], foreign)


def test_a_mapped_load_stays_private_even_when_torch_is_set_to_share_mappings(tmp_path):
    """With torch's mmap option set to MAP_SHARED, writing to a mapped tensor would write the file."""
    import mmap
    path = tmp_path / "state.pt"
    ckpt_io.atomic_save({"w": torch.zeros(4096)}, path)
    before = path.read_bytes()
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        loaded = read_checkpoint(path, mmap=True)
        loaded["w"].add_(1.0)  # what an optimizer step does to mapped weights
    del loaded
    assert path.read_bytes() == before


def test_a_save_replacing_the_file_during_a_load_neither_mixes_files_nor_fails_it(tmp_path, monkeypatch):
    """The file is opened once; every later read goes through that descriptor, not the path."""
    path, newer = tmp_path / "ckpt.pt", tmp_path / "newer.pt"
    ckpt_io.atomic_save({"w": torch.zeros(4096), "step": 1}, path)
    ckpt_io.atomic_save({"w": torch.ones(4096), "step": 2}, newer)
    real = ckpt_io.read_trailer

    def read_then_replace(source):
        trailer = real(source)
        if newer.exists():
            ckpt_io.atomic_save({"w": torch.ones(4096), "step": 2}, path)  # a concurrent save lands
            newer.unlink()
        return trailer

    monkeypatch.setattr(ckpt_io, "read_trailer", read_then_replace)
    loaded = read_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.zeros(4096))
    assert read_checkpoint(path)["step"] == 2  # the next load sees the new file


def test_a_data_record_no_tensor_uses_sends_the_read_down_the_plain_route(tmp_path):
    """With an unused first record, 'lowest storage = lowest record' would shift every storage onto
    its neighbour's bytes (equal sizes, equal spacing): the pairing must be refused, not guessed."""
    path = tmp_path / "three.pt"
    torch.save({"a": torch.full((1024,), 1.0), "b": torch.full((1024,), 2.0), "c": torch.full((1024,), 3.0)}, path)
    offsets = copyload._record_offsets(str(path))
    mapped = torch.load(path, mmap=True, weights_only=True)
    size = path.stat().st_size
    assert copyload._match([mapped["a"], mapped["b"], mapped["c"]], offsets, size) is not None
    assert copyload._match([mapped["b"], mapped["c"]], offsets, size) is None  # as if "a" were not in the pickle


def test_thousands_of_small_tensors_load(tmp_path):
    """A 1 MiB block can hold more records than one preadv call takes buffers (IOV_MAX = 1024)."""
    path = tmp_path / "small.pt"
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(3000)}
    ckpt_io.atomic_save(state, path)
    loaded = read_checkpoint(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_conjugate_and_negative_views_keep_their_values(tmp_path):
    path = tmp_path / "views.pt"
    state = {"conj": torch.tensor([1 + 2j, 3 - 4j]).conj(), "neg": torch.tensor([1.0, -2.0])._neg_view(),
             "w": torch.randn(64)}
    ckpt_io.atomic_save(state, path)
    loaded = read_checkpoint(path)
    for key, value in state.items():
        assert torch.equal(loaded[key].resolve_conj().resolve_neg(), value.resolve_conj().resolve_neg()), key


def test_a_file_cut_short_while_it_is_copied_is_a_corrupt_checkpoint_naming_the_path(tmp_path, monkeypatch):
    path = tmp_path / "cut.pt"
    ckpt_io.atomic_save({"w": torch.randn(300_000)}, path)
    real = copyload._read_into

    def truncate_then_read(fd, buffers, offset):
        os.truncate(path, 1000)  # a plain torch.save over the file, caught mid-copy
        return real(fd, buffers, offset)

    monkeypatch.setattr(copyload, "_read_into", truncate_then_read)
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "/proc/self/fd" not in str(info.value)
