"""Process environment and process group: torchrun's variables are read here and nowhere else.

    env = read_env()                       # RANK, WORLD_SIZE, LOCAL_RANK (defaults: one process)
    device = pick_device(env, "auto")      # cuda:LOCAL_RANK when CUDA is there, else cpu
    created = init_process_group(env, device)   # gloo on CPU, nccl on CUDA; no-op for one process
    model = wrap_ddp(model, env, device)   # DDP, broadcast_buffers=False: each rank keeps its telemetry buffer

Only ``sharding=data`` exists so far (seeds replicated, batch sharded); ``Mesh`` checks the degrees. The seed
and hybrid modes (DeviceMesh + tensor parallel) are a later issue.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env() -> DistEnv:
    """The one place that reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    env = DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    if not 0 <= env.rank < env.world_size:
        raise RuntimeError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


@dataclass(frozen=True)
class Mesh:
    """Degrees of the (dp, seed) mesh; only the data-parallel mode exists so far (seed degree 1)."""

    mode: str
    dp: int
    seed: int = 1

    @classmethod
    def from_config(cls, sharding_cfg: Any, env: DistEnv) -> Mesh:
        mode = str(sharding_cfg.mode)
        if mode != "data":
            raise NotImplementedError(f"sharding.mode={mode!r} is not implemented yet; allowed values: ['data']")
        mesh = cls(mode=mode, dp=env.world_size, seed=1)
        if mesh.dp * mesh.seed != env.world_size:
            raise ValueError(f"mesh dp={mesh.dp} x seed={mesh.seed} != world size {env.world_size}")
        return mesh


def pick_device(env: DistEnv, preference: str = "auto") -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but CUDA is not available")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the process group (gloo for CPU, nccl for CUDA) when there are several processes; True when this
    call created it (the caller then destroys it)."""
    if not env.distributed or is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value of ``obj`` on every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_equal(value: Any) -> bool:
    """Whether every rank holds the same (picklable) ``value``."""
    if not is_initialized():
        return True
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def shared_run_dir(env: DistEnv, root: str = "outputs") -> str:
    """A fresh run dir chosen by rank 0 and handed to every rank (needs the process group when distributed)."""
    path = None
    if env.is_main:
        path = os.path.join(root, time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))
    return broadcast_object(path)


def wrap_ddp(model: nn.Module, env: DistEnv, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel for several processes (identity otherwise). broadcast_buffers=False: each rank
    keeps its own telemetry buffer; seed state buffers stay equal because every rank applies the same
    decisions."""
    if not env.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():
        # newer torch suggests forward_sync_buffers, which still syncs buffers at init: rank-local telemetry
        # buffers need broadcast_buffers=False (the warning itself says to keep it for that case)
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters
        )


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
