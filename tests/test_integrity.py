"""Safe, atomic, verified checkpoints: hostile files, junk, damage, crashes."""
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safety_helpers import Payload, mapped_from

from nn_handler import NNHandler
from nn_handler.checkpointing import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
)
from nn_handler.checkpointing import io as ckpt_io
from nn_handler.models import MLP

DATA = {"_target_": "nn_handler.datasets.synthetic_classification", "n": 64, "in_features": 8, "num_classes": 3}


def _trained_handler() -> NNHandler:
    h = NNHandler(MLP, in_features=8, out_features=3, hidden=[16])
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(DATA, batch_size=16, shuffle=True)
    h.train(epochs=1, ema_decay=0.9, progress_bar=False)
    return h


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    h = _trained_handler()
    h.save(path)
    return path, h


def _same_state(a: NNHandler, b: NNHandler) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and \
        a.train_losses == b.train_losses and a.epoch == b.epoch


# ------------------------------------------------------------------ hostile files
@pytest.mark.parametrize("where", ["top level", "inside the model state", "deep in a list"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = Payload(str(marker))
    obj = {"top level": evil,
           "inside the model state": {"model_state_dict": {"w": torch.zeros(2), "x": evil}},
           "deep in a list": {"a": [1, {"b": (2, [evil])}]}}[where]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    for load in (lambda: NNHandler.load(path), lambda: NNHandler.initialize_from_checkpoint(path, MLP, in_features=2,
                                                                                    out_features=2)):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_raw_pickle_file_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        NNHandler.load(path)
    assert not marker.exists()


# ------------------------------------------------------------------ junk
@pytest.mark.parametrize("kind,content,error", [
    ("empty", b"", CorruptCheckpointError),
    ("text", b"epoch: 3\nloss: 0.1\n", NotACheckpointError),
    ("random bytes", bytes(random.Random(0).getrandbits(8) for _ in range(4096)), NotACheckpointError),
    ("utf-16 text", "hello".encode("utf-16"), NotACheckpointError),
])
def test_junk_files_get_the_right_error(tmp_path, kind, content, error):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(error) as info:
        NNHandler.load(path)
    assert str(path) in str(info.value)


def test_directory_and_foreign_zip_are_not_checkpoints(tmp_path):
    with pytest.raises(NotACheckpointError, match="directory"):
        NNHandler.load(tmp_path)
    path = tmp_path / "archive.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a model")
    with pytest.raises(NotACheckpointError, match="zip archive"):
        NNHandler.load(path)


def test_truncation_at_many_offsets_is_detected(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    offsets = sorted({1, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 30,
                      len(data) - 2, len(data) - 1} | {random.Random(1).randrange(1, len(data)) for _ in range(10)})
    for offset in offsets:
        damaged = tmp_path / "truncated.pt"
        damaged.write_bytes(data[:offset])
        with pytest.raises(CheckpointError) as info:
            NNHandler.load(damaged)
        assert isinstance(info.value, (CorruptCheckpointError, NotACheckpointError)), offset
        assert str(damaged) in str(info.value)


def test_every_random_single_bit_flip_is_detected_or_harmless(saved, tmp_path):
    path, original = saved
    data = path.read_bytes()
    rng = random.Random(2026)
    positions = [rng.randrange(len(data)) for _ in range(60)] + list(range(len(data) - 40, len(data)))
    detected = harmless = 0
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        target = tmp_path / "flipped.pt"
        target.write_bytes(bytes(damaged))
        try:
            loaded = NNHandler.load(target)
        except CheckpointError:
            detected += 1
            continue
        assert _same_state(loaded, original), f"bit flip at byte {pos} loaded different state without an error"
        harmless += 1
    assert detected + harmless == len(positions) and detected >= len(positions) - 5


def test_handler_file_without_checksum_record_is_refused(saved, tmp_path):
    path, _ = saved
    state = torch.load(path, weights_only=True)
    plain = tmp_path / "resaved.pt"
    torch.save(state, plain)  # the same contents, but written without nn_handler's checksum
    with pytest.raises(CorruptCheckpointError, match="checksum record is missing or damaged"):
        NNHandler.load(plain)


def test_foreign_state_dict_loads_without_checksum_and_says_so(tmp_path, caplog):
    model = MLP(in_features=4, out_features=2)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with caplog.at_level("INFO", logger="nn_handler"):
        h = NNHandler.initialize_from_checkpoint(path, MLP, in_features=4, out_features=2)
    assert "no checksum" in caplog.text
    assert torch.equal(h.module.net[0].weight, model.net[0].weight)


def test_newer_format_version_is_refused(saved, tmp_path):
    path, _ = saved
    state = read_checkpoint(path)
    state["format_version"] = 99
    newer = tmp_path / "newer.pt"
    ckpt_io.atomic_save(state, newer)
    with pytest.raises(IncompatibleCheckpointError, match="newer nn_handler"):
        NNHandler.load(newer)


# ------------------------------------------------------------------ atomic writes
def test_save_killed_at_a_dozen_moments_always_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "loop.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    rng = random.Random(7)
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "safety_helpers", str(path)], env=env,
                                stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        state = read_checkpoint(path)  # verified: never torn
        assert torch.equal(state["weights"], torch.full((6_000_000,), float(state["version"])))
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) <= 1, leftovers  # the next save cleans up after a killed one


