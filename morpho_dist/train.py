"""run(cfg): the project's app, a plain training loop over the engine (morpho_dist.Morphogenesis).

    python -m morpho_dist.train [overrides]                        # one process
    torchrun --nproc_per_node=2 -m morpho_dist.train [overrides]   # sharding=data|seed|hybrid (gloo / nccl)

Build: mesh (dp x seed) -> data -> host -> Morphogenesis (wrap, seed shards, tensor-parallel host layers) -> DDP
over dp -> the host optimizer -> resume (DCP, any mesh). Per step: forward, ``morph.loss``, backward,
``morph.step`` (guarded optimizer step, seed banks, alpha, ticks; every ``controller.interval`` steps the
all-reduced report, counterfactuals on a fixed val batch, decisions, events to the run log; on a host divergence
the last good checkpoint through ``Checkpoints.roll_back``), metrics and checkpoints.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from morpho_dist import checkpoint
from morpho_dist.config_rules import validate
from morpho_dist.data import load_dataset
from morpho_dist.distributed import DistEnv, Mesh, pick_device, process_group, read_env, shared_run_dir, wrap_ddp
from morpho_dist.engine import Morphogenesis
from morpho_dist.flops import FlopMeter, Throughput, measure_host
from morpho_dist.interrupts import Interrupted, StopSignal
from morpho_dist.logging import make_run_log
from morpho_dist.models import build_model
from morpho_dist.optim import make_host_optimizer
from morpho_dist.reliability import hook, maybe_kill
from morpho_dist.resume import fits_config, resolve_resume, run_dir_lock
from morpho_dist.summary import stage_counts
from morpho_dist.task import build_task
from morpho_dist.wrap import find_targets

PROGRESS_KEYS = ("val/loss", "val/acc", "val/bpb")  # shown beside the loss on the progress bar


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: Any, env: DistEnv) -> str:
    """cfg.run_dir (the CLI sets it from Hydra), else a fresh outputs/<date>/<time> picked by rank 0."""
    return str(cfg.run_dir) if cfg.run_dir else shared_run_dir(env)


def build(cfg: Any, env: DistEnv, device: torch.device) -> dict:
    """Mesh, data stream, task, the host model under its engine, DDP, the host optimizer, the FLOP meter: what a
    run (or a test) starts from."""
    mesh = Mesh.from_config(cfg.sharding, env, device)
    seed_everything(int(cfg.seed))
    data = load_dataset(cfg.data, int(cfg.seed))
    batch_size, seed = int(cfg.train.batch_size), int(cfg.seed)
    stream = data.stream(batch_size, seed=seed, rank=mesh.dp_rank, world_size=mesh.dp, device=device)
    model = build_model(cfg.model, data.spec).to(device)
    targets = cfg.seeds.targets if isinstance(cfg.seeds.targets, str) else list(cfg.seeds.targets)
    seeded_names = find_targets(model, targets, list(cfg.seeds.exclude)) if cfg.seeds.enabled else []
    host_flops, seeded_rows = measure_host(model, stream.batch(0)[0], seeded_names)  # the host before wrapping
    morph = Morphogenesis(
        model,
        seeds=cfg.seeds,
        controller=cfg.controller,
        schedule=cfg.schedule,
        kernel=cfg.kernel,
        reliability=cfg.reliability,
        optim=cfg.optim,
        mesh=mesh,
        tp_plan=dict(cfg.sharding.tp_plan),
        rec_weight=float(cfg.train.rec_weight),
        base_seed=int(cfg.seed),
    )
    ddp = wrap_ddp(model, env, device, bool(cfg.sharding.find_unused_parameters), mesh, morph.tensor_parallel)
    optimizer = make_host_optimizer(cfg.optim, float(cfg.train.lr), morph.host_parameters())  # after DDP
    flops = FlopMeter.for_layers(host_flops, seeded_rows, morph.layers)
    built = {"mesh": mesh, "data": data, "stream": stream, "task": build_task(cfg.task), "model": model, "ddp": ddp}
    return built | {"morph": morph, "optimizer": optimizer, "flops": flops}


class Checkpoints:
    """The run dir's DCP checkpoints (morpho_dist.checkpoint) of what ``build`` made: the engine, the host
    optimizer and the FLOP meter."""

    def __init__(self, cfg: Any, run_dir: str, built: dict) -> None:
        self.cfg, self.run_dir, self.app_cfg = cfg.checkpoint, run_dir, cfg
        self.morph, self.optimizer, self.flops = built["morph"], built["optimizer"], built["flops"]

    def restore(self, path: str) -> str:
        at, extra = checkpoint.load(path, config=self.app_cfg, **self.morph.training_state(self.optimizer))
        self.morph.after_restore(at, extra.get("reliability"))
        self.flops.load_state_dict(extra.get("flops") or {})
        return path

    def roll_back(self, last_good_step: int) -> str | None:
        """The engine's rollback: the newest checkpoint at or before ``last_good_step`` that can be restored
        (walking back past any that is corrupt or holds non-finite host tensors), restored; None: none."""
        candidates = [p for s, p in checkpoint.list_checkpoints(self.run_dir) if s <= last_good_step]
        for target in reversed(candidates):
            try:
                return self.restore(target)
            except checkpoint.CheckpointError as err:
                print(f"warning: not restoring {target}: {err}", file=sys.stderr)
        return None

    def resume(self, steps: int, announce: bool) -> str | None:
        """checkpoint.resume (a path, a run dir, "auto"); a worker restarted by torchrun resumes "auto". Returns
        the checkpoint restored, if any."""
        resume = self.cfg.resume
        if resume in (None, "", "null") and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            resume = "auto"
        path = resolve_resume(resume, self.run_dir, steps=steps, fits=fits_config(self.app_cfg), announce=announce)
        if path is not None:
            self.restore(path)
        return path

    def save(self, step: int) -> None:
        path = checkpoint.checkpoint_path(self.run_dir, step)
        extra = {"reliability": self.morph.monitor.state_dict(), "flops": self.flops.state_dict()}
        state = self.morph.training_state(self.optimizer)
        checkpoint.save(path, step=step, extra=extra, keep=int(self.cfg.keep), config=self.app_cfg, **state)

    def save_if_due(self, step: int, last: bool) -> None:
        every = int(self.cfg.every)
        if (every and step % every == 0) or (last and self.cfg.save_final):
            self.save(step)

    def save_at_stop(self, step: int, start: int) -> None:
        """An interrupted run keeps its last step when checkpoints are on (unless that one is saved already)."""
        path = checkpoint.checkpoint_path(self.run_dir, step)
        if int(self.cfg.every) and step > start and checkpoint.latest_checkpoint(self.run_dir) != path:
            self.save(step)


def train_batches(cfg: Any, built: dict, monitor: Any, device: torch.device) -> Any:
    """The training batches: the run's stream until the first divergence restore, then a fresh order per restore
    (``DivergenceMonitor.batch_seed``), so that a replay never meets the same batches."""
    if monitor.rollbacks == 0:
        return built["stream"]
    mesh, seed, size = built["mesh"], monitor.batch_seed(int(cfg.seed)), int(cfg.train.batch_size)
    return built["data"].stream(size, seed=seed, rank=mesh.dp_rank, world_size=mesh.dp, device=device)


class Recorder:
    """An engine logger for tests: every interval's telemetry table and events, into ``record``."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def interval(self, step: int, report: Any, events: list[dict], stages: dict) -> None:
        self.record.setdefault("tables", []).append((step, report.table.clone()))
        self.record.setdefault("events", []).extend(events)


