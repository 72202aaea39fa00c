"""The default lifecycle controller (DESIGN.md section 3): a heuristic policy over measured signals only.

Each interval the train loop runs, on every rank:

    report = build_report(layers, step)                         # telemetry/state, all-reduced
    measure_counterfactuals(layers, report, evaluate, controller=ctl)   # val loss at alpha vs at 0
    decisions = ctl.decide(report, step)                         # pure function of (report, ctl state)
    apply_decisions(layers, decisions, step, schedule)           # each rank changes the seeds it owns
    verify_same_decisions(decisions_checksum(decisions, layers, report), step)

Policy, per seed (in report order: layer order, then global seed index):
- any non-finite signal of a TRAINING..FINE_TUNING seed -> rollback (ROLLED_BACK)
- GERMINATED -> TRAINING at the next interval
- TRAINING -> GRAFTING once the seed looked useful for ``patience_k`` consecutive intervals and has trained
  ``min_training_steps``: benefit < -benefit_threshold (additive/multiplicative), or reconstruction error
  delta_rms / rms < rec_rel_threshold (linear); cull after ``max_training_steps`` without that
- GRAFTING -> STABILIZATION when alpha >= alpha_done (cull after ``max_grafting_steps``)
- STABILIZATION -> EVALUATING after ``stabilization_steps``
- EVALUATING: improvement = loss(alpha=0) - loss(alpha) > evaluate_threshold -> FINE_TUNING, else cull
- FINE_TUNING, after ``fine_tuning_steps``: improvement > fossilize_threshold -> FOSSILIZED, else cull
- CULLED -> DORMANT once the embargo (``embargo_steps`` after the cull) has passed; CANCELLED -> DORMANT
- germination: DORMANT seeds whose grad_rms is at least the ``germinate_grad_quantile`` quantile (over the
  DORMANT seeds) or whose dead_frac >= dead_frac_threshold are ranked by capacity score
  grad_rms / max grad_rms + dead_frac; the top ones germinate while active seeds < max_active
  (at most ``germinate_per_interval`` per interval, none before ``warmup_steps``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from morpho_dist.commands import local_index, owns, run_command, target_of
from morpho_dist.lifecycle import ACTIVE_STAGES, IllegalTransition, Stage, check_transition
from morpho_dist.telemetry import HealthReport, SeedReport, global_num_seeds

if TYPE_CHECKING:
    from morpho_dist.layer import SeededLayer
    from morpho_dist.schedules import AlphaSchedule


@dataclass
class ControllerConfig:
    """Controller knobs (the Hydra ``controller`` group). These defaults are the app's (conf/controller/default.yaml
    repeats them; tests/unit/test_config_defaults.py keeps the two equal). Short runs need shorter dwell times
    (``fine_tuning_steps``, ``min_training_steps``, ``stabilization_steps``)."""

    interval: int = 10  # steps between controller decisions
    max_active: int = 2  # budget of concurrently active seeds (GERMINATED..FINE_TUNING), all layers together
    germinate_per_interval: int = 1  # germinations per interval at most
    warmup_steps: int = 0  # no germination before this step
    germinate_grad_quantile: float = 0.5  # germinate seeds whose grad rms reaches this quantile
    dead_frac_threshold: float = 0.5  # ... or whose dead fraction reaches this
    patience_k: int = 2  # consecutive useful intervals before TRAINING -> GRAFTING
    benefit_threshold: float = 0.0  # useful: benefit < -benefit_threshold
    rec_rel_threshold: float = 0.1  # linear seeds: useful when delta_rms / rms < this
    min_training_steps: int = 20  # TRAINING steps before grafting
    max_training_steps: int = 200  # TRAINING steps before a cull
    alpha_done: float = 0.999  # GRAFTING ends at this alpha
    max_grafting_steps: int = 500  # GRAFTING steps before a cull
    stabilization_steps: int = 10  # steps in STABILIZATION
    evaluate_threshold: float = 0.0  # EVALUATING -> FINE_TUNING when loss(0) - loss(alpha) > this
    fine_tuning_steps: int = 600  # FINE_TUNING steps before fossilizing
    fossilize_threshold: float = 0.0  # FINE_TUNING -> FOSSILIZED when loss(0) - loss(alpha) > this
    embargo_steps: int = 100  # steps a culled seed waits before it may germinate again


def _as_config(cfg: Any) -> ControllerConfig:
    if cfg is None:
        return ControllerConfig()
    if isinstance(cfg, ControllerConfig):
        return cfg
    given = {f.name: getattr(cfg, f.name) for f in fields(ControllerConfig) if getattr(cfg, f.name, None) is not None}
    return ControllerConfig(**given)


@dataclass
class Decision:
    """One lifecycle command for one global seed, with why and on which measured values."""

    layer: str
    seed: int
    command: str  # germinate | advance | cull | cancel | rollback | recycle | set_alpha_rate
    target: Stage | None
    value: float | None
    reason: str
    signals: dict[str, float] = field(default_factory=dict)
    source: Stage | None = None  # stage in the report the decision was taken on

    def to_event(self, step: int) -> dict:
        return {
            "step": step,
            "layer": self.layer,
            "seed": self.seed,
            "command": self.command,
            "from": self.source.name if self.source is not None else None,
            "to": self.target.name if self.target is not None else None,
            "value": self.value,
            "reason": self.reason,
            "signals": dict(self.signals),
        }


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


class Controller:
    """Heuristic lifecycle policy; its only state is the per-seed streak of useful TRAINING intervals."""

    def __init__(self, controller_cfg: Any = None) -> None:
        self.cfg = _as_config(controller_cfg)
        if self.cfg.interval < 1 or self.cfg.max_active < 0 or self.cfg.patience_k < 1:
            raise ValueError(
                f"controller needs interval >= 1, max_active >= 0, patience_k >= 1; got interval="
                f"{self.cfg.interval}, max_active={self.cfg.max_active}, patience_k={self.cfg.patience_k}"
            )
        self.streaks: dict[str, int] = {}
        self.intervals = 0

    # ---- checkpointing (plain Python types) ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"streaks": dict(self.streaks), "intervals": self.intervals}

    def load_state_dict(self, state: Mapping) -> None:
        self.streaks = {str(k): int(v) for k, v in dict(state.get("streaks", {})).items()}
        self.intervals = int(state.get("intervals", 0))

    # ---- policy -------------------------------------------------------------------------------------------
    def wants_counterfactual(self, s: SeedReport) -> bool:
        """Seeds whose decision this interval needs the counterfactual validation loss."""
        return s.stage == Stage.EVALUATING or (
            s.stage == Stage.FINE_TUNING and s.steps_in_stage >= self.cfg.fine_tuning_steps
        )

    def decide(self, report: HealthReport, step: int) -> list[Decision]:
        """Decisions for this interval; updates the controller state. Deterministic in (report, state)."""
        self.intervals += 1
        out: list[Decision] = []
        for s in report.seeds:
            key = f"{s.layer}:{s.seed}"
            if s.stage != Stage.TRAINING:
                self.streaks.pop(key, None)
            d = self._decide_seed(s, key, report, step)
            if d is not None:
                out.append(d)
        out.extend(self._germinations(report, out, step))
        return out

    def _make(self, s: SeedReport, command: str, reason: str, signals: dict, value: float | None = None) -> Decision:
        target = target_of(command, s.stage)
        if command == "cull":
            value = float(self.cfg.embargo_steps)
        return Decision(s.layer, s.seed, command, target, value, reason, signals, source=s.stage)

    def _decide_seed(self, s: SeedReport, key: str, report: HealthReport, step: int) -> Decision | None:
        c = self.cfg
        st = s.stage
        if st in ACTIVE_STAGES and st != Stage.GERMINATED and not _finite(s.benefit, s.delta_rms, s.grad_rms, s.mean):
            sig = {"benefit": s.benefit, "delta_rms": s.delta_rms, "grad_rms": s.grad_rms, "mean": s.mean}
            return self._make(s, "rollback", "non-finite telemetry", sig)
        if st == Stage.GERMINATED:
            return self._make(s, "advance", "germinated; start training", {"steps_in_stage": s.steps_in_stage})
        if st == Stage.TRAINING:
            return self._training(s, key)
        if st == Stage.GRAFTING:
            sig = {"alpha": s.alpha, "alpha_rate": s.alpha_rate, "steps_in_stage": s.steps_in_stage}
            if s.alpha >= c.alpha_done:
                return self._make(s, "advance", f"alpha reached {c.alpha_done}", sig)
            if s.steps_in_stage >= c.max_grafting_steps:
                return self._make(s, "cull", f"ramp stalled for {c.max_grafting_steps} steps", sig)
            return None
        if st == Stage.STABILIZATION:
            if s.steps_in_stage >= c.stabilization_steps:
                return self._make(s, "advance", "stabilized", {"steps_in_stage": s.steps_in_stage})
            return None
        if st in (Stage.EVALUATING, Stage.FINE_TUNING) and self.wants_counterfactual(s):
            cf = report.counterfactual.get((s.layer, s.seed))
            if cf is None:
                return None  # no measurement this interval: wait
            at_alpha, at_zero = cf
            improvement = at_zero - at_alpha
            sig = {"loss_at_alpha": at_alpha, "loss_at_zero": at_zero, "improvement": improvement}
            limit = c.evaluate_threshold if st == Stage.EVALUATING else c.fossilize_threshold
            if _finite(improvement) and improvement > limit:
                return self._make(s, "advance", f"val loss improvement {improvement:.6g} > {limit:g}", sig)
            return self._make(s, "cull", f"val loss improvement {improvement:.6g} <= {limit:g}", sig)
        if st == Stage.CULLED and step >= s.embargo_until:
            return self._make(s, "recycle", "embargo passed", {"embargo_until": s.embargo_until})
        if st == Stage.CANCELLED:
            return self._make(s, "recycle", "cancelled seed returns to the pool", {})
        return None

    def _training(self, s: SeedReport, key: str) -> Decision | None:
        c = self.cfg
        streak = self.streaks.get(key, 0)
        if s.blend == 2:  # linear: the blueprint must first reconstruct its chunk
            rel = s.delta_rms / s.rms if s.rms > 0 else math.inf
            useful = rel < c.rec_rel_threshold
            sig = {"rel_error": rel, "delta_rms": s.delta_rms, "rms": s.rms}
        else:
            useful = s.benefit < -c.benefit_threshold
            sig = {"benefit": s.benefit}
        if s.count > 0:  # an interval without data leaves the streak as it was
            streak = streak + 1 if useful else 0
        self.streaks[key] = streak
        sig.update(streak=streak, steps_in_stage=s.steps_in_stage)
        if streak >= c.patience_k and s.steps_in_stage >= c.min_training_steps:
            self.streaks.pop(key, None)
            return self._make(s, "advance", f"useful for {streak} intervals", sig)
        if s.steps_in_stage >= c.max_training_steps:
            self.streaks.pop(key, None)
            return self._make(s, "cull", f"not useful after {s.steps_in_stage} training steps", sig)
        return None

    def _germinations(self, report: HealthReport, decided: list[Decision], step: int) -> list[Decision]:
        c = self.cfg
        if step < c.warmup_steps:
            return []
        after = {(s.layer, s.seed): s.stage for s in report.seeds}
        for d in decided:
            if d.target is not None:
                after[(d.layer, d.seed)] = d.target
        budget = min(c.max_active - sum(st in ACTIVE_STAGES for st in after.values()), c.germinate_per_interval)
        pool = [
            s for s in report.seeds if s.stage == Stage.DORMANT and s.count > 0 and _finite(s.grad_rms, s.dead_frac)
        ]
        if budget <= 0 or not pool:
            return []
        grads = sorted(s.grad_rms for s in pool)
        q = min(max(c.germinate_grad_quantile, 0.0), 1.0)
        grad_cut = grads[int(q * (len(grads) - 1))]
        top = grads[-1] if grads[-1] > 0 else 1.0
        order = {name: i for i, name in enumerate(report.layers)}
        ranked = []
        for s in pool:
            if s.grad_rms >= grad_cut or s.dead_frac >= c.dead_frac_threshold:
                score = s.grad_rms / top + s.dead_frac
                ranked.append((-score, order.get(s.layer, len(order)), s.seed, s, score))
        ranked.sort(key=lambda r: r[:3])
        out = []
        for *_, s, score in ranked[:budget]:
            sig = {"grad_rms": s.grad_rms, "dead_frac": s.dead_frac, "score": score, "grad_cut": grad_cut}
            out.append(self._make(s, "germinate", "capacity short (grad_rms / dead_frac)", sig))
        return out


# ---- applying and checking decisions ------------------------------------------------------------------------
def _prevalidate(layers: Mapping[str, SeededLayer], decisions: list[Decision], step: int) -> None:
    """Check every decision against the current state (as updated by the earlier ones) before changing any."""
    stages: dict[str, list[int]] = {}
    for d in decisions:
        if d.layer not in layers:
            raise ValueError(f"decision for unknown layer {d.layer!r}; layers: {list(layers)}")
        layer = layers[d.layer]
        if d.command == "set_alpha_rate" or not owns(layer, d.seed):
            continue
        cur = stages.setdefault(d.layer, layer.stage.tolist())
        i = local_index(layer, d.seed)
        src = Stage(cur[i])
        try:
            dst = target_of(d.command, src)
        except IllegalTransition as err:
            raise IllegalTransition(f"seed {d.seed}: {err}") from None
        check_transition(d.seed, src, dst, d.command)
        if src == Stage.CULLED and dst == Stage.DORMANT and step < int(layer.embargo_until[i]):
            raise IllegalTransition(
                f"seed {d.seed}: command {d.command!r} refused: CULLED seed is embargoed until step "
                f"{int(layer.embargo_until[i])} (now {step})"
            )
        cur[i] = int(dst)


@torch.no_grad()
def apply_decisions(
    layers: Mapping[str, SeededLayer], decisions: list[Decision], step: int, schedule: AlphaSchedule | None
) -> None:
    """Apply decisions to the seeds this rank owns (all checked first: a refused batch changes nothing).
    Entering GRAFTING sets alpha_rate to the schedule's initial rate; entering STABILIZATION snaps alpha to 1."""
    _prevalidate(layers, decisions, step)
    for d in decisions:
        layer = layers[d.layer]
        if not owns(layer, d.seed):
            continue
        i = local_index(layer, d.seed)
        if d.command == "set_alpha_rate":
            layer.alpha_rate[i] = float(d.value or 0.0)
            continue
        embargo = int(d.value or 0) if d.command == "cull" else 0
        run_command(layer, d.seed, d.command, step, embargo_steps=embargo)
        if d.command == "advance":
            dst = Stage(int(layer.stage[i]))
            if dst == Stage.GRAFTING:
                layer.alpha_rate[i] = schedule.initial_rate() if schedule is not None else float(d.value or 0.0)
            elif dst == Stage.STABILIZATION:
                layer.alpha[i] = 1.0
                layer.alpha_rate[i] = 0.0


