"""The PyTorch reference of the seeded op (DESIGN.md section 2): gradients, stage semantics, telemetry."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from morpho_dist.blends import Blend
from morpho_dist.kernels.layout import (
    F_ABSMAX,
    F_BENEFIT,
    F_COUNT,
    F_DEAD,
    F_DELTA_SQ,
    F_GRAD_SQ,
    F_SUM,
    F_SUMSQ,
    NUM_FIELDS,
    TELEMETRY_FIELDS,
)
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.ops import seeded
from morpho_dist.ops.reference import seeded_reference

S = Stage
ADD, MUL, LIN = int(Blend.ADDITIVE), int(Blend.MULTIPLICATIVE), int(Blend.LINEAR)
IDLE = [S.DORMANT, S.GERMINATED, S.CULLED, S.CANCELLED, S.ROLLED_BACK]
FROZEN = [S.STABILIZATION, S.EVALUATING, S.FOSSILIZED]


def make(kind, stages, blends, alphas, *, rows=2, chunk=None, rank=2, dtype=torch.float64, seed=0):
    """Random x and (non-zero) parameters for N = len(stages) seeds."""
    g = torch.Generator().manual_seed(seed)
    n = len(stages)
    c = chunk or (16 if kind == "lowrank" else 3)
    if kind == "lowrank":
        p0 = torch.randn(n, c, rank, generator=g, dtype=torch.float64) / c**0.5
        p1 = torch.randn(n, rank, c, generator=g, dtype=torch.float64) / rank**0.5
    else:
        p0 = torch.randn(n, c, generator=g, dtype=torch.float64)
        p1 = torch.randn(n, c, generator=g, dtype=torch.float64)
    x = torch.randn(rows, n * c, generator=g, dtype=torch.float64)
    return dict(
        x=x.to(dtype),
        stage=torch.tensor([int(s) for s in stages], dtype=torch.int8),
        blend=torch.tensor(blends, dtype=torch.int8),
        alpha=torch.tensor(alphas, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        p0=p0.to(dtype if dtype == torch.float64 else torch.float32),
        p1=p1.to(dtype if dtype == torch.float64 else torch.float32),
    )


def run(d, telemetry=None, *, kind, act="relu", **over):
    a = {**d, **over}
    return seeded_reference(a["x"], a["stage"], a["blend"], a["alpha"], a["p0"], a["p1"], telemetry, kind=kind, act=act)


KIND_ACT = [("lowrank", "relu"), ("lowrank", "gelu_tanh"), ("diagonal", "relu")]
# Five seeds per call; "mixed" puts all three blends on the live seeds (indices 1..3) of the stage lists below.
BLEND_SETS = {
    "additive": [ADD] * 5,
    "multiplicative": [MUL] * 5,
    "linear": [LIN] * 5,
    "mixed": [LIN, ADD, MUL, LIN, ADD],
}


# ---- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "act"), KIND_ACT)
@pytest.mark.parametrize("blends", list(BLEND_SETS.values()), ids=list(BLEND_SETS))
def test_gradcheck_idle_and_trainable_blended(kind, act, blends):
    """y is differentiable in x and in the parameters of GRAFTING / FINE_TUNING seeds; idle seeds pass x."""
    stages = [S.DORMANT, S.GRAFTING, S.FINE_TUNING, S.GRAFTING, S.CULLED]
    d = make(kind, stages, blends, [0.6, 0.3, 0.8, 1.0, 0.5])

    def f(x, p0, p1):
        return run(d, kind=kind, act=act, x=x, p0=p0, p1=p1)

    inputs = tuple(d[k].clone().requires_grad_() for k in ("x", "p0", "p1"))
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "act"), KIND_ACT)
@pytest.mark.parametrize("blends", list(BLEND_SETS.values()), ids=list(BLEND_SETS))
def test_gradcheck_frozen_blended_wrt_x(kind, act, blends):
    """Frozen blended stages still pass gradients to x through the blend."""
    stages = [S.GERMINATED, S.STABILIZATION, S.EVALUATING, S.FOSSILIZED, S.ROLLED_BACK]
    d = make(kind, stages, blends, [0.4, 1.0, 0.7, 0.2, 0.9])

    def f(x):
        return run(d, kind=kind, act=act, x=x)[0]

    assert gradcheck(f, (d["x"].clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "act"), KIND_ACT)
def test_frozen_and_idle_params_get_no_gradient(kind, act):
    stages = [S.STABILIZATION, S.EVALUATING, S.FOSSILIZED, S.DORMANT, S.GRAFTING]
    d = make(kind, stages, [ADD, MUL, LIN, ADD, MUL], [0.5] * 5)
    p0, p1 = d["p0"].clone().requires_grad_(), d["p1"].clone().requires_grad_()
    y, rec = run(d, kind=kind, act=act, p0=p0, p1=p1)
    (y.sin().sum() + rec).backward()
    for p in (p0, p1):
        assert torch.equal(p.grad[:4], torch.zeros_like(p.grad[:4]))
        assert p.grad[4].abs().sum() > 0  # the GRAFTING seed is trained


@pytest.mark.parametrize(("kind", "act"), KIND_ACT)
def test_linear_training_reconstruction(kind, act):
    """Linear TRAINING seeds: y = x, and rec_loss = sum over them of 0.5 * mean((u(x) - x)^2), a true
    gradient in the parameters."""
    stages = [S.TRAINING, S.DORMANT, S.TRAINING, S.GRAFTING]
    d = make(kind, stages, [LIN, LIN, LIN, ADD], [0.0, 0.0, 0.0, 0.5])

    def f(p0, p1):
        return run(d, kind=kind, act=act, p0=p0, p1=p1)[1]

    assert gradcheck(f, (d["p0"].clone().requires_grad_(), d["p1"].clone().requires_grad_()), eps=1e-6, atol=1e-5)

    y, rec = run(d, kind=kind, act=act)
    n, c = 4, d["x"].shape[1] // 4
    xc = d["x"].view(-1, n, c)
    expect = 0.0
    for i in (0, 2):
        if kind == "lowrank":
            h = xc[:, i] @ d["p0"][i]
            h = torch.relu(h) if act == "relu" else torch.nn.functional.gelu(h, approximate="tanh")
            u = h @ d["p1"][i]
        else:
            u = d["p0"][i] * xc[:, i] + d["p1"][i]
        expect += 0.5 * ((u - xc[:, i]) ** 2).mean()
    torch.testing.assert_close(rec, expect, rtol=1e-12, atol=0)
    assert torch.equal(y.view(-1, n, c)[:, :3], xc[:, :3])
    # The reconstruction target is x̄: rec_loss sends no gradient into x.
    x = d["x"].clone().requires_grad_()
    _, rec = run(d, kind=kind, act=act, x=x, p0=d["p0"].clone().requires_grad_())
    rec.backward()
    assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x))


def test_rec_loss_zero_without_linear_training():
    d = make("diagonal", [S.TRAINING, S.TRAINING, S.GRAFTING, S.DORMANT], [ADD, MUL, LIN, LIN], [0.0, 0.0, 0.5, 0.0])
    _, rec = run(d, kind="diagonal")
    assert rec.item() == 0.0


@pytest.mark.parametrize(("kind", "act"), KIND_ACT)
def test_incubator_gradients_equal_grafting_at_alpha_one_on_detached_x(kind, act):
    """Add/mult TRAINING: blueprint grads of sum(dy * blend(x̄, u(x̄), 1)) -- the same as GRAFTING at alpha=1
    on a detached x -- while y = x and dx = dy."""
    blends = [ADD, MUL, MUL, ADD]
    d = make(kind, [S.TRAINING] * 4, blends, [0.0, 0.3, 0.7, 0.0], rows=3)
    dy = torch.randn(d["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    x1 = d["x"].clone().requires_grad_()
    p0a, p1a = d["p0"].clone().requires_grad_(), d["p1"].clone().requires_grad_()
    y1, rec1 = run(d, kind=kind, act=act, x=x1, p0=p0a, p1=p1a)
    y1.backward(dy)
    assert torch.equal(y1, d["x"]) and torch.equal(x1.grad, dy) and rec1.item() == 0.0

    p0b, p1b = d["p0"].clone().requires_grad_(), d["p1"].clone().requires_grad_()
    y2, _ = run(
        d,
        kind=kind,
        act=act,
        stage=torch.full((4,), int(S.GRAFTING), dtype=torch.int8),
        alpha=torch.ones(4, dtype=torch.float64),
        x=d["x"].detach(),
        p0=p0b,
        p1=p1b,
    )
    y2.backward(dy)
    assert p0a.grad.abs().sum() > 0
    torch.testing.assert_close(p0a.grad, p0b.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p1a.grad, p1b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["lowrank", "diagonal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_idle_and_training_seeds_are_bit_identical(kind, dtype):
    """Idle and TRAINING seeds: y is x bit for bit and dx is dy bit for bit, next to blended seeds."""
    stages = IDLE + [S.TRAINING, S.TRAINING, S.TRAINING, S.GRAFTING, S.FOSSILIZED]
    blends = [ADD, MUL, LIN, ADD, MUL, ADD, MUL, LIN, MUL, LIN]
    d = make(kind, stages, blends, [0.5] * 10, rows=5, dtype=dtype, chunk=16 if kind == "lowrank" else 2)
    n, c = len(stages), d["x"].shape[1] // len(stages)
    x = d["x"].clone().requires_grad_()
    p0, p1 = d["p0"].clone().requires_grad_(), d["p1"].clone().requires_grad_()
    y, rec = run(d, kind=kind, x=x, p0=p0, p1=p1)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    (y * dy).sum().backward()
    passthrough = slice(0, 8 * c)  # IDLE (5) + TRAINING (3) seeds are the first 8
    assert y.dtype == dtype
    assert torch.equal(y[:, passthrough], d["x"][:, passthrough])
    assert torch.equal(x.grad[:, passthrough], dy[:, passthrough])
    assert not torch.equal(y[:, 8 * c :], d["x"][:, 8 * c :])  # the blended seeds do change y
    assert n == 10 and torch.isfinite(rec)


@pytest.mark.parametrize("blend", [ADD, MUL, LIN])
def test_counterfactual_alpha_zero_is_identity(blend):
    d = make("lowrank", [S.EVALUATING, S.GRAFTING], [blend, blend], [0.0, 0.0], dtype=torch.float32)
    y, _ = run(d, kind="lowrank")
    assert torch.equal(y, d["x"])


def test_leading_dims_are_flattened():
    d = make("lowrank", [S.GRAFTING, S.FINE_TUNING, S.DORMANT], [ADD, MUL, LIN], [0.5, 0.9, 0.0], rows=6)
    y_flat, rec_flat = run(d, kind="lowrank")
    y_3d, rec_3d = run(d, kind="lowrank", x=d["x"].view(2, 3, -1))
    assert y_3d.shape == (2, 3, d["x"].shape[1])
    assert torch.equal(y_3d.reshape(6, -1), y_flat) and torch.equal(rec_3d, rec_flat)


# ---- telemetry ---------------------------------------------------------------------------------------------------


def _blend(b, x, u, a):
    if b == ADD:
        return x + a * u
    if b == MUL:
        return x * (1 + a * math.tanh(u))
    return (1 - a) * x + a * u


def hand_telemetry(x, dy, stages, blends, alphas, g, b, dead_eps):
    """DESIGN.md's telemetry formulas, element by element, for a diagonal blueprint (u = g x + b)."""
    rows, n, c = len(x), len(stages), len(g[0])
    out = []
    for s in range(n):
        xs = [x[t][s * c + j] for t in range(rows) for j in range(c)]
        dys = [dy[t][s * c + j] for t in range(rows) for j in range(c)]
        us = [g[s][j] * x[t][s * c + j] + b[s][j] for t in range(rows) for j in range(c)]
        training = stages[s] == S.TRAINING
        blended = S.GRAFTING <= stages[s] <= S.FOSSILIZED
        full = [_blend(blends[s], xv, uv, 1.0) - xv for xv, uv in zip(xs, us)]
        if training:
            delta = full
        elif blended:
            delta = [_blend(blends[s], xv, uv, alphas[s]) - xv for xv, uv in zip(xs, us)]
        else:
            delta = [0.0] * len(xs)
        benefit = sum(d * f for d, f in zip(dys, full)) if (training or blended) else 0.0
        out.append(
            [
                float(len(xs)),
                sum(xs),
                sum(v * v for v in xs),
                float(sum(abs(v) <= dead_eps for v in xs)),
                max(abs(v) for v in xs),
                sum(v * v for v in dys),
                benefit,
                sum(v * v for v in delta),
            ]
        )
    return torch.tensor(out, dtype=torch.float32)


