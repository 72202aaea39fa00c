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

import hashlib
import math
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
    destroy_process_group,
    init_process_group,
    is_initialized,
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
from morpho_dist.optim import make_optimizers
from morpho_dist.sharding import host_square_sums, named_host_parameters, shard_model, snapshot_host
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


def stage_counts(stages: dict[str, list[int]]) -> dict[str, int]:
    counts = {s.name: 0 for s in Stage}
    for seq in stages.values():
        for s in seq:
            counts[Stage(s).name] += 1
    return counts


def gather_ranks(layers: dict, mesh: Mesh, optimizers) -> list[dict]:
    """Every rank's seed shard: global seed ranges, local stages, bytes of blueprint / optimizer state and a
    digest of its seeds' state (one all_gather_object; a list of one entry in a single process)."""
    seeds_opt = optimizers.seeds.state if optimizers.seeds is not None else {}
    host_opt = optimizers.host.state if optimizers.host is not None else {}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))  # noqa: E731
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    info = {
        "rank": mesh.rank,
        "dp_rank": mesh.dp_rank,
        "seed_rank": mesh.seed_rank,
        "seed_ranges": {n: [layer.seed_offset, layer.seed_offset + layer.num_seeds] for n, layer in layers.items()},
        "blueprint_bytes": nbytes(p for layer in layers.values() for p in layer.bank.parameters()),
        "seed_optimizer_bytes": nbytes(t for st in seeds_opt.values() for t in st.values()),
        "host_optimizer_bytes": nbytes(local(t) for st in host_opt.values() for t in st.values()),
        "stages": {n: layer.stage.tolist() for n, layer in layers.items()},
        "seed_state_digest": seed_state_digest(layers),
    }
    if not is_initialized():
        return [info]
    out: list = [None] * mesh.world_size
    torch.distributed.all_gather_object(out, info)
    return out


def global_stages(ranks: list[dict]) -> dict[str, list[int]]:
    """Layer -> stage of every global seed, assembled from the dp-rank-0 shards."""
    out: dict[str, list[int]] = {}
    for info in sorted((r for r in ranks if r["dp_rank"] == 0), key=lambda r: r["seed_rank"]):
        for name, seq in info["stages"].items():
            out.setdefault(name, []).extend(seq)
    return out


def run(cfg: Any, record: dict | None = None) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json by rank 0).
    ``record`` (tests): filled with this rank's per-step losses, per-interval telemetry tables and decisions."""
    validate(cfg)
    env = read_env()
    device = pick_device(env, cfg.train.device)
    created = init_process_group(env, device)
    try:
        return _run(cfg, env, device, record)
    finally:
        if created:
            destroy_process_group()


def build(cfg: Any, env: DistEnv, device: torch.device) -> dict:
    """Mesh, data, sharded model, DDP, optimizers, controller: everything a run (or a test) starts from."""
    mesh = Mesh.from_config(cfg.sharding, env, device)
    seed_everything(int(cfg.seed))
    data = load_dataset(cfg.data, int(cfg.seed)).to(device)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    host_param_count = count_params(model)
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


