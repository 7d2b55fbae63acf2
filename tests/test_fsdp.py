"""FSDP2 training and sharded (DCP) checkpoints: real torchrun jobs with gloo on CPU.

Every scenario runs in tests/fsdp_workers.py; the records compared are whole tensors (gathered
over the ranks), so runs under any world size and strategy compare directly.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.checkpointing import CheckpointError, CorruptCheckpointError, find_latest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = str(HERE / "fsdp_workers.py")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env():
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    return e


def job(out: Path, scenario: str, *args: str, nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 0:  # one plain process, no process group
        cmd = [sys.executable, WORKER, scenario, str(out), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER,
               scenario, str(out), *args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc)  # the agent and its workers (each in a session of its own): nothing left running
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{scenario} did not finish in {timeout} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def record(out: Path, tag: str) -> dict:
    return torch.load(out / f"{tag}-rank0.pt", weights_only=False)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("weights", "ema", "optimizer", "param_groups", "epoch", "global_step", "train_losses", "val_losses"):
        assert same(a[key], b[key]), key


def in_process(tag: str, path: Path, out: Path) -> None:
    """Load ``path`` in this process (no process group) and record it as the workers do."""
    import fsdp_workers
    h = NNHandler.load(path, device="cpu", trusted_packages=["fsdp_workers"])
    fsdp_workers.dump(h, str(out), f"{tag}-loaded")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two FSDP ranks train 2 epochs (EMA, AdamW, StepLR), save sharded and as one file, then train 2 more;
    every conversion and load of those checkpoints is then made once (two jobs of 2 and 4 ranks)."""
    out = tmp_path_factory.mktemp("fsdp")
    sys.path.insert(0, str(HERE))
    ok(job(out, "train_and_save", "fsdp", "2", f"{out / 'ck.dcp'},{out / 'ck.pth'}", "more"))
    # one process: a sharded checkpoint of its own, and the consolidation round trip of the FSDP one
    one = out / "one"
    one.mkdir()
    import fsdp_workers
    h = fsdp_workers.make("none")
    h.train(1, ema_decay=0.9, seed=3, progress_bar=False)
    h.save(one / "ck.dcp")
    fsdp_workers.dump(h, str(one), "saved")
    NNHandler.convert(out / "ck.dcp", out / "consolidated.pth", trusted_packages=["fsdp_workers"])
    NNHandler.convert(out / "consolidated.pth", out / "again.dcp", trusted_packages=["fsdp_workers"])
    ok(job(out, "load_each", f"dcp=fsdp={out / 'ck.dcp'}=2", f"ddp=ddp={out / 'ck.dcp'}=2",
           f"file=fsdp={out / 'ck.pth'}=2", f"again=fsdp={out / 'again.dcp'}", f"one=fsdp={one / 'ck.dcp'}"))
    ok(job(out, "load_each", f"four=fsdp={out / 'ck.dcp'}", nproc=4))
    for tag, path in (("dcp1", out / "ck.dcp"), ("file1", out / "ck.pth")):
        in_process(tag, path, out)
    return out


