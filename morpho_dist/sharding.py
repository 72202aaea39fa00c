"""Sharding plans: pure functions that apply a ``distributed.Mesh`` to a wrapped model.

    mesh = Mesh.from_config(cfg.sharding, env, device)       # axes dp x seed
    plan = shard_model(model, mesh, user_plan)               # seed shards + tensor-parallel host layers
    ddp = wrap_ddp(model, env, device, mesh=mesh, tensor_parallel=plan.tensor_parallel)   # DDP over dp
    params = named_host_parameters(model, layers)            # after DDP: what the host optimizer steps on
    opt = torch.optim.AdamW(optim.host_param_groups(p for _, p in params), lr=...)   # DTensors in their own group

``sharding=seed|hybrid``: rank (d, s) keeps seeds ``[s*N/S, (s+1)*N/S)`` of every seeded layer (state,
telemetry, blueprint bank; so also only their optimizer state), and host Linears are tensor parallel over the
``seed`` axis (torch.distributed.tensor.parallel) with local outputs, by a plan of module names -> "colwise" |
"rowwise" (torchtitan's convention; ``tp_plan``): the user's (``sharding.tp_plan``), else the model's own (a
``transformers`` model's ``config.base_model_tp_plan``), else the built-in host's (the seeded Linear
column-parallel, the Linear after it row-parallel). Each seeded target is column-parallel, so its SeededLayer
sees exactly its seeds' features as a plain tensor. Gradients of everything are averaged over ``dp`` by DDP.

Global views (``global_view``, ``seed_view``) describe a rank's tensors as DTensors of the unsharded shape;
checkpoints and host-wide norms are built on them, so they do not depend on the mesh.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from morpho_dist.distributed import Mesh, is_initialized
from morpho_dist.layer import SeededLayer
from morpho_dist.models import seed_tp_plan
from morpho_dist.wrap import SeededOutput, seeded_layers

STYLES = ("colwise", "rowwise")


@dataclass
class ShardPlan:
    """What ``shard_model`` did: the tensor-parallel styles by module name, where the plan came from, and each
    layer's global seed range on this rank."""

    tp: dict[str, str] = field(default_factory=dict)
    source: str = ""
    seed_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def tensor_parallel(self) -> bool:
        return bool(self.tp)


def _host_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every host Linear a plan may name: a seeded target counts under its own name."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, SeededOutput) or isinstance(module, nn.Linear) and not name.endswith(".original"):
            out[name] = module
    return out


def _expand(patterns: Mapping[str, str], names: list[str], source: str) -> dict[str, str]:
    """Plan patterns ('*' stands for one name component, as in torchtitan and transformers) -> concrete names."""
    out: dict[str, str] = {}
    for pattern, style in patterns.items():
        if style not in STYLES:
            raise ValueError(
                f"{source}: {pattern!r} -> {style!r} is not a supported tensor-parallel style; allowed values: "
                f"{list(STYLES)}"
            )
        regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            raise ValueError(f"{source}: {pattern!r} matches no Linear module of the model")
        for name in hits:
            out[name] = style
    return out


def _model_plan(model: nn.Module) -> dict[str, str] | None:
    """transformers models: ``config.base_model_tp_plan``, its names under the base model's prefix."""
    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not plan:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return {f"{prefix}.{k}": v for k, v in plan.items()}
    return dict(plan)


def tp_plan(model: nn.Module, targets: list[str], user_plan: Mapping[str, str] | None = None) -> ShardPlan:
    """The tensor-parallel plan of seed sharding: module name -> "colwise" | "rowwise". From ``user_plan``
    (``sharding.tp_plan``) when given, else the model's own (a ``transformers`` model's
    ``config.base_model_tp_plan``), else the built-in host's (models.seed_tp_plan: the seeded Linear
    column-parallel, the Linear after it row-parallel). Every seeded target must be column-parallel: a rank's
    output features are then exactly its seeds' features."""
    names = list(_host_linears(model))
    if user_plan:
        source = "sharding.tp_plan"
        plan = _expand(user_plan, names, source)
    elif (own := _model_plan(model)) is not None:
        source = f"{type(model).__name__}.config.base_model_tp_plan"
        plan = _expand(own, names, source)
    else:
        source = f"the built-in plan of {type(model).__name__}"
        plan = {}
        for target, successor in seed_tp_plan(model, targets).items():
            plan[target], plan[successor] = "colwise", "rowwise"
    for name in targets:
        if plan.get(name) != "colwise":
            raise ValueError(
                f"seeds.targets: {name!r} is {plan.get(name, 'not in')!r} in {source}; seed sharding splits a seeded "
                "layer's output features over the ranks, so each target must be 'colwise' (set sharding.tp_plan)"
            )
    return ShardPlan(tp=plan, source=source)


