"""SeededLayer's idle record: the forward promises the op all_idle exactly while the layer has seen every seed idle
and nothing has written its stage tensor since; any write makes it unknown, and it never reads the stages to
keep it during a step."""

from __future__ import annotations

import pytest
import torch

import morpho_dist.ops as ops
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.reliability import SeedGuard


def make_layer(**kw) -> SeededLayer:
    return SeededLayer(64, 4, rank=4, backend="reference", **kw)


def test_a_new_layer_is_known_idle_and_its_commands_keep_the_record_true():
    layer = make_layer()
    assert layer.known_idle()
    layer.germinate(1, step=0)  # GERMINATED is idle
    assert layer.known_idle()
    layer.apply_stage_changes([(1, Stage.TRAINING)], step=1)
    assert not layer.known_idle()
    layer.apply_stage_changes([(1, Stage.CULLED)], step=2, command="cull")
    assert layer.known_idle()


@pytest.mark.parametrize(
    "write",
    [
        lambda layer: layer.stage.__setitem__(2, int(Stage.GRAFTING)),
        lambda layer: layer.stage.copy_(torch.tensor([0, 0, 2, 0], dtype=torch.int8)),
        lambda layer: layer.stage.fill_(int(Stage.DORMANT)),  # even a write that keeps every seed idle
        lambda layer: layer.load_state_dict(layer.state_dict()),
    ],
    ids=["setitem", "copy_", "fill_", "load_state_dict"],
)
def test_any_write_to_the_stages_makes_the_record_unknown_until_read_again(write):
    layer = make_layer()
    write(layer)
    assert not layer.known_idle()
    idle = all(s in (Stage.DORMANT, Stage.GERMINATED) for s in layer.stages())
    assert layer.refresh_idle_record() is idle
    assert layer.known_idle() is idle


def test_moving_the_layer_reads_the_new_stage_tensor():
    layer = make_layer()
    layer.stage[0] = int(Stage.TRAINING)
    moved = layer.to(torch.float64)  # a new tensor for every buffer: the record follows what it holds
    assert moved.stage.dtype == torch.int8 and not moved.known_idle()
    layer.stage[0] = int(Stage.DORMANT)
    assert layer.to(torch.float32).known_idle()


def test_a_meta_layer_is_not_known_idle():
    with torch.device("meta"):
        layer = make_layer()
    assert not layer.known_idle()


@pytest.mark.parametrize("stage, promised", [(Stage.DORMANT, True), (Stage.FOSSILIZED, False)])
def test_forward_passes_the_record_to_the_op(monkeypatch, stage, promised):
    seen = []
    real = ops.seeded  # the reference backend's calls go through ops.seeded (morpho_dist.ops.prepared)
    monkeypatch.setattr(ops, "seeded", lambda *a, **kw: seen.append(kw["all_idle"]) or real(*a, **kw))
    layer = make_layer()
    layer.stage[3] = int(stage)
    layer.refresh_idle_record()
    layer(torch.randn(5, 64))
    layer.stage[3] = int(stage)  # an unrecorded write, even of the same value
    layer(torch.randn(5, 64))
    assert seen == [promised, False]


def test_the_seed_guard_leaves_a_known_idle_layer_untouched():
    """Its per-step cull writes nothing where no seed is cullable, so the record survives the train step."""
    layer = make_layer()
    guard = SeedGuard({"l": layer}, embargo_steps=5, device=torch.device("cpu"))
    version = layer.stage._version
    guard.before_forward(1)
    layer(torch.randn(3, 64)).sum().backward()
    guard.after_backward(torch.tensor(1.0), 1)
    assert layer.stage._version == version and layer.known_idle()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_all_idle_must_be_a_bool(backend):
    layer = make_layer()
    args = (torch.randn(3, 64), layer.stage, layer.blend, layer.alpha, layer.bank.p0, layer.bank.p1, None)
    with pytest.raises(ValueError, match=r"all_idle must be a bool \(True or False\), got 1"):
        ops.seeded(*args, kind="lowrank", backend=backend, all_idle=1)


def test_with_rec_losses_leaves_out_the_zero_loss_of_an_idle_forward():
    """An idle forward's reconstruction loss is zero: the total is the loss itself (no ops, the same value); a
    forward with a reconstructing seed adds its loss."""
    from morpho_dist.layer import with_rec_losses

    layer = make_layer()
    x = torch.randn(6, 64)
    layer(x)
    loss = torch.tensor(2.5, requires_grad=True)
    assert float(layer.rec_loss) == 0.0 and with_rec_losses(loss, [layer], 0.7) is loss
    layer.germinate(0, step=0, blend="linear")
    layer.apply_stage_changes([(0, Stage.TRAINING)], step=0)  # TRAINING linear: reconstructs
    layer(x)
    total = with_rec_losses(loss, [layer], 0.7)
    assert float(layer.rec_loss) > 0.0
    assert torch.equal(total, loss + 0.7 * layer.rec_loss)