TEL_STAGES = [S.DORMANT, S.TRAINING, S.GRAFTING, S.FOSSILIZED, S.TRAINING]
TEL_BLENDS = [ADD, MUL, LIN, ADD, LIN]
TEL_ALPHAS = [0.9, 0.0, 0.25, 0.5, 0.0]
TEL_G = [[0.5, -1.0], [2.0, 0.5], [1.5, -0.5], [0.25, 1.0], [0.75, 1.25]]
TEL_B = [[0.1, 0.2], [0.3, -0.4], [0.0, 1.0], [-0.2, 0.0], [0.5, -0.5]]
TEL_X = [
    [0.0, -1.5, 0.5, 2.0, 3e-7, -0.25, 1.0, -2.0, 0.5, 0.5],
    [1.0, 0.25, -3.0, 0.0, 1.25, 4.0, -0.5, 0.75, -1.0, 2.0],
    [-0.75, 2.5, 1.5, -1.0, -5e-7, 0.5, 0.0, 1.5, 3.0, -0.25],
]
TEL_DY = [
    [0.5, -1.0, 0.25, 1.0, -0.5, 0.75, 2.0, -0.25, 1.0, 0.5],
    [-1.5, 0.5, 1.0, -0.75, 0.25, -2.0, 0.5, 1.0, -0.5, 0.25],
    [0.25, 0.75, -0.5, 0.5, 1.5, 1.0, -1.0, 0.0, 0.75, -1.0],
]


