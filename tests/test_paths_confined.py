"""Paths from a file stay inside the run (issue 13): a forged ModelCheckpoint state cannot delete
or write files outside the directory the run configured; retention deletes only what the store
wrote; recorded DataLoader options are bounded; stale ``last.pth`` link temporaries are swept."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import helpers_core as hc
import helpers_generative as hg
import pytest
import torch
from torch.utils.data import TensorDataset

from nn_handler import NNHandler
from nn_handler.callbacks import ModelCheckpoint
from nn_handler.checkpointing import atomic_save
from nn_handler.checkpointing.store import CheckpointStore
from nn_handler.data import bounded_loader_options, max_workers

one_thread = pytest.fixture(scope="module", autouse=True)(hg.one_thread_fixture)
TESTS = Path(__file__).resolve().parent
VICTIM_TEXT = b"precious user data\n"


# ---------------------------------------------------------------------------- helpers
def snapshot(root: Path, skip: Path) -> Dict[str, Tuple[Any, ...]]:
    """Every entry under ``root`` but ``skip``: kind, size, mtime and content hash (links by target)."""
    out: Dict[str, Tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        here = Path(directory)
        if here == skip or skip in here.parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = here / name
            if path == skip:
                continue
            st = os.lstat(path)
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir",)
            else:
                out[str(path)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def forge(path: Path, edit: Callable[[Dict[str, Any]], None]) -> None:
    """Rewrite a real checkpoint by hand, with a valid checksum (anyone can)."""
    state = torch.load(path, weights_only=True)
    edit(state)
    atomic_save(state, path)


def checkpoint_entry(state: Dict[str, Any]) -> Dict[str, Any]:
    (entry,) = [c for c in state["callbacks"] if c["spec"]["_target_"].endswith("ModelCheckpoint")]
    return entry


def trained_run(run: Path, **kwargs: Any) -> Path:
    """A real run directory written by a ModelCheckpoint (monitor='loss', save_top_k=1)."""
    torch.manual_seed(0)
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    h.add_callback(ModelCheckpoint(**{"dirpath": str(run), "filename": "e{epoch}.pt", "monitor": "loss",
                                      "save_top_k": 1, **kwargs}))
    h.train(1, seed=0, progress_bar=False)
    return run / "last.pt"


def load_and_train(path: Path, epochs: int = 2) -> Tuple[NNHandler, List[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(path)
        h.train(epochs, progress_bar=False)
    return h, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- ModelCheckpoint
def _victim_in_best_k(state, run, outside):
    checkpoint_entry(state)["state"]["best_k_models"] = {str(outside / "victim.txt"): 1e9}
    return str(outside / "victim.txt")


def _dirpath_outside(state, run, outside):
    entry = checkpoint_entry(state)
    entry["spec"].update(dirpath=str(outside), filename="victim.txt", last_filename="victim.txt")
    entry["state"] = {"best_k_models": {str(outside / "victim.txt"): 1e9},
                      "last_model_path": str(outside / "victim.txt")}
    return str(outside)


def _filename_escapes(state, run, outside):
    entry = checkpoint_entry(state)
    escape = os.path.relpath(outside / "victim.txt", run)
    entry["spec"].update(filename=escape, last_filename=escape)
    entry["state"]["best_k_models"] = {str(run / escape): 1e9}
    return escape


def _symlinked_dirpath(state, run, outside):
    os.symlink(outside, run / "escape")
    entry = checkpoint_entry(state)
    entry["spec"].update(dirpath=str(run / "escape"), filename="victim.txt")
    entry["state"]["best_k_models"] = {str(run / "escape" / "victim.txt"): 1e9}
    return str(run / "escape")


def _relative_dotdot(state, run, outside):
    entry = checkpoint_entry(state)
    entry["spec"].update(dirpath=os.path.relpath(outside), filename="victim.txt")
    entry["state"]["best_k_models"] = {os.path.relpath(outside / "victim.txt"): 1e9}
    return os.path.relpath(outside)


FORGERIES = [_victim_in_best_k, _dirpath_outside, _filename_escapes, _symlinked_dirpath, _relative_dotdot]


@pytest.mark.parametrize("forgery", FORGERIES, ids=[f.__name__.strip("_") for f in FORGERIES])
def test_a_forged_model_checkpoint_never_touches_a_file_outside_its_run(tmp_path, forgery):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(VICTIM_TEXT)
    (outside / "other.pt").write_bytes(b"another file")
    last = trained_run(run)
    named = {}
    forge(last, lambda state: named.setdefault("path", forgery(state, run, outside)))
    before = snapshot(tmp_path, skip=run)

    h, messages = load_and_train(last)

    assert (outside / "victim.txt").read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path, skip=run) == before  # nothing outside the run was written, deleted or created
    dropped = [m for m in messages if "ModelCheckpoint" in m and "dropped" in m]
    assert len(dropped) == 1, messages  # one warning, naming what was dropped
    assert named["path"] in dropped[0]
    cb = next(c for c in h.callbacks if isinstance(c, ModelCheckpoint))
    assert os.path.realpath(cb.dirpath) == os.path.realpath(run)  # it went on writing inside the run
    assert cb.best_k_models and all(Path(p).resolve().parent == run.resolve() for p in cb.best_k_models)
    assert all(Path(p).is_file() for p in cb.best_k_models)


def test_a_forged_best_k_entry_inside_the_run_that_is_not_our_file_is_not_deleted(tmp_path):
    run = tmp_path / "run"
    last = trained_run(run)
    foreign = run / "e9.pt"  # the callback's own pattern, but a file it did not write (no trailer)
    foreign.write_bytes(VICTIM_TEXT)
    forge(last, lambda state: checkpoint_entry(state)["state"].update(best_k_models={str(foreign): 1e9}))

    h, messages = load_and_train(last)

    assert foreign.read_bytes() == VICTIM_TEXT
    assert any("not deleting" in m and str(foreign) in m and "not a file this callback wrote" in m
               for m in messages), messages
    cb = next(c for c in h.callbacks if isinstance(c, ModelCheckpoint))
    (best,) = cb.best_k_models  # its own files still rotate (e1.pt was not in the forged state: kept)
    assert sorted(p.name for p in run.iterdir()) == sorted(["e1.pt", Path(best).name, "e9.pt", "last.pt"])


def test_a_callback_not_from_a_file_deletes_only_its_own_files_too(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_bytes(VICTIM_TEXT)
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    cb = ModelCheckpoint(dirpath=str(tmp_path / "run"), monitor="loss", save_top_k=1, save_last=False)
    cb.load_state_dict({"best_k_models": {str(outside): 1e9}})  # e.g. a state copied from a file
    h.add_callback(cb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h.train(1, seed=0, progress_bar=False)
    assert outside.read_bytes() == VICTIM_TEXT
    assert any("not deleting" in str(w.message) and str(outside) in str(w.message) for w in caught)


def test_a_moved_run_goes_on_inside_its_new_place_and_leaves_the_old_one_alone(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    trained_run(old)
    new.mkdir()
    for name in os.listdir(old):
        (new / name).write_bytes((old / name).read_bytes())
    before = snapshot(tmp_path, skip=new)

    h, messages = load_and_train(new / "last.pt")

    assert snapshot(tmp_path, skip=new) == before
    assert sorted(os.listdir(new)) == ["e1.pt", "e3.pt", "last.pt"]  # e1.pt was recorded under old/: not ours
    assert any("dropped" in m and str(old) in m for m in messages)


def test_the_legitimate_resume_keeps_its_ranking_and_prunes_its_own_files(tmp_path):
    run = tmp_path / "run"
    last = trained_run(run)
    h, messages = load_and_train(last)
    assert not [m for m in messages if "ModelCheckpoint" in m]
    assert sorted(os.listdir(run)) == ["e3.pt", "last.pt"]
    cb = h.callbacks[0]
    assert list(cb.best_k_models) == [str(run / "e3.pt")] and cb.last_model_path == str(run / "last.pt")


def test_a_path_the_caller_sets_after_load_is_honoured(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    last = trained_run(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = NNHandler.load(last)
        cb = h.callbacks[0]
        cb.dirpath = str(elsewhere)  # the caller's own choice, outside the checkpoint's directory
        h.train(1, progress_bar=False)
    assert sorted(os.listdir(elsewhere)) == ["e2.pt", "last.pt"]
    assert sorted(os.listdir(run)) == ["e1.pt", "last.pt"]  # e1.pt is not in the new dirpath: never deleted


# ---------------------------------------------------------------------------- CheckpointStore retention
def test_retention_deletes_only_files_the_store_wrote(tmp_path, caplog):
    store_dir = tmp_path / "ckpts"
    store_dir.mkdir()
    foreign = store_dir / "notes.txt"
    foreign.write_bytes(VICTIM_TEXT)
    no_trailer = store_dir / "ckpt-e0000-s000000001.pth"  # the store's pattern, written by torch.save
    torch.save({"progress": {"global_step": 1}}, no_trailer)
    garbage = store_dir / "ckpt-e0000-s000000002.pth"
    garbage.write_bytes(VICTIM_TEXT)
    newer = store_dir / "ckpt-e0099-s000999999.pth"  # would rank as the newest, and so shield nothing
    newer.write_bytes(VICTIM_TEXT)
    kept = {p: p.read_bytes() for p in (foreign, no_trailer, garbage, newer)}
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    with caplog.at_level(logging.WARNING, logger="nn_handler"):
        h.train(3, seed=0, progress_bar=False, checkpoint_dir=CheckpointStore(store_dir, keep_last=1),
                save_every_n_epochs=1)
    for path, data in kept.items():
        assert path.read_bytes() == data, path
    ours = sorted(p.name for p in store_dir.glob("ckpt-e000[1-9]-*.pth"))
    assert ours == ["ckpt-e0003-s000000018.pth"]  # the store's own files are still pruned
    assert os.readlink(store_dir / "last.pth") == ours[0]
    text = caplog.text
    for path in (no_trailer, garbage, newer):
        assert text.count(str(path)) == 1, text  # named once, however many saves
    assert str(foreign) not in text


# ---------------------------------------------------------------------------- link temporaries
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=60) == 0
    return proc.pid


def test_stale_link_temporaries_are_swept_by_the_next_save(tmp_path):
    store_dir = tmp_path / "ckpts"
    store_dir.mkdir()
    host, dead = socket.gethostname(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [store_dir / f".last.pth.{dead}.tmp", store_dir / f".last.pth.{host}.{dead}.tmp"]
        os.symlink("ckpt-e0000-s000000000.pth", stale[0])
        stale[1].write_bytes(b"")
        left = [store_dir / f".last.pth.{host}.{live.pid}.tmp",  # a running writer's
                store_dir / f".last.pth.some-other-host.{dead}.tmp",  # another host's
                store_dir / ".last.pth.x.tmp", store_dir / "last.pth.123.tmp"]  # not the pattern
        for path in left:
            path.write_bytes(b"")
        not_a_file = store_dir / f".last.pth.{_dead_pid()}.tmp"
        not_a_file.mkdir()
        left.append(not_a_file)
        h = hc.classification_handler(val=False, scheduler=False, metric=False)
        saved = CheckpointStore(store_dir).save(h)
        assert not any(os.path.lexists(p) for p in stale)
        assert all(p.exists() for p in left)
        assert os.readlink(store_dir / "last.pth") == saved.name
    finally:
        live.kill()
        live.wait(timeout=30)


KILLED_IN_LINK_UPDATE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    import helpers_core as hc
    from nn_handler.checkpointing.store import CheckpointStore
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == "last.pth":  # inside _link_last: the link is half made
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    CheckpointStore(sys.argv[1]).save(hc.classification_handler(val=False, scheduler=False, metric=False))
""")


