"""reliability.SeedGuard on one seeded layer, without a training run (fast; the mutation script's tests for
reliability.py with test_divergence): which seeds a fault culls and with which bits, what the interval extras
hold, how interval_faults decodes them, and that a non-finite step applied to the weights (skip_nonfinite=false)
blames no seed."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from morpho_dist.commands import advance, germinate
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.reliability import FAULT_REASON, SeedGuard, host_fault, interval_loss

MESH = SimpleNamespace(dp=1)
EMBARGO = 7


class Resets:
    """Records the optimizer resets interval_faults asks for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def reset_seed(self, key: str, index: int) -> None:
        self.calls.append((key, index))


def _layer(stages: list[Stage]) -> SeededLayer:
    layer = SeededLayer(16 * len(stages), len(stages), kind="lowrank", rank=4, backend="reference", layer_key="fc")
    for i, stage in enumerate(stages):
        if stage == Stage.DORMANT:
            continue
        germinate(layer, i, 0)
        while Stage(int(layer.stage[i])) != stage:
            advance(layer, i, 0)
    layer.train()
    return layer


def _step(guard: SeedGuard, layer: SeededLayer, step: int, *, scale_loss: float = 1.0) -> torch.Tensor:
    """One forward/backward of the layer on a fixed input; returns the guard's ok flag."""
    guard.before_forward(step)
    x = torch.linspace(-1, 1, 3 * layer.hidden).view(3, layer.hidden)
    loss = (layer(x) ** 2).mean() * scale_loss
    for p in (layer.bank.p0, layer.bank.p1):
        p.grad = None
    loss.backward()
    return guard.after_backward(loss, step)


def test_a_non_finite_bank_culls_that_seed_before_it_runs():
    layer = _layer([Stage.TRAINING, Stage.GRAFTING, Stage.DORMANT])
    guard = SeedGuard({"fc": layer}, EMBARGO, torch.device("cpu"))
    with torch.no_grad():
        layer.bank.p1[1, 0, 0] = float("nan")
    ok = _step(guard, layer, 5)
    assert bool(ok)
    assert layer.stages() == [Stage.TRAINING, Stage.CULLED, Stage.DORMANT]
    assert float(layer.alpha[1]) == 0.0 and int(layer.embargo_until[1]) == 5 + EMBARGO
    assert not layer.bank.p0[1].any() and not layer.bank.p1[1].any()  # inert until its reset
    assert int(guard.culled["fc"][1]) == 1 * 16 + int(Stage.GRAFTING)  # FAULT_BANK, from GRAFTING
    assert int(guard.culled["fc"][0]) == 0 and int(guard.culled["fc"][2]) == 0


def test_interval_extras_and_faults_round_trip():
    layer = _layer([Stage.TRAINING, Stage.GRAFTING])
    guard = SeedGuard({"fc": layer}, EMBARGO, torch.device("cpu"))
    with torch.no_grad():
        layer.bank.p0[0].fill_(float("inf"))
    _step(guard, layer, 1)
    _step(guard, layer, 2)
    values = guard.interval_extras(MESH).tolist()
    assert values[1:4] == [2.0, 2.0, 0.0]  # finite steps, steps, applied non-finite steps
    mean, ok_steps, steps = interval_loss(values)
    assert ok_steps == 2 and steps == 2 and mean == values[0] / 2
    assert values[4:] == [16.0 + int(Stage.TRAINING), 0.0]
    resets = Resets()
    decisions = guard.interval_faults(values, None, resets, MESH)
    assert [(d.layer, d.seed, d.command, d.target, d.source) for d in decisions] == [
        ("fc", 0, "cull", Stage.CULLED, Stage.TRAINING)
    ]
    assert decisions[0].reason == FAULT_REASON and decisions[0].signals == {"bank": 1.0, "output": 0.0, "gradient": 0.0}
    assert decisions[0].value == float(EMBARGO) and resets.calls == [("fc", 0)]
    assert torch.isfinite(layer.bank.p0[0]).all()  # reset to the fresh init of its generation
    assert guard.steps == 0 and float(guard.ok_steps) == 0 and not guard.culled["fc"].any()  # accumulators reset


def test_a_non_finite_loss_skips_blame_and_counts_as_not_ok():
    layer = _layer([Stage.TRAINING, Stage.GRAFTING])
    guard = SeedGuard({"fc": layer}, EMBARGO, torch.device("cpu"))
    ok = _step(guard, layer, 1, scale_loss=float("nan"))
    assert not bool(ok)
    assert layer.stages() == [Stage.TRAINING, Stage.GRAFTING]  # every gradient is NaN: no seed is blamed
    values = guard.interval_extras(MESH).tolist()
    assert values[1:4] == [0.0, 1.0, 0.0] and not host_fault(values)


