"""run(cfg): env -> data -> host model -> wrap -> optimizers -> loop (+ controller, logs, checkpoints) -> summary.

    python -m morpho_dist.train [overrides]                        # one process
    torchrun --nproc_per_node=2 -m morpho_dist.train [overrides]   # data parallel (gloo on CPU, nccl on GPU)

Per step: forward, loss + sum of the SeededLayers' rec_loss, backward, optimizer step, ``schedule.step_`` on
every seeded layer and ``tick_``. Every ``controller.interval`` steps: all-reduced health report,
counterfactual val losses, decisions (identical on every rank, checked by checksum), applied, alpha rates set,
events and telemetry logged by rank 0.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from morpho_dist import checkpoint
from morpho_dist.commands import local_index, owns, tick_
from morpho_dist.config import validate
from morpho_dist.controller import (
    Controller,
    apply_decisions,
    decisions_checksum,
    measure_counterfactuals,
    verify_same_decisions,
)
from morpho_dist.data import ShardedBatches, load_dataset, val_subset
from morpho_dist.distributed import (
    DistEnv,
    Mesh,
    all_equal,
    destroy_process_group,
    init_process_group,
    pick_device,
    read_env,
    shared_run_dir,
    wrap_ddp,
)
from morpho_dist.grafting import HostSignals, make_schedule
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.lifecycle import ACTIVE_STAGES, BLENDED_STAGES, Stage
from morpho_dist.logging import make_run_log
from morpho_dist.models import build_model, count_params
from morpho_dist.optim import host_parameters, make_optimizers
from morpho_dist.telemetry import build_report
from morpho_dist.wrap import seeded_layers, wrap


def kernel_options(kernel_cfg: Any) -> KernelOptions:
    return KernelOptions(
        block_rows=int(kernel_cfg.block_rows),
        block_cols=int(kernel_cfg.block_cols),
        num_warps=int(kernel_cfg.num_warps),
        deterministic=bool(kernel_cfg.deterministic),
        dot_precision=str(kernel_cfg.dot_precision),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: Any, env: DistEnv) -> str:
    """cfg.run_dir (the CLI sets it from Hydra), else a fresh outputs/<date>/<time> picked by rank 0."""
    return str(cfg.run_dir) if cfg.run_dir else shared_run_dir(env)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (SeededLayers collect no telemetry there)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)


def _flat_host(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone() if params else torch.zeros(0)


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def seed_params(layers: dict, stages: set[Stage]) -> int:
    """Blueprint parameters of the seeds in ``stages`` (what growth added to the host)."""
    total = 0
    for layer in layers.values():
        per_seed = (layer.bank.p0[0].numel() + layer.bank.p1[0].numel()) if layer.num_seeds else 0
        total += per_seed * sum(Stage(s) in stages for s in layer.stage.tolist())
    return total


def seed_state_digest(layers: dict) -> str:
    """A hash of every seed's state and blueprint parameters (not the rank-local telemetry): equal on all ranks
    when the replicated seeds evolved identically."""
    h = hashlib.blake2b(digest_size=12)
    for name, layer in layers.items():
        h.update(name.encode())
        for key, tensor in sorted(layer.state_dict().items()):
            if not key.endswith("telemetry"):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stage_counts(layers: dict) -> dict[str, int]:
    counts = {s.name: 0 for s in Stage}
    for layer in layers.values():
        for s in layer.stage.tolist():
            counts[Stage(s).name] += 1
    return counts


def run(cfg: Any) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json by rank 0)."""
    validate(cfg)
    env = read_env()
    device = pick_device(env, cfg.train.device)
    created = init_process_group(env, device)
    try:
        return _run(cfg, env, device)
    finally:
        if created:
            destroy_process_group()


