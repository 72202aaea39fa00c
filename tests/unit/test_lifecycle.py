"""Lifecycle: stage ids, the legal transition table (DESIGN.md section 3), SeededLayer stage changes."""

import pytest
import torch

from morpho_dist.blends import Blend
from morpho_dist.blueprints import init_generator_seed
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import (
    ACTIVE_STAGES,
    BLENDED_STAGES,
    IDLE_STAGES,
    LEGAL_TRANSITIONS,
    NUM_STAGES,
    TERMINAL_STAGES,
    TRAINABLE_STAGES,
    IllegalTransition,
    SeedState,
    Stage,
    check_transition,
    count_stages,
    is_legal,
)
from tests import expected
from tests.expected import LEGAL

# DESIGN.md section 2, "Ids (stable; tests outside the project use them)".
EXPECTED_IDS = {
    "DORMANT": 0,
    "GERMINATED": 1,
    "TRAINING": 2,
    "GRAFTING": 3,
    "STABILIZATION": 4,
    "EVALUATING": 5,
    "FINE_TUNING": 6,
    "FOSSILIZED": 7,
    "CULLED": 8,
    "CANCELLED": 9,
    "ROLLED_BACK": 10,
}

EXPECTED_TABLE = LEGAL  # DESIGN.md section 3, written out by hand in tests/expected.py


def test_stage_ids_match_design():
    assert {s.name: int(s) for s in Stage} == EXPECTED_IDS
    assert NUM_STAGES == 11


def test_transition_table_matches_design():
    got = {src.name: {dst.name for dst in dsts} for src, dsts in LEGAL_TRANSITIONS.items()}
    assert got == EXPECTED_TABLE


def test_stage_sets_match_design():
    # the op, the kernels and their tests read these sets: pinned here to hand-written ones (tests/expected.py)
    got = {
        "idle": IDLE_STAGES,
        "blended": BLENDED_STAGES,
        "trainable": TRAINABLE_STAGES,
        "terminal": TERMINAL_STAGES,
        "active": ACTIVE_STAGES,
    }
    want = {
        "idle": expected.IDLE,
        "blended": expected.BLENDED,
        "trainable": expected.TRAINABLE,
        "terminal": expected.TERMINAL,
        "active": expected.ACTIVE,
    }
    assert {k: {s.name for s in v} for k, v in got.items()} == want
    terminal = {src for src, dsts in EXPECTED_TABLE.items() if not dsts}
    assert terminal == expected.TERMINAL  # the hand-written sets agree with the hand-written table too


@pytest.mark.parametrize("src", list(Stage))
@pytest.mark.parametrize("dst", list(Stage))
def test_check_transition_every_pair(src, dst):
    legal = dst.name in EXPECTED_TABLE[src.name]
    assert is_legal(src, dst) == legal
    if legal:
        check_transition(7, int(src), int(dst), "advance")
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition(7, int(src), int(dst), "advance")
        msg = str(info.value)
        assert "seed 7" in msg
        assert src.name in msg and dst.name in msg
        assert "'advance'" in msg


def test_illegal_transition_is_a_value_error():
    assert issubclass(IllegalTransition, ValueError)
    with pytest.raises(ValueError, match="FOSSILIZED"):
        check_transition(0, Stage.FOSSILIZED, Stage.DORMANT, "reset")


def test_seed_state_empty():
    st = SeedState.empty(5, blend_id=int(Blend.LINEAR))
    assert st.num_seeds == 5
    assert st.stage.dtype == torch.int8 and st.blend.dtype == torch.int8
    assert st.alpha.dtype == torch.float32 and st.generation.dtype == torch.int32
    assert torch.equal(st.stage, torch.zeros(5, dtype=torch.int8))
    assert torch.equal(st.blend, torch.full((5,), 2, dtype=torch.int8))
    assert torch.equal(st.germinated_at, torch.full((5,), -1, dtype=torch.int32))


# ---- SeededLayer ---------------------------------------------------------------------------------------------


def make_layer(**kw) -> SeededLayer:
    args = dict(kind="lowrank", rank=4, backend="reference", layer_key="blocks.0.mlp", base_seed=123)
    args.update(kw)
    return SeededLayer(64, 4, **args)


