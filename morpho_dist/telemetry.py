"""Telemetry: the global per-seed table, its all-reduce, and the health report the controller reads.

Every controller interval ``build_report`` lays each layer's local [N_local, 8] buffer into one zero-padded
table [L, N_global_max, 8] at the layer's global seed range, and the per-seed state (stage, alpha, ...) into a
second table padded with -inf. Under torch.distributed it issues exactly two collectives over ``group``:
all_reduce(SUM) of the sum fields (every rank contributes its local accumulations: data-parallel replicas
add up, seed shards fill disjoint ranges) and all_reduce(MAX) of absmax plus the state (replicas agree, shards
fill their own ranges; -inf marks "not here"). One device->host copy, then the layers' buffers are reset.

Data parallelism: each of ``dp`` replicas back-propagates the mean loss of its 1/dp of the global batch, so
its dy is dp times the dy of the global mean loss. After the reduce, ``grad_sq`` is divided by dp**2 and
``benefit`` by dp: the table is that of one process on the global batch, whatever the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from morpho_dist.kernels.layout import (
    F_ABSMAX,
    F_BENEFIT,
    F_COUNT,
    F_DEAD,
    F_DELTA_SQ,
    F_GRAD_SQ,
    F_SUM,
    F_SUMSQ,
    NUM_FIELDS,
    SUM_FIELDS,
)
from morpho_dist.lifecycle import STATE_FIELDS, Stage, count_stages

if TYPE_CHECKING:
    from morpho_dist.layer import SeededLayer

# Columns of the MAX table: absmax, then the per-seed state fields in lifecycle.STATE_FIELDS order.
MAX_COLUMNS = ("absmax", *STATE_FIELDS)


@dataclass
class SeedReport:
    """Health of one (global) seed over one controller interval."""

    layer: str
    seed: int  # global seed index
    stage: Stage
    blend: int
    alpha: float
    steps_in_stage: int
    count: float
    mean: float
    std: float
    dead_frac: float
    absmax: float
    grad_rms: float
    benefit: float  # sum over the interval of dy * (blend(x, u, 1) - x); negative: grafting lowers the loss
    delta_rms: float
    rms: float = 0.0  # sqrt(sumsq / count): scale of the chunk, for relative errors
    alpha_rate: float = 0.0
    embargo_until: int = 0
    germinated_at: int = -1
    generation: int = 0

    def record(self) -> dict:
        out = asdict(self)
        out["stage"] = self.stage.name
        return out


@dataclass
class HealthReport:
    """All seeds of all layers (global view, identical on every rank) at one step."""

    step: int
    seeds: list[SeedReport]
    layers: list[str] = field(default_factory=list)
    # (layer, seed) -> (val loss at the seed's alpha, val loss with its alpha at 0); filled by the train loop
    counterfactual: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    # the reduced raw table [L, N_global_max, 8] on the host (zero rows where a layer has fewer seeds)
    table: torch.Tensor | None = None
    # the reduced ``extras`` of build_report (per-rank shares of host-wide sums), as floats
    extras: list[float] = field(default_factory=list)
    # the reduced per-seed state table [L, N_global_max, 1 + len(STATE_FIELDS)] on the host
    states: torch.Tensor | None = None

    def records(self) -> list[dict]:
        """One flat dict per seed for the JSONL log."""
        out = []
        for s in self.seeds:
            rec = {"step": self.step, **s.record()}
            cf = self.counterfactual.get((s.layer, s.seed))
            if cf is not None:
                rec["loss_at_alpha"], rec["loss_at_zero"] = cf
            out.append(rec)
        return out

    def layer_seeds(self, layer: str) -> list[SeedReport]:
        return [s for s in self.seeds if s.layer == layer]

    def get(self, layer: str, seed: int) -> SeedReport:
        for s in self.seeds:
            if s.layer == layer and s.seed == seed:
                return s
        raise KeyError(f"no seed {seed} of layer {layer!r} in the report")


def stage_counts(report: HealthReport, layer: str | None = None) -> dict[str, int]:
    """Stage name -> number of seeds in it (every stage listed, zeros included), optionally for one layer."""
    return count_stages(s.stage for s in report.seeds if layer is None or s.layer == layer)


def global_num_seeds(layer: SeededLayer) -> int:
    """Seeds of the whole (unsharded) layer: ``layer.num_global_seeds`` when set (wrap and the sharding code
    set it), else this shard's end (correct when the seeds are replicated)."""
    return int(getattr(layer, "num_global_seeds", None) or layer.seed_offset + layer.num_seeds)