def decisions_checksum(
    decisions: list[Decision], layers: Mapping[str, SeededLayer], report: HealthReport | None = None
) -> int:
    """A 62-bit hash (blake2b, stable across processes) of the decisions (with their signals), of the
    post-decision state of every layer whose seeds are replicated, and of the global ``report`` (its reduced
    telemetry and state tables, which every rank must hold bit for bit): seed-sharded state is covered
    through the report it was decided on plus the decisions every rank applies to its own seeds."""
    payload: list[Any] = []
    if report is not None:
        h = hashlib.blake2b(digest_size=16)
        for t in (report.table, report.states):
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        payload.append([report.step, h.hexdigest(), [repr(v) for v in report.extras]])
    for d in decisions:
        sig = sorted((k, repr(float(v))) for k, v in d.signals.items())
        target = int(d.target) if d.target is not None else None
        payload.append([d.layer, d.seed, d.command, target, repr(d.value), d.reason, sig])
    for name, layer in layers.items():
        if layer.seed_offset == 0 and layer.num_seeds == global_num_seeds(layer):
            state = [layer.stage.tolist(), layer.generation.tolist(), layer.embargo_until.tolist()]
            payload.append([name, state, [repr(v) for v in layer.alpha_rate.tolist()]])
    text = json.dumps(payload, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 62) - 1)