def tel_args(x=TEL_X):
    return dict(
        x=torch.tensor(x),
        stage=torch.tensor([int(s) for s in TEL_STAGES], dtype=torch.int8),
        blend=torch.tensor(TEL_BLENDS, dtype=torch.int8),
        alpha=torch.tensor(TEL_ALPHAS),
        p0=torch.tensor(TEL_G),
        p1=torch.tensor(TEL_B),
    )


def forward_backward(args, telemetry, dy=TEL_DY, dead_eps=1e-6):
    x = args["x"].clone().requires_grad_()
    y, rec = seeded_reference(
        x,
        args["stage"],
        args["blend"],
        args["alpha"],
        args["p0"],
        args["p1"],
        telemetry,
        kind="diagonal",
        dead_eps=dead_eps,
    )
    return y, rec, lambda: y.backward(torch.tensor(dy))


def test_telemetry_layout():
    assert TELEMETRY_FIELDS == ("count", "sum", "sumsq", "dead", "absmax", "grad_sq", "benefit", "delta_sq")
    assert NUM_FIELDS == 8


def test_telemetry_matches_hand_computed_formulas():
    tel = torch.zeros(5, NUM_FIELDS)
    y, rec, backward = forward_backward(tel_args(), tel)
    expect = hand_telemetry(TEL_X, TEL_DY, TEL_STAGES, TEL_BLENDS, TEL_ALPHAS, TEL_G, TEL_B, 1e-6)
    fwd = [F_COUNT, F_SUM, F_SUMSQ, F_DEAD, F_ABSMAX, F_DELTA_SQ]
    bwd = [F_GRAD_SQ, F_BENEFIT]
    torch.testing.assert_close(tel[:, fwd], expect[:, fwd], rtol=1e-6, atol=1e-6)
    assert torch.equal(tel[:, bwd], torch.zeros(5, 2))  # backward fields arrive with the backward
    backward()
    torch.testing.assert_close(tel, expect, rtol=1e-6, atol=1e-6)
    # Spot checks the formulas cannot hide: dead counts exact zeros and |x| <= eps; idle seeds have no
    # benefit or delta; a linear TRAINING seed's delta_sq is its reconstruction error.
    assert tel[:, F_DEAD].tolist() == [1.0, 1.0, 2.0, 1.0, 0.0]
    assert tel[0, F_BENEFIT] == 0 and tel[0, F_DELTA_SQ] == 0 and tel[0, F_GRAD_SQ] > 0
    torch.testing.assert_close(rec, 0.5 * tel[4, F_DELTA_SQ] / tel[4, F_COUNT], rtol=1e-6, atol=0)