def _health(layer: str, seed: int, f: list[float], m: list[float]) -> SeedReport:
    """Turn raw summed fields f[8] and max-table row m (absmax, state...) into a SeedReport."""
    count = f[F_COUNT]
    inv = 1.0 / count if count > 0 else 0.0
    mean = f[F_SUM] * inv
    sq = f[F_SUMSQ] * inv
    st = dict(zip(STATE_FIELDS, m[1:]))
    return SeedReport(
        layer=layer,
        seed=seed,
        stage=Stage(int(st["stage"])),
        blend=int(st["blend"]),
        alpha=float(st["alpha"]),
        steps_in_stage=int(st["steps_in_stage"]),
        count=count,
        mean=mean,
        std=math.sqrt(max(sq - mean * mean, 0.0)),
        dead_frac=f[F_DEAD] * inv,
        absmax=f[F_ABSMAX],
        grad_rms=math.sqrt(max(f[F_GRAD_SQ] * inv, 0.0)) if math.isfinite(f[F_GRAD_SQ]) else math.nan,
        benefit=f[F_BENEFIT],
        delta_rms=math.sqrt(max(f[F_DELTA_SQ] * inv, 0.0)) if math.isfinite(f[F_DELTA_SQ]) else math.nan,
        rms=math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else math.nan,
        alpha_rate=float(st["alpha_rate"]),
        embargo_until=int(st["embargo_until"]),
        germinated_at=int(st["germinated_at"]),
        generation=int(st["generation"]),
    )


@torch.no_grad()
def local_tables(layers: Mapping[str, SeededLayer]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contribution: (sum table [L, Nmax, 8] float64 zero-padded (only SUM_FIELDS are reduced),
    max table [L, Nmax, 1 + len(STATE_FIELDS)] float64 padded with -inf), on the layers' device."""
    items = list(layers.values())
    device = items[0].telemetry.device
    width = max(global_num_seeds(layer) for layer in items)
    sums = torch.zeros(len(items), width, NUM_FIELDS, dtype=torch.float64, device=device)
    maxes = torch.full((len(items), width, len(MAX_COLUMNS)), -math.inf, dtype=torch.float64, device=device)
    for li, layer in enumerate(items):
        lo, hi = layer.seed_offset, layer.seed_offset + layer.num_seeds
        tel = layer.telemetry.to(device=device, dtype=torch.float64)
        sums[li, lo:hi] = tel
        maxes[li, lo:hi, 0] = tel[:, F_ABSMAX]
        for ci, name in enumerate(STATE_FIELDS, start=1):
            maxes[li, lo:hi, ci] = getattr(layer, name).to(device=device, dtype=torch.float64)
    return sums, maxes


def grad_field_scale(dp: int) -> torch.Tensor:
    """Per-field factors that turn dp replicas' summed telemetry into the global-batch table (see above)."""
    scale = torch.ones(NUM_FIELDS, dtype=torch.float64)
    scale[F_GRAD_SQ] = 1.0 / (dp * dp)
    scale[F_BENEFIT] = 1.0 / dp
    return scale


@torch.no_grad()
def build_report(
    layers: Mapping[str, SeededLayer], step: int, group=None, *, dp: int = 1, extras: torch.Tensor | None = None
) -> HealthReport:
    """All-reduce the layers' telemetry and state (two collectives when distributed), copy to the host once,
    reset the buffers and return the per-seed health report (identical on every rank of ``group``).
    ``dp``: the data-parallel degree (see the module doc). ``extras``: a few more per-rank sums to reduce in
    the same SUM collective (the train loop's host grad and drift norms), returned as ``report.extras``."""
    names = list(layers)
    if not names:
        return HealthReport(step=step, seeds=[], layers=[])
    sums, maxes = local_tables(layers)
    sum_part = sums[..., list(SUM_FIELDS)].contiguous()
    n_extra = 0 if extras is None else extras.numel()
    if n_extra:
        flat = torch.cat([sum_part.reshape(-1), extras.to(device=sum_part.device, dtype=torch.float64).reshape(-1)])
    else:
        flat = sum_part.reshape(-1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sum_part = flat[: sum_part.numel()].view_as(sum_part)
    table = torch.zeros_like(sums)
    table[..., list(SUM_FIELDS)] = sum_part
    if dp != 1:
        table *= grad_field_scale(dp).to(table.device)
    table[..., F_ABSMAX] = maxes[..., 0].clamp_min(0.0)  # -inf padding -> 0
    both = torch.cat([table, maxes], dim=-1)
    packed = torch.cat([both.reshape(-1), flat[sum_part.numel() :]]).cpu()  # the one device->host copy
    host = packed[: both.numel()].view(both.shape)
    extra_values = packed[both.numel() :].tolist()
    for layer in layers.values():
        layer.reset_telemetry()
    rows = host.tolist()
    seeds = []
    for li, name in enumerate(names):
        for n, row in enumerate(rows[li]):
            f, m = row[:NUM_FIELDS], row[NUM_FIELDS:]
            if m[1] == -math.inf:  # no rank holds this seed (padding of a narrower layer)
                continue
            seeds.append(_health(name, n, f, m))
    return HealthReport(
        step=step,
        seeds=seeds,
        layers=names,
        table=host[..., :NUM_FIELDS].float(),
        extras=extra_values,
        states=host[..., NUM_FIELDS:],
    )


def telemetry_table(report: HealthReport) -> dict[str, list[list[float]]]:
    """Layer -> per-seed [mean, std, dead_frac, absmax, grad_rms, benefit, delta_rms] rows (for histograms)."""
    keys = ("mean", "std", "dead_frac", "absmax", "grad_rms", "benefit", "delta_rms")
    out: dict[str, list[list[float]]] = {name: [] for name in report.layers}
    for s in report.seeds:
        out.setdefault(s.layer, []).append([getattr(s, k) for k in keys])
    return out