def snapshot(layer: SeededLayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_layer_walks_the_happy_path():
    layer = make_layer()
    layer.germinate(1, step=10)
    assert layer.stages()[1] == Stage.GERMINATED
    assert int(layer.germinated_at[1]) == 10
    path = [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING]
    for step, dst in enumerate(path, start=11):
        layer.apply_stage_changes([(1, dst)], step=step)
        assert layer.stages()[1] == dst
        assert int(layer.steps_in_stage[1]) == 0
    layer.apply_stage_changes([(1, Stage.FOSSILIZED)], step=20, command="fossilize")
    assert layer.stages() == [Stage.DORMANT, Stage.FOSSILIZED, Stage.DORMANT, Stage.DORMANT]


def test_illegal_batch_is_refused_and_changes_nothing():
    layer = make_layer()
    layer.germinate(0, step=1)
    layer.germinate(2, step=1)
    before = snapshot(layer)
    # The first move is legal, the second is not: the whole batch must be refused.
    with pytest.raises(IllegalTransition) as info:
        layer.apply_stage_changes([(0, Stage.TRAINING), (2, Stage.FOSSILIZED)], step=5, command="promote")
    msg = str(info.value)
    assert "seed 2" in msg and "GERMINATED" in msg and "FOSSILIZED" in msg and "'promote'" in msg
    assert_same_state(before, snapshot(layer))


def test_seed_offset_names_global_seed():
    layer = make_layer(seed_offset=40)
    with pytest.raises(IllegalTransition, match="seed 43"):
        layer.apply_stage_changes([(3, Stage.GRAFTING)], step=0)


def test_germinate_refused_unless_dormant():
    layer = make_layer()
    layer.germinate(0, step=1)
    before = snapshot(layer)
    with pytest.raises(IllegalTransition, match="germinate"):
        layer.germinate(0, step=2)
    assert_same_state(before, snapshot(layer))


def test_apply_stage_changes_refuses_germinated_target():
    layer = make_layer()
    before = snapshot(layer)
    with pytest.raises(IllegalTransition, match="germinate"):
        layer.apply_stage_changes([(0, Stage.GERMINATED)], step=0)
    assert_same_state(before, snapshot(layer))


def test_out_of_range_index_is_refused():
    layer = make_layer()
    with pytest.raises(ValueError, match="out of range"):
        layer.apply_stage_changes([(4, Stage.GERMINATED)], step=0)
    with pytest.raises(ValueError, match="out of range"):
        layer.germinate(-1, step=0)


def test_germinate_bumps_generation_and_redraws_deterministically():
    a, b = make_layer(), make_layer()
    a.germinate(2, step=3)
    b.germinate(2, step=99)
    assert int(a.generation[2]) == 1 and int(b.generation[2]) == 1
    # Same (base_seed, layer_key, seed, generation) -> the same draw, whatever the step.
    assert torch.equal(a.bank.p0[2], b.bank.p0[2])
    assert a.bank.p0[2].abs().sum() > 0
    assert torch.equal(a.bank.p1[2], torch.zeros_like(a.bank.p1[2]))  # B = 0: u = 0 at germination
    # Other seeds are untouched.
    assert torch.equal(a.bank.p0[0], torch.zeros_like(a.bank.p0[0]))

    first = a.bank.p0[2].clone()
    a.apply_stage_changes([(2, Stage.CANCELLED)], step=4, command="cancel")
    a.apply_stage_changes([(2, Stage.DORMANT)], step=5, command="reset")
    a.germinate(2, step=6)
    assert int(a.generation[2]) == 2
    assert not torch.equal(a.bank.p0[2], first)  # new generation -> new values

    # Generation 2 is a function of the key alone: a fresh layer forced to generation 1 draws the same.
    c = make_layer()
    c.generation[2] = 1
    c.germinate(2, step=0)
    assert torch.equal(c.bank.p0[2], a.bank.p0[2])


def test_draw_depends_on_layer_key_seed_and_base_seed():
    ref = make_layer()
    ref.germinate(1, step=0)
    for kw in ({"layer_key": "blocks.1.mlp"}, {"base_seed": 124}, {"seed_offset": 4}):
        other = make_layer(**kw)
        other.germinate(1, step=0)
        assert not torch.equal(other.bank.p0[1], ref.bank.p0[1]), kw
    assert init_generator_seed(123, "blocks.0.mlp", 1, 1) != init_generator_seed(123, "blocks.0.mlp", 2, 1)


def test_germinate_resets_alpha_and_sets_blend():
    layer = make_layer()
    layer.alpha[0] = 0.7
    layer.alpha_rate[0] = 0.1
    layer.germinate(0, step=0, blend="linear")
    assert float(layer.alpha[0]) == 0.0 and float(layer.alpha_rate[0]) == 0.0
    assert int(layer.blend[0]) == Blend.LINEAR
    with pytest.raises(ValueError, match="allowed"):
        layer.germinate(1, step=0, blend="sideways")


def test_culled_to_dormant_waits_for_embargo():
    layer = make_layer()
    layer.germinate(0, step=0)
    layer.apply_stage_changes([(0, Stage.TRAINING)], step=1)
    layer.apply_stage_changes([(0, Stage.CULLED)], step=2, command="cull")
    layer.embargo_until[0] = 100
    before = snapshot(layer)
    with pytest.raises(IllegalTransition) as info:
        layer.apply_stage_changes([(0, Stage.DORMANT)], step=99, command="reset")
    msg = str(info.value)
    assert "seed 0" in msg and "CULLED" in msg and "'reset'" in msg and "100" in msg
    assert_same_state(before, snapshot(layer))
    layer.apply_stage_changes([(0, Stage.DORMANT)], step=100, command="reset")
    assert layer.stages()[0] == Stage.DORMANT


def test_cancelled_to_dormant_has_no_embargo():
    layer = make_layer()
    layer.germinate(0, step=0)
    layer.embargo_until[0] = 1000
    layer.apply_stage_changes([(0, Stage.CANCELLED)], step=1)
    layer.apply_stage_changes([(0, Stage.DORMANT)], step=2)
    assert layer.stages()[0] == Stage.DORMANT


def test_layer_rejects_bad_construction():
    with pytest.raises(ValueError, match="hidden=30"):
        SeededLayer(30, 4, kind="diagonal", backend="reference")
    with pytest.raises(ValueError, match="lowrank"):
        SeededLayer(32, 4, kind="lowrank", backend="reference")
    with pytest.raises(ValueError, match="backend"):
        SeededLayer(32, 4, kind="diagonal", backend="cuda")


def test_count_stages_counts_every_stage_with_zeros():
    ids = [0, 0, 3, 7, 7, 7, 10]
    expected = {name: 0 for name in EXPECTED_IDS}
    expected.update(DORMANT=2, GRAFTING=1, FOSSILIZED=3, ROLLED_BACK=1)
    assert count_stages(ids) == expected


def test_illegal_transition_lists_the_legal_targets_or_says_terminal():
    with pytest.raises(IllegalTransition) as info:
        check_transition(2, int(Stage.GRAFTING), int(Stage.DORMANT), "recycle")
    assert str(info.value).endswith("the legal targets are ['CULLED', 'ROLLED_BACK', 'STABILIZATION']")
    with pytest.raises(IllegalTransition) as info:
        check_transition(2, int(Stage.FOSSILIZED), int(Stage.DORMANT), "recycle")
    assert str(info.value).endswith("the legal targets are ['none (terminal)']")


def test_empty_seed_state_defaults():
    state = SeedState.empty(3)
    assert state.blend.tolist() == [0, 0, 0] and state.germinated_at.tolist() == [-1, -1, -1]
    assert state.stage.tolist() == [0, 0, 0] and state.num_seeds == 3
    assert SeedState.empty(2, blend_id=2).blend.tolist() == [2, 2]
    assert {k: v.dtype for k, v in state.tensors().items()} == {
        "stage": torch.int8,
        "blend": torch.int8,
        "alpha": torch.float32,
        "alpha_rate": torch.float32,
        "steps_in_stage": torch.int32,
        "embargo_until": torch.int32,
        "germinated_at": torch.int32,
        "generation": torch.int32,
    }
