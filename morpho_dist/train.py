"""run(cfg): env -> data -> host model -> wrap -> optimizers -> loop (+ controller, logs, checkpoints) -> summary.

    python -m morpho_dist.train [overrides]                        # one process
    torchrun --nproc_per_node=2 -m morpho_dist.train [overrides]   # sharding=data|seed|hybrid (gloo / nccl)

Build: mesh (dp x seed) -> data -> host -> wrap -> shard_model (seed shards, TP host layers) -> DDP over dp
-> optimizers -> resume (DCP, any mesh). Per step: forward, loss + sum of the SeededLayers' rec_loss,
backward, optimizer step, ``schedule.step_`` on every seeded layer and ``tick_``: no collective but those of
DDP and tensor parallelism. Every ``controller.interval`` steps: the health report (two all-reduces over the
world, which also carry the host grad / drift norms), counterfactual val losses, decisions (identical on every
rank, checked by one checksum all-reduce), applied by each rank to its seeds, events and telemetry logged by
rank 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from morpho_dist import checkpoint
from morpho_dist.commands import local_index, owns, tick_
from morpho_dist.config import validate
from morpho_dist.controller import Controller, apply_decisions, measure_counterfactuals
from morpho_dist.data import load_dataset
from morpho_dist.distributed import (
    DistEnv,
    Mesh,
    pick_device,
    process_group,
    read_env,
    shared_run_dir,
    wrap_ddp,
)
from morpho_dist.flops import FlopMeter, Throughput, measure_host
from morpho_dist.interrupts import Interrupted, StopSignal
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import with_rec_losses
from morpho_dist.lifecycle import Stage
from morpho_dist.logging import make_run_log
from morpho_dist.models import build_model, count_params
from morpho_dist.optim import make_optimizers
from morpho_dist.reliability import (
    DivergenceError,
    DivergenceMonitor,
    SeedGuard,
    blending_seeds,
    check_same_decisions,
    hook,
    mark_rolled_back,
    maybe_kill,
)
from morpho_dist.schedules import HostSignals, make_schedule
from morpho_dist.sharding import host_square_sums, named_host_parameters, shard_model, snapshot_host
from morpho_dist.summary import build_summary, gather_ranks, global_stages, stage_counts
from morpho_dist.task import build_task
from morpho_dist.telemetry import build_report
from morpho_dist.wrap import find_targets, seeded_layers, wrap


def kernel_options(kernel_cfg: Any) -> KernelOptions:
    """The `kernel` config group (schema: KernelConfig, validated) as launch options: every KernelOptions field."""
    return KernelOptions(**{f.name: kernel_cfg[f.name] for f in dataclasses.fields(KernelOptions)})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: Any, env: DistEnv) -> str:
    """cfg.run_dir (the CLI sets it from Hydra), else a fresh outputs/<date>/<time> picked by rank 0."""
    return str(cfg.run_dir) if cfg.run_dir else shared_run_dir(env)


def run(cfg: Any, record: dict | None = None, stop: StopSignal | None = None) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json by rank 0).
    ``record`` (tests): filled with this rank's per-step losses, per-interval telemetry tables and decisions.
    ``stop`` (the CLI's signal handler): the run ends after the step every rank agrees on, saving a checkpoint
    there when ``checkpoint.every`` is set, and raises ``Interrupted``."""
    validate(cfg)
    env = read_env()
    device = pick_device(env, cfg.train.device)
    with process_group(env, device, float(cfg.reliability.collective_timeout_s)):
        return _run(cfg, env, device, record, stop)


