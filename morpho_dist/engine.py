"""The public engine: the seeds' whole lifecycle inside any training loop over any ``nn.Module``.

    morph = Morphogenesis(model, seeds={"targets": ["fc1"], "per_layer": 4}, controller={"interval": 10})
    opt = torch.optim.AdamW(morph.host_parameters(), lr=3e-4)   # the host's parameters, no blueprint banks
    for x, y in batches:
        loss = morph.loss(loss_fn(model(x), y))   # adds the seeds' reconstruction losses
        loss.backward()
        morph.step(opt, evaluate=val_loss_fn)     # guarded optimizer step, seed banks' step, alpha, lifecycle
        opt.zero_grad()

``step`` does, in this order: the seed guard (a step whose loss or host gradient is non-finite moves neither host
nor seeds; a seed whose output or gradient went non-finite is culled on the device), the user's optimizer step,
the seeds' own optimizer step (per-seed state, only seeds in TRAINING / GRAFTING / FINE_TUNING move), the alpha
schedule and the stage ticks. Every ``controller.interval`` steps it also builds the health report (all-reduced
when a process group is up), measures counterfactual validation losses through ``evaluate`` (a function of no
argument returning the validation loss, the same on every rank), takes the controller's decisions, checks them
across ranks (checksum all-reduce), applies them and hands events and telemetry to the loggers. A host
divergence calls ``rollback`` (see ``Morphogenesis``) and marks the seeds that were blending ROLLED_BACK.

Loggers (the one hook for events and telemetry): objects with ``interval(step, report, events, stages)``, called
at every controller interval with the HealthReport, the interval's events (dicts: step, layer, seed, command,
from, to, value, reason, signals, host) and the global stages after the decisions; and optionally
``events(events)`` for events outside an interval (a divergence restore and its rollbacks). The app's
``morpho_dist.logging.make_run_log`` (events.jsonl, telemetry.jsonl and the wandb or jsonl backend) is one.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from morpho_dist.commands import local_index, owns, tick_
from morpho_dist.config import KernelConfig, OptimConfig, ReliabilityConfig, SeedsConfig, TrainConfig
from morpho_dist.config_rules import group_config
from morpho_dist.controller import Controller, ControllerConfig, apply_decisions, measure_counterfactuals
from morpho_dist.distributed import Mesh
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import with_rec_losses
from morpho_dist.lifecycle import Stage
from morpho_dist.optim import Optimizers, guarded_step, host_param_groups, make_seed_optimizer
from morpho_dist.reliability import (
    DivergenceError,
    DivergenceMonitor,
    SeedGuard,
    blending_seeds,
    check_same_decisions,
    mark_rolled_back,
)
from morpho_dist.schedules import HostSignals, ScheduleConfig, make_schedule
from morpho_dist.sharding import (
    clip_host_grad_norm_,
    host_square_sums,
    named_host_parameters,
    shard_model,
    snapshot_host,
)
from morpho_dist.summary import build_summary, gather_ranks, global_stages
from morpho_dist.telemetry import build_report
from morpho_dist.wrap import seeded_layers, wrap

STATE_VERSION = 1


def kernel_options(kernel_cfg: Any) -> KernelOptions:
    """The ``kernel`` group (schema KernelConfig) as launch options: every KernelOptions field."""
    return KernelOptions(**{f.name: getattr(kernel_cfg, f.name) for f in dataclasses.fields(KernelOptions)})


def default_mesh() -> Mesh:
    """Data parallel over the default process group when one is up (every rank holds every seed), else one
    process."""
    if dist.is_available() and dist.is_initialized():
        return Mesh(mode="data", dp=dist.get_world_size(), rank=dist.get_rank())
    return Mesh(mode="data", dp=1)


class Morphogenesis:
    """Seeds at ``model``'s target modules (wrapped in place) and their lifecycle, driven by ``step``.

    Config arguments (each a dict, a dataclass or an OmegaConf node with the keys of the Hydra group of the same
    name; missing keys take the schema dataclass defaults of morpho_dist.config; an unknown key or a bad value is
    a ValueError naming it): ``seeds`` (targets required), ``controller``, ``schedule``, ``kernel``,
    ``reliability`` and ``optim`` (the seeds' optimizer: name adamw|adam|sgd, betas, momentum, seed_lr_scale).

    ``mesh``: a morpho_dist.distributed.Mesh (default: data parallel over the default process group, if any).
    ``tp_plan``: seed / hybrid sharding's tensor-parallel plan, module name -> "colwise" | "rowwise" (default:
    the model's own, e.g. a transformers model's ``config.base_model_tp_plan``; morpho_dist.sharding.tp_plan).
    ``seed_lr``: the banks' learning rate (default: the user optimizer's first group's lr x optim.seed_lr_scale,
    read at every step, so it follows lr schedulers). ``rec_weight``: weight of the reconstruction losses.
    ``base_seed``: seeds the deterministic blueprint init. ``loggers``: see the module doc. ``rollback``: called
    as ``rollback(last_good_step)`` when the host loss diverges; it restores model, optimizer and this engine
    (``load_state_dict``, or ``after_restore`` for the app's checkpoints) from the newest state saved at or before
    that step and returns a description of it (e.g. a path), or None when there is none (then the run stops with
    DivergenceError).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        seeds: Any = None,
        controller: Any = None,
        schedule: Any = None,
        kernel: Any = None,
        reliability: Any = None,
        optim: Any = None,
        mesh: Mesh | None = None,
        tp_plan: Mapping[str, str] | None = None,
        seed_lr: float | None = None,
        rec_weight: float = TrainConfig.rec_weight,
        base_seed: int = 0,
        loggers: Sequence[Any] = (),
        rollback: Callable[[int], str | None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.seeds_cfg = group_config("seeds", seeds, SeedsConfig)
        self.controller_cfg = group_config("controller", controller, ControllerConfig)
        self.schedule_cfg = group_config("schedule", schedule, ScheduleConfig)
        self.kernel_cfg = group_config("kernel", kernel, KernelConfig)
        self.reliability_cfg = group_config("reliability", reliability, ReliabilityConfig)
        self.optim_cfg = group_config("optim", optim, OptimConfig)
        self.model = model
        self.mesh = mesh if mesh is not None else default_mesh()
        self.seed_lr, self.rec_weight = seed_lr, float(rec_weight)
        self.loggers, self.rollback = list(loggers), rollback
        self.host_param_count = sum(p.numel() for p in model.parameters())
        if self.seeds_cfg.enabled:
            options = kernel_options(self.kernel_cfg)
            wrap(model, self.seeds_cfg, kernel=options, backend=self.kernel_cfg.backend, base_seed=int(base_seed))
        # seed shards + tensor-parallel host layers (seed > 1), by tp_plan or the model's own plan
        self.shard_plan = shard_model(model, self.mesh, tp_plan)
        self.layers = seeded_layers(model)
        self.bank_params = sum(
            (layer.bank.p0[0].numel() + layer.bank.p1[0].numel()) * layer.num_global_seeds
            for layer in self.layers.values()
        )
        self.controller = Controller(self.controller_cfg) if self.layers else None
        self.schedule = make_schedule(self.schedule_cfg)
        self.monitor = DivergenceMonitor(self.reliability_cfg)
        self.device = self._layers_device()
        self.seed_optimizer = make_seed_optimizer(self.optim_cfg, self.layers, 0.0) if self.layers else None
        self.guard = SeedGuard(
            self.layers, self.controller_cfg.embargo_steps, self.device, self.reliability_cfg.skip_nonfinite
        )
        self.steps = 0  # completed steps
        self.events: list[dict] = []  # every event so far (this process)
        self.last_report = None
        self._prev_host: list[torch.Tensor] | None = None
        self._host_named: list | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._armed = True  # the guard's before_forward is due at the next training forward
        self._checked_optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._started = False
        self._last_optimizer = None
        # on every seeded layer, not the root: Lightning and others run training_step, not the model's forward
        self._hooks = [layer.register_forward_pre_hook(self._before_forward) for layer in self.layers.values()]
        self.stages = self._gather_stages()

    # ---- what the user's loop asks for ---------------------------------------------------------------------
    @property
    def tensor_parallel(self) -> bool:
        return self.shard_plan.tensor_parallel

    def named_host_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the host, banks excluded. Read when first needed, so a DDP wrapper built after the
        engine (which may swap tensor-parallel parameters for local shards) is seen."""
        if self._host_named is None:
            self._host_named = named_host_parameters(self.model, self.layers)
        return self._host_named

    def host_parameters(self) -> list[nn.Parameter] | list[dict]:
        """What the user's optimizer should hold: the host's parameters, no blueprint bank. Under seed / hybrid
        sharding without DDP the host holds tensor-parallel DTensors beside plain tensors: then one param group
        per kind (optim.host_param_groups), which torch optimizers take as well; in one group their foreach and
        fused paths (the CUDA default) refuse the mix."""
        params = [p for _, p in self.named_host_parameters()]
        groups = host_param_groups(params)
        return params if len(groups) <= 1 else groups

    @property
    def prev_host(self) -> list[torch.Tensor]:
        """The host parameters at the last interval (for the weight drift signal); a checkpoint restores it."""
        if self._prev_host is None:
            self._prev_host = snapshot_host(self.named_host_parameters())
        return self._prev_host

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus ``rec_weight`` times the seeds' reconstruction losses of the last forward; call it on every
        training loss (each micro-batch when accumulating), before ``backward``."""
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError(f"loss() takes the scalar training loss tensor, got {type(loss).__name__}")
        self._check_device()
        value = loss.detach().reshape(())
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1
        total = with_rec_losses(loss, self.layers.values(), self.rec_weight)
        for layer in self.layers.values():
            layer.rec_loss = None  # consumed: the graph is not kept alive on the layer
        return total

    def step(self, optimizer: Any = None, *, evaluate: Callable[[], float] | None = None, host_step: bool = True):
        """One training step after ``backward``: see the module doc. ``optimizer``: the user's host optimizer
        (refused if it holds a bank parameter). ``host_step=False``: the caller steps the host optimizer itself
        (Lightning, the HF Trainer); the seeds are still guarded. Zeroes the banks' gradients."""
        self._check_device()
        if self._loss_sum is None:
            raise RuntimeError(
                "Morphogenesis.step() was called without loss(): pass every training loss through morph.loss(loss) "
                "before backward() (it adds the seeds' reconstruction losses, and the step guard reads it)"
            )
        if optimizer is not None:
            self._check_optimizer(optimizer)
            self._last_optimizer = optimizer
        self._started = True
        done = self.steps + 1
        loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        host_named = self.named_host_parameters()
        if self._prev_host is None:  # the drift of the first interval is measured from the first step's start
            self._prev_host = snapshot_host(host_named)
        if self._armed:  # no training forward since the last step (e.g. the loss came from elsewhere)
            self.guard.before_forward(done)
        finite = self.guard.after_backward(loss, done, host_named)
        ok = finite if self.reliability_cfg.skip_nonfinite else None
        at_interval = bool(self.layers) and done % self.controller_cfg.interval == 0
        grad_sq = host_square_sums(host_named, None, self.mesh, grads=True) if at_interval else None
        if self.optim_cfg.max_grad_norm and optimizer is not None and host_step:  # the norm above: before clipping
            clip_host_grad_norm_(host_named, float(self.optim_cfg.max_grad_norm), self.mesh)
        if optimizer is not None and host_step:
            guarded_step(optimizer, ok) if ok is not None else optimizer.step()
        if self.seed_optimizer is not None:
            self.seed_optimizer.lr = self._seed_lr(optimizer)
            self.seed_optimizer.step(ok)
            self.seed_optimizer.zero_grad()
        for layer in self.layers.values():
            self.schedule.step_(layer)
        tick_(self.layers)
        self.steps = done
        self._armed = True
        if at_interval:
            drift_sq = host_square_sums(host_named, self.prev_host, self.mesh, grads=False)
            self._prev_host = snapshot_host(host_named)
            if ok is not None:
                grad_sq = torch.where(ok, grad_sq, torch.zeros_like(grad_sq))
            extras = torch.cat([grad_sq, drift_sq, self.guard.interval_extras(self.mesh).to(grad_sq.device)])
            diverged, blending = self._interval(done, evaluate, extras)
            if diverged is not None:
                self._roll_back(done, diverged, blending)

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the engine needs to continue (this process's seeds): step count, seed layers' state and
        banks, seed optimizer, controller, reliability monitor, the host snapshot of the last interval, and the
        configs. Save it with your checkpoint (torch.save); the layers' tensors are also in model.state_dict()."""
        cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "seeds": {n: {k: cpu(v) for k, v in layer.state_dict().items()} for n, layer in self.layers.items()},
            "seed_optimizer": self.seed_optimizer.state_dict() if self.seed_optimizer is not None else None,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "reliability": self.monitor.state_dict(),
            "prev_host": [cpu(t) for t in self.prev_host],
            "schedule": self.schedule.name,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (on a model wrapped by an engine built with the same config)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"engine state version {state.get('version')!r} is not {STATE_VERSION}")
        if sorted(state["seeds"]) != sorted(self.layers):
            raise ValueError(f"engine state holds layers {sorted(state['seeds'])}, this model {sorted(self.layers)}")
        for name, layer in self.layers.items():
            layer.load_state_dict(state["seeds"][name])
        if self.seed_optimizer is not None and state.get("seed_optimizer") is not None:
            self.seed_optimizer.load_state_dict(state["seed_optimizer"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        with torch.no_grad():
            for t, saved in zip(self.prev_host, state.get("prev_host") or []):
                t.copy_(saved)
        self.after_restore(int(state["steps"]), state.get("reliability"))

    def after_restore(self, step: int, reliability: dict | None = None) -> None:
        """The engine's tensors were restored in place (``load_state_dict``, or the app's DCP checkpoint): continue
        from ``step``. Reads the stages again and resets the guard's per-interval accumulators."""
        self.steps = int(step)
        self.monitor.load_state_dict(reliability)
        self.guard.reset()
        for layer in self.layers.values():
            layer.refresh_idle_record()
        self._loss_sum, self._loss_count, self._armed = None, 0, True
        self.stages = self._gather_stages()

    def training_state(self, optimizer: Any = None) -> dict:
        """The keyword arguments of morpho_dist.checkpoint.save / load for this engine and a host optimizer."""
        return {
            "mesh": self.mesh,
            "layers": self.layers,
            "host_params": self.named_host_parameters(),
            "optimizers": Optimizers(optimizer, self.seed_optimizer),
            "controller": self.controller,
            "prev_host": self.prev_host,
        }

    def summary(self, optimizer: Any = None) -> dict:
        """Seed states of every rank (one all_gather_object when distributed), stage counts, grown and total
        parameter counts, the state digest and the step count."""
        ranks = gather_ranks(self.layers, self.mesh, Optimizers(optimizer or self._last_optimizer, self.seed_optimizer))
        out = build_summary(ranks, self.layers, steps=self.steps, world_size=self.mesh.world_size)
        out.update(
            params=self.host_param_count + self.bank_params,
            host_params=self.host_param_count,
            effective_params=self.host_param_count + out["grown_params"],
        )
        self.stages = global_stages(ranks)
        return out

    # ---- internals -----------------------------------------------------------------------------------------
    def _layers_device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.stage.device
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _check_device(self) -> None:
        now = self._layers_device()
        if now != self.device:
            hint = (
                "; the engine cannot follow it any more"
                if self._started
                else (", or call morph.follow_model_device() before the first step")
            )
            raise RuntimeError(
                f"the model moved from {self.device} to {now} after Morphogenesis(...) wrapped it: the seeds' "
                f"optimizer state and the guard are on {self.device}; move the model before wrapping it{hint}"
            )

    def follow_model_device(self) -> None:
        """Move the engine's own state (seed optimizer, guard, host snapshot) to the device the model was moved to
        after wrapping; only before the first step (integrations call it where their framework moves the model)."""
        now = self._layers_device()
        if now == self.device:
            return
        if self._started:
            self._check_device()
        self.device = now
        if self.seed_optimizer is not None:
            for st in self.seed_optimizer.state.values():
                for key in st:
                    st[key] = st[key].to(now)
            self.seed_optimizer._ids = {k: t.to(now) for k, t in self.seed_optimizer._ids.items()}
        self.guard = SeedGuard(self.layers, self.controller_cfg.embargo_steps, now, self.reliability_cfg.skip_nonfinite)
        self._host_named = None
        if self._prev_host is not None:
            self._prev_host = [t.to(now) for t in self._prev_host]

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of every SeededLayer: before the first seeded layer runs in a step's training forward,
        the guard culls seeds whose bank went non-finite and keeps the telemetry to fall back to."""
        if self._armed and module.training:
            self._check_device()
            self.guard.before_forward(self.steps + 1)
            self._armed = False

    def exclude_banks(self, optimizer: Any) -> None:
        """Take the blueprint banks out of an optimizer built over all of the model's parameters, before its first
        step (integrations whose framework builds the optimizer: Lightning's configure_optimizers, the HF Trainer)."""
        banks = {id(p) for layer in self.layers.values() for p in layer.bank.parameters()}
        if any(id(p) in banks for p in getattr(optimizer, "state", {})):
            raise ValueError(
                "the optimizer has already stepped the blueprint banks; exclude them before its first step"
            )
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in banks]

    def _check_optimizer(self, optimizer: Any) -> None:
        groups = optimizer.param_groups
        count = sum(len(g["params"]) for g in groups)
        if self._checked_optimizers.get(optimizer) == count:
            return
        banks = {
            id(p): f"{name}.bank.{k}" for name, layer in self.layers.items() for k, p in layer.bank.named_parameters()
        }
        for group in groups:
            for p in group["params"]:
                if id(p) in banks:
                    raise ValueError(
                        f"the optimizer holds the blueprint bank parameter {banks[id(p)]!r}: the seeds have their own "
                        "optimizer (a bank must not move while its seed is frozen or idle); build yours from "
                        "morph.host_parameters()"
                    )
        self._checked_optimizers[optimizer] = count

    def _seed_lr(self, optimizer: Any) -> float:
        if self.seed_lr is not None:
            return float(self.seed_lr)
        if optimizer is None:
            raise ValueError("step() needs the optimizer (or Morphogenesis(seed_lr=...)) to set the seeds' lr")
        return float(optimizer.param_groups[0]["lr"]) * float(self.optim_cfg.seed_lr_scale)

    def _gather_stages(self) -> dict[str, list[int]]:
        if not self.layers:
            return {}
        return global_stages(gather_ranks(self.layers, self.mesh, Optimizers(None, self.seed_optimizer)))

    def _interval(self, step: int, evaluate: Callable[[], float] | None, host_sums: torch.Tensor):
        """One controller interval; returns (the reason the host diverged or None, the seeds that were blending)."""
        layers, controller, schedule = self.layers, self.controller, self.schedule
        report = build_report(layers, step, dp=self.mesh.dp, extras=host_sums)
        grad_sq, drift_sq, prev_sq = report.extras[:3]
        weight_drift = math.sqrt(drift_sq) / max(math.sqrt(prev_sq), 1e-12)
        host = HostSignals(weight_drift=weight_drift, grad_norm=math.sqrt(grad_sq))
        faults = self.guard.interval_faults(report.extras[3:], report, self._resetter(), self.mesh)
        diverged = self.monitor.check(step, report.extras[3:], len(faults))
        if evaluate is None:
            waiting = [f"{s.layer}:{s.seed}" for s in report.seeds if controller.wants_counterfactual(s)]
            if waiting:
                raise ValueError(
                    f"step {step}: seeds {waiting} need the counterfactual validation loss: pass "
                    "morph.step(optimizer, evaluate=fn), fn() returning the validation loss (same on every rank)"
                )
        else:
            measure_counterfactuals(layers, report, evaluate, controller=controller)
        decisions = controller.decide(report, step) if diverged is None else []
        apply_decisions(layers, decisions, step, schedule)
        check_same_decisions([*faults, *decisions], layers, report, controller, step)
        for d in decisions:
            if d.target is not None and owns(layers[d.layer], d.seed):
                self._resetter().reset_seed(d.layer, local_index(layers[d.layer], d.seed))
        for layer in layers.values():
            schedule.on_interval(layer, report, host)
            layer.refresh_idle_record()  # after the interval's culls and decisions (one small copy per layer)
        decisions = [*faults, *decisions]
        events = [d.to_event(step) for d in decisions]
        for e in events:
            e["host"] = {"weight_drift": host.weight_drift, "grad_norm": host.grad_norm}
        stages = {name: [int(s.stage) for s in report.layer_seeds(name)] for name in report.layers}
        for d in decisions:
            if d.target is not None:
                stages[d.layer][d.seed] = int(d.target)
        self.stages, self.last_report = stages, report
        self.events.extend(events)
        for logger in self.loggers:
            logger.interval(step, report, events, stages)
        return diverged, blending_seeds(report)

    def _resetter(self) -> Optimizers:
        return Optimizers(None, self.seed_optimizer)

    def _roll_back(self, step: int, reason: str, blending: list[tuple[str, int]]) -> None:
        """Host divergence: ``rollback`` restores the last good state; the seeds that were blending become
        ROLLED_BACK. DivergenceError when there is no rollback, no saved state, or ``max_rollbacks`` are used up."""
        monitor = self.monitor
        if monitor.rollbacks >= monitor.max_rollbacks:
            raise DivergenceError(f"step {step}: {reason}; max_rollbacks reached")
        rollbacks, last_good = monitor.rollbacks + 1, monitor.last_good_step
        restored = self.rollback(last_good) if self.rollback is not None else None
        if restored is None:
            raise DivergenceError(
                f"step {step}: {reason}; no checkpoint to restore at or before step {last_good} (save one at least "
                "every controller interval: checkpoint.every in the app, Morphogenesis(rollback=...) in a loop)"
            )
        if self.steps > last_good:
            raise RuntimeError(
                f"rollback({last_good}) returned {restored!r} but the engine is still at step {self.steps}: it must "
                "restore the engine too (morph.load_state_dict)"
            )
        monitor.rollbacks = rollbacks
        at = self.steps
        marked = mark_rolled_back(self.layers, blending, at, self._resetter())
        event = {"step": step, "layer": None, "seed": None, "command": "restore", "from": None, "to": None}
        event.update(
            value=at, reason=f"host divergence: {reason}; restored {restored}", signals={"rollbacks": rollbacks}
        )
        events = [event] + [
            {"step": at, "layer": n, "seed": i, "command": "rollback", "from": src, "to": Stage.ROLLED_BACK.name}
            | {"value": None, "reason": "blending when the host diverged", "signals": {}}
            for n, i, src in marked
        ]
        self.events.extend(events)
        self.stages = self._gather_stages()
        for logger in self.loggers:
            if hasattr(logger, "events"):
                logger.events(events)
