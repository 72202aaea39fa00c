"""Lifecycle commands by global seed index: legal moves, refusals that change nothing, embargo, tick_."""

from __future__ import annotations

import pytest
import torch

from morpho_dist import commands
from morpho_dist.commands import advance, cancel, cull, germinate, recycle, rollback, run_command, tick_
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import IllegalTransition, Stage
from tests.expected import command_target, is_legal

OFFSET = 4  # this shard holds global seeds 4..7


def make_layer() -> SeededLayer:
    return SeededLayer(32, 4, kind="diagonal", backend="reference", seed_offset=OFFSET, layer_key="fc")


def snapshot(layer: SeededLayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_same(layer: SeededLayer, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_main_path_by_global_index():
    layer = make_layer()
    germinate(layer, 5, step=3)
    assert layer.stages()[1] == Stage.GERMINATED
    assert int(layer.generation[1]) == 1 and int(layer.germinated_at[1]) == 3
    seen = []
    while layer.stages()[1] != Stage.FOSSILIZED:
        layer.steps_in_stage[1] = 7
        seen.append(advance(layer, 5, step=10))
        assert int(layer.steps_in_stage[1]) == 0  # entering a stage restarts its clock
    assert seen == [
        Stage.TRAINING,
        Stage.GRAFTING,
        Stage.STABILIZATION,
        Stage.EVALUATING,
        Stage.FINE_TUNING,
        Stage.FOSSILIZED,
    ]
    assert [s for i, s in enumerate(layer.stages()) if i != 1] == [Stage.DORMANT] * 3


def test_advance_refused_at_terminal_and_dormant_names_seed_stage_command():
    layer = make_layer()
    before = snapshot(layer)
    with pytest.raises(IllegalTransition) as err:
        advance(layer, 6, step=0)
    assert "seed 6" in str(err.value) and "DORMANT" in str(err.value) and "advance" in str(err.value)
    assert_same(layer, before)
    layer.stage[2] = int(Stage.FOSSILIZED)
    before = snapshot(layer)
    with pytest.raises(IllegalTransition, match=r"seed 6.*advance.*FOSSILIZED"):
        advance(layer, 6, step=0)
    assert_same(layer, before)


def test_seed_not_on_this_shard_is_refused():
    layer = make_layer()
    with pytest.raises(ValueError, match="seed 0 is not held"):
        germinate(layer, 0, step=0)
    with pytest.raises(ValueError, match="seed 8 is not held"):
        cull(layer, 8, step=0)
    assert commands.owns(layer, 7) and not commands.owns(layer, 3)


def test_cull_sets_embargo_and_recycle_waits_for_it():
    layer = make_layer()
    germinate(layer, 4, step=0)
    advance(layer, 4, step=1)  # TRAINING
    layer.alpha_rate[0] = 0.5
    cull(layer, 4, step=20, embargo_steps=30)
    assert layer.stages()[0] == Stage.CULLED and int(layer.embargo_until[0]) == 50
    assert float(layer.alpha_rate[0]) == 0.0
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"seed 4.*recycle.*embargoed until step 50"):
        recycle(layer, 4, step=49)
    assert_same(layer, before)
    recycle(layer, 4, step=50)
    assert layer.stages()[0] == Stage.DORMANT
    germinate(layer, 4, step=51)  # a recycled seed can grow again, as a new generation
    assert int(layer.generation[0]) == 2


def test_cancel_and_rollback():
    layer = make_layer()
    germinate(layer, 4, step=0)
    cancel(layer, 4, step=1)
    assert layer.stages()[0] == Stage.CANCELLED
    recycle(layer, 4, step=1)
    assert layer.stages()[0] == Stage.DORMANT
    germinate(layer, 5, step=0)
    advance(layer, 5, step=0)
    rollback(layer, 5, step=2)
    assert layer.stages()[1] == Stage.ROLLED_BACK
    before = snapshot(layer)
    with pytest.raises(IllegalTransition, match=r"seed 5.*recycle.*ROLLED_BACK"):
        recycle(layer, 5, step=3)
    assert_same(layer, before)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("command", commands.COMMANDS)
def test_every_illegal_command_is_refused_and_changes_nothing(stage, command):
    layer = make_layer()
    layer.stage[3] = int(stage)
    layer.alpha[3] = 0.25
    layer.steps_in_stage[3] = 9
    name = command_target(command, stage.name)  # hand-written (tests/expected.py), not the library's tables
    target = Stage[name] if name is not None else None
    legal = name is not None and is_legal(stage.name, name)
    before = snapshot(layer)
    if legal:
        run_command(layer, 7, command, step=1000, embargo_steps=5)
        assert layer.stages()[3] == target
    else:
        with pytest.raises(ValueError) as err:
            run_command(layer, 7, command, step=1000, embargo_steps=5)
        msg = str(err.value)
        assert "seed 7" in msg and stage.name in msg and command in msg
        assert_same(layer, before)


def test_tick_counts_non_dormant_on_device_without_sync(monkeypatch):
    a, b = make_layer(), make_layer()
    a.stage.copy_(torch.tensor([0, 2, 7, 8], dtype=torch.int8))
    b.stage.copy_(torch.tensor([3, 0, 0, 1], dtype=torch.int8))

    def boom(*args, **kwargs):
        raise AssertionError("host sync in tick_")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    tick_({"a": a, "b": b})
    tick_([a])
    monkeypatch.undo()
    assert a.steps_in_stage.tolist() == [0, 2, 2, 2]
    assert b.steps_in_stage.tolist() == [1, 0, 0, 1]
    assert a.steps_in_stage.dtype == torch.int32
