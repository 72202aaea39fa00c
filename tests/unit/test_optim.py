"""SeedOptimizer: only trainable seeds move, per-seed Adam bias correction, reset of one seed's state."""

from __future__ import annotations

import pytest
import torch

from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.optim import SeedOptimizer


def _layer() -> SeededLayer:
    layer = SeededLayer(32, 2, kind="lowrank", rank=4, backend="reference", layer_key="l")
    with torch.no_grad():
        layer.bank.p0.normal_()
        layer.bank.p1.normal_()
    return layer


def _grads(layer: SeededLayer) -> None:
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = torch.ones_like(p)


def test_only_trainable_seeds_move_and_first_adam_step_is_lr():
    layer = _layer()
    layer.stage[0], layer.stage[1] = int(Stage.GRAFTING), int(Stage.FOSSILIZED)
    before = layer.bank.p0.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    _grads(layer)
    opt.step()
    after = layer.bank.p0.detach()
    assert torch.equal(after[1], before[1])  # frozen seed: untouched (no momentum, no weight decay)
    torch.testing.assert_close(before[0] - after[0], torch.full_like(before[0], 0.1), rtol=1e-4, atol=1e-6)


def test_reset_seed_restarts_bias_correction():
    layer = _layer()
    layer.stage[0] = layer.stage[1] = int(Stage.TRAINING)
    opt = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    for _ in range(5):
        _grads(layer)
        opt.step()
    opt.reset_seed("l", 1)
    assert float(opt.state["l"]["t"][1]) == 0 and float(opt.state["l"]["t"][0]) == 5
    assert not opt.state["l"]["m_p0"][1].any() and opt.state["l"]["m_p0"][0].any()
    state = opt.state_dict()
    other = SeedOptimizer({"l": layer}, name="adamw", lr=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.state["l"]["v_p1"], opt.state["l"]["v_p1"])


def test_sgd_momentum_masks_idle_seeds():
    layer = _layer()
    layer.stage[0] = int(Stage.FINE_TUNING)  # seed 1 stays DORMANT
    before = layer.bank.p1.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="sgd", lr=0.5, momentum=0.0)
    _grads(layer)
    opt.step()
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5)
    assert torch.equal(layer.bank.p1.detach()[1], before[1])


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused-kernel"])
def test_sgd_momentum_through_a_skipped_step(fused):
    """momentum 0.9 (off the test above's 0): a skipped step (ok False, NaN gradients) leaves the momentum and
    the banks as they were, so the next step is p - lr * (0.9 * m + g) with the momentum of the step before it;
    the DORMANT seed never moves and keeps zero momentum."""
    layer = _layer()
    layer.stage[0] = int(Stage.FINE_TUNING)  # seed 1 stays DORMANT
    before = layer.bank.p1.detach().clone()
    opt = SeedOptimizer({"l": layer}, name="sgd", lr=0.5, momentum=0.9, fused=fused)
    yes, no = torch.tensor(True), torch.tensor(False)
    _grads(layer)
    opt.step(yes)  # m = 1, p -= 0.5
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = torch.full_like(p, float("nan"))
    opt.step(no)  # skipped: nothing moves
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5)
    _grads(layer)
    opt.step(yes)  # m = 0.9 * 1 + 1 = 1.9, p -= 0.5 * 1.9
    torch.testing.assert_close(layer.bank.p1.detach()[0], before[0] - 0.5 - 0.95)
    assert torch.isfinite(layer.bank.p0).all() and torch.isfinite(layer.bank.p1).all()
    assert torch.equal(layer.bank.p1.detach()[1], before[1])
    assert torch.equal(opt.state["l"]["m_p1"][1], torch.zeros_like(before[1]))
    torch.testing.assert_close(opt.state["l"]["m_p1"][0], torch.full_like(before[0], 1.9))