def test_fsdp_shards_the_model_and_resumes_bit_identically(fsdp_run):
    saved, uninterrupted = record(fsdp_run, "saved"), record(fsdp_run, "uninterrupted")
    assert saved["strategy"] == "fsdp" and saved["sharded_params"] == "DTensor"  # really sharded
    shards = sorted(p.name for p in (fsdp_run / "ck.dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "header.pth"]  # each rank wrote its shards
    loaded, resumed = record(fsdp_run, "dcp-loaded"), record(fsdp_run, "dcp-resumed")
    assert loaded["strategy"] == "fsdp" and loaded["sharded_params"] == "DTensor"
    assert_same_state(saved, loaded)  # weights, EMA, optimizer moments and step counts, lr, progress
    assert_same_state(uninterrupted, resumed)  # bit for bit the run that was never interrupted


@pytest.mark.parametrize("tag,strategy,world", [("dcp1", "none", 1), ("four", "fsdp", 4), ("ddp", "ddp", 2)],
                         ids=["2to1", "2to4", "fsdp-to-ddp"])
def test_a_sharded_checkpoint_reshards_onto_other_world_sizes_and_strategies(fsdp_run, tag, strategy, world):
    loaded = record(fsdp_run, f"{tag}-loaded")
    assert loaded["strategy"] == strategy and loaded["world_size"] == world
    assert_same_state(record(fsdp_run, "saved"), loaded)
    if tag == "ddp":  # FSDP -> DDP, same world size: the run goes on exactly
        assert_same_state(record(fsdp_run, "uninterrupted"), record(fsdp_run, "ddp-resumed"))


def test_one_process_shards_and_two_fsdp_ranks_load_it(fsdp_run):
    loaded = record(fsdp_run, "one-loaded")
    assert loaded["sharded_params"] == "DTensor"
    assert_same_state(record(fsdp_run / "one", "saved"), loaded)


def test_a_single_file_from_fsdp_loads_anywhere_and_resumes_fsdp_exactly(fsdp_run):
    saved = record(fsdp_run, "saved")
    assert_same_state(saved, record(fsdp_run, "file1-loaded"))  # whole weights and torch's optimizer layout
    assert_same_state(saved, record(fsdp_run, "file-loaded"))
    assert_same_state(record(fsdp_run, "uninterrupted"), record(fsdp_run, "file-resumed"))


def test_consolidation_round_trip_keeps_every_tensor_and_the_per_rank_records(fsdp_run):
    state = torch.load(fsdp_run / "consolidated.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks' random streams carried over
    assert state["metadata"]["lineage"]["parent"]["path"].endswith("ck.dcp")
    saved = record(fsdp_run, "saved")
    assert same(state["model_state_dict"], saved["weights"])
    assert same(state["ema"]["weights"], saved["ema"])
    assert same(state["optimizer"]["state"]["state"], saved["optimizer"])
    assert_same_state(saved, record(fsdp_run, "again-loaded"))  # sharded again, on two FSDP ranks


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused_on_every_rank_naming_it(fsdp_run, tmp_path):
    copy = tmp_path / "ck.dcp"
    shutil.copytree(fsdp_run / "ck.dcp", copy)
    _flip(copy / "__1_0.distcp")  # a shard rank 1 wrote (and, split, the only one rank 1 hashes)
    proc = job(tmp_path / "out", "load_and_record", "fsdp", str(copy))
    assert proc.returncode != 0
    errors = [json.loads((tmp_path / "out" / f"error-rank{r}.json").read_text()) for r in (0, 1)]
    assert all("__1_0.distcp" in e["message"] and "CRC" in e["message"] for e in errors), errors
    with pytest.raises(CorruptCheckpointError, match="__1_0.distcp"):
        NNHandler.load(copy, trusted_packages=["fsdp_workers"])


def test_nothing_in_the_directory_is_unpickled_and_the_index_names_no_outside_file(fsdp_run, tmp_path):
    from nn_handler.checkpointing import sharded
    from nn_handler.checkpointing.io import atomic_save, safe_load
    copy = tmp_path / "ck.dcp"
    shutil.copytree(fsdp_run / "ck.dcp", copy)
    marker = tmp_path / "ran"
    # DCP's own index is a pickle: one that runs code when unpickled must never be read
    (copy / ".metadata").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    h = NNHandler.load(copy, trusted_packages=["fsdp_workers"])
    assert not marker.exists()
    assert same(h.module.state_dict(), record(fsdp_run, "saved")["weights"])
    # a forged header (valid checksum) whose index points outside the directory is refused before any read
    state = safe_load(copy / sharded.HEADER)
    state["sharded"]["index"]["storage"][0][2] = "../../outside.distcp"
    atomic_save(state, copy / sharded.HEADER)
    with pytest.raises(CheckpointError, match="a recorded shard file"):
        NNHandler.load(copy, trusted_packages=["fsdp_workers"])
    state["sharded"]["files"]["../x"] = [1, 0]
    atomic_save(state, copy / sharded.HEADER)
    with pytest.raises(CheckpointError, match="shard file names"):
        NNHandler.load(copy, trusted_packages=["fsdp_workers"])


def test_predict_and_uneven_validation_under_fsdp_match_the_whole_model(tmp_path):
    ok(job(tmp_path, "predict", "fsdp"))  # (its validation data gives the ranks unequal batch counts)
    two = torch.load(tmp_path / "predict-rank0.pt")
    assert two["predict"].shape == (7, 3)
    assert torch.allclose(two["predict"], two["reference"], atol=1e-6)  # the sharded forward = the whole model's
    assert torch.allclose(two["predict_small"], two["reference"][:3], atol=1e-6)  # ranks with 2 and 1 batches
    mixed = torch.load(tmp_path / "mixed-rank0.pt")  # the same run with strategy.param_dtype=bfloat16
    assert mixed["param_dtype"] == "torch.float32"  # the sharded parameters stay float32
    assert math.isfinite(mixed["losses"][0]) and mixed["losses"][0] != two["fp32_losses"][0]  # computed in bf16
    assert abs(mixed["losses"][0] - two["fp32_losses"][0]) < 0.05


def test_asynchronous_saves_write_the_same_checkpoints_and_a_failure_is_raised(tmp_path):
    ok(job(tmp_path, "train_checkpointed", "fsdp", "2", str(tmp_path / "ck")))
    sync, asyn = record(tmp_path, "done-sync"), record(tmp_path, "done-async")
    assert_same_state(sync, asyn)  # training went on while saving, changing nothing
    names = sorted(p.name for p in (tmp_path / "ck" / "async").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ck" / "sync").iterdir())
    assert [n for n in names if n.endswith(".dcp")] and not [n for n in names if n.startswith(".")]
    for name in (n for n in names if n.endswith(".dcp")):  # each checkpoint holds the state of its own step
        a, b = (NNHandler.load(tmp_path / "ck" / m / name, trusted_packages=["fsdp_workers"]) for m in ("sync", "async"))
        assert same(a.module.state_dict(), b.module.state_dict()), name
        assert same(a.optimizer.state_dict(), b.optimizer.state_dict()), name
        assert same(a.ema.state_dict(), b.ema.state_dict()) and a.global_step == b.global_step, name
    newest = find_latest(tmp_path / "ck" / "async")
    assert newest.suffix == ".dcp"
    h = NNHandler.load(newest, trusted_packages=["fsdp_workers"])
    assert same(h.module.state_dict(), asyn["weights"])
    # a background write that fails is raised on the training thread, at the next save or wait
    h.save(tmp_path / "file-in-the-way", asynchronous=False)
    h.save(tmp_path / "file-in-the-way" / "ck.pth", asynchronous=True)
    with pytest.raises(OSError):
        h.wait_for_save()


KILL_SCRIPT = r"""
import sys, torch
from nn_handler import NNHandler
from nn_handler.models import MLP
torch.manual_seed(0)
h = NNHandler(MLP, device="cpu", strategy="fsdp", in_features=512, out_features=3, hidden=[1024, 512])
h.set_optimizer(torch.optim.Adam, lr=1e-3)
h.set_loss_fn(torch.nn.CrossEntropyLoss)
h.set_train_loader(torch.utils.data.TensorDataset(torch.randn(512, 512), torch.randint(0, 3, (512,))), batch_size=16)
h.train(50, checkpoint_dir=sys.argv[1], save_every_n_steps=1, async_save=sys.argv[2] == "async", keep_last=2,
        progress_bar=False, handle_signals=False)
"""


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own: a process-group
    kill of the agent would leave them running)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and every worker at once, as a node failure would."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _has_checkpoint(directory: Path) -> bool:
    return directory.exists() and any(p.suffix == ".dcp" and not p.name.startswith(".") for p in directory.iterdir())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_in_the_middle_of_sharded_saves_never_leaves_a_torn_checkpoint(tmp_path, mode):
    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT)
    ckpt = tmp_path / "ck"
    for attempt, delay in enumerate((0.3,) if mode == "sync" else (0.7,)):
        log = open(tmp_path / f"job{attempt}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(script), str(ckpt), mode], env=env(), cwd=tmp_path, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not _has_checkpoint(ckpt):
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"no checkpoint was written: {(tmp_path / f'job{attempt}.log').read_text()[-3000:]}"
                time.sleep(0.05)
            time.sleep(delay)  # saves every step: the kill lands inside one, at some stage
        finally:
            _kill_job(proc)
            log.close()
        assert not [p for p in _descendants(os.getpid()) if p != proc.pid and Path(f"/proc/{p}").exists()
                    and "killed.py" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        newest = find_latest(ckpt)  # verified: header and every shard
        h = NNHandler.load(newest)
        assert h.global_step >= 1, attempt
        for path in ckpt.iterdir():  # every checkpoint that a listing shows is complete
            if path.suffix == ".dcp" and not path.name.startswith("."):
                NNHandler.load(path)


def test_saving_over_a_sharded_checkpoint_swaps_it_atomically_and_listings_skip_partial_ones(tmp_path):
    import fsdp_workers

    from nn_handler.checkpointing import sharded
    sys.path.insert(0, str(HERE))
    h = fsdp_workers.make("none")
    h.save(tmp_path / "ck.dcp")
    first = (tmp_path / "ck.dcp" / sharded.HEADER).stat().st_ino
    h.train(1, seed=3, progress_bar=False)
    h.save(tmp_path / "ck.dcp")  # replaced by RENAME_EXCHANGE: no moment without a complete ck.dcp
    assert (tmp_path / "ck.dcp" / sharded.HEADER).stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.dcp"]  # the old one removed, no partial left
    again = NNHandler.load(tmp_path / "ck.dcp", trusted_packages=["fsdp_workers"])
    assert again.epoch == 1 and same(again.module.state_dict(), h.module.state_dict())
    partial = tmp_path / ".ckpt-e0009-s000000099.dcp.partial-host-1234"  # a killed save
    shutil.copytree(tmp_path / "ck.dcp", partial)
    assert find_latest(tmp_path) == tmp_path / "ck.dcp"  # never listed
    via_header = NNHandler.load(sharded.header_path(tmp_path / "ck.dcp"), trusted_packages=["fsdp_workers"])
    assert same(via_header.module.state_dict(), h.module.state_dict())  # its header names the checkpoint
    shutil.copyfile(sharded.header_path(tmp_path / "ck.dcp"), tmp_path / "lonely.pth")
    with pytest.raises(CheckpointError, match="sharded checkpoint's header"):  # never random weights
        NNHandler.load(tmp_path / "lonely.pth", trusted_packages=["fsdp_workers"])


def test_the_runner_trains_fsdp_with_async_sharded_saves_and_converts(tmp_path):
    """torchrun -m runner strategy=fsdp save.async=true: sharded checkpoints; the printed resume runs in
    one process from them; task=convert consolidates one and task=inspect reads both."""
    def runner(*args, nproc=0):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc else [sys.executable]
        return subprocess.run([*launch, "-m", "runner", *args], env=env(), cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)

    proc = runner("data=synthetic", "model.hidden=[16]", "train.epochs=2", "strategy=fsdp", "save.every_n_steps=3",
                  "save.async=true", "save.keep_last=2", "hydra.run.dir=run", nproc=2)
    ok(proc)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["checkpoint_written"].endswith(".dcp")
    listed = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len([n for n in listed if n.endswith(".dcp")]) == 2 and "last.pth" in listed  # keep_last=2, no partial
    resume = next(line.split("resume:", 1)[1].strip() for line in proc.stdout.splitlines() if "resume:" in line)
    ok(runner(*resume.split()[3:], "hydra.run.dir=resumed"))  # as printed (python -m runner ...), one process
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epoch"] == record["epoch"] + 5
    ok(runner("task=convert", "checkpoint.path=run/checkpoints/last.pth", "convert.to=one.pth", "hydra.run.dir=conv"))
    weights = torch.load(tmp_path / "one.pth", weights_only=True)["model_state_dict"]
    sharded = NNHandler.load(tmp_path / "run" / "checkpoints" / "last.pth").module.state_dict()
    assert same(weights, sharded)
    shown = runner("task=inspect", "checkpoint.path=run/checkpoints/last.pth")
    ok(shown)
    assert f"parameters: {sum(t.numel() for t in weights.values()):,}" in shown.stdout  # from the shards' index
    assert all(name in shown.stdout for name in weights)


def test_sampling_and_preemption_under_fsdp(tmp_path):
    ok(job(tmp_path, "score", str(tmp_path / "ck")))
    got = torch.load(tmp_path / "score-rank0.pt")
    # the samples of the sharded model, drawn by both ranks, are those of the whole model with its EMA weights
    from nn_handler import ModelType
    from nn_handler.models import ScoreMLP
    from nn_handler.sde import VPSDE
    h = NNHandler(ScoreMLP, device="cpu", model_type=ModelType.SCORE_BASED, shape=[2], hidden=32, layers=2)
    h.set_sde(VPSDE)
    h.module.load_state_dict(got["ema"])
    h.module.eval()
    from nn_handler.sampler import EulerMaruyama
    expected = torch.empty(6, 2)
    for rank in range(2):  # rank r draws rows r, r+2, ... from its own generator (NNHandler.sample's rule)
        g = torch.Generator().manual_seed(0 + 1_000_003 * rank)
        with torch.no_grad():
            expected[rank::2] = EulerMaruyama().sample(h.module, h.sde, (3, 2), 5, corrector_steps=0, generator=g,
                                                       device=torch.device("cpu"), progress_bar=False)
    assert torch.allclose(got["samples"], expected, atol=1e-4), (got["samples"], expected)
    # SIGTERM on one rank: every rank stops at the same step, the pre-emption checkpoint is written and loads
    assert got["preempted"] == 128 + 15
    preempt = [p for p in (tmp_path / "ck").iterdir() if p.name.endswith("-preempt.dcp")]
    assert len(preempt) == 1
    loaded = NNHandler.load(preempt[0])
    assert loaded.global_step == got["step"]
