"""Helpers for the gloo tests: run train.run (or build + checkpoint calls) in N spawned processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = [
    "kernel.backend=reference",
    "kernel.deterministic=true",
    "train.progress=false",
    "controller.interval=5",
    "controller.fine_tuning_steps=20",
    "schedule.ramp_steps=10",
    "logger=none",
]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a torchrun subprocess: this repo importable, no rank variables of our own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORPHO_RUN_DIR")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on nproc local processes with a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]


def run_launcher(cmd: list[str], cwd, *, timeout: int = 300, **env_extra: str) -> subprocess.CompletedProcess:
    """Run a launcher command line (torchrun, launch/*.sh) in cwd with launcher_env, output captured."""
    return subprocess.run(cmd, cwd=cwd, env=launcher_env(**env_extra), capture_output=True, text=True, timeout=timeout)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from morpho_dist.cli import CONF_DIR
    from morpho_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[*FAST, *overrides])


def _set_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def record_launches(launches: list) -> None:
    """Wrap the Triton launchers (kernels.launch.run_forward / run_backward: every forward and backward launch,
    prepared or not, goes through them by module attribute) so that each appends (direction, device, rows,
    features, seeds, bank.p0 shape) to ``launches``: what this rank really ran its kernels on."""
    from morpho_dist.kernels import launch

    def recording(direction, fn, stage_at, p0_at):
        def call(*args, **kwargs):
            x2, stage, p0 = args[1], args[stage_at], args[p0_at]
            rows = x2.numel() // x2.shape[-1]
            launches.append((direction, str(x2.device), rows, x2.shape[-1], stage.numel(), tuple(p0.shape)))
            return fn(*args, **kwargs)

        return call

    launch.run_forward = recording("fwd", launch.run_forward, 2, 5)  # (plan, x2, stage, blend, alpha, p0, ...)
    launch.run_backward = recording("bwd", launch.run_backward, 4, 7)  # (plan, x2, dy2, drec, stage, ..., p0, ...)


def _run_recorded(overrides: list[str], launches: bool) -> dict:
    from morpho_dist.train import run

    record: dict = {}
    if launches:
        record_launches(record.setdefault("launches", []))
    summary = run(compose(overrides), record)
    return {"summary": summary, "record": record}


def _train_worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str, launches: bool) -> None:
    _set_env(rank, world, port)
    torch.save(_run_recorded(overrides, launches), os.path.join(out_dir, f"rank{rank}.pt"))


def train(world: int, overrides: list[str], out_dir, *, launches: bool = False) -> list[dict]:
    """train.run on ``world`` processes (in this process when world == 1); each rank's summary and record.
    ``launches``: record["launches"] lists the rank's Triton launches (``record_launches``)."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if world == 1:
        return [_run_recorded(overrides, launches)]
    mp.spawn(_train_worker, args=(world, free_port(), overrides, out_dir, launches), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _resave_worker(rank: int, world: int, port: int, overrides: list[str], src: str, dst: str) -> None:
    _set_env(rank, world, port)
    resave(overrides, src, dst)


def resave(overrides: list[str], src: str, dst: str) -> None:
    """Build the run's model under ``overrides``, load checkpoint ``src`` into it and save it again to ``dst``."""
    from morpho_dist import checkpoint
    from morpho_dist.distributed import pick_device, process_group, read_env
    from morpho_dist.train import build

    env = read_env()
    device = pick_device(env, "cpu")
    with process_group(env, device):
        b = build(compose(overrides), env, device)
        state = b["morph"].training_state(b["optimizer"])
        step, _ = checkpoint.load(src, **state)
        checkpoint.save(dst, step=step, **state)


def resave_on(world: int, overrides: list[str], src, dst) -> None:
    if world == 1:
        resave(overrides, str(src), str(dst))
    else:
        mp.spawn(_resave_worker, args=(world, free_port(), overrides, str(src), str(dst)), nprocs=world, join=True)


def read_full(path) -> dict:
    """A DCP checkpoint as full (unsharded) tensors, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(path) + ".full.pt"
    dcp_to_torch_save(str(path), out)
    return torch.load(out, weights_only=False)


# ---- comparing a sharded run with the one-process run ----------------------------------------------------------
def _global_losses(outs: list[dict]) -> list[tuple[int, float]]:
    """Per step, the mean over the dp replicas (seed shard 0) of their local-batch mean losses."""
    reps = [o for o in outs if _coords(o)[1] == 0]
    steps = [s for s, _ in reps[0]["record"]["losses"]]
    return [(s, sum(o["record"]["losses"][i][1] for o in reps) / len(reps)) for i, s in enumerate(steps)]


def _coords(out: dict) -> tuple[int, int]:
    me = out["summary"]["ranks"][out["record"]["rank"]]
    return me["dp_rank"], me["seed_rank"]


def _decisions(events: list[dict]) -> list[tuple]:
    return [(e["step"], e["layer"], e["seed"], e["command"], e["from"], e["to"]) for e in events]


def assert_matches(single: dict, outs: list[dict], steps: int, interval: int = 5) -> None:
    """Every rank of ``outs`` matches the one-process run: global-batch losses within 1e-5 relative, telemetry
    tables within 1e-5 of each field's scale, identical decisions, seed states and parameter counts."""
    for r, o in enumerate(outs):
        o["record"]["rank"] = r
    ref_losses = single["record"]["losses"]
    assert len(ref_losses) == steps
    got = _global_losses(outs)
    assert [s for s, _ in got] == [s for s, _ in ref_losses]
    for (step, a), (_, b) in zip(ref_losses, got):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    ref_tables = single["record"]["tables"]
    assert len(ref_tables) == steps // interval
    for o in outs:
        tables = o["record"]["tables"]
        assert [s for s, _ in tables] == [s for s, _ in ref_tables]
        for (step, want), (_, have) in zip(ref_tables, tables):
            scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # per layer and field
            err = ((have.cpu() - want.cpu()).abs() / scale.cpu()).max()
            assert err <= 1e-5, (step, float(err))
        assert _decisions(o["record"]["events"]) == _decisions(single["record"]["events"])
        for mine, ref in zip(o["record"]["events"], single["record"]["events"]):
            for key, want in ref.get("host", {}).items():  # host-wide grad norm and weight drift of the interval
                assert abs(mine["host"][key] - want) <= 1e-5 * abs(want), (mine["step"], key, mine["host"][key], want)
    assert _decisions(single["record"]["events"]), "the controller made no decision"
    s0 = outs[0]["summary"]
    assert s0["seed_states"] == single["summary"]["seed_states"]
    assert s0["seeds_identical_across_ranks"]
    assert s0["params"] == single["summary"]["params"]
    # each seed shard holds 1/seed of the blueprint banks and of the seed optimizer state
    full = single["summary"]["ranks"][0]
    seed = s0["mesh"]["seed"]
    for info in s0["ranks"]:
        assert info["blueprint_bytes"] * seed == full["blueprint_bytes"]
        assert info["seed_optimizer_bytes"] * seed == full["seed_optimizer_bytes"]


def launch_shapes(out: dict) -> set[tuple]:
    """(direction, features, seeds) of every Triton launch a rank made."""
    return {(d, f, s) for d, _, _, f, s, _ in out["record"]["launches"]}
