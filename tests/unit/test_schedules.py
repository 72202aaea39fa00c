"""Alpha schedules: trajectories of each schedule, rates set per interval, and no host sync in step_."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from morpho_dist.commands import tick_
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.schedules import HostSignals, ScheduleConfig, make_schedule
from morpho_dist.telemetry import HealthReport, SeedReport

STAGES = [Stage.GRAFTING, Stage.TRAINING, Stage.STABILIZATION, Stage.GRAFTING]


def make_layer() -> SeededLayer:
    layer = SeededLayer(16, 4, kind="diagonal", backend="reference", layer_key="fc")
    layer.stage.copy_(torch.tensor([int(s) for s in STAGES], dtype=torch.int8))
    layer.alpha.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    return layer


def report(benefits: dict[int, float], layer: SeededLayer) -> HealthReport:
    seeds = []
    for i, st in enumerate(layer.stages()):
        seeds.append(
            SeedReport(
                layer="fc",
                seed=i,
                stage=st,
                blend=0,
                alpha=float(layer.alpha[i]),
                steps_in_stage=0,
                count=10.0,
                mean=0.0,
                std=1.0,
                dead_frac=0.0,
                absmax=1.0,
                grad_rms=1.0,
                benefit=benefits.get(i, 0.0),
                delta_rms=0.1,
            )
        )
    return HealthReport(step=10, seeds=seeds, layers=["fc"])


def run(schedule, layer, steps):
    traj = []
    for _ in range(steps):
        schedule.step_(layer)
        tick_([layer])
        traj.append(layer.alpha.tolist())
    return traj


def test_fixed_ramp_linear_trajectory():
    sch = make_schedule(ScheduleConfig(name="fixed_ramp", ramp_steps=4))
    layer = make_layer()
    layer.alpha_rate[0] = sch.initial_rate()
    layer.alpha_rate[3] = sch.initial_rate()
    layer.alpha_rate[1] = 0.5  # not GRAFTING: ignored
    traj = run(sch, layer, 6)
    assert [round(t[0], 6) for t in traj] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [t[3] for t in traj] == [t[0] for t in traj]
    assert all(t[1] == 0.0 and t[2] == 1.0 for t in traj)


def test_fixed_ramp_cosine_trajectory_from_steps_in_stage():
    sch = make_schedule(SimpleNamespace(name="fixed_ramp", ramp_steps=5, shape="cosine"))
    layer = make_layer()
    layer.steps_in_stage[3] = 2  # entered GRAFTING two steps earlier
    traj = run(sch, layer, 6)
    cos = lambda k: 0.5 * (1 - math.cos(math.pi * min(k / 5, 1.0)))  # noqa: E731
    assert [t[0] for t in traj] == pytest.approx([cos(k) for k in range(1, 7)], abs=1e-6)
    assert [t[3] for t in traj] == pytest.approx([cos(k) for k in range(3, 9)], abs=1e-6)
    assert traj[4][0] == 1.0 and all(t[1] == 0.0 for t in traj)


def test_performance_linked_rates_scale_with_negative_benefit():
    sch = make_schedule(ScheduleConfig(name="performance_linked", ramp_steps=10, min_factor=0.0, max_factor=2.0))
    layer = make_layer()
    layer.alpha_rate[1] = 0.7  # TRAINING seed keeps its rate
    sch.on_interval(layer, report({0: -3.0, 3: -1.0}, layer), HostSignals())
    rates = layer.alpha_rate.tolist()
    assert rates[0] == pytest.approx(0.1 * 1.5)  # -(-3) / mean(|b|) = 1.5
    assert rates[3] == pytest.approx(0.1 * 0.5)
    assert rates[1] == pytest.approx(0.7) and rates[2] == 0.0
    sch.on_interval(layer, report({0: -10.0, 3: 2.0}, layer), HostSignals())
    assert layer.alpha_rate[0].item() == pytest.approx(0.1 * 10 / 6)
    assert layer.alpha_rate[3].item() == 0.0  # harmful seed paused (min_factor 0)
    run(sch, layer, 2)
    assert layer.alpha[0].item() == pytest.approx(2 * 0.1 * 10 / 6) and layer.alpha[3].item() == 0.0
    capped = make_schedule(ScheduleConfig(name="performance_linked", ramp_steps=10, max_factor=1.2))
    capped.on_interval(layer, report({0: -10.0, 3: 2.0}, layer), HostSignals())
    assert layer.alpha_rate[0].item() == pytest.approx(0.12)  # clamped at max_factor


def test_drift_controlled_pauses_while_drift_is_high():
    sch = make_schedule(ScheduleConfig(name="drift_controlled", ramp_steps=10, drift_threshold=0.05))
    layer = make_layer()
    rep = report({}, layer)
    sch.on_interval(layer, rep, HostSignals(weight_drift=0.2, grad_norm=1.0))
    assert layer.alpha_rate.tolist() == [0.0, 0.0, 0.0, 0.0]
    run(sch, layer, 3)
    assert layer.alpha[0].item() == 0.0
    sch.on_interval(layer, rep, HostSignals(weight_drift=0.01, grad_norm=1.0))
    assert layer.alpha_rate.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.1])
    run(sch, layer, 3)
    assert layer.alpha[0].item() == pytest.approx(0.3)


def test_grad_norm_gated_ramps_only_inside_band():
    sch = make_schedule(ScheduleConfig(name="grad_norm_gated", ramp_steps=4, grad_lo=0.5, grad_hi=2.0))
    layer = make_layer()
    rep = report({}, layer)
    for norm, expected in ((0.1, 0.0), (5.0, 0.0), (1.0, 0.25), (0.5, 0.25), (2.5, 0.0)):
        sch.on_interval(layer, rep, HostSignals(weight_drift=0.0, grad_norm=norm))
        assert layer.alpha_rate[0].item() == pytest.approx(expected), norm


def test_make_schedule_rejects_unknown_names_and_values():
    with pytest.raises(ValueError, match="fixed_ramp"):
        make_schedule(SimpleNamespace(name="exponential"))
    with pytest.raises(ValueError, match="shape"):
        make_schedule(ScheduleConfig(shape="square"))
    with pytest.raises(ValueError, match="ramp_steps"):
        make_schedule(ScheduleConfig(ramp_steps=0))
    with pytest.raises(ValueError, match="grad_lo"):
        make_schedule(ScheduleConfig(name="grad_norm_gated", grad_lo=3.0, grad_hi=1.0))
    assert make_schedule(None).name == "fixed_ramp"


@pytest.mark.parametrize(
    "name,shape",
    [
        ("fixed_ramp", "linear"),
        ("fixed_ramp", "cosine"),
        ("performance_linked", "linear"),
        ("drift_controlled", "linear"),
        ("grad_norm_gated", "linear"),
    ],
)
def test_step_makes_no_host_sync(monkeypatch, name, shape):
    sch = make_schedule(ScheduleConfig(name=name, shape=shape, ramp_steps=4))
    layer = make_layer()
    layer.alpha_rate.fill_(0.25)

    def boom(*args, **kwargs):
        raise AssertionError("host sync in step_")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    for _ in range(3):
        sch.step_(layer)
        tick_([layer])
    monkeypatch.undo()
    assert layer.alpha[0].item() > 0.0


def test_schedule_boundaries_and_defaults():
    """Each threshold at its boundary (DESIGN.md: drift pauses above the threshold, the band includes both
    ends), one-step ramps, and the documented defaults (drift_threshold 0.05, grad band [0, 10])."""
    layer = make_layer()
    rep = report({}, layer)
    drift = make_schedule(ScheduleConfig(name="drift_controlled", ramp_steps=10, drift_threshold=0.05))
    drift.on_interval(layer, rep, HostSignals(weight_drift=0.05, grad_norm=1.0))
    assert layer.alpha_rate[0].item() == pytest.approx(0.1)  # at the threshold: still ramps
    gated = make_schedule(ScheduleConfig(name="grad_norm_gated", ramp_steps=4, grad_lo=0.5, grad_hi=2.0))
    gated.on_interval(layer, rep, HostSignals(grad_norm=2.0))
    assert layer.alpha_rate[0].item() == pytest.approx(0.25)  # the band's upper end is inside
    assert make_schedule(ScheduleConfig(ramp_steps=1)).base_rate == 1.0
    defaults = ScheduleConfig()
    assert (defaults.drift_threshold, defaults.grad_lo, defaults.grad_hi) == (0.05, 0.0, 10.0)
    by_default = make_schedule(ScheduleConfig(name="drift_controlled"))
    by_default.on_interval(layer, rep, HostSignals(weight_drift=0.06))
    assert layer.alpha_rate[0].item() == 0.0
    banded = make_schedule(ScheduleConfig(name="grad_norm_gated"))
    banded.on_interval(layer, rep, HostSignals(grad_norm=9.5))
    assert layer.alpha_rate[0].item() > 0.0


def test_performance_linked_without_a_finite_benefit_ramps_at_the_base_rate():
    sch = make_schedule(ScheduleConfig(name="performance_linked", ramp_steps=10, min_factor=0.0, max_factor=3.0))
    layer = make_layer()
    sch.on_interval(layer, report({0: float("nan"), 3: 0.0}, layer), HostSignals())
    assert layer.alpha_rate[0].item() == pytest.approx(0.1) and layer.alpha_rate[3].item() == pytest.approx(0.1)
    sch.on_interval(layer, report({0: -0.2, 3: -0.6}, layer), HostSignals())  # mean |benefit| 0.4 < 1
    assert layer.alpha_rate[0].item() == pytest.approx(0.05)  # factor 0.2 / 0.4
    assert layer.alpha_rate[3].item() == pytest.approx(0.15)  # factor 0.6 / 0.4


def test_on_interval_ignores_seeds_of_other_shards():
    """A report's seeds outside this layer shard (global index below its offset) leave its rates alone."""
    layer = SeededLayer(16, 4, kind="diagonal", backend="reference", layer_key="fc", seed_offset=4)
    layer.stage.copy_(torch.tensor([int(s) for s in STAGES], dtype=torch.int8))
    sch = make_schedule(ScheduleConfig(name="performance_linked", ramp_steps=10, max_factor=3.0))
    rep = report({}, layer)
    for s in rep.seeds:
        s.seed += 4  # this shard's seeds are global 4..7
    rep.seeds.append(replace(rep.seeds[0], seed=3, benefit=-9.0))  # global 3: local index -1, another shard's
    rep.seeds[0].benefit, rep.seeds[3].benefit = -1.0, -1.0
    sch.on_interval(layer, rep, HostSignals())
    rates = layer.alpha_rate.tolist()
    scale = (1.0 + 1.0 + 9.0) / 3  # mean |benefit| of the GRAFTING seeds in the report (4, 7 and global 3)
    assert rates[0] == pytest.approx(0.1 / scale)  # global seed 4 is local 0
    assert rates[3] == pytest.approx(rates[0])  # seed 7 (local 3) not overwritten by global seed 3


