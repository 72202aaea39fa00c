"""Reliability: seed faults, host divergence, rank desynchronisation, fault injection (README "Failure behaviour").

Seed faults, per step and on the device only (no host synchronisation):

    guard.before_forward(layers, step)          # a seed whose bank is non-finite is culled before it runs
    ... forward, loss, backward ...
    ok = guard.after_backward(layers, loss, step)   # 0-d bool: the host loss is finite
    optimizers.step(ok)                         # when not ok nothing moves (optim.guarded_step)

``after_backward`` culls (on the device) every TRAINING..FINE_TUNING seed whose blueprint output (its
telemetry ``delta_sq``/``benefit`` this step, while its input x was finite) or whose bank gradient is
non-finite, before the optimizer step, so the seed optimizer (which only updates trainable stages) never
writes a non-finite value into any bank, and it drops the step's telemetry where it is not finite. A cull on
the device sets stage CULLED, alpha 0, its embargo and remembers the stage it came from; at the next controller
interval ``interval_faults`` turns those into lifecycle events, resets the seeds' bank slices (the
deterministic init of their generation) and zeroes their optimizer state. The host's view of such a seed from
its cull on is exactly that of a seed that never germinated (the op passes x through for CULLED seeds).

Host divergence (at the controller interval, from values reduced in the telemetry's SUM all-reduce): the
interval's mean host loss over its finite steps is non-finite; or it is above all of ``divergence_floor`` times
the first interval's mean, ``divergence_factor`` times the mean of the last ``window`` good intervals and that
mean plus ``divergence_sigmas`` times their spread (``DivergenceMonitor``); or some step's loss was non-finite
and no seed fault explains it; or, with ``skip_nonfinite=false``, a non-finite step reached the parameters. The
train loop then restores the newest good checkpoint at or before the last good interval, marks the seeds that
were blending ROLLED_BACK and draws its batches in a fresh order (``DivergenceMonitor.batch_seed``).

Desynchronisation: ``check_same_decisions`` is the per-interval checksum all-reduce; when the checksums differ
every rank gathers per-seed digests once and raises ``DesyncError`` naming the step and the first differing
seed. Collective timeouts (``reliability.collective_timeout_s``) bound every other wait.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from morpho_dist.commands import local_index, owns
from morpho_dist.controller import Decision, decisions_checksum
from morpho_dist.kernels.layout import F_BENEFIT, F_DELTA_SQ, F_SUMSQ
from morpho_dist.lifecycle import STATE_FIELDS, Stage
from morpho_dist.telemetry import global_num_seeds

# Stages from which a fault culls (the legal "-> CULLED" sources that run the blueprint).
CULLABLE = (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING)
BLENDING = (Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING)
FAULT_BANK, FAULT_OUTPUT, FAULT_GRAD = 1, 2, 4
FAULT_REASON = "non-finite blueprint output/gradient"
# Test hooks: "before_step"(step, ctx) and "loss"(step, loss) -> loss; empty in a normal run.
HOOKS: dict[str, Callable] = {}
KILL_STEP_ENV, KILL_RANK_ENV = "MORPHO_FAULT_KILL_AT_STEP", "MORPHO_FAULT_RANK"
KILL_MARKER = ".fault_injected"
HEAD = 4  # interval extras before the culled table: loss sum, finite steps, steps, applied non-finite steps


class DesyncError(RuntimeError):
    """Ranks disagree on the controller decisions or on the state of a replicated seed."""


class DivergenceError(RuntimeError):
    """The host loss diverged and no (more) rollback is possible."""


# ---- seed faults, per step on the device -----------------------------------------------------------------
class SeedGuard:
    """Device-side per-step seed fault detection and cull, plus the host-loss accumulators of an interval."""

    def __init__(
        self, layers: Mapping[str, Any], embargo_steps: int, device: torch.device, skip_nonfinite: bool = True
    ) -> None:
        self.layers = dict(layers)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.embargo = int(embargo_steps)
        self.device = device
        self.cullable = torch.tensor([int(s) for s in CULLABLE], device=device)
        # per layer: 0, or 16 * fault bits + the stage the seed was culled from
        self.culled = {k: torch.zeros(layer.num_seeds, dtype=torch.int32, device=device) for k, layer in layers.items()}
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.ok_steps = torch.zeros((), dtype=torch.float64, device=device)
        # steps whose non-finite loss or host gradient reached the optimizer (skip_nonfinite=false)
        self.applied_bad = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self._tel: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        for t in self.culled.values():
            t.zero_()
        self.loss_sum.zero_()
        self.ok_steps.zero_()
        self.applied_bad.zero_()
        self.steps = 0

    @torch.no_grad()
    def _cull(self, layer: Any, key: str, bad: torch.Tensor, kind: torch.Tensor | int, step: int) -> None:
        if layer.known_idle():  # no seed can be culled (CULLABLE stages are live), and writing would void the record
            return
        bad = bad & torch.isin(layer.stage.long(), self.cullable)
        code = kind * 16 + layer.stage.to(torch.int32)
        self.culled[key].copy_(torch.where(bad & (self.culled[key] == 0), code, self.culled[key]))
        layer.stage.copy_(torch.where(bad, int(Stage.CULLED), layer.stage))
        for name, value in (("alpha", 0.0), ("alpha_rate", 0.0), ("steps_in_stage", 0)):
            t = getattr(layer, name)
            t.copy_(torch.where(bad, value, t))
        layer.embargo_until.copy_(torch.where(bad, int(step) + self.embargo, layer.embargo_until))
        for p in (layer.bank.p0, layer.bank.p1):  # a culled seed's bank is zero until its reset: inert
            p.data.copy_(torch.where(bad.view(-1, *[1] * (p.dim() - 1)), 0.0, p.data))

    @torch.no_grad()
    def before_forward(self, step: int) -> None:
        """Cull seeds whose bank holds a non-finite value before they run; keep the telemetry to fall back to."""
        for key, layer in self.layers.items():
            finite = [torch.isfinite(p).reshape(p.shape[0], -1).all(1) for p in (layer.bank.p0, layer.bank.p1)]
            self._cull(layer, key, ~(finite[0] & finite[1]), FAULT_BANK, step)
            self._tel[key] = layer.telemetry.clone()

    @torch.no_grad()
    def after_backward(self, loss: torch.Tensor, step: int, host_params: list | None = None) -> torch.Tensor:
        """ok = the host loss and the host gradients are finite (0-d bool on the device). Culls the seeds whose
        output or gradient went non-finite this step; restores the telemetry rows this step made non-finite
        (all rows if not ok)."""
        ok = torch.isfinite(loss.detach())
        grads = [
            g.to_local() if hasattr(g, "to_local") else g for _, p in host_params or [] if (g := p.grad) is not None
        ]
        if grads:
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()
        for key, layer in self.layers.items():
            tel, before = layer.telemetry, self._tel.pop(key)
            x_ok = torch.isfinite(tel[:, F_SUMSQ])
            out_bad = x_ok & (~torch.isfinite(tel[:, F_DELTA_SQ]) | (ok & ~torch.isfinite(tel[:, F_BENEFIT])))
            grad_bad = torch.zeros_like(out_bad)
            for p in (layer.bank.p0, layer.bank.p1):
                if p.grad is not None:
                    grad_bad |= ~torch.isfinite(p.grad).reshape(p.shape[0], -1).all(1)
            grad_bad &= ok  # with a non-finite loss every gradient is, and says nothing about this seed
            kind = out_bad.to(torch.int32) * FAULT_OUTPUT + grad_bad.to(torch.int32) * FAULT_GRAD
            self._cull(layer, key, out_bad | grad_bad, kind, step)
            row_ok = ok & torch.isfinite(tel).all(1) & ~(out_bad | grad_bad)
            tel.copy_(torch.where(row_ok[:, None], tel, before))
        self.loss_sum += torch.where(ok, loss.detach().double(), 0.0)
        self.ok_steps += ok.double()
        if not self.skip_nonfinite:
            self.applied_bad += (~ok).double()
        self.steps += 1
        return ok

    def interval_extras(self, mesh: Any) -> torch.Tensor:
        """This rank's share of [loss sum, finite steps, steps, applied non-finite steps, culled table (L x
        N_global_max)], to ride in the telemetry SUM all-reduce (replicas of a seed shard add dp copies;
        ``interval_faults`` divides)."""
        width = max((global_num_seeds(layer) for layer in self.layers.values()), default=0)
        table = torch.zeros(len(self.layers), width, dtype=torch.float64, device=self.device)
        for li, (key, layer) in enumerate(self.layers.items()):
            table[li, layer.seed_offset : layer.seed_offset + layer.num_seeds] = self.culled[key].double()
        steps = torch.tensor(float(self.steps), dtype=torch.float64, device=self.device)
        head = torch.stack([self.loss_sum, self.ok_steps, steps, self.applied_bad])
        return torch.cat([head.double(), table.reshape(-1)])

    @torch.no_grad()
    def interval_faults(self, values: list[float], report: Any, optimizers: Any, mesh: Any) -> list[Decision]:
        """From the reduced extras: events for the seeds culled on the device since the last interval (already
        CULLED), whose bank slices are reset and optimizer state zeroed here. Resets the accumulators. When a
        non-finite step reached the optimizer (``host_fault``) the whole state is poisoned: the seeds' faults
        are its consequence, not theirs, so none is reported (the divergence restore undoes the culls)."""
        out = []
        if host_fault(values):
            self.reset()
            return out
        width = (len(values) - HEAD) // max(len(self.layers), 1)
        for li, (key, layer) in enumerate(self.layers.items()):
            for seed in range(global_num_seeds(layer)):
                code = int(round(values[HEAD + li * width + seed] / mesh.dp))
                if code == 0:
                    continue
                kind, src = code // 16, Stage(code % 16)
                sig = {"bank": float(bool(kind & FAULT_BANK)), "output": float(bool(kind & FAULT_OUTPUT))}
                sig["gradient"] = float(bool(kind & FAULT_GRAD))
                out.append(Decision(key, seed, "cull", Stage.CULLED, float(self.embargo), FAULT_REASON, sig, src))
                if owns(layer, seed):
                    i = local_index(layer, seed)
                    layer.bank.reinit_(i, int(layer.generation[i]), int(layer.blend[i]))
                    optimizers.reset_seed(key, i)
        self.reset()
        return out


def host_fault(values: list[float]) -> bool:
    """Some step of the interval applied a non-finite loss or host gradient to the parameters (any rank)."""
    return values[3] > 0


def interval_loss(values: list[float]) -> tuple[float, float, float]:
    """(mean host loss over the finite steps, finite steps, steps) from the reduced extras (world sums)."""
    loss_sum, ok_steps, steps = values[:3]
    return (loss_sum / ok_steps if ok_steps > 0 else float("nan")), ok_steps, steps


# ---- host divergence ---------------------------------------------------------------------------------------
class DivergenceMonitor:
    """Recent interval mean losses and the divergence rule; its state goes into the checkpoint.

    An interval whose mean host loss is finite diverged only when it is above all three of: the floor,
    ``divergence_floor`` times the mean loss of the run's first interval (a loss well below where training
    started is never a divergence: near zero the loss is noisy and spikes of 10-100x its recent mean are routine,
    e.g. 0.0015 -> 0.26 and back in the default 12000-step digits run), ``divergence_factor`` times the mean of
    the last ``window`` good intervals, and that mean plus ``divergence_sigmas`` times their standard deviation.
    After a restore the batch order is reshuffled (``batch_seed``), so a replay never meets the same batches."""

    def __init__(self, cfg: Any) -> None:
        self.factor = float(cfg.divergence_factor)
        self.floor = float(getattr(cfg, "divergence_floor", 0.0))
        self.sigmas = float(getattr(cfg, "divergence_sigmas", 0.0))
        self.window = int(cfg.window)
        self.max_rollbacks = int(cfg.max_rollbacks)
        self.recent: list[float] = []
        self.start: float | None = None  # the mean loss of the run's first good interval
        self.last_good_step = 0
        self.rollbacks = 0

    def state_dict(self) -> dict:
        return {
            "recent": list(self.recent),
            "start": self.start,
            "last_good_step": self.last_good_step,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: Mapping | None) -> None:
        state = state or {}
        self.recent = [float(v) for v in state.get("recent", [])]
        self.start = None if state.get("start") is None else float(state["start"])
        self.last_good_step = int(state.get("last_good_step", 0))
        self.rollbacks = int(state.get("rollbacks", self.rollbacks))

    def batch_seed(self, seed: int) -> int:
        """The data-order seed: the run's seed until the first restore, a fresh order after each one (a function
        of the rollback count, which the checkpoints carry, so a resumed run draws the same batches)."""
        return int(seed) if self.rollbacks == 0 else int(seed) + 7_919 * self.rollbacks

    def threshold(self) -> float:
        """The interval mean loss above which a finite interval diverged (inf with no good interval yet)."""
        if self.factor <= 0 or not self.recent:
            return math.inf
        ref = sum(self.recent) / len(self.recent)
        spread = math.sqrt(sum((v - ref) ** 2 for v in self.recent) / len(self.recent))
        floor = self.floor * (self.start if self.start is not None else ref)
        return max(floor, self.factor * ref, ref + self.sigmas * spread)

    def check(self, step: int, values: list[float], seed_faults: int) -> str | None:
        """None when the interval is good (then it joins the window), else the reason it diverged. ``values``:
        the reduced interval extras (``SeedGuard.interval_extras``). A non-finite step that reached the
        parameters (``skip_nonfinite=false``) poisons the host state itself: seed faults explain nothing then."""
        mean, ok_steps, steps = interval_loss(values)
        reason = None
        if ok_steps == 0 or not math.isfinite(mean):
            reason = f"host loss non-finite at every step of the interval ending at step {step}"
        elif host_fault(values):
            reason = (
                f"host loss non-finite at {steps - ok_steps:g} step(s) of the interval ending at step {step}, "
                "applied to the parameters (reliability.skip_nonfinite=false)"
            )
        elif ok_steps < steps and seed_faults == 0:
            reason = f"host loss non-finite at {steps - ok_steps:g} step(s) of the interval (no seed fault explains it)"
        elif mean > (limit := self.threshold()):
            ref = sum(self.recent) / len(self.recent)
            reason = (
                f"interval mean loss {mean:.6g} > {limit:.6g} (the largest of {self.floor:g} x the first interval's "
                f"mean, {self.factor:g} x the recent mean {ref:.6g}, the recent mean + {self.sigmas:g} x its spread)"
            )
        if reason is None:
            self.start = mean if self.start is None else self.start
            self.recent = [*self.recent, mean][-self.window :]
            self.last_good_step = step
        return reason


def blending_seeds(report: Any) -> list[tuple[str, int]]:
    return [(s.layer, s.seed) for s in report.seeds if s.stage in BLENDING]


@torch.no_grad()
def mark_rolled_back(layers: Mapping[str, Any], seeds: list[tuple[str, int]], step: int, optimizers: Any) -> list:
    """After a restore: seeds that were blending at the divergence and are TRAINING..FINE_TUNING in the restored
    state -> ROLLED_BACK (their optimizer state zeroed). Returns [(layer, seed, from stage)] over all ranks."""
    done = []
    for name, seed in seeds:
        layer = layers[name]
        if not owns(layer, seed):
            continue
        i = local_index(layer, seed)
        src = Stage(int(layer.stage[i]))
        if src in CULLABLE:
            layer.apply_stage_changes([(i, Stage.ROLLED_BACK)], step, "rollback")
            optimizers.reset_seed(name, i)
            done.append((name, seed, src.name))
    if dist.is_available() and dist.is_initialized():
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, done)
        done = sorted({tuple(d) for part in everyone for d in part})
    return done


# ---- desynchronisation -----------------------------------------------------------------------------------
def _seed_digests(decisions: list[Decision], layers: Mapping[str, Any], controller: Any) -> dict:
    """(layer, seed) -> {"decision": digest of its decisions and controller streak, "state": digest of its local
    state and bank slice (seeds this rank holds), "stage": its local stage name}."""
    out: dict = {}
    streaks = getattr(controller, "streaks", {})
    for name, layer in layers.items():
        for seed in range(global_num_seeds(layer)):
            mine = [[d.command, repr(d.value), d.reason] for d in decisions if d.layer == name and d.seed == seed]
            text = json.dumps([mine, streaks.get(f"{name}:{seed}")]).encode()
            entry = {"decision": hashlib.blake2b(text, digest_size=8).hexdigest()}
            if owns(layer, seed):
                i = local_index(layer, seed)
                h = hashlib.blake2b(digest_size=8)
                for field in (*STATE_FIELDS, "bank.p0", "bank.p1"):
                    t = layer.get_parameter(field) if field.startswith("bank") else getattr(layer, field)
                    h.update(t[i].detach().cpu().contiguous().numpy().tobytes())
                entry.update(state=h.hexdigest(), stage=Stage(int(layer.stage[i])).name)
                entry["generation"] = int(layer.generation[i])
            out[(name, seed)] = entry
    return out


def _first_difference(gathered: list[dict], order: list[tuple[str, int]]) -> str:
    for key in order:
        for part in ("decision", "state"):
            values = {r: g[key][part] for r, g in enumerate(gathered) if part in g.get(key, {})}
            if len(set(values.values())) > 1:
                detail = ", ".join(
                    f"rank {r}: stage {gathered[r][key].get('stage', '?')} generation "
                    f"{gathered[r][key].get('generation', '?')}"
                    for r in values
                )
                what = "decisions" if part == "decision" else "state"
                return f"first differing seed: layer {key[0]!r} seed {key[1]} ({what} differ; {detail})"
    return "no seed differs: the ranks' health reports (telemetry / state tables) differ"


def check_same_decisions(
    decisions: list[Decision], layers: Mapping[str, Any], report: Any, controller: Any, step: int
) -> None:
    """The per-interval checksum all-reduce (one collective when the ranks agree). When they do not, every rank
    gathers per-seed digests once and raises DesyncError naming the step and the first differing seed."""
    checksum = decisions_checksum(decisions, layers, report)
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([checksum, -checksum], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi == lo:
        return
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _seed_digests(decisions, layers, controller))
    order = sorted({k for g in gathered for k in g}, key=lambda k: (list(layers).index(k[0]), k[1]))
    raise DesyncError(
        f"step {step}: ranks are desynchronised (decision checksum of rank {dist.get_rank()}: {checksum}, "
        f"min {lo}, max {hi}); {_first_difference(gathered, order)}; every rank stops"
    )


# ---- fault injection (tests) -------------------------------------------------------------------------------
def maybe_kill(step: int, rank: int, run_dir: str) -> None:
    """MORPHO_FAULT_KILL_AT_STEP=k [MORPHO_FAULT_RANK=r]: rank r dies (exit 1, no cleanup) at the start of step
    k, once per run dir (a marker file there keeps the restarted attempt alive)."""
    at = os.environ.get(KILL_STEP_ENV)
    if at is None or int(at) != step or rank != int(os.environ.get(KILL_RANK_ENV, "0")):
        return
    marker = os.path.join(run_dir, KILL_MARKER)
    if os.path.exists(marker):
        return
    with open(marker, "w") as fh:
        fh.write(f"rank {rank} killed at step {step}\n")
    os._exit(1)


def hook(name: str, *args: Any) -> Any:
    fn = HOOKS.get(name)
    if fn is None:
        return args[-1] if name == "loss" else None
    return fn(*args)