def build(cfg: Any, env: DistEnv, device: torch.device) -> dict:
    """Mesh, data, sharded model, DDP, optimizers, controller: everything a run (or a test) starts from."""
    mesh = Mesh.from_config(cfg.sharding, env, device)
    seed_everything(int(cfg.seed))
    data = load_dataset(cfg.data, int(cfg.seed))
    batch_size, seed = int(cfg.train.batch_size), int(cfg.seed)
    stream = data.stream(batch_size, seed=seed, rank=mesh.dp_rank, world_size=mesh.dp, device=device)
    model = build_model(cfg.model, data.spec).to(device)
    host_param_count = count_params(model)
    targets = cfg.seeds.targets if isinstance(cfg.seeds.targets, str) else list(cfg.seeds.targets)
    seeded_names = find_targets(model, targets, list(cfg.seeds.exclude)) if cfg.seeds.enabled else []
    host_flops, seeded_rows = measure_host(model, stream.batch(0)[0], seeded_names)
    if cfg.seeds.enabled:
        wrap(model, cfg.seeds, kernel=kernel_options(cfg.kernel), backend=cfg.kernel.backend, base_seed=int(cfg.seed))
    plan = shard_model(model, mesh)
    layers = seeded_layers(model)
    ddp = wrap_ddp(model, env, device, bool(cfg.sharding.find_unused_parameters), mesh, plan.tensor_parallel)
    host_named = named_host_parameters(model, layers)  # after DDP: the tensors DDP and the optimizer hold
    optimizers = make_optimizers(cfg.optim, float(cfg.train.lr), model, layers, [p for _, p in host_named])
    return {
        "mesh": mesh,
        "data": data,
        "stream": stream,
        "task": build_task(cfg.task),
        "flops": FlopMeter.for_layers(host_flops, seeded_rows, layers),
        "model": model,
        "ddp": ddp,
        "layers": layers,
        "host_named": host_named,
        "optimizers": optimizers,
        "controller": Controller(cfg.controller) if layers else None,
        "host_param_count": host_param_count,
        "bank_params": sum(
            (layer.bank.p0[0].numel() + layer.bank.p1[0].numel()) * layer.num_global_seeds for layer in layers.values()
        ),
    }


