"""Sharding plans: pure functions that apply a ``distributed.Mesh`` to a wrapped model.

    mesh = Mesh.from_config(cfg.sharding, env, device)       # axes dp x seed
    plan = shard_model(model, mesh)                          # seed shards + tensor-parallel host layers
    ddp = wrap_ddp(model, env, device, mesh=mesh, tensor_parallel=plan.tensor_parallel)   # DDP over dp
    params = named_host_parameters(model, layers)            # after DDP: what the host optimizer steps on

``sharding=seed|hybrid``: rank (d, s) keeps seeds ``[s*N/S, (s+1)*N/S)`` of every seeded layer (state,
telemetry, blueprint bank; so also only their optimizer state), and the host layers around each seeded point
are tensor parallel over the ``seed`` axis (torch.distributed.tensor.parallel): the target Linear is
column-parallel, the Linear after it row-parallel, both with local outputs, so the SeededLayer sees exactly its
seeds' features as a plain tensor. Gradients of everything are averaged over ``dp`` by DDP.

Global views (``global_view``, ``seed_view``) describe a rank's tensors as DTensors of the unsharded shape;
checkpoints and host-wide norms are built on them, so they do not depend on the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from morpho_dist.distributed import Mesh
from morpho_dist.layer import SeededLayer
from morpho_dist.models import seed_tp_plan
from morpho_dist.wrap import SeededOutput, seeded_layers


@dataclass
class ShardPlan:
    """What ``shard_model`` did: target -> successor (column- -> row-parallel) and each layer's global seeds."""

    tp: dict[str, str] = field(default_factory=dict)
    seed_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def tensor_parallel(self) -> bool:
        return bool(self.tp)


def shard_seeded_layers(model: nn.Module, mesh: Mesh) -> None:
    """Replace every SeededLayer by this rank's contiguous shard of its seeds (same global numbering)."""
    if mesh.seed == 1:
        return
    for module in model.modules():
        if isinstance(module, SeededOutput):
            layer = module.seeded
            per = layer.num_seeds // mesh.seed
            module.seeded = layer.narrow(mesh.seed_rank * per, per)


def shard_model(model: nn.Module, mesh: Mesh) -> ShardPlan:
    """Apply the mesh's seed sharding to a wrapped model, in place (nothing to do for ``data`` / seed = 1)."""
    layers = seeded_layers(model)
    mesh.check_seed_counts({name: layer.num_global_seeds for name, layer in layers.items()})
    plan = ShardPlan()
    if mesh.seed > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan.tp = seed_tp_plan(model, list(layers))
        shard_seeded_layers(model, mesh)
        styles: dict[str, object] = {}
        for target, successor in plan.tp.items():
            styles[f"{target}.original"] = ColwiseParallel(use_local_output=True)
            styles[successor] = RowwiseParallel(use_local_output=True)
        parallelize_module(model, mesh.seed_mesh, styles)
    plan.seed_ranges = {
        name: (layer.seed_offset, layer.seed_offset + layer.num_seeds) for name, layer in seeded_layers(model).items()
    }
    return plan


# ---- parameters and their global views ----------------------------------------------------------------------
def named_host_parameters(model: nn.Module, layers: Mapping[str, SeededLayer]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the host, blueprint banks excluded. Call it after DDP wraps the model: with DDP +
    tensor parallelism the parameters DDP and the optimizer hold are local shards (they carry ``_st_info``)."""
    bank = {id(p) for layer in layers.values() for p in layer.bank.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in bank and p.requires_grad]


def is_sharded(param: torch.Tensor) -> bool:
    """Whether a host parameter is a tensor-parallel shard (a DTensor, or DDP's local view of one)."""
    return isinstance(param, DTensor) or hasattr(param, "_st_info")


def local_part(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def global_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (laid out like host parameter ``like``: its value, grad or optimizer state) as a tensor of the
    global shape: itself when replicated or already a DTensor, a DTensor over DDP's local shard otherwise."""
    if isinstance(t, DTensor):
        return t.detach()
    spec = like._spec if isinstance(like, DTensor) else getattr(like, "_st_info", None)
    if spec is None:
        return t.detach()
    return DTensor.from_local(
        t.detach(), spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
    )


def seed_view(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """A per-seed tensor of this rank's shard (seeds along dim 0) as a DTensor of the whole population:
    Shard(0) over ``seed``, Replicate over ``dp``. Plain when seeds are not sharded."""
    if mesh.device_mesh is None or mesh.seed == 1:
        return t.detach()
    return DTensor.from_local(t.detach(), mesh.device_mesh, [Replicate(), Shard(0)], run_check=False)


@torch.no_grad()
def host_square_sums(
    params: list[tuple[str, nn.Parameter]], prev: list[torch.Tensor] | None, mesh: Mesh, *, grads: bool
) -> torch.Tensor:
    """This rank's share of host-wide sums of squares, to be summed over the world (telemetry's SUM
    collective): [sum grad^2] when ``grads``, else [sum (p - prev)^2, sum prev^2]. Each element is counted
    once: replicated parameters on rank 0, tensor-parallel shards on the dp-rank-0 replica."""
    device = params[0][1].device if params else torch.device("cpu")
    out = torch.zeros(1 if grads else 2, dtype=torch.float64, device=device)
    for i, (_, p) in enumerate(params):
        owner = mesh.dp_rank == 0 if is_sharded(p) else mesh.rank == 0
        if not owner:
            continue
        if grads:
            if p.grad is not None:
                out[0] += local_part(p.grad).detach().double().square().sum()
        else:
            now, before = local_part(p).detach().double(), prev[i].double()
            out[0] += (now - before).square().sum()
            out[1] += before.square().sum()
    return out


def snapshot_host(params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """Local copies of the host parameters (for the weight drift per interval)."""
    return [local_part(p).detach().clone() for _, p in params]