def _run(cfg: Any, env: DistEnv, device: torch.device, record: dict | None) -> dict:
    t0 = time.time()
    b = build(cfg, env, device)
    mesh, data, model, ddp, layers = b["mesh"], b["data"], b["model"], b["ddp"], b["layers"]
    host_named, optimizers, controller = b["host_named"], b["optimizers"], b["controller"]
    run_dir = resolve_run_dir(cfg, env)
    schedule = make_schedule(cfg.schedule)
    prev_host = snapshot_host(host_named)
    ckpt = {"mesh": mesh, "layers": layers, "host_params": host_named, "optimizers": optimizers}

    start = 0
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        start, _ = checkpoint.load(resume_from, controller=controller, prev_host=prev_host, **ckpt)
    batches = ShardedBatches(
        len(data.y_train), int(cfg.train.batch_size), seed=int(cfg.seed), rank=mesh.dp_rank, world_size=mesh.dp
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
    # every rank evaluates when the forward itself is collective (tensor-parallel host layers)
    evaluates = env.is_main or mesh.seed > 1
    stages = global_stages(gather_ranks(layers, mesh, optimizers)) if layers else {}

    steps, interval = int(cfg.train.steps), int(cfg.controller.interval)
    log_every, ckpt_every = int(cfg.train.log_every), int(cfg.checkpoint.every)
    rec_weight = float(cfg.train.rec_weight)
    bar = tqdm(
        range(start, steps),
        total=steps,
        initial=start,
        disable=not (env.is_main and cfg.train.progress),
        dynamic_ncols=True,
        desc="train",
    )
    loss = torch.zeros(())
    losses = []
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
        grad_sq = host_square_sums(host_named, None, mesh, grads=True) if at_interval else None
        optimizers.step()
        for layer in layers.values():
            schedule.step_(layer)
        tick_(layers)
        if record is not None:
            losses.append((done, loss.detach()))

        if at_interval:
            drift_sq = host_square_sums(host_named, prev_host, mesh, grads=False)
            prev_host = snapshot_host(host_named)
            stages = _controller_interval(
                done,
                layers,
                mesh,
                controller,
                schedule,
                optimizers,
                val_loss_fn,
                log,
                torch.cat([grad_sq, drift_sq]),
                record,
            )
        if log_every and (done % log_every == 0 or done == steps) and evaluates:
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
            acc = float((logits.argmax(1) == data.y_train[idx]).float().mean())
            metrics = {"train/loss": float(loss.detach()), "train/acc": acc, "val/loss": val_loss, "val/acc": val_acc}
            if layers:
                metrics.update({f"stages/{k}": v for k, v in stage_counts(stages).items() if v})
            log.metrics(done, metrics)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_acc=f"{val_acc:.3f}")
        save_now = (ckpt_every and done % ckpt_every == 0) or (done == steps and cfg.checkpoint.save_final)
        if save_now:
            path = checkpoint.checkpoint_path(run_dir, done)
            checkpoint.save(path, step=done, controller=controller, prev_host=prev_host, **ckpt)
    bar.close()

    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    ranks = gather_ranks(layers, mesh, optimizers)
    stages = global_stages(ranks)
    by_shard: dict[int, set] = {}
    for r in ranks:
        by_shard.setdefault(r["seed_rank"], set()).add(r["seed_state_digest"])
    shard_digests = [sorted(by_shard[s])[0] for s in sorted(by_shard)]
    digest = (
        shard_digests[0]
        if len(shard_digests) == 1
        else hashlib.blake2b("|".join(shard_digests).encode(), digest_size=12).hexdigest()
    )
    per_seed = {name: layer.bank.p0[0].numel() + layer.bank.p1[0].numel() for name, layer in layers.items()}
    grown = sum(per_seed[n] * sum(Stage(s) in BLENDED_STAGES for s in seq) for n, seq in stages.items())
    summary = {
        "val_loss": val_loss,
        "val_acc": val_acc,
        "train_loss": float(loss.detach()),
        "stage_counts": stage_counts(stages),
        "seed_states": {name: [Stage(s).name for s in seq] for name, seq in stages.items()},
        "seed_state_digest": digest,
        "seeds_identical_across_ranks": all(len(v) == 1 for v in by_shard.values()),
        "steps": steps,
        "world_size": env.world_size,
        "sharding": mesh.mode,
        "mesh": {"dp": mesh.dp, "seed": mesh.seed},
        "ranks": [{k: v for k, v in r.items() if k != "stages"} for r in ranks],
        "params": b["host_param_count"] + b["bank_params"],
        "host_params": b["host_param_count"],
        "grown_params": grown,
        "effective_params": b["host_param_count"] + grown,
        "active_seeds": sum(Stage(s) in ACTIVE_STAGES for seq in stages.values() for s in seq),
        "backend": str(cfg.kernel.backend),
        "device": str(device),
        "run_dir": os.path.abspath(run_dir),
        "runtime_s": time.time() - t0,
    }
    if record is not None:
        record["losses"] = [(s, float(v)) for s, v in losses]
    log.finish(summary, stages)
    return summary


def _controller_interval(
    step, layers, mesh, controller, schedule, optimizers, val_loss_fn, log, host_sums, record
) -> dict[str, list[int]]:
    """One controller interval; returns the global post-decision stages (layer -> per-seed stage ids)."""
    report = build_report(layers, step, dp=mesh.dp, extras=host_sums)
    grad_sq, drift_sq, prev_sq = report.extras
    host = HostSignals(weight_drift=math.sqrt(drift_sq) / max(math.sqrt(prev_sq), 1e-12), grad_norm=math.sqrt(grad_sq))
    measure_counterfactuals(layers, report, val_loss_fn, controller=controller)
    decisions = controller.decide(report, step)
    apply_decisions(layers, decisions, step, schedule)
    verify_same_decisions(decisions_checksum(decisions, layers, report), step)
    for d in decisions:
        if d.target is not None and owns(layers[d.layer], d.seed):
            optimizers.reset_seed(d.layer, local_index(layers[d.layer], d.seed))
    for layer in layers.values():
        schedule.on_interval(layer, report, host)
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
    return stages


if __name__ == "__main__":
    from morpho_dist.cli import main

    main()