def verify_same_decisions(checksum: int, step: int, group=None) -> None:
    """One all_reduce(MAX) of (checksum, -checksum): every rank raises RuntimeError naming the step if the
    ranks' checksums differ. Nothing happens in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([checksum, -checksum], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(
            f"step {step}: ranks disagree on the controller decisions (this rank's checksum {checksum}, "
            f"min {lo}, max {hi}); the run is stopped because seed states would diverge"
        )


@torch.no_grad()
def measure_counterfactuals(
    layers: Mapping[str, SeededLayer],
    report: HealthReport,
    evaluate: Callable[[], float],
    *,
    controller: Controller | None = None,
) -> None:
    """Fill report.counterfactual[(layer, seed)] = (val loss as is, val loss with that seed's alpha at 0) for
    the seeds the controller needs (default: every EVALUATING and FINE_TUNING seed). ``evaluate`` must put the
    model in eval mode and return the same value on every rank; every rank calls it the same number of times
    and only the owner of a seed zeroes its alpha. Alphas are restored exactly."""
    wanted = [
        s
        for s in report.seeds
        if (controller.wants_counterfactual(s) if controller else s.stage in (Stage.EVALUATING, Stage.FINE_TUNING))
    ]
    if not wanted:
        return
    base = float(evaluate())
    for s in wanted:
        layer = layers.get(s.layer)
        held = layer is not None and owns(layer, s.seed)
        if held:
            i = local_index(layer, s.seed)
            saved = layer.alpha[i].clone()
            layer.alpha[i] = 0.0
        try:
            at_zero = float(evaluate())
        finally:
            if held:
                layer.alpha[i] = saved
        report.counterfactual[(s.layer, s.seed)] = (base, at_zero)


def decision_records(decisions: list[Decision], step: int) -> list[dict]:
    """Events for events.jsonl."""
    return [d.to_event(step) for d in decisions]


__all__ = [
    "Controller",
    "ControllerConfig",
    "Decision",
    "apply_decisions",
    "decision_records",
    "decisions_checksum",
    "measure_counterfactuals",
    "verify_same_decisions",
]
