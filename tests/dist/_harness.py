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


def _train_worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str) -> None:
    _set_env(rank, world, port)
    from morpho_dist.train import run

    record: dict = {}
    summary = run(compose(overrides), record)
    torch.save({"summary": summary, "record": record}, os.path.join(out_dir, f"rank{rank}.pt"))


def train(world: int, overrides: list[str], out_dir) -> list[dict]:
    """train.run on ``world`` processes (in this process when world == 1); each rank's summary and record."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if world == 1:
        from morpho_dist.train import run

        record: dict = {}
        summary = run(compose(overrides), record)
        return [{"summary": summary, "record": record}]
    mp.spawn(_train_worker, args=(world, free_port(), overrides, out_dir), nprocs=world, join=True)
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
