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


def test_config_refusals_and_the_interval_count():
    for bad in ({"max_active": -1}, {"interval": 0}, {"patience_k": 0}):
        with pytest.raises(ValueError, match="interval >= 1, max_active >= 0, patience_k >= 1"):
            Controller(ControllerConfig(**bad))
    from types import SimpleNamespace

    partial = Controller(SimpleNamespace(max_active=0, interval=None))  # missing or None keys take the defaults
    assert (partial.cfg.max_active, partial.cfg.interval, partial.cfg.patience_k) == (0, 10, 2)
    Controller(ControllerConfig(interval=1, max_active=0, patience_k=1))  # each at its lowest allowed value
    ctl = Controller(ControllerConfig(max_active=0))
    assert ctl.intervals == 0
    ctl.decide(rep(sr(0)), 10)
    ctl.decide(rep(sr(0)), 20)
    assert ctl.state_dict()["intervals"] == 2
    ctl.load_state_dict({"streaks": {"fc:0": 1}})  # a state without the count (an older checkpoint) restarts it
    assert (ctl.intervals, ctl.streaks) == (0, {"fc:0": 1})


def test_germination_pool_and_capacity_score():
    """The pool is the DORMANT seeds with data this interval (count > 0); score = grad_rms / max grad_rms +
    dead_frac (a zero max grad leaves grad_rms as is)."""
    cfg = ControllerConfig(max_active=1, germinate_grad_quantile=0.0, dead_frac_threshold=0.4)
    no_data = [sr(0, grad_rms=5.0, count=0.0), sr(1, grad_rms=1.0, count=1.0)]
    assert [d.seed for d in Controller(cfg).decide(rep(*no_data), 10)] == [1]
    # normalised grad: seed 0 scores 0.2 / 0.2 = 1.0, seed 1 0.1 / 0.2 + 0.4 = 0.9 (unnormalised, 0.2 < 0.5)
    d = Controller(cfg).decide(rep(sr(0, grad_rms=0.2), sr(1, grad_rms=0.1, dead_frac=0.4), sr(2, grad_rms=0.05)), 10)
    assert [x.seed for x in d] == [0] and d[0].signals["score"] == pytest.approx(1.0)
    d = Controller(cfg).decide(rep(sr(0, grad_rms=0.0), sr(1, grad_rms=0.0, dead_frac=0.6)), 10)
    assert [x.seed for x in d] == [1] and d[0].signals["score"] == pytest.approx(0.6)
    d = Controller(cfg).decide(rep(sr(0, grad_rms=0.0), sr(1, grad_rms=0.5)), 10)  # max 0.5 although the min is 0
    assert [x.seed for x in d] == [1] and d[0].signals["score"] == pytest.approx(1.0)
    at_threshold = replace(cfg, germinate_grad_quantile=1.0, germinate_per_interval=2, max_active=2)
    seeds = [sr(0, grad_rms=1.0), sr(1, grad_rms=0.2, dead_frac=0.4), sr(2, grad_rms=0.3)]
    d = Controller(at_threshold).decide(rep(*seeds), 10)
    assert [x.seed for x in d] == [0, 1]  # dead_frac 0.4 reaches the threshold 0.4: a candidate (score 0.6)


def test_germinate_grad_quantile_is_clamped_to_the_unit_interval():
    seeds = [sr(0, grad_rms=1.0), sr(1, grad_rms=2.0), sr(2, grad_rms=3.0)]
    cfg = ControllerConfig(max_active=3, germinate_per_interval=3, dead_frac_threshold=2.0)
    below = Controller(replace(cfg, germinate_grad_quantile=-0.5)).decide(rep(*seeds), 10)
    assert sorted(d.seed for d in below) == [0, 1, 2]  # clamped to 0: the cut is the smallest grad_rms
    above = Controller(replace(cfg, germinate_grad_quantile=1.5)).decide(rep(*seeds), 10)
    assert [d.seed for d in above] == [2]  # clamped to 1: the cut is the largest