def test_skip_nonfinite_false_is_a_host_fault_that_blames_no_seed():
    layer = _layer([Stage.TRAINING, Stage.GRAFTING])
    guard = SeedGuard({"fc": layer}, EMBARGO, torch.device("cpu"), skip_nonfinite=False)
    _step(guard, layer, 1, scale_loss=float("nan"))
    _step(guard, layer, 2)
    with torch.no_grad():  # what the applied NaN step did to the banks: the next forward culls them
        layer.bank.p0.fill_(float("nan"))
    _step(guard, layer, 3)
    values = guard.interval_extras(MESH).tolist()
    assert values[1:4] == [2.0, 3.0, 1.0] and host_fault(values)
    resets = Resets()
    assert guard.interval_faults(values, None, resets, MESH) == [] and resets.calls == []
    assert guard.steps == 0 and float(guard.applied_bad) == 0.0


def test_output_and_gradient_faults_cull_with_their_bits_and_restore_the_telemetry():
    """Two layers (the extras' table has one row per layer): on the second, seed 1's blueprint output went
    non-finite this step (its delta_sq, with a finite input) and seed 0's bank gradient did. Both are culled
    from where they were (alpha, rate and dwell reset), their telemetry rows are put back as they were before
    the forward, and interval_faults decodes layer, seed, bits and source stage (from the extras summed over two
    data-parallel replicas)."""
    from morpho_dist.kernels.layout import F_DELTA_SQ

    first = _layer([Stage.TRAINING, Stage.DORMANT, Stage.DORMANT])
    layer = _layer([Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING])
    layer.layer_key = "g"
    with torch.no_grad():
        layer.alpha[1:] = torch.tensor([0.5, 1.0])
        layer.alpha_rate[1] = 0.1
        layer.steps_in_stage[:] = 7
    guard = SeedGuard({"fc": first, "g": layer}, EMBARGO, torch.device("cpu"))
    guard.before_forward(3)
    before = layer.telemetry.clone()
    x = torch.linspace(-1, 1, 3 * layer.hidden).view(3, layer.hidden)
    loss = (layer(x) ** 2).mean() + (first(torch.ones(3, first.hidden)) ** 2).mean()
    loss.backward()
    with torch.no_grad():
        layer.telemetry[1, F_DELTA_SQ] = float("inf")
        layer.bank.p1.grad[0, 0, 0] = float("nan")
    assert bool(guard.after_backward(loss, 3))
    assert layer.stages() == [Stage.CULLED, Stage.CULLED, Stage.FINE_TUNING]
    assert layer.alpha.tolist() == [0.0, 0.0, 1.0] and float(layer.alpha_rate[1]) == 0.0
    assert layer.steps_in_stage.tolist() == [0, 0, 7]
    assert torch.equal(layer.telemetry[:2], before[:2]) and not torch.equal(layer.telemetry[2], before[2])
    assert guard.culled["g"].tolist() == [4 * 16 + int(Stage.TRAINING), 2 * 16 + int(Stage.GRAFTING), 0]
    values = guard.interval_extras(MESH).tolist()
    assert len(values) == 4 + 2 * 3 and values[4:7] == [0.0, 0.0, 0.0]
    replicas = SimpleNamespace(dp=2)  # two data-parallel replicas of these seeds: the SUM all-reduce doubles
    decisions = guard.interval_faults([2 * v for v in values], None, Resets(), replicas)
    assert [(d.layer, d.seed, d.source) for d in decisions] == [("g", 0, Stage.TRAINING), ("g", 1, Stage.GRAFTING)]
    assert [d.signals for d in decisions] == [
        {"bank": 0.0, "output": 0.0, "gradient": 1.0},
        {"bank": 0.0, "output": 1.0, "gradient": 0.0},
    ]


def test_host_gradients_decide_ok_and_a_non_finite_loss_adds_nothing():
    layer = _layer([Stage.TRAINING])
    guard = SeedGuard({"fc": layer}, EMBARGO, torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2))  # no gradient: not looked at
    guard.before_forward(1)
    w.grad = torch.ones(2)
    assert bool(guard.after_backward(torch.tensor(2.0), 1, [("w", w), ("frozen", frozen)]))
    guard.before_forward(2)
    tel = layer.telemetry.clone()
    layer(torch.ones(2, layer.hidden))  # adds this step's forward telemetry
    assert not torch.equal(layer.telemetry, tel)
    w.grad = torch.tensor([1.0, float("inf")])
    assert not bool(guard.after_backward(torch.tensor(3.0), 2, [("w", w)]))
    assert torch.equal(layer.telemetry, tel)  # a step that is not ok keeps none of its telemetry
    guard.before_forward(3)
    assert not bool(guard.after_backward(torch.tensor(float("nan")), 3))
    values = guard.interval_extras(MESH).tolist()
    assert values[:4] == [2.0, 1.0, 3.0, 0.0]  # only the first step's loss is summed
    assert interval_loss([3.0, 1.0, 2.0, 0.0]) == (3.0, 1.0, 2.0)  # one finite step is a mean


def test_no_layers_no_faults():
    guard = SeedGuard({}, EMBARGO, torch.device("cpu"))
    values = guard.interval_extras(MESH).tolist()
    assert values == [0.0, 0.0, 0.0, 0.0] and guard.interval_faults(values, None, Resets(), MESH) == []
