"""h.sample under DDP (a real 2-rank torchrun job, gloo on CPU): each rank draws its share and
every rank gets all samples, in order."""
from __future__ import annotations

import helpers_generative as hg
import pytest
import torch
from test_distributed import ok, ranks, torchrun

from nn_handler import ModelType, NNHandler
from nn_handler.sde import VPSDE

pytestmark = pytest.mark.distributed


def test_two_ranks_draw_their_shares_and_gather_all_samples_in_order(tmp_path):
    ok(torchrun(tmp_path, "sample", "3"))
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == 2 and r0["seeded"].shape == (7, 2)
    assert torch.equal(r0["seeded"], r1["seeded"])  # every rank has all of them
    # rank r drew rows r, r + 2, ... from its own generator (seed + 1_000_003 r): one process
    # drawing each share with that seed gives exactly those rows
    h = NNHandler(hg.ExactMixtureScore, device="cpu", model_type=ModelType.SCORE_BASED, **hg.SDE_KWARGS)
    h.set_sde(VPSDE, **hg.SDE_KWARGS)
    torch.testing.assert_close(h.sample((4, 2), steps=20, seed=3), r0["seeded"][0::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.sample((3, 2), steps=20, seed=3 + 1_000_003), r0["seeded"][1::2],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["global"], r1["global"])
    assert not torch.allclose(r0["global"][0], r0["global"][1])  # ranks seeded alike still draw different rows