def run(cfg: Any, record: dict | None = None, stop: StopSignal | None = None) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json by rank 0).
    ``record`` (tests): filled with this rank's per-step losses, per-interval telemetry tables and events.
    ``stop`` (the CLI's signal handler): the run ends after the step every rank agrees on, saving a checkpoint
    there when ``checkpoint.every`` is set, and raises ``Interrupted``."""
    validate(cfg)
    env = read_env()
    per_device = int(cfg.train.ranks_per_device)
    device = pick_device(env, cfg.train.device, per_device)
    timeout = float(cfg.reliability.collective_timeout_s)
    with process_group(env, device, timeout, backend=str(cfg.sharding.backend), ranks_per_device=per_device):
        if not cfg.run_dir:
            cfg.run_dir = resolve_run_dir(cfg, env)  # picked once (rank 0's choice on every rank)
        with run_dir_lock(str(cfg.run_dir), env.is_main):  # one run per run dir
            return train(cfg, env, device, record, stop)


def train(cfg: Any, env: DistEnv, device: torch.device, record: dict | None, stop: StopSignal | None) -> dict:
    t0 = time.time()
    b = build(cfg, env, device)
    mesh, stream, task, model, ddp = b["mesh"], b["stream"], b["task"], b["model"], b["ddp"]
    morph, optimizer, flops = b["morph"], b["optimizer"], b["flops"]
    run_dir = resolve_run_dir(cfg, env)
    ckpt = Checkpoints(cfg, run_dir, b)
    morph.rollback = ckpt.roll_back
    resumed = ckpt.resume(int(cfg.train.steps), announce=env.is_main)
    start = morph.steps
    config = OmegaConf.to_container(cfg, resolve=True)
    where = {"resume_step": start if resumed else None, "resumed_from": resumed}
    log = make_run_log(cfg.logger, run_dir, is_main=env.is_main, config=config, **where)
    morph.loggers.append(log)
    if record is not None:
        morph.loggers.append(Recorder(record))
    cf_batches = stream.val(int(cfg.train.eval_batch))  # the same val batch on every rank
    val_loss = lambda: task.evaluate(model, cf_batches)["loss"]  # noqa: E731
    speed = Throughput(device, cfg.train.batch_size, b["data"].spec)
    evaluates = env.is_main or mesh.seed > 1  # every rank evaluates when the forward is collective (TP)
    steps, log_every = int(cfg.train.steps), int(cfg.train.log_every)
    bar = tqdm(total=steps, initial=start, disable=not (env.is_main and cfg.train.progress), dynamic_ncols=True)
    loss, losses = torch.zeros(()), []
    batches, batches_drawn = stream, 0
    while morph.steps < steps:
        step = morph.steps
        if stop is not None and stop.stop_after(step):
            bar.close()
            ckpt.save_at_stop(step, start)
            log.close()
            raise Interrupted(stop.signum, step, checkpoint.latest_checkpoint(run_dir) or resumed)
        maybe_kill(step, env.rank, run_dir)
        hook("before_step", step, {"layers": morph.layers, "model": model, "mesh": mesh, "morph": morph})
        model.train()
        if batches_drawn != morph.monitor.rollbacks:  # a fresh batch order after each divergence restore
            batches, batches_drawn = train_batches(cfg, b, morph.monitor, device), morph.monitor.rollbacks
        x, y = batches.batch(step)
        output = ddp(x)
        loss = hook("loss", step, task.loss(output, y))
        optimizer.zero_grad(set_to_none=True)
        morph.loss(loss).backward()
        morph.step(optimizer, evaluate=val_loss)
        flops.step(morph.stages)
        if record is not None:
            losses.append((step + 1, loss.detach()))
        if morph.steps <= step:  # a host divergence restored an earlier checkpoint
            bar.reset(total=steps)
            bar.update(morph.steps)
            continue
        done = morph.steps
        if log_every and (done % log_every == 0 or done == steps) and evaluates:
            metrics = {"train/loss": float(loss.detach())}
            metrics.update({f"train/{k}": v for k, v in task.train_metrics(output, y).items()})
            metrics.update(speed.metrics(done, flops))
            with speed.paused():
                metrics.update({f"val/{k}": v for k, v in task.evaluate(model, stream.val()).items()})
            if morph.layers:
                metrics.update({f"stages/{k}": v for k, v in stage_counts(morph.stages).items()})  # zeros too
            log.metrics(done, metrics)
            shown = {k.replace("/", "_"): f"{v:.3f}" for k, v in metrics.items() if k in PROGRESS_KEYS}
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **shown)
        ckpt.save_if_due(done, last=done == steps)
        bar.update(1)
    bar.close()

    val = task.evaluate(model, stream.val())
    summary = morph.summary(optimizer)
    summary.update({f"val_{k}": v for k, v in val.items() if k not in ("loss", "acc")})
    summary.update(val_loss=val["loss"], val_acc=val.get("acc"), train_loss=float(loss.detach()))
    summary.update(speed.summary(steps - start, flops), task=task.name, data=b["data"].spec.kind)
    summary.update(sharding=mesh.mode, mesh={"dp": mesh.dp, "seed": mesh.seed}, backend=str(cfg.kernel.backend))
    summary.update(device=str(device), run_dir=os.path.abspath(run_dir), runtime_s=time.time() - t0)
    if record is not None:
        record["losses"] = [(s, float(v)) for s, v in losses]
    log.finish(summary, morph.stages)
    return summary


if __name__ == "__main__":
    from morpho_dist.cli import main

    main()