def _run(cfg: Any, env: DistEnv, device: torch.device) -> dict:
    t0 = time.time()
    mesh = Mesh.from_config(cfg.sharding, env)
    run_dir = resolve_run_dir(cfg, env)
    seed_everything(int(cfg.seed))
    data = load_dataset(cfg.data, int(cfg.seed)).to(device)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    host_param_count = count_params(model)
    if cfg.seeds.enabled:
        wrap(model, cfg.seeds, kernel=kernel_options(cfg.kernel), backend=cfg.kernel.backend, base_seed=int(cfg.seed))
    layers = seeded_layers(model)
    optimizers = make_optimizers(cfg.optim, float(cfg.train.lr), model, layers)
    controller = Controller(cfg.controller) if layers else None
    schedule = make_schedule(cfg.schedule)
    host_params = host_parameters(model, layers)

    start, extra = 0, {}
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        start, extra = checkpoint.load(
            resume_from, model=model, optimizers=optimizers, controller=controller, device=device
        )
    ddp = wrap_ddp(model, env, device, bool(cfg.sharding.find_unused_parameters))
    batches = ShardedBatches(
        len(data.y_train), int(cfg.train.batch_size), seed=int(cfg.seed), rank=env.rank, world_size=env.world_size
    )
    x_cf, y_cf = val_subset(data, int(cfg.train.eval_batch))
    val_loss_fn = lambda: evaluate(model, x_cf, y_cf)[0]  # noqa: E731  same val batch on every rank
    log = make_run_log(
        cfg.logger,
        run_dir,
        is_main=env.is_main,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_step=start if resume_from is not None else None,
    )

    steps, interval = int(cfg.train.steps), int(cfg.controller.interval)
    log_every, ckpt_every = int(cfg.train.log_every), int(cfg.checkpoint.every)
    rec_weight = float(cfg.train.rec_weight)
    prev_host = extra.get("prev_host", _flat_host(host_params)).to(device)
    bar = tqdm(
        range(start, steps),
        total=steps,
        initial=start,
        disable=not (env.is_main and cfg.train.progress),
        dynamic_ncols=True,
        desc="train",
    )
    loss = torch.zeros(())
    for step in bar:
        done = step + 1
        model.train()
        idx = batches.indices(step).to(device)
        logits = ddp(data.x_train[idx])
        loss = F.cross_entropy(logits, data.y_train[idx])
        total = loss
        for layer in layers.values():
            if layer.rec_loss is not None:
                total = total + rec_weight * layer.rec_loss
        optimizers.zero_grad()
        total.backward()
        at_interval = bool(layers) and done % interval == 0
        grad_norm = _grad_norm(host_params) if at_interval else 0.0
        optimizers.step()
        for layer in layers.values():
            schedule.step_(layer)
        tick_(layers)

        if at_interval:
            now_host = _flat_host(host_params)
            drift = float((now_host - prev_host).norm() / prev_host.norm().clamp_min(1e-12))
            prev_host = now_host
            _controller_interval(
                done,
                layers,
                controller,
                schedule,
                optimizers,
                val_loss_fn,
                log,
                HostSignals(weight_drift=drift, grad_norm=grad_norm),
            )
        if log_every and (done % log_every == 0 or done == steps) and env.is_main:
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
            acc = float((logits.argmax(1) == data.y_train[idx]).float().mean())
            metrics = {"train/loss": float(loss.detach()), "train/acc": acc, "val/loss": val_loss, "val/acc": val_acc}
            if layers:
                metrics.update({f"stages/{k}": v for k, v in stage_counts(layers).items() if v})
            log.metrics(done, metrics)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_acc=f"{val_acc:.3f}")
        save_now = (ckpt_every and done % ckpt_every == 0) or (done == steps and cfg.checkpoint.save_final)
        if save_now and env.is_main:
            checkpoint.save(
                checkpoint.checkpoint_path(run_dir, done),
                step=done,
                model=model,
                optimizers=optimizers,
                controller=controller,
                extra={"prev_host": prev_host.cpu()},
            )
    bar.close()

    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    states = {name: [Stage(s).name for s in layer.stage.tolist()] for name, layer in layers.items()}
    digest = seed_state_digest(layers)
    grown = seed_params(layers, set(BLENDED_STAGES))
    summary = {
        "val_loss": val_loss,
        "val_acc": val_acc,
        "train_loss": float(loss.detach()),
        "stage_counts": stage_counts(layers),
        "seed_states": states,
        "seed_state_digest": digest,
        "seeds_identical_across_ranks": all_equal(digest),
        "steps": steps,
        "world_size": env.world_size,
        "sharding": mesh.mode,
        "params": count_params(model),
        "host_params": host_param_count,
        "grown_params": grown,
        "effective_params": host_param_count + grown,
        "active_seeds": sum(
            int(layer.stage.tolist().count(int(s))) for layer in layers.values() for s in ACTIVE_STAGES
        ),
        "backend": str(cfg.kernel.backend),
        "device": str(device),
        "run_dir": os.path.abspath(run_dir),
        "runtime_s": time.time() - t0,
    }
    log.finish(summary, {name: layer.stage.tolist() for name, layer in layers.items()})
    return summary


def _controller_interval(step, layers, controller, schedule, optimizers, val_loss_fn, log, host: HostSignals) -> None:
    report = build_report(layers, step)
    measure_counterfactuals(layers, report, val_loss_fn, controller=controller)
    decisions = controller.decide(report, step)
    apply_decisions(layers, decisions, step, schedule)
    verify_same_decisions(decisions_checksum(decisions, layers), step)
    for d in decisions:
        if d.target is not None and owns(layers[d.layer], d.seed):
            optimizers.reset_seed(d.layer, local_index(layers[d.layer], d.seed))
    for layer in layers.values():
        schedule.on_interval(layer, report, host)
    events = [d.to_event(step) for d in decisions]
    for e in events:
        e["host"] = {"weight_drift": host.weight_drift, "grad_norm": host.grad_norm}
    log.interval(step, report, events, {name: layer.stage.tolist() for name, layer in layers.items()})


if __name__ == "__main__":
    from morpho_dist.cli import main

    main()
