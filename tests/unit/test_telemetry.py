"""Health report math against hand computation, table layout, buffer reset, no collectives in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from morpho_dist.kernels.layout import NUM_FIELDS
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.telemetry import build_report, stage_counts


def diag_layer(hidden=8, seeds=2, **kw) -> SeededLayer:
    return SeededLayer(hidden, seeds, kind="diagonal", backend="reference", **kw)


@pytest.fixture
def no_collectives(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("collective issued in a single process")

    monkeypatch.setattr(dist, "all_reduce", boom)


def test_report_math_by_hand(no_collectives):
    layer = diag_layer(layer_key="fc")
    # count, sum, sumsq, dead, absmax, grad_sq, benefit, delta_sq
    layer.telemetry[0] = torch.tensor([4.0, 2.0, 3.0, 1.0, 1.5, 8.0, -0.5, 0.16])
    layer.stage[0], layer.alpha[0], layer.steps_in_stage[0] = int(Stage.GRAFTING), 0.25, 7
    layer.alpha_rate[0], layer.embargo_until[0], layer.generation[0] = 0.125, 0, 3
    rep = build_report({"fc": layer}, step=40)
    s = rep.get("fc", 0)
    assert (s.stage, s.alpha, s.steps_in_stage, s.alpha_rate, s.generation) == (Stage.GRAFTING, 0.25, 7, 0.125, 3)
    assert s.count == 4.0
    assert s.mean == pytest.approx(0.5)
    assert s.std == pytest.approx(math.sqrt(3 / 4 - 0.25))
    assert s.dead_frac == pytest.approx(0.25)
    assert s.absmax == pytest.approx(1.5)
    assert s.grad_rms == pytest.approx(math.sqrt(2.0))
    assert s.benefit == pytest.approx(-0.5)
    assert s.delta_rms == pytest.approx(0.2)
    assert s.rms == pytest.approx(math.sqrt(0.75))
    z = rep.get("fc", 1)  # never observed: zeros, not NaN
    assert (z.count, z.mean, z.std, z.dead_frac, z.grad_rms, z.delta_rms) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert z.stage == Stage.DORMANT and z.germinated_at == -1
    assert torch.count_nonzero(layer.telemetry) == 0  # buffers reset


def test_std_never_negative_under_rounding(no_collectives):
    layer = diag_layer(layer_key="fc")
    layer.telemetry[0, :3] = torch.tensor([3.0, 3.0, 2.9999])  # sumsq/count < mean^2 by rounding
    assert build_report({"fc": layer}, 0).get("fc", 0).std == 0.0


def test_report_matches_a_real_forward_backward():
    torch.manual_seed(0)
    layer = diag_layer(hidden=8, seeds=2, layer_key="fc", dead_eps=0.1)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    rep = build_report({"fc": layer}, step=1)
    for n in range(2):
        xc = x.detach()[:, 4 * n : 4 * n + 4]
        dy = 2 * xc  # y = x for DORMANT seeds
        s = rep.get("fc", n)
        assert s.count == 20
        assert s.mean == pytest.approx(xc.mean().item(), abs=1e-6)
        assert s.std == pytest.approx(xc.std(unbiased=False).item(), abs=1e-5)
        assert s.dead_frac == pytest.approx((xc.abs() <= 0.1).float().mean().item())
        assert s.absmax == pytest.approx(xc.abs().max().item())
        assert s.grad_rms == pytest.approx(dy.pow(2).mean().sqrt().item(), rel=1e-5)
        assert s.benefit == 0.0 and s.delta_rms == 0.0


def test_global_table_places_layers_and_offsets(no_collectives):
    wide = diag_layer(hidden=8, seeds=4, layer_key="a")
    narrow = diag_layer(hidden=8, seeds=2, layer_key="b")
    shard = diag_layer(hidden=4, seeds=2, layer_key="c", seed_offset=2)  # global seeds 2..3 of 4
    shard.num_global_seeds = 4
    for k, layer in enumerate((wide, narrow, shard)):
        layer.telemetry[:, 0] = torch.arange(layer.num_seeds) + 1.0 + 10 * k
        layer.telemetry[:, 4] = 0.5 + k
    rep = build_report({"a": wide, "b": narrow, "c": shard}, step=5)
    assert rep.table.shape == (3, 4, NUM_FIELDS)
    assert rep.table[0, :, 0].tolist() == [1, 2, 3, 4]
    assert rep.table[1, :, 0].tolist() == [11, 12, 0, 0]  # zero padding
    assert rep.table[2, :, 0].tolist() == [0, 0, 21, 22]  # placed at the global seed range
    assert rep.table[2, :, 4].tolist() == [0, 0, 2.5, 2.5]
    assert [(s.layer, s.seed) for s in rep.seeds] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 0),
        ("b", 1),
        ("c", 2),
        ("c", 3),
    ]
    assert rep.layers == ["a", "b", "c"]


def test_stage_counts_and_records(no_collectives):
    layer = diag_layer(hidden=8, seeds=4, layer_key="fc")
    layer.stage.copy_(torch.tensor([0, 2, 2, 7], dtype=torch.int8))
    layer.telemetry[:, 0] = 1.0
    rep = build_report({"fc": layer}, step=9)
    counts = stage_counts(rep)
    assert counts["DORMANT"] == 1 and counts["TRAINING"] == 2 and counts["FOSSILIZED"] == 1
    assert set(counts) == {s.name for s in Stage} and sum(counts.values()) == 4
    assert stage_counts(rep, layer="other")["TRAINING"] == 0
    rep.counterfactual[("fc", 3)] = (0.5, 0.7)
    recs = rep.records()
    assert len(recs) == 4 and recs[1]["stage"] == "TRAINING" and recs[1]["step"] == 9
    assert recs[3]["loss_at_alpha"] == 0.5 and recs[3]["loss_at_zero"] == 0.7
    assert "loss_at_alpha" not in recs[0]


def test_empty_layers_give_empty_report():
    rep = build_report({}, step=3)
    assert rep.seeds == [] and rep.step == 3