def _run(cfg: Any, env: DistEnv, device: torch.device, record: dict | None, stop: StopSignal | None = None) -> dict:
    t0 = time.time()
    b = build(cfg, env, device)
    mesh, stream, task, model, ddp, layers = b["mesh"], b["stream"], b["task"], b["model"], b["ddp"], b["layers"]
    data = b["data"]
    host_named, optimizers, controller = b["host_named"], b["optimizers"], b["controller"]
    run_dir = resolve_run_dir(cfg, env)
    schedule = make_schedule(cfg.schedule)
    prev_host = snapshot_host(host_named)
    ckpt = {"mesh": mesh, "layers": layers, "host_params": host_named, "optimizers": optimizers}
    rel = cfg.reliability
    guard = SeedGuard(layers, int(controller.cfg.embargo_steps) if controller else 0, device)
    monitor = DivergenceMonitor(rel)

    def restore(path: str) -> int:
        at, extra = checkpoint.load(path, controller=controller, prev_host=prev_host, **ckpt)
        monitor.load_state_dict(extra.get("reliability"))
        b["flops"].load_state_dict(extra.get("flops") or {})
        guard.reset()
        return at

    start = 0
    resume = cfg.checkpoint.resume
    if resume in (None, "", "null") and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        resume = "auto"  # a worker restarted by torchrun continues from the run dir's latest checkpoint
    resume_from = checkpoint.resolve_resume(resume, run_dir, steps=int(cfg.train.steps), announce=env.is_main)
    if resume_from is not None:
        start = restore(resume_from)
    cf_batches = stream.val(int(cfg.train.eval_batch))
    val_loss_fn = lambda: task.evaluate(model, cf_batches)["loss"]  # noqa: E731  same val batch on every rank
    flops, speed = b["flops"], Throughput(device, cfg.train.batch_size, data.spec)
    log = make_run_log(
        cfg.logger,
        run_dir,
        is_main=env.is_main,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_step=start if resume_from is not None else None,
        resumed_from=resume_from,
    )
    # every rank evaluates when the forward itself is collective (tensor-parallel host layers)
    evaluates = env.is_main or mesh.seed > 1
    stages = global_stages(gather_ranks(layers, mesh, optimizers)) if layers else {}

    steps, interval = int(cfg.train.steps), int(cfg.controller.interval)
    log_every, ckpt_every = int(cfg.train.log_every), int(cfg.checkpoint.every)
    rec_weight = float(cfg.train.rec_weight)
    bar = tqdm(total=steps, initial=start, disable=not (env.is_main and cfg.train.progress), dynamic_ncols=True)
    loss = torch.zeros(())
    losses = []
    step = start

    def save(done: int) -> None:
        extra = {"reliability": monitor.state_dict(), "flops": flops.state_dict()}
        path, keep = checkpoint.checkpoint_path(run_dir, done), int(cfg.checkpoint.keep)
        checkpoint.save(path, step=done, controller=controller, prev_host=prev_host, extra=extra, keep=keep, **ckpt)

    while step < steps:
        if stop is not None and stop.stop_after(step):
            bar.close()
            if (
                ckpt_every
                and step > start
                and checkpoint.latest_checkpoint(run_dir) != checkpoint.checkpoint_path(run_dir, step)
            ):
                save(step)
            log.close()
            raise Interrupted(stop.signum, step, checkpoint.latest_checkpoint(run_dir) or resume_from)
        maybe_kill(step, env.rank, run_dir)
        hook("before_step", step, {"layers": layers, "model": model, "mesh": mesh, "optimizers": optimizers})
        done = step + 1
        model.train()
        guard.before_forward(done)
        x, y = stream.batch(step)
        output = ddp(x)
        loss = hook("loss", step, task.loss(output, y))
        total = with_rec_losses(loss, layers.values(), rec_weight)
        optimizers.zero_grad()
        total.backward()
        finite = guard.after_backward(loss, done, host_named)  # seed culls and loss accounting, on the device
        ok = finite if rel.skip_nonfinite else None
        at_interval = bool(layers) and done % interval == 0
        grad_sq = host_square_sums(host_named, None, mesh, grads=True) if at_interval else None
        optimizers.step(ok)
        for layer in layers.values():
            schedule.step_(layer)
        tick_(layers)
        flops.step(stages)
        if record is not None:
            losses.append((done, loss.detach()))

        if at_interval:
            drift_sq = host_square_sums(host_named, prev_host, mesh, grads=False)
            prev_host = snapshot_host(host_named)
            if ok is not None:
                grad_sq = torch.where(ok, grad_sq, torch.zeros_like(grad_sq))
            extras = torch.cat([grad_sq, drift_sq, guard.interval_extras(mesh).to(grad_sq.device)])
            stages, diverged, blending = _controller_interval(
                done, layers, mesh, controller, schedule, optimizers, val_loss_fn, log, extras, record, (guard, monitor)
            )
            if diverged is not None:
                step = _roll_back(done, diverged, blending, run_dir, monitor, restore, layers, optimizers, log, bar)
                continue
        if log_every and (done % log_every == 0 or done == steps) and evaluates:
            metrics = {"train/loss": float(loss.detach())}
            metrics.update({f"train/{k}": v for k, v in task.train_metrics(output, y).items()})
            metrics.update(speed.metrics(done, flops))
            with speed.paused():
                metrics.update({f"val/{k}": v for k, v in task.evaluate(model, stream.val()).items()})
            if layers:
                metrics.update({f"stages/{k}": v for k, v in stage_counts(stages).items()})  # zeros too
            log.metrics(done, metrics)
            shown = {k: f"{v:.3f}" for k, v in metrics.items() if k in ("val/loss", "val/acc", "val/bpb")}
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **{k.replace("/", "_"): v for k, v in shown.items()})
        save_now = (ckpt_every and done % ckpt_every == 0) or (done == steps and cfg.checkpoint.save_final)
        if save_now:
            save(done)
        bar.update(1)
        step = done
    bar.close()

    val = task.evaluate(model, stream.val())
    ranks = gather_ranks(layers, mesh, optimizers)
    val_loss, val_acc = val["loss"], val.get("acc")
    summary = build_summary(ranks, layers, val_loss=val_loss, val_acc=val_acc, loss=loss, steps=steps, env=env)
    summary.update({f"val_{k}": v for k, v in val.items() if k not in ("loss", "acc")})
    summary.update(speed.summary(steps - start, flops), task=task.name, data=data.spec.kind)
    summary.update(
        sharding=mesh.mode,
        mesh={"dp": mesh.dp, "seed": mesh.seed},
        params=b["host_param_count"] + b["bank_params"],
        host_params=b["host_param_count"],
        effective_params=b["host_param_count"] + summary["grown_params"],
        backend=str(cfg.kernel.backend),
        device=str(device),
        run_dir=os.path.abspath(run_dir),
        runtime_s=time.time() - t0,
    )
    if record is not None:
        record["losses"] = [(s, float(v)) for s, v in losses]
    log.finish(summary, global_stages(ranks))
    return summary


