"""Interop: Lightning / {"model"} / {"state_dict"} / safetensors in, safetensors export out (issue 18)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from nn_handler import NNHandler
from nn_handler.checkpointing import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from nn_handler.models import MLP

safetensors_torch = pytest.importorskip("safetensors.torch")  # a dev dependency: present in CI

KW = dict(in_features=4, out_features=3, hidden=[8])
ROOT = Path(__file__).resolve().parents[1]


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _trained(ema: bool = True) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(MLP, device="cpu", **KW)
    h.set_optimizer(torch.optim.Adam, lr=5e-2)
    h.set_loss_fn(torch.nn.CrossEntropyLoss)
    h.set_train_loader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    h.train(epochs=2, ema_decay=0.9 if ema else None, progress_bar=False, seed=0)
    return h


# ---------------------------------------------------------------------------- Lightning, written by Lightning
@pytest.fixture(scope="module")
def lightning_files(tmp_path_factory):
    L = pytest.importorskip("lightning")
    from omegaconf import OmegaConf

    class Wrapped(L.LightningModule):
        def __init__(self, in_features=4, out_features=3, hidden=(8,)):
            super().__init__()
            self.save_hyperparameters()
            self.model = MLP(in_features=in_features, out_features=out_features, hidden=list(hidden))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-1)

    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))),
                                       batch_size=8)
    module = Wrapped()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, data)
    plain = root / "plain.ckpt"
    trainer.save_checkpoint(plain)
    # The Hydra user's LightningModule: save_hyperparameters(cfg) with an OmegaConf config.
    module.save_hyperparameters(OmegaConf.create({"width": 8, "opt": {"lr": 0.1}}))
    omega = root / "omega.ckpt"
    trainer.save_checkpoint(omega)
    expected = {k[len("model."):]: v.clone() for k, v in module.state_dict().items()}
    return plain, omega, expected


def test_lightning_checkpoint_written_by_lightning_loads_with_equal_weights(lightning_files):
    plain, _, expected = lightning_files
    raw = torch.load(plain, weights_only=True)
    assert "pytorch-lightning_version" in raw and all(k.startswith("model.") for k in raw["state_dict"])
    h = NNHandler.initialize_from_checkpoint(plain, MLP, device="cpu", **KW)
    assert _equal(h.module.state_dict(), expected)
    assert not _equal(MLP(**KW).state_dict(), expected)  # (the weights really came from the file)
    h2 = NNHandler.load(plain, device="cpu", model_class=MLP, model_kwargs=KW)
    assert _equal(h2.module.state_dict(), expected)
    h3 = NNHandler.initialize_from_checkpoint(plain, MLP, device="cpu", prefix="model", **KW)
    assert _equal(h3.module.state_dict(), expected)
    with pytest.raises(IncompatibleCheckpointError, match="'encoder.'") as info:
        NNHandler.initialize_from_checkpoint(plain, MLP, device="cpu", prefix="encoder.", **KW)
    assert str(plain) in str(info.value)
    with pytest.raises(NotACheckpointError, match="model_class="):
        NNHandler.load(plain, device="cpu")


def test_lightning_omegaconf_hyperparameters_refused_clearly(lightning_files):
    _, omega, _ = lightning_files
    with pytest.raises(UnsafeCheckpointError) as info:
        NNHandler.initialize_from_checkpoint(omega, MLP, device="cpu", **KW)
    text = str(info.value)
    assert str(omega) in text and "omegaconf.dictconfig.DictConfig" in text and "OmegaConf.to_container" in text


# ---------------------------------------------------------------------------- other tools' dicts
def test_model_and_state_dict_dicts(tmp_path):
    sd = MLP(**KW).state_dict()
    for key in ("model", "state_dict"):
        path = tmp_path / f"{key}.pt"
        torch.save({key: sd, "epoch": 3}, path)
        h = NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", **KW)
        # MLP's own keys all start with "net.": that shared component is the model's, never stripped
        assert _equal(h.module.state_dict(), sd)
        assert _equal(NNHandler.load(path, device="cpu", model_class=MLP, model_kwargs=KW).module.state_dict(), sd)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"net_module.{k}": v for k, v in sd.items()}}, wrapped)
    assert _equal(NNHandler.initialize_from_checkpoint(wrapped, MLP, device="cpu", **KW).module.state_dict(), sd)


def test_strict_and_non_strict_reporting(tmp_path):
    sd = MLP(**KW).state_dict()
    path = tmp_path / "extra.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "model.head.weight": torch.ones(2)},
                "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(IncompatibleCheckpointError, match=r"unexpected keys \['head.weight'\]"):
        NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", **KW)
    with pytest.warns(UserWarning, match="head.weight"):
        h = NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", strict_load=False, **KW)
    assert _equal(h.module.state_dict(), sd)


# ---------------------------------------------------------------------------- safetensors in
def test_safetensors_file_loads_with_equal_weights(tmp_path):
    sd = MLP(**KW).state_dict()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(sd, path)
    h = NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", **KW)
    assert _equal(h.module.state_dict(), sd)
    h2 = NNHandler.load(path, device="cpu", model_class=MLP, model_kwargs=KW)
    assert _equal(h2.module.state_dict(), sd)
    # Private memory: rewriting the file in place leaves the loaded weights alone.
    safetensors_torch.save_file({k: torch.zeros_like(v) for k, v in sd.items()}, path)
    assert _equal(h.module.state_dict(), sd)
    with pytest.raises(IncompatibleCheckpointError, match="model_class"):
        NNHandler.initialize_from_checkpoint(path, device="cpu")


def _forged(path: Path, header: bytes, data: bytes = b"", length: int = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize("case", ["offset_past_end", "huge_header", "max_header", "overlap", "wrong_size",
                                  "not_json", "bad_dtype", "bad_metadata"])
def test_forged_safetensors_refused_naming_the_path(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    entry = lambda shape, offsets, dtype="F32": {"dtype": dtype, "shape": shape, "data_offsets": offsets}  # noqa: E731
    if case == "offset_past_end":
        _forged(path, json.dumps({"w": entry([2 ** 38], [0, 2 ** 40])}).encode(), b"\0" * 16)
    elif case == "huge_header":
        _forged(path, b'{"w": {}}', length=2 ** 62)
    elif case == "max_header":
        _forged(path, b'{"w": {}}', length=2 ** 64 - 1)
    elif case == "overlap":
        _forged(path, json.dumps({"a": entry([2], [0, 8]), "b": entry([2], [4, 12])}).encode(), b"\0" * 12)
    elif case == "wrong_size":
        _forged(path, json.dumps({"a": entry([1000], [0, 8])}).encode(), b"\0" * 8)
    elif case == "not_json":
        _forged(path, b'{"a": [', b"\0" * 8)
    elif case == "bad_dtype":
        _forged(path, json.dumps({"a": entry([2], [0, 8], "PY_OBJECT")}).encode(), b"\0" * 8)
    else:
        _forged(path, json.dumps({"__metadata__": {"x": 1}, "a": entry([2], [0, 8])}).encode(), b"\0" * 8)
    words = {"offset_past_end": "outside the", "huge_header": "header claims", "max_header": "header claims",
             "overlap": "overlap", "wrong_size": "needs 4000 bytes", "not_json": "not valid JSON",
             "bad_dtype": "PY_OBJECT", "bad_metadata": "__metadata__"}
    tracemalloc.start()
    try:
        expected = IncompatibleCheckpointError if case == "bad_dtype" else CorruptCheckpointError
        with pytest.raises(expected, match=words[case]) as info:
            NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", **KW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 4 << 20, peak  # nothing the header claims was allocated
    with pytest.raises(CheckpointError):
        NNHandler.load(path, device="cpu", model_class=MLP, model_kwargs=KW)


# ---------------------------------------------------------------------------- export
def test_export_round_trip_ema_and_live(tmp_path):
    h = _trained(ema=True)
    ema, live = h.ema.module.state_dict(), h.module.state_dict()
    assert not _equal(ema, live)
    path = h.export(tmp_path / "out" / "model.safetensors")
    assert _equal(safetensors_torch.load_file(path), ema)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary left
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    record = json.loads(meta["nn_handler"])
    assert meta["format"] == "nn_handler.export" and record["weights"] == "ema"
    assert record["model"] == {"_target_": "nn_handler.models.MLP", **KW} and record["model_type"] == "classification"
    # Rebuilt from the recorded spec (trusted: nn_handler's own model), or into the caller's class.
    h2 = NNHandler.initialize_from_checkpoint(path, device="cpu")
    assert isinstance(h2.module, MLP) and _equal(h2.module.state_dict(), ema)
    assert _equal(NNHandler.initialize_from_checkpoint(path, MLP, device="cpu", **KW).module.state_dict(), ema)
    assert _equal(NNHandler.load(path, device="cpu").module.state_dict(), ema)
    live_path = h.export(tmp_path / "live.safetensors", ema=False)
    assert _equal(safetensors_torch.load_file(live_path), live)
    # Without EMA the live weights are exported.
    plain = _trained(ema=False)
    assert _equal(safetensors_torch.load_file(plain.export(tmp_path / "p.safetensors")), plain.module.state_dict())


def test_export_damage_detected_and_recorded_spec_trust_enforced(tmp_path):
    h = _trained(ema=False)
    path = h.export(tmp_path / "m.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10  # one bit in the tensor data
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as info:
        NNHandler.initialize_from_checkpoint(damaged, MLP, device="cpu", **KW)
    assert str(damaged) in str(info.value)
    # A forged export naming a dangerous model target: refused before anything is imported or called.
    marker = tmp_path / "marker"
    tensors = safetensors_torch.load_file(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    record = json.loads(meta["nn_handler"])
    for target in ("subprocess.Popen", "torch.nn.functional.torch.os.system", "matplotlib.subprocess.Popen"):
        record["model"] = {"_target_": target, "args": ["touch", str(marker)]}
        forged = tmp_path / "forged.safetensors"
        safetensors_torch.save_file(tensors, forged, metadata={**meta, "nn_handler": json.dumps(record)})
        for attempt in (lambda: NNHandler.initialize_from_checkpoint(forged, device="cpu"),
                        lambda: NNHandler.load(forged, device="cpu")):
            with pytest.raises(UnsafeCheckpointError) as info:
                attempt()
            assert str(forged) in str(info.value) and target in str(info.value)
    assert not marker.exists()


def test_runner_task_export(tmp_path):
    h = _trained(ema=True)
    ckpt = tmp_path / "run.pth"
    h.save(ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra, expected in (([], h.ema.module.state_dict()), (["export.ema=false"], h.module.state_dict())):
        out_dir = tmp_path / f"exp{len(extra)}"
        done = subprocess.run([sys.executable, "-m", "runner", "task=export", f"checkpoint.path={ckpt}",
                               f"hydra.run.dir={out_dir}", *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        out = out_dir / "model.safetensors"
        assert f"exported: {out}" in done.stdout
        assert _equal(safetensors_torch.load_file(out), expected)
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["task"] == "export" and metrics["weights"] == ("live" if extra else "ema")