def test_a_sigkill_inside_the_link_update_leaves_a_temporary_that_the_next_save_sweeps(tmp_path):
    store_dir = tmp_path / "ckpts"
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_LINK_UPDATE, str(store_dir), str(TESTS)],
                          capture_output=True, timeout=180, cwd=TESTS.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [n for n in os.listdir(store_dir) if n.startswith(".last.pth.")]
    assert len(leftovers) == 1 and not (store_dir / "last.pth").exists(), os.listdir(store_dir)
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    h.global_step = 7
    saved = CheckpointStore(store_dir).save(h)
    assert sorted(os.listdir(store_dir)) == sorted(["ckpt-e0000-s000000000.pth", saved.name, "last.pth"])
    assert os.readlink(store_dir / "last.pth") == saved.name


# ---------------------------------------------------------------------------- DataLoader options
HOSTILE_OPTIONS = {
    "batch_size": 16, "shuffle": True, "num_workers": max(24, (os.cpu_count() or 1) + 22),
    "collate_fn": {"_target_": "os.system", "command": "touch MARKER"}, "worker_init_fn": "os.system",
    "sampler": [0, 1, 2], "batch_sampler": [[0, 1]], "generator": 3, "pin_memory": "yes", "timeout": -1.0,
    "prefetch_factor": 10 ** 9, "persistent_workers": 1, "drop_last": False,
}