def test_host_signals_default_to_zero():
    assert (HostSignals().weight_drift, HostSignals().grad_norm) == (0.0, 0.0)


def test_step_clamps_alpha_to_the_unit_interval():
    sch = make_schedule(ScheduleConfig(ramp_steps=10))
    layer = make_layer()
    layer.alpha_rate.copy_(torch.tensor([-0.3, 0.0, 0.0, 0.7]))
    layer.alpha.copy_(torch.tensor([0.1, 0.0, 1.0, 0.5]))
    sch.step_(layer)
    assert layer.alpha.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_documented_defaults_ramp_in_50_steps_and_cap_the_rate_at_twice_the_base():
    """README: ramp_steps defaults to 50; performance_linked clamps a seed's rate factor to [0, 2] by default."""
    assert make_schedule(None).base_rate == pytest.approx(1 / 50)
    sch = make_schedule(ScheduleConfig(name="performance_linked"))
    layer = make_layer()
    layer.stage.fill_(int(Stage.GRAFTING))
    sch.on_interval(layer, report({0: -9.0, 1: -1.0, 2: -1.0, 3: -1.0}, layer), HostSignals())  # mean |b| 3
    assert layer.alpha_rate.tolist() == pytest.approx([2.0 / 50, 1 / 150, 1 / 150, 1 / 150])  # factor 3 capped at 2
    sch.on_interval(layer, report({0: -7.0, 1: -1.0}, layer), HostSignals())  # mean |b| 2 (with two 0s): 3.5 -> 2
    assert layer.alpha_rate[0].item() == pytest.approx(2.0 / 50)
    sch.on_interval(layer, report({0: -3.5, 1: -0.5, 2: -2.0, 3: -2.0}, layer), HostSignals())  # mean |b| 2
    assert layer.alpha_rate.tolist() == pytest.approx([1.75 / 50, 0.25 / 50, 1 / 50, 1 / 50])  # under the cap