def shard_seeded_layers(model: nn.Module, mesh: Mesh) -> None:
    """Replace every SeededLayer by this rank's contiguous shard of its seeds (same global numbering)."""
    if mesh.seed == 1:
        return
    for module in model.modules():
        if isinstance(module, SeededOutput):
            layer = module.seeded
            per = layer.num_seeds // mesh.seed
            module.seeded = layer.narrow(mesh.seed_rank * per, per)


def shard_model(model: nn.Module, mesh: Mesh, user_plan: Mapping[str, str] | None = None) -> ShardPlan:
    """Apply the mesh's seed sharding to a wrapped model, in place (nothing to do for ``data`` / seed = 1):
    this rank's seed shards, and the host Linears of the tensor-parallel plan (``tp_plan``) over the ``seed``
    axis, with local outputs (a seeded layer sees its seeds' features as a plain tensor)."""
    layers = seeded_layers(model)
    mesh.check_seed_counts({name: layer.num_global_seeds for name, layer in layers.items()})
    plan = ShardPlan()
    if mesh.seed > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = tp_plan(model, list(layers), user_plan)
        shard_seeded_layers(model, mesh)
        styles: dict[str, object] = {}
        for name, style in plan.tp.items():
            module = model.get_submodule(name)
            key = f"{name}.original" if isinstance(module, SeededOutput) else name
            parallel = ColwiseParallel if style == "colwise" else RowwiseParallel
            styles[key] = parallel(use_local_output=True)
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


def counted_here(param: torch.Tensor, mesh: Mesh) -> bool:
    """Whether this rank counts ``param``'s local elements in a host-wide sum, so that every element is counted
    once over the world: a plain (replicated) parameter on rank 0; a tensor-parallel one on the dp-rank-0
    replica, by every seed rank where it is sharded, by seed rank 0 alone where it is replicated over the
    ``seed`` axis (a row-parallel Linear's bias)."""
    spec = param._spec if isinstance(param, DTensor) else getattr(param, "_st_info", None)
    if spec is None:
        return mesh.rank == 0
    sharded = any(isinstance(p, Shard) for p in spec.placements)
    return mesh.dp_rank == 0 and (sharded or mesh.seed_rank == 0)


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
    once (``counted_here``)."""
    device = params[0][1].device if params else torch.device("cpu")
    out = torch.zeros(1 if grads else 2, dtype=torch.float64, device=device)
    for i, (_, p) in enumerate(params):
        if not counted_here(p, mesh):
            continue
        if grads:
            if p.grad is not None:
                out[0] += local_part(p.grad).detach().double().square().sum()
        else:
            now, before = local_part(p).detach().double(), prev[i].double()
            out[0] += (now - before).square().sum()
            out[1] += before.square().sum()
    return out


@torch.no_grad()
def clip_host_grad_norm_(params: list[tuple[str, nn.Parameter]], max_norm: float, mesh: Mesh) -> torch.Tensor:
    """Scale the host gradients in place so that their global L2 norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``'s rule: factor max_norm / (norm + 1e-6), at most 1); returns the norm
    before clipping (0-d, on the device). The norm is that of the unsharded model on any mesh: each element
    counted once (``host_square_sums``), one all-reduce over the world. torch's own clip_grad_norm_ cannot take
    a tensor-parallel host: its foreach norm refuses DTensor and plain gradients in one list, and DDP's local
    shards of tensor-parallel parameters would be counted as whole tensors."""
    sq = host_square_sums(params, None, mesh, grads=True)
    if is_initialized() and mesh.world_size > 1:
        dist.all_reduce(sq)
    norm = sq[0].sqrt()
    factor = (float(max_norm) / (norm + 1e-6)).clamp(max=1.0)
    grads = [local_part(p.grad) for _, p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return norm.float()


def snapshot_host(params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """Local copies of the host parameters (for the weight drift per interval)."""
    return [local_part(p).detach().clone() for _, p in params]