def test_dead_eps_is_respected():
    tel = torch.zeros(5, NUM_FIELDS)
    forward_backward(tel_args(), tel, dead_eps=0.25)  # |x| == eps counts as dead
    assert tel[:, F_DEAD].tolist() == [2.0, 1.0, 3.0, 1.0, 1.0]


def test_telemetry_accumulates_over_calls():
    x2 = [[v * s for v, s in zip(row, [3.0, 3.0, 0.1, 0.1, 1.0, 1.0, 2.0, 2.0, 0.5, 0.5])] for row in TEL_X]
    one, two, both = torch.zeros(5, 8), torch.zeros(5, 8), torch.zeros(5, 8)
    for args, tel in ((tel_args(), one), (tel_args(x2), two)):
        forward_backward(args, tel)[2]()
    forward_backward(tel_args(), both)[2]()
    forward_backward(tel_args(x2), both)[2]()
    sums = [i for i in range(NUM_FIELDS) if i != F_ABSMAX]
    torch.testing.assert_close(both[:, sums], one[:, sums] + two[:, sums], rtol=1e-6, atol=1e-6)
    assert torch.equal(both[:, F_ABSMAX], torch.maximum(one[:, F_ABSMAX], two[:, F_ABSMAX]))
    assert (one[:, F_ABSMAX] > two[:, F_ABSMAX]).any() and (one[:, F_ABSMAX] < two[:, F_ABSMAX]).any()
    assert both[0, F_COUNT] == 12.0


