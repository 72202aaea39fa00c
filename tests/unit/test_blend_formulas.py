"""The blended output y of the reference op (and the op through its public entry point) at 0 < alpha < 1, for
every blend, blueprint kind and activation, against the formulas of DESIGN.md section 2 written out here seed by
seed with plain loops: additive x + a*u, multiplicative x * (1 + a*tanh(u)), linear (1 - a)*x + a*u, where
u = W1 act(W0 x_c) (lowrank) or p0 * x_c + p1 (diagonal). The blend ids are the stable ones of DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch

from morpho_dist.lifecycle import Stage
from morpho_dist.ops import seeded
from morpho_dist.ops.reference import seeded_reference

ADDITIVE, MULTIPLICATIVE, LINEAR = 0, 1, 2  # DESIGN.md's blend ids
BLENDED = [Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED]


def act_by_hand(h: float, act: str) -> float:
    if act == "relu":
        return h if h > 0 else 0.0
    return 0.5 * h * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def u_by_hand(kind: str, act: str, xc: list[float], p0, p1) -> list[float]:
    c = len(xc)
    if kind == "diagonal":
        return [float(p0[j]) * xc[j] + float(p1[j]) for j in range(c)]
    rank = p0.shape[1]
    h = [act_by_hand(sum(xc[j] * float(p0[j, r]) for j in range(c)), act) for r in range(rank)]
    return [sum(h[r] * float(p1[r, j]) for r in range(rank)) for j in range(c)]


def blend_by_hand(blend: int, x: float, u: float, a: float) -> float:
    if blend == ADDITIVE:
        return x + a * u
    if blend == MULTIPLICATIVE:
        return x * (1.0 + a * math.tanh(u))
    assert blend == LINEAR
    return (1.0 - a) * x + a * u


@pytest.mark.parametrize("kind, act", [("lowrank", "relu"), ("lowrank", "gelu_tanh"), ("diagonal", "relu")])
@pytest.mark.parametrize("blend", [ADDITIVE, MULTIPLICATIVE, LINEAR], ids=["additive", "multiplicative", "linear"])
def test_blended_y_matches_the_formula_at_fractional_alpha(kind, act, blend):
    g = torch.Generator().manual_seed(11 + blend)
    n, c, rank, rows = len(BLENDED), (16 if kind == "lowrank" else 3), 4, 3
    alphas = [0.13, 0.37, 0.5, 0.71, 0.94]  # one per blended stage, all strictly inside (0, 1)
    if kind == "lowrank":
        p0 = torch.randn(n, c, rank, generator=g, dtype=torch.float64)
        p1 = torch.randn(n, rank, c, generator=g, dtype=torch.float64)
    else:
        p0 = torch.randn(n, c, generator=g, dtype=torch.float64)
        p1 = torch.randn(n, c, generator=g, dtype=torch.float64)
    x = torch.randn(rows, n * c, generator=g, dtype=torch.float64) * 2
    stage = torch.tensor([int(s) for s in BLENDED], dtype=torch.int8)
    blends = torch.full((n,), blend, dtype=torch.int8)
    alpha = torch.tensor(alphas, dtype=torch.float32)  # the op takes fp32 alphas

    expected = torch.empty_like(x)
    for t in range(rows):
        for i in range(n):
            xc = [float(v) for v in x[t, i * c : (i + 1) * c]]
            u = u_by_hand(kind, act, xc, p0[i], p1[i])
            for j in range(c):
                expected[t, i * c + j] = blend_by_hand(blend, xc[j], u[j], float(alpha[i]))
    assert not torch.allclose(expected, x)  # every seed's blueprint moved y

    y, _ = seeded_reference(x, stage, blends, alpha, p0, p1, None, kind=kind, act=act)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y_op, _ = seeded(x, stage, blends, alpha, p0, p1, None, kind=kind, act=act, backend="reference")
    torch.testing.assert_close(y_op, expected, rtol=1e-12, atol=1e-12)