def test_factor_and_band_bounds_may_be_equal_but_not_crossed_or_negative():
    """min_factor == max_factor (a fixed factor) and grad_lo == grad_hi (a one-point band) are allowed."""
    fixed = make_schedule(ScheduleConfig(name="performance_linked", ramp_steps=10, min_factor=1.0, max_factor=1.0))
    layer = make_layer()
    fixed.on_interval(layer, report({0: -5.0, 3: 1.0}, layer), HostSignals())
    assert layer.alpha_rate[0].item() == pytest.approx(0.1) and layer.alpha_rate[3].item() == pytest.approx(0.1)
    point = make_schedule(ScheduleConfig(name="grad_norm_gated", ramp_steps=4, grad_lo=1.0, grad_hi=1.0))
    point.on_interval(layer, report({}, layer), HostSignals(grad_norm=1.0))
    assert layer.alpha_rate[0].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="min_factor"):
        make_schedule(ScheduleConfig(name="performance_linked", min_factor=-0.5, max_factor=1.0))
    with pytest.raises(ValueError, match="min_factor"):
        make_schedule(ScheduleConfig(name="performance_linked", min_factor=1.5, max_factor=1.0))


def test_on_interval_ignores_seeds_of_the_next_shard():
    """A report seed whose global index is just past this shard (offset + num_seeds) is another shard's."""
    layer = make_layer()
    sch = make_schedule(ScheduleConfig(name="drift_controlled", ramp_steps=10))
    rep = report({}, layer)
    rep.seeds.append(replace(rep.seeds[0], seed=4))  # the first seed of the next shard
    sch.on_interval(layer, rep, HostSignals())
    assert layer.alpha_rate.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.1])


def test_host_signals_are_immutable():
    """One HostSignals is shared by every layer's schedule in an interval; none may change it for the others."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        HostSignals().grad_norm = 1.0