def _saved_classifier(tmp_path: Path, options: Dict[str, Any], dataset_recorded: bool = True) -> Path:
    h = hc.classification_handler(val=False, scheduler=False, metric=False)
    path = tmp_path / "h.pt"
    h.save(path)

    def edit(state):
        state["data"]["train"]["options"] = options
        if not dataset_recorded:
            state["data"]["train"]["dataset"] = None
    forge(path, edit)
    return path


def test_recorded_loader_options_are_bounded_on_load(tmp_path):
    path = _saved_classifier(tmp_path, HOSTILE_OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = NNHandler.load(path)
    loader = h.train_loader
    assert loader.num_workers == max_workers() and max_workers() <= (os.cpu_count() or 1)
    assert loader.batch_size == 16 and loader.collate_fn is torch.utils.data.default_collate
    assert loader.worker_init_fn is None and loader.pin_memory is False and loader.timeout == 0
    assert loader.prefetch_factor == 2 and loader.sampler is h._data["train"].sampler  # the handler's own
    assert loader.persistent_workers is False
    told = [str(w.message) for w in caught if "DataLoader options" in str(w.message)]
    assert len(told) == 1 and str(path) in told[0], told
    for key in ("num_workers", "collate_fn", "worker_init_fn", "sampler", "batch_sampler", "generator",
                "pin_memory", "timeout", "prefetch_factor", "persistent_workers"):
        assert key in told[0], key
    assert "clamped to" in told[0]


def test_recorded_options_reused_after_load_are_bounded_and_the_callers_win(tmp_path):
    path = _saved_classifier(tmp_path, {"batch_size": 8, "num_workers": 10 ** 6}, dataset_recorded=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = NNHandler.load(path)
    dataset = TensorDataset(torch.randn(20, hc.IN), torch.randint(0, hc.OUT, (20,)))
    h.set_train_loader(dataset)  # no options: the recorded ones, bounded
    assert h.train_loader.num_workers == max_workers() and h.train_loader.batch_size == 8
    h.set_train_loader(dataset, batch_size=4, num_workers=0)  # the caller's own values
    assert h.train_loader.num_workers == 0 and h.train_loader.batch_size == 4


@pytest.mark.parametrize("options, expected", [
    ({"batch_size": 32, "shuffle": False, "num_workers": 1, "pin_memory": True, "drop_last": True,
      "timeout": 5, "prefetch_factor": 4, "persistent_workers": True}, "same"),
    ({"num_workers": 10 ** 9}, {"num_workers": max_workers()}),
    ({"batch_size": 0}, {}), ({"batch_size": True}, {}), ({"batch_size": 2 ** 40}, {}), ({"batch_size": None}, "same"),
    ({"batch_size": 1.5}, {}), ({"num_workers": -1}, {}), ({"num_workers": "4"}, {}),
    ({"timeout": float("inf")}, {}), ({"timeout": float("nan")}, {}),
    ({"shuffle": "false"}, {}), ({"prefetch_factor": 2}, {}), ({"persistent_workers": True}, {}),
    ({"multiprocessing_context": "spawn", "num_workers": 1}, "same"),
    ({"multiprocessing_context": "os.system", "num_workers": 1}, {"num_workers": 1}),
    ({"collate_fn": None, "sampler": None, "worker_init_fn": None}, {}),
    ([("num_workers", 3)], {}), ("num_workers=3", {}), (None, {}),
])
def test_bounded_loader_options(options, expected):
    told: List[str] = []
    result = bounded_loader_options(options, "here", told.append)
    assert result == (options if expected == "same" else expected)
    assert len(told) == (0 if expected == "same" or options is None else 1)
    if told:
        assert told[0].startswith("here")


# ---------------------------------------------------------------------------- the runner
def test_the_runner_keeps_a_forged_checkpoints_paths_inside_the_new_run(tmp_path):
    """task=resume of a forged file: the ModelCheckpoint writes into the run's checkpoints/, nothing
    outside the run changes, and the recorded 24 workers are clamped (told once per place they are read)."""
    source, outside, run = tmp_path / "source", tmp_path / "outside", tmp_path / "resume"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(VICTIM_TEXT)
    last = trained_run(source)

    def edit(state):
        entry = checkpoint_entry(state)
        entry["spec"].update(dirpath=str(outside), filename="victim.txt")
        entry["state"] = {"best_k_models": {str(outside / "victim.txt"): 1e9}, "last_model_path": None}
        state["data"]["train"]["options"].update(num_workers=max(24, (os.cpu_count() or 1) + 22))
    forge(last, edit)
    before = snapshot(tmp_path, skip=run)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    proc = subprocess.run([sys.executable, "-m", "runner", "task=resume", f"checkpoint.path={last}", "train.epochs=1",
                           "data.batch_size=32", f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (outside / "victim.txt").read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path, skip=run) == before
    # the callback's files went into this run, under the default name ("victim.txt" is no checkpoint name)
    assert (run / "checkpoints" / "epoch002.pt").is_file() and not (run / "checkpoints" / "victim.txt").exists()
    output = proc.stdout + proc.stderr
    assert "dropped" in output and str(outside / "victim.txt") in output
    assert f"clamped to {max_workers()}" in output