def test_no_telemetry_when_none():
    y1, rec1, bw = forward_backward(tel_args(), None)
    bw()
    y2, rec2, _ = forward_backward(tel_args(), torch.zeros(5, 8))
    assert torch.equal(y1, y2) and torch.equal(rec1, rec2)


# ---- SeededLayer -------------------------------------------------------------------------------------------------


def grafting_layer(**kw):
    torch.manual_seed(0)
    layer = SeededLayer(48, 3, kind="diagonal", backend="reference", **kw)
    for i in range(3):
        layer.germinate(i, step=0)
    layer.apply_stage_changes([(0, S.TRAINING), (1, S.TRAINING)], step=1)
    layer.apply_stage_changes([(1, S.GRAFTING)], step=2)
    layer.alpha[1] = 0.5
    with torch.no_grad():
        layer.bank.p0.normal_()
        layer.bank.p1.normal_()
    return layer


def test_layer_forward_matches_functional_op_and_reads_telemetry():
    layer = grafting_layer()
    x = torch.randn(4, 5, 48, requires_grad=True)
    y = layer(x)
    tel = torch.zeros(3, 8)
    y_ref, rec_ref = seeded(
        x, layer.stage, layer.blend, layer.alpha, layer.bank.p0, layer.bank.p1, tel, kind="diagonal"
    )
    assert torch.equal(y, y_ref) and torch.equal(layer.rec_loss, rec_ref)
    (y.square().sum() + layer.rec_loss).backward()
    (y_ref.square().sum() + rec_ref).backward()
    got = layer.read_telemetry(reset=False)
    torch.testing.assert_close(got, tel)
    assert got[:, F_COUNT].tolist() == [320.0, 320.0, 320.0]
    assert (got[:, F_GRAD_SQ] > 0).all()
    assert torch.equal(layer.telemetry, got)  # reset=False keeps it

    got2 = layer.read_telemetry(reset=True)
    assert torch.equal(got2, got)
    assert torch.equal(layer.telemetry, torch.zeros(3, 8))
    assert got2.abs().sum() > 0  # the returned copy is not the zeroed buffer


