"""The heuristic controller on synthetic reports: deterministic decisions, the full path to FOSSILIZED,
refusals, checkpointable state and a stable checksum."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from morpho_dist.commands import tick_
from morpho_dist.controller import (
    Controller,
    ControllerConfig,
    Decision,
    apply_decisions,
    decisions_checksum,
    measure_counterfactuals,
    verify_same_decisions,
)
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import IllegalTransition, Stage
from morpho_dist.schedules import HostSignals, ScheduleConfig, make_schedule
from morpho_dist.telemetry import HealthReport, SeedReport, build_report


def sr(seed=0, stage=Stage.DORMANT, layer="fc", **kw) -> SeedReport:
    base = dict(
        layer=layer,
        seed=seed,
        stage=stage,
        blend=0,
        alpha=0.0,
        steps_in_stage=0,
        count=100.0,
        mean=0.0,
        std=1.0,
        dead_frac=0.0,
        absmax=3.0,
        grad_rms=1.0,
        benefit=0.0,
        delta_rms=0.0,
        rms=1.0,
    )
    base.update(kw)
    return SeedReport(**base)


def rep(*seeds, step=100, layers=("fc",)) -> HealthReport:
    return HealthReport(step=step, seeds=list(seeds), layers=list(layers))


def cmds(decisions):
    return [(d.layer, d.seed, d.command, d.target) for d in decisions]


def test_germinates_highest_capacity_within_budget():
    cfg = ControllerConfig(max_active=2, germinate_per_interval=2)
    seeds = [sr(0, grad_rms=1.0), sr(1, grad_rms=3.0), sr(2, grad_rms=2.0), sr(3, grad_rms=0.5)]
    assert cmds(Controller(cfg).decide(rep(*seeds), 10)) == [
        ("fc", 1, "germinate", Stage.GERMINATED),
        ("fc", 2, "germinate", Stage.GERMINATED),
    ]
    busy = [*seeds[:3], sr(3, Stage.TRAINING, steps_in_stage=1)]  # one active seed: budget 1
    d = Controller(cfg).decide(rep(*busy), 10)
    assert cmds(d) == [("fc", 1, "germinate", Stage.GERMINATED)]
    assert d[0].signals["grad_rms"] == 3.0 and d[0].reason
    full = [sr(0), sr(1, Stage.GRAFTING, alpha=0.1), sr(2, Stage.FINE_TUNING)]
    assert Controller(cfg).decide(rep(*full), 10) == []
    assert Controller(replace(cfg, warmup_steps=50)).decide(rep(*seeds), 10) == []


def test_dead_fraction_makes_a_candidate():
    seeds = [sr(0, grad_rms=1.0), sr(1, grad_rms=0.1, dead_frac=0.95), sr(2, grad_rms=0.2), sr(3, count=0.0)]
    d = Controller(ControllerConfig(max_active=1)).decide(rep(*seeds), 10)
    assert cmds(d) == [("fc", 1, "germinate", Stage.GERMINATED)]  # score 0.1 + 0.95 > 1.0


def test_training_promotion_needs_patience_and_min_steps_and_culls_when_useless():
    ctl = Controller(ControllerConfig(patience_k=2, min_training_steps=20, max_training_steps=60, max_active=1))
    t = lambda b, steps: rep(sr(0, Stage.TRAINING, benefit=b, steps_in_stage=steps))  # noqa: E731
    assert ctl.decide(t(-1.0, 10), 10) == []
    assert ctl.decide(t(0.5, 20), 20) == []  # streak broken
    assert ctl.decide(t(-1.0, 30), 30) == []
    d = ctl.decide(t(-1.0, 40), 40)
    assert cmds(d) == [("fc", 0, "advance", Stage.GRAFTING)] and d[0].signals["streak"] == 2
    ctl2 = Controller(ControllerConfig(patience_k=2, max_training_steps=60, embargo_steps=33, max_active=1))
    d = ctl2.decide(t(0.1, 60), 60)
    assert cmds(d) == [("fc", 0, "cull", Stage.CULLED)] and d[0].value == 33.0


def test_benefit_threshold_off_its_default():
    """useful means benefit < -benefit_threshold (strictly): with threshold 0.5, benefit -0.3 and -0.5 are not
    useful, -0.7 is."""
    cfg = ControllerConfig(patience_k=1, min_training_steps=0, benefit_threshold=0.5, max_active=1)
    t = lambda b: rep(sr(0, Stage.TRAINING, benefit=b, steps_in_stage=30))  # noqa: E731
    assert Controller(cfg).decide(t(-0.3), 10) == []
    assert Controller(cfg).decide(t(-0.5), 10) == []
    assert cmds(Controller(cfg).decide(t(-0.7), 10)) == [("fc", 0, "advance", Stage.GRAFTING)]
    assert cmds(Controller(replace(cfg, benefit_threshold=0.0)).decide(t(-0.3), 10))[0][2] == "advance"


def test_alpha_done_and_fossilize_threshold_off_their_defaults():
    cfg = ControllerConfig(max_active=0, alpha_done=0.8, fossilize_threshold=0.3, evaluate_threshold=0.0)
    ctl = Controller(cfg)
    assert ctl.decide(rep(sr(0, Stage.GRAFTING, alpha=0.79)), 1) == []
    assert cmds(ctl.decide(rep(sr(0, Stage.GRAFTING, alpha=0.8)), 1))[0][3] == Stage.STABILIZATION
    ft = rep(sr(0, Stage.FINE_TUNING, steps_in_stage=10**6))
    ft.counterfactual[("fc", 0)] = (1.0, 1.25)  # improvement 0.25 <= 0.3: culled, although > evaluate_threshold
    assert cmds(ctl.decide(ft, 1))[0][2] == "cull"
    ft.counterfactual[("fc", 0)] = (1.0, 1.35)
    assert cmds(ctl.decide(ft, 1))[0][3] == Stage.FOSSILIZED
    ev = rep(sr(0, Stage.EVALUATING, alpha=1.0))
    ev.counterfactual[("fc", 0)] = (1.0, 1.25)  # the evaluate threshold (0) applies in EVALUATING
    assert cmds(ctl.decide(ev, 1))[0][3] == Stage.FINE_TUNING


def test_dead_frac_threshold_off_its_default():
    # the grad cut is the largest grad_rms (quantile 1): seed 0 qualifies by it, seed 1 only by its dead fraction
    # (then it ranks first: score 0.1 / 0.3 + 0.8 > 0.3 / 0.3)
    seeds = [sr(0, grad_rms=0.3), sr(1, grad_rms=0.1, dead_frac=0.8), sr(2, grad_rms=0.2)]
    cfg = ControllerConfig(max_active=1, germinate_grad_quantile=1.0)
    assert Controller(replace(cfg, dead_frac_threshold=0.7)).decide(rep(*seeds), 10)[0].seed == 1
    assert Controller(replace(cfg, dead_frac_threshold=0.9)).decide(rep(*seeds), 10)[0].seed == 0


def test_linear_seed_promotes_on_reconstruction_error():
    ctl = Controller(ControllerConfig(patience_k=1, min_training_steps=0, rec_rel_threshold=0.2, max_active=1))
    lin = lambda err: rep(sr(0, Stage.TRAINING, blend=2, delta_rms=err, rms=2.0, benefit=5.0))  # noqa: E731
    assert ctl.decide(lin(0.6), 10) == []  # 0.3 relative
    d = ctl.decide(lin(0.2), 20)  # 0.1 relative
    assert cmds(d) == [("fc", 0, "advance", Stage.GRAFTING)] and d[0].signals["rel_error"] == pytest.approx(0.1)


def test_grafting_stabilization_evaluating_fine_tuning_rules():
    cfg = ControllerConfig(stabilization_steps=10, fine_tuning_steps=20, max_active=0, evaluate_threshold=0.01)
    ctl = Controller(cfg)
    assert ctl.decide(rep(sr(0, Stage.GRAFTING, alpha=0.5)), 1) == []
    assert cmds(ctl.decide(rep(sr(0, Stage.GRAFTING, alpha=1.0)), 1))[0][3] == Stage.STABILIZATION
    assert ctl.decide(rep(sr(0, Stage.STABILIZATION, steps_in_stage=9)), 1) == []
    assert cmds(ctl.decide(rep(sr(0, Stage.STABILIZATION, steps_in_stage=10)), 1))[0][3] == Stage.EVALUATING
    ev = rep(sr(0, Stage.EVALUATING, alpha=1.0))
    assert ctl.decide(ev, 1) == []  # no counterfactual yet: wait
    ev.counterfactual[("fc", 0)] = (1.0, 1.5)
    d = ctl.decide(ev, 1)
    assert cmds(d)[0][3] == Stage.FINE_TUNING and d[0].signals["improvement"] == pytest.approx(0.5)
    ev.counterfactual[("fc", 0)] = (1.0, 1.005)  # below the threshold
    assert cmds(ctl.decide(ev, 1))[0][2:] == ("cull", Stage.CULLED)
    ft = rep(sr(0, Stage.FINE_TUNING, steps_in_stage=5))
    ft.counterfactual[("fc", 0)] = (1.0, 2.0)
    assert ctl.decide(ft, 1) == []  # not fine-tuned long enough
    ft.seeds[0].steps_in_stage = 20
    assert cmds(ctl.decide(ft, 1))[0][3] == Stage.FOSSILIZED
    ft.counterfactual[("fc", 0)] = (1.0, 0.9)  # the seed now hurts
    assert cmds(ctl.decide(ft, 1))[0][2] == "cull"


def test_recycle_after_embargo_and_rollback_on_nan():
    ctl = Controller(ControllerConfig(max_active=0))
    assert ctl.decide(rep(sr(0, Stage.CULLED, embargo_until=50)), 49) == []
    assert cmds(ctl.decide(rep(sr(0, Stage.CULLED, embargo_until=50)), 50)) == [("fc", 0, "recycle", Stage.DORMANT)]
    assert cmds(ctl.decide(rep(sr(0, Stage.CANCELLED)), 1)) == [("fc", 0, "recycle", Stage.DORMANT)]
    d = ctl.decide(rep(sr(0, Stage.GRAFTING, benefit=math.nan)), 1)
    assert cmds(d) == [("fc", 0, "rollback", Stage.ROLLED_BACK)]
    assert ctl.decide(rep(sr(0, Stage.FOSSILIZED), sr(1, Stage.ROLLED_BACK)), 1) == []


def _sequence_of_reports():
    seeds = [sr(i, grad_rms=1.0 + (i * 7 % 5) / 10) for i in range(6)]
    seeds += [sr(0, Stage.TRAINING, layer="g", benefit=-0.2, steps_in_stage=40)]
    return [rep(*seeds, step=s, layers=("fc", "g")) for s in (10, 20, 30)]


def test_decisions_are_deterministic_and_state_round_trips():
    a, b = Controller(), Controller()
    for r in _sequence_of_reports():
        assert [d.to_event(r.step) for d in a.decide(r, r.step)] == [d.to_event(r.step) for d in b.decide(r, r.step)]
    state = json.loads(json.dumps(a.state_dict()))  # plain Python types
    c = Controller()
    c.load_state_dict(state)
    r = _sequence_of_reports()[0]
    assert cmds(c.decide(r, 40)) == cmds(a.decide(r, 40))
    assert c.state_dict() == a.state_dict()


def test_decision_event_fields():
    d = Decision("fc", 3, "advance", Stage.GRAFTING, None, "useful", {"benefit": -1.0}, source=Stage.TRAINING)
    ev = d.to_event(70)
    assert ev == {
        "step": 70,
        "layer": "fc",
        "seed": 3,
        "command": "advance",
        "from": "TRAINING",
        "to": "GRAFTING",
        "value": None,
        "reason": "useful",
        "signals": {"benefit": -1.0},
    }


def _layer() -> SeededLayer:
    return SeededLayer(64, 4, kind="diagonal", backend="reference", layer_key="fc")


def test_illegal_decision_refused_and_batch_changes_nothing():
    layer = _layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    good = Decision("fc", 0, "germinate", Stage.GERMINATED, None, "x", {})
    bad = Decision("fc", 1, "advance", Stage.GRAFTING, None, "x", {})  # seed 1 is DORMANT
    with pytest.raises(IllegalTransition, match=r"seed 1.*advance.*DORMANT"):
        apply_decisions({"fc": layer}, [good, bad], step=5, schedule=None)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="unknown layer"):
        apply_decisions({"fc": layer}, [replace(good, layer="nope")], step=5, schedule=None)


def test_full_path_to_fossilized_driven_by_reports():
    """Real layer + schedule; synthetic telemetry each interval; counterfactual from a fake val loss."""
    cfg = ControllerConfig(interval=5, max_active=1, min_training_steps=10, stabilization_steps=5, fine_tuning_steps=5)
    ctl, sch, layer = Controller(cfg), make_schedule(ScheduleConfig(ramp_steps=10)), _layer()
    layers = {"fc": layer}
    path = []
    for step in range(1, 201):
        sch.step_(layer)
        tick_(layers)
        with torch.no_grad():  # synthetic telemetry: seed 2 has the largest gradient, grafting helps
            layer.telemetry[:, 0] += 16.0
            layer.telemetry[:, 5] += torch.tensor([1.0, 1.0, 9.0, 1.0])
            layer.telemetry[:, 6] += torch.where(layer.stage > 1, -1.0, 0.0)
        if step % cfg.interval:
            continue
        r = build_report(layers, step)
        measure_counterfactuals(layers, r, lambda: 1.0 - 0.2 * float(layer.alpha[2]), controller=ctl)
        ds = ctl.decide(r, step)
        apply_decisions(layers, ds, step, sch)
        for l in layers.values():
            sch.on_interval(l, r, HostSignals(0.0, 1.0))
        path += [(d.seed, d.target) for d in ds]
        if layer.stages()[2] == Stage.FOSSILIZED:
            break
    assert [t for s, t in path if s == 2] == [
        Stage.GERMINATED,
        Stage.TRAINING,
        Stage.GRAFTING,
        Stage.STABILIZATION,
        Stage.EVALUATING,
        Stage.FINE_TUNING,
        Stage.FOSSILIZED,
    ]
    others = [(s, t) for s, t in path if s != 2]  # budget of 1 active seed: the next one germinates at the end
    assert path[-1] == others[0] and len(others) == 1 and others[0][1] == Stage.GERMINATED
    assert float(layer.alpha[2]) == 1.0 and layer.stages().count(Stage.DORMANT) == 2


def test_measure_counterfactuals_zeroes_one_alpha_at_a_time_and_restores():
    layer = _layer()
    layer.stage.copy_(torch.tensor([5, 6, 3, 5], dtype=torch.int8))
    layer.alpha.copy_(torch.tensor([1.0, 0.9, 0.5, 0.8]))
    seen = []

    def evaluate():
        seen.append(layer.alpha.tolist())
        return float(layer.alpha.sum())

    r = build_report({"fc": layer}, step=1)
    measure_counterfactuals({"fc": layer}, r, evaluate)
    want = [[1, 0.9, 0.5, 0.8], [0, 0.9, 0.5, 0.8], [1, 0, 0.5, 0.8], [1, 0.9, 0.5, 0]]
    assert torch.allclose(torch.tensor(seen), torch.tensor(want))
    assert layer.alpha.tolist() == pytest.approx([1.0, 0.9, 0.5, 0.8])
    assert set(r.counterfactual) == {("fc", 0), ("fc", 1), ("fc", 3)}
    assert r.counterfactual[("fc", 1)] == pytest.approx((3.2, 2.3))
    only_ready = []
    ctl = Controller(ControllerConfig(fine_tuning_steps=10))  # FINE_TUNING seed 1 is not ready yet
    measure_counterfactuals(
        {"fc": layer}, build_report({"fc": layer}, 2), lambda: only_ready.append(1) or 0.0, controller=ctl
    )
    assert len(only_ready) == 3  # base + seeds 0 and 3


CHECKSUM_SCRIPT = """
import torch
from morpho_dist.controller import Decision, decisions_checksum
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
layer = SeededLayer(64, 4, kind="diagonal", backend="reference", layer_key="fc")
layer.stage[1] = 3; layer.alpha_rate[1] = 0.1
ds = [Decision("fc", 1, "advance", Stage.GRAFTING, None, "useful", {"benefit": -0.25, "streak": 2})]
print(decisions_checksum(ds, {"fc": layer}))
"""


def test_checksum_stable_across_processes_and_sensitive():
    exec_globals: dict = {}
    exec(CHECKSUM_SCRIPT.replace("print(", "result = ("), exec_globals)
    here = exec_globals["result"]
    out = subprocess.run([sys.executable, "-c", CHECKSUM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == here
    ds, layer = exec_globals["ds"], exec_globals["layer"]
    assert 0 <= here < 2**62
    assert decisions_checksum([replace(ds[0], signals={"benefit": -0.2500001, "streak": 2})], {"fc": layer}) != here
    assert decisions_checksum([], {"fc": layer}) != here
    layer.stage[2] = 1  # post-state is covered
    assert decisions_checksum(ds, {"fc": layer}) != here
    verify_same_decisions(here, step=3)  # single process: nothing to compare, no error