def _roll_back(step, reason, blending, run_dir, monitor, restore, layers, optimizers, log, bar) -> int:
    """Host divergence: restore the last good checkpoint, mark the seeds that were blending ROLLED_BACK; returns
    the step to continue from. DivergenceError when there is none or ``max_rollbacks`` are used up."""
    target = checkpoint.latest_checkpoint(run_dir, max_step=monitor.last_good_step)
    if target is None or monitor.rollbacks >= monitor.max_rollbacks:
        why = "no checkpoint to restore (set checkpoint.every)" if target is None else "max_rollbacks reached"
        raise DivergenceError(f"step {step}: {reason}; {why}")
    rollbacks = monitor.rollbacks + 1
    at = restore(target)
    monitor.rollbacks = rollbacks
    marked = mark_rolled_back(layers, blending, at, optimizers)
    event = {"step": step, "layer": None, "seed": None, "command": "restore", "from": None, "to": None}
    event.update(value=at, reason=f"host divergence: {reason}; restored {target}", signals={"rollbacks": rollbacks})
    events = [event] + [
        {"step": at, "layer": n, "seed": i, "command": "rollback", "from": src, "to": Stage.ROLLED_BACK.name}
        | {"value": None, "reason": "blending when the host diverged", "signals": {}}
        for n, i, src in marked
    ]
    log.events(events)
    bar.reset(total=bar.total)
    bar.update(at)
    return at


def _controller_interval(
    step, layers, mesh, controller, schedule, optimizers, val_loss_fn, log, host_sums, record, reliability=None
) -> tuple[dict[str, list[int]], str | None, list[tuple[str, int]]]:
    """One controller interval; returns the global post-decision stages (layer -> per-seed stage ids), the
    reason the host diverged (None if it did not) and the seeds that were blending."""
    report = build_report(layers, step, dp=mesh.dp, extras=host_sums)
    grad_sq, drift_sq, prev_sq = report.extras[:3]
    host = HostSignals(weight_drift=math.sqrt(drift_sq) / max(math.sqrt(prev_sq), 1e-12), grad_norm=math.sqrt(grad_sq))
    faults, diverged = [], None
    if reliability is not None:
        guard, monitor = reliability
        faults = guard.interval_faults(report.extras[3:], report, optimizers, mesh)
        diverged = monitor.check(step, report.extras[3:], len(faults))
    measure_counterfactuals(layers, report, val_loss_fn, controller=controller)
    decisions = controller.decide(report, step) if diverged is None else []
    apply_decisions(layers, decisions, step, schedule)
    check_same_decisions([*faults, *decisions], layers, report, controller, step)
    for d in decisions:
        if d.target is not None and owns(layers[d.layer], d.seed):
            optimizers.reset_seed(d.layer, local_index(layers[d.layer], d.seed))
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
    log.interval(step, report, events, stages)
    if record is not None:
        record.setdefault("tables", []).append((step, report.table.clone()))
        record.setdefault("events", []).extend(events)
    return stages, diverged, blending_seeds(report)


if __name__ == "__main__":
    from morpho_dist.cli import main

    main()