def test_disk_full_during_save_keeps_previous_checkpoint(saved, tmp_path, monkeypatch):
    path, original = saved
    target = tmp_path / "keep.pt"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def full(self, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io._ChunkedCRCWriter, "_write_some", full)
    with pytest.raises(OSError) as info:
        original.save(target)
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value) and "intact" in str(info.value)
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_permission_error_names_the_path_and_keeps_previous_checkpoint(saved, tmp_path, monkeypatch):
    path, original = saved
    target = tmp_path / "keep.pt"
    target.write_bytes(path.read_bytes())

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as info:
        original.save(target)
    assert str(target) in str(info.value)
    assert _same_state(NNHandler.load(target), original)


def test_loaded_state_is_not_tied_to_a_file_that_a_later_save_replaces(tmp_path):
    path = tmp_path / "same.pt"
    h = _trained_handler()
    h.save(path)
    loaded = NNHandler.load(path)
    weights = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
                 for k, s in loaded.optimizer.state_dict()["state"].items()}
    h.train(epochs=1, progress_bar=False)
    h.save(path)  # rewrites the path the loaded handler came from
    assert all(torch.equal(v, weights[k]) for k, v in loaded.module.state_dict().items())
    for k, s in loaded.optimizer.state_dict()["state"].items():
        for n, t in opt_state[k].items():
            assert torch.equal(s[n], t)


def test_loaded_weights_survive_the_file_being_rewritten_in_place(tmp_path):
    """Exporting the weights back over the file they came from (a plain torch.save truncates and
    rewrites it in place) must neither crash the process nor change the loaded state."""
    script = f"""
import os, torch
from nn_handler import NNHandler
from nn_handler.models import MLP
p = {str(tmp_path / 'w.pt')!r}
NNHandler(MLP, in_features=8, out_features=3).save(p)
for load in (lambda: NNHandler.initialize_from_checkpoint(p, MLP, in_features=8, out_features=3),
             lambda: NNHandler.load(p)):
    h = load()
    before = {{k: v.clone() for k, v in h.module.state_dict().items()}}
    with open(p, "wb"):
        pass  # truncated to nothing while the handler lives
    torch.save(h.module.state_dict(), p)
    assert all(torch.equal(v, before[k]) for k, v in h.module.state_dict().items())
    assert os.path.getsize(p) > 0
    NNHandler(MLP, in_features=8, out_features=3).save(p)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_mmap_load_adopts_the_mapped_tensors_without_a_copy(saved):
    path, original = saved
    fast = NNHandler.load(path, mmap=True)
    safe = NNHandler.load(path)
    assert _same_state(fast, original) and _same_state(safe, original)

    assert mapped_from(fast.module.net[0].weight, path)  # the file's own pages, no copy
    assert not mapped_from(safe.module.net[0].weight, path)  # the default owns its memory


def test_a_file_cannot_make_load_call_functions_outside_the_trusted_ones(tmp_path):
    """The checksum is no defence (a forger rewrites it): targets read from a file are checked,
    and a refused one stops the load with an error naming the file, the slot and the target."""
    from nn_handler.checkpointing import UnsafeCheckpointError
    marker = tmp_path / "pwned"
    h = _trained_handler()
    payload = {"_target_": "torch.utils.collect_env.run", "command": f"touch {marker}"}
    for slot in ("sde", "dataset"):
        state = h.state_dict()
        if slot == "sde":
            state["sde"] = {"spec": payload}
        else:
            state["data"]["train"]["dataset"] = payload
        forged = tmp_path / f"forged-{slot}.pt"
        ckpt_io.atomic_save(state, forged)
        with pytest.raises(UnsafeCheckpointError) as caught:
            NNHandler.load(forged)
        assert not marker.exists()
        text = str(caught.value)
        assert str(forged) in text and "'torch.utils.collect_env.run'" in text
        assert caught.value.target == "torch.utils.collect_env.run" and slot in caught.value.slot


def test_a_file_gets_no_string_interpolation(tmp_path):
    from nn_handler import NNHandlerWarning
    h = _trained_handler()
    state = h.state_dict()
    state["data"]["val"] = {"dataset": {"_target_": "nn_handler.datasets.synthetic_classification",
                                        "n": "${oc.env:HOME}"}, "options": {}}
    forged = tmp_path / "forged.pt"
    ckpt_io.atomic_save(state, forged)
    with pytest.warns(NNHandlerWarning, match="val dataset"):
        loaded = NNHandler.load(forged)
    assert loaded.val_loader is None and loaded.train_loader is not None
    assert _same_state(loaded, h)  # the rest of the file still loads


def test_trusted_packages_let_a_file_name_the_users_own_functions(tmp_path):
    h = _trained_handler()
    state = h.state_dict()
    state["data"]["train"]["dataset"] = {"_target_": "safety_helpers.tiny_dataset", "n": 8}
    path = tmp_path / "mine.pt"
    ckpt_io.atomic_save(state, path)
    from nn_handler.checkpointing import UnsafeCheckpointError
    with pytest.raises(UnsafeCheckpointError, match=r"trusted_packages=\['safety_helpers'\]"):
        NNHandler.load(path)
    assert len(NNHandler.load(path, trusted_packages=["safety_helpers"]).train_loader.dataset) == 8