def test_apply_decisions_embargo_alpha_rate_and_alpha():
    """A cull sets the embargo its decision carries (none without a value); a recycle is refused before the
    embargo's step and allowed at it; entering GRAFTING sets the schedule's initial rate (the decision's value
    without a schedule); entering STABILIZATION snaps alpha to 1 and the rate to 0; other moves keep alpha."""
    layer = _layer()
    layer.stage.copy_(torch.tensor([int(Stage.TRAINING), int(Stage.TRAINING), int(Stage.GRAFTING), 5]))
    layer.alpha.copy_(torch.tensor([0.0, 0.0, 0.4, 0.7]))
    layers = {"fc": layer}
    cull = Decision("fc", 0, "cull", Stage.CULLED, 33.0, "x", {})
    apply_decisions(layers, [cull, replace(cull, seed=1, value=None)], step=10, schedule=None)
    assert layer.embargo_until[:2].tolist() == [43, 10]
    recycle = Decision("fc", 0, "recycle", Stage.DORMANT, None, "x", {})
    with pytest.raises(IllegalTransition, match="embargoed until step 43"):  # seed 1 (embargo passed) first
        apply_decisions(layers, [replace(recycle, seed=1), recycle], step=42, schedule=None)
    assert layer.stages()[:2] == [Stage.CULLED, Stage.CULLED]  # the batch changed nothing
    apply_decisions(layers, [recycle], step=43, schedule=None)
    assert layer.stages()[0] == Stage.DORMANT
    layer.stage[0] = layer.stage[1] = int(Stage.TRAINING)
    adv = Decision("fc", 0, "advance", Stage.GRAFTING, 0.3, "x", {})
    apply_decisions(layers, [adv, replace(adv, seed=1, value=None)], step=50, schedule=None)
    assert layer.alpha_rate[:2].tolist() == pytest.approx([0.3, 0.0])
    layer.stage[0] = int(Stage.TRAINING)
    apply_decisions(layers, [adv], step=51, schedule=make_schedule(ScheduleConfig(ramp_steps=8)))
    assert layer.alpha_rate[0].item() == pytest.approx(1 / 8)
    stab = Decision("fc", 2, "advance", Stage.STABILIZATION, None, "x", {})
    apply_decisions(layers, [stab, replace(stab, seed=3, target=Stage.FINE_TUNING)], step=52, schedule=None)
    assert layer.alpha[2:].tolist() == pytest.approx([1.0, 0.7]) and layer.alpha_rate[2].item() == 0.0
    assert layer.stages()[2:] == [Stage.STABILIZATION, Stage.FINE_TUNING]


def test_checksum_covers_the_report_tables_and_uses_62_bits():
    layer = _layer()
    r = build_report({"fc": layer}, step=5)
    base = decisions_checksum([], {"fc": layer}, r)
    r.table[0, 0] += 1.0
    assert decisions_checksum([], {"fc": layer}, r) != base
    r.table[0, 0] -= 1.0
    r.states[0, 0] += 1
    assert decisions_checksum([], {"fc": layer}, r) != base
    sums = [decisions_checksum([Decision("fc", 0, "cull", None, float(v), "x", {})], {}) for v in range(32)]
    assert all(0 <= s < 2**62 for s in sums) and len(set(sums)) == 32
    bits = 0
    for s in sums:
        bits |= s
    assert bits == 2**62 - 1  # every one of the 62 bits is used
    sharded = SeededLayer(64, 4, kind="diagonal", backend="reference", layer_key="fc", seed_offset=4)
    sharded.num_global_seeds = 8
    before = decisions_checksum([], {"fc": sharded})
    sharded.stage[0] = 1  # a seed shard's state is covered through the report, not here (it differs by rank)
    assert decisions_checksum([], {"fc": sharded}) == before
    first = SeededLayer(64, 4, kind="diagonal", backend="reference", layer_key="fc")  # the first shard of 8 seeds
    first.num_global_seeds = 8
    before = decisions_checksum([], {"fc": first})
    first.stage[0] = 1
    assert decisions_checksum([], {"fc": first}) == before


