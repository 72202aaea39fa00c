"""The seed optimizer's fused step (one kernel per layer) against its PyTorch ops, and the skip of known-idle layers.

Every stage present (trainable ones move, the others must not), Adam and SGD, the step's ``ok`` flag None, True
and False, several steps so the per-seed bias corrections differ; compared: both banks, the moments and the
per-seed step counters.
"""

from __future__ import annotations

import pytest
import torch

from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import TRAINABLE_STAGES, Stage
from morpho_dist.optim import SeedOptimizer
from tests.kernels.test_seeded_kernels import DEVICES

SEEDS = 11  # every stage once (ids 0..10)


def make(device: str) -> SeededLayer:
    torch.manual_seed(0)
    layer = SeededLayer(SEEDS * 16, SEEDS, rank=4, backend="reference").to(device)
    with torch.no_grad():
        layer.stage.copy_(torch.arange(SEEDS, dtype=torch.int8))
        layer.bank.p0.normal_()
        layer.bank.p1.normal_()
    return layer


def grads(layer: SeededLayer, k: int) -> None:
    gen = torch.Generator().manual_seed(10 + k)
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_step_matches_the_torch_ops(device, name):
    fused_layer, plain_layer = make(device), make(device)
    fused = SeedOptimizer({"l": fused_layer}, name=name, lr=0.05, momentum=0.9, fused=True)
    plain = SeedOptimizer({"l": plain_layer}, name=name, lr=0.05, momentum=0.9, fused=False)
    oks = [None, torch.tensor(True, device=device), torch.tensor(False, device=device), None, None]
    before = plain_layer.bank.p0.detach().clone()
    for k, ok in enumerate(oks):
        grads(fused_layer, k)
        grads(plain_layer, k)
        fused.step(ok)
        plain.step(ok)
    for pname in ("p0", "p1"):
        a, b = getattr(fused_layer.bank, pname), getattr(plain_layer.bank, pname)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=pname: f"{n}: {m}")
    for key, value in plain.state["l"].items():
        torch.testing.assert_close(fused.state["l"][key], value, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    trainable = torch.tensor([Stage(s) in TRAINABLE_STAGES for s in range(SEEDS)], device=device)
    moved = (fused_layer.bank.p0.detach() != before).flatten(1).any(1)
    assert torch.equal(moved, trainable)  # exactly the trainable seeds moved
    assert fused.state["l"]["t"].tolist() == [4.0 if t else 0.0 for t in trainable.tolist()]  # ok=False: no step


def test_a_known_idle_layer_is_skipped():
    """Idle stages only: the update would move nothing, so the optimizer launches nothing for the layer."""
    layer = SeededLayer(64, 4, rank=4, backend="reference")
    assert layer.known_idle()
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1, fused=False)
    grads(layer, 0)
    versions = [t._version for t in (layer.bank.p0, layer.bank.p1, *opt.state["l"].values())]
    opt.step()
    assert [t._version for t in (layer.bank.p0, layer.bank.p1, *opt.state["l"].values())] == versions
    layer.germinate(1, step=0)
    layer.apply_stage_changes([(1, Stage.TRAINING)], step=0)
    opt.step()
    assert opt.state["l"]["t"].tolist() == [0.0, 1.0, 0.0, 0.0]