def test_layer_eval_mode_does_not_touch_telemetry():
    layer = grafting_layer()
    layer.telemetry.copy_(torch.arange(24.0).view(3, 8))
    before = layer.telemetry.clone()
    layer.eval()
    x = torch.randn(4, 48, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(layer.telemetry, before)
    layer.train()
    layer(x).sum().backward()
    assert not torch.equal(layer.telemetry, before)


def test_layer_training_mode_accumulates_until_reset():
    layer = grafting_layer()
    x = torch.randn(2, 48)
    layer(x)
    layer(x)
    assert layer.read_telemetry()[:, F_COUNT].tolist() == [64.0, 64.0, 64.0]
    layer(x)
    assert layer.read_telemetry()[:, F_COUNT].tolist() == [32.0, 32.0, 32.0]


def test_a_broken_all_idle_promise_is_nan_in_exactly_the_live_columns():
    """all_idle=True while seed 1 is TRAINING and seed 2 GRAFTING: y and dx are NaN in their columns only."""
    d = make("diagonal", [S.DORMANT, S.TRAINING, S.GRAFTING, S.CULLED], [ADD] * 4, [0.0, 0.0, 0.5, 0.0])
    x = d["x"].clone().requires_grad_(True)
    y, _ = seeded_reference(
        x, d["stage"], d["blend"], d["alpha"], d["p0"], d["p1"], None, kind="diagonal", all_idle=True
    )
    y.sum().backward()
    live = torch.tensor([False] * 3 + [True] * 6 + [False] * 3)  # chunk 3: seeds 1 and 2
    assert torch.isnan(y[:, live]).all() and torch.isfinite(y[:, ~live]).all()
    assert torch.equal(y[:, :3], d["x"][:, :3])  # the DORMANT seed passes x through
    assert torch.isnan(x.grad[:, live]).all() and torch.isfinite(x.grad[:, ~live]).all()


def test_ids_are_checked_by_default_and_the_options_are_keyword_only():
    d = make("diagonal", [S.DORMANT, S.DORMANT], [ADD, ADD], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"stage holds ids \[42\] out of range"):
        run(d, kind="diagonal", stage=torch.tensor([0, 42], dtype=torch.int8))
    with pytest.raises(TypeError):
        seeded_reference(d["x"], d["stage"], d["blend"], d["alpha"], d["p0"], d["p1"], None, "diagonal")


def test_dead_eps_defaults_to_1e_6():
    """Without dead_eps the dead counts are those of eps 1e-6 (the spot check of the formulas test above)."""
    a, tel = tel_args(), torch.zeros(5, NUM_FIELDS)
    seeded_reference(a["x"], a["stage"], a["blend"], a["alpha"], a["p0"], a["p1"], tel, kind="diagonal")
    assert tel[:, F_DEAD].tolist() == [1.0, 1.0, 2.0, 1.0, 0.0]