def test_verify_same_decisions_in_a_one_rank_group(tmp_path):
    """Under torch.distributed with one rank the ranks agree by construction: no error."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        verify_same_decisions(123456789, step=3)
    finally:
        dist.destroy_process_group()


def test_training_streak_boundaries():
    """The first useful interval makes a streak of 1; an interval without data (count 0) leaves the streak as it
    was, one with a single sample counts; a linear seed with rms 0 (or a tiny one) is judged by delta_rms / rms;
    GRAFTING culls at exactly max_grafting_steps; germination starts at exactly warmup_steps."""
    cfg = ControllerConfig(patience_k=2, min_training_steps=0, max_active=1)
    ctl = Controller(cfg)
    t = lambda b, count=100.0: rep(sr(0, Stage.TRAINING, benefit=b, count=count, steps_in_stage=5))  # noqa: E731
    assert ctl.decide(t(-1.0), 10) == [] and ctl.streaks["fc:0"] == 1
    assert ctl.decide(t(1.0, count=0.0), 20) == [] and ctl.streaks["fc:0"] == 1  # no data: kept, not reset
    assert cmds(ctl.decide(t(-1.0, count=1.0), 30)) == [("fc", 0, "advance", Stage.GRAFTING)]
    lin = Controller(replace(cfg, patience_k=1, rec_rel_threshold=0.2))
    zero = rep(sr(0, Stage.TRAINING, blend=2, delta_rms=0.0, rms=0.0, steps_in_stage=5))
    assert lin.decide(zero, 10) == []  # rms 0: the relative error is inf, not useful
    small = rep(sr(0, Stage.TRAINING, blend=2, delta_rms=0.05, rms=0.5, steps_in_stage=5))
    assert cmds(lin.decide(small, 10))[0][2] == "advance"  # 0.1 < 0.2
    graft = Controller(ControllerConfig(max_grafting_steps=40, max_active=0))
    assert graft.decide(rep(sr(0, Stage.GRAFTING, alpha=0.5, steps_in_stage=39)), 10) == []
    assert cmds(graft.decide(rep(sr(0, Stage.GRAFTING, alpha=0.5, steps_in_stage=40)), 10))[0][2] == "cull"
    over = Controller(ControllerConfig(max_active=1, germinate_per_interval=3))  # 2 active > max_active 1
    busy = [sr(0, Stage.TRAINING, steps_in_stage=1), sr(1, Stage.GRAFTING, alpha=0.5), sr(2), sr(3), sr(4)]
    assert over.decide(rep(*busy), 10) == []
    lin_edge = rep(sr(0, Stage.TRAINING, blend=2, delta_rms=0.1, rms=0.5, steps_in_stage=5))  # 0.2: not < 0.2
    assert lin.decide(lin_edge, 10) == []
    ev = Controller(ControllerConfig(evaluate_threshold=0.5, max_active=0))
    at_limit = rep(sr(0, Stage.EVALUATING, alpha=1.0))
    at_limit.counterfactual[("fc", 0)] = (1.0, 1.5)  # improvement 0.5 is not > 0.5
    assert cmds(ev.decide(at_limit, 10))[0][2] == "cull"
    warm = Controller(ControllerConfig(warmup_steps=30, max_active=1))
    assert warm.decide(rep(sr(0)), 29) == [] and cmds(warm.decide(rep(sr(0)), 30))[0][2] == "germinate"


def test_apply_set_alpha_rate_and_seeds_of_other_shards():
    layer = SeededLayer(64, 4, kind="diagonal", backend="reference", layer_key="fc", seed_offset=4)
    rate = Decision("fc", 5, "set_alpha_rate", None, 0.25, "x", {})
    apply_decisions({"fc": layer}, [rate, replace(rate, seed=6, value=None)], step=1, schedule=None)
    assert layer.alpha_rate.tolist() == pytest.approx([0.0, 0.25, 0.0, 0.0])
    other = Decision("fc", 1, "germinate", Stage.GERMINATED, None, "x", {})  # global seed 1: another shard's
    apply_decisions({"fc": layer}, [other], step=1, schedule=None)
    assert layer.stages() == [Stage.DORMANT] * 4


def test_measure_counterfactuals_takes_the_controller_by_keyword_only():
    with pytest.raises(TypeError):
        measure_counterfactuals({}, rep(), lambda: 0.0, Controller())


def test_measure_counterfactuals_skips_layers_this_rank_does_not_hold():
    layer = _layer()
    r = rep(sr(0, Stage.EVALUATING, layer="elsewhere"))
    calls = []
    measure_counterfactuals({"fc": layer}, r, lambda: calls.append(1) or 2.0)
    assert r.counterfactual == {("elsewhere", 0): (2.0, 2.0)} and len(calls) == 2
