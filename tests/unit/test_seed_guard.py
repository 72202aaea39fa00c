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
