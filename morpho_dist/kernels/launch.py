"""Launchers of the seeded kernels: tile planning, result buffers, deterministic reductions.

`seeded_forward` -> (y, rec_loss) and `seeded_backward` -> (dx, dp0, dp1); both add their telemetry fields to
the [N, 8] buffer in place when one is given. Plain tensors in, plain tensors out: autograd lives in
morpho_dist.ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from morpho_dist.kernels.common import ACT_IDS
from morpho_dist.kernels.layout import F_ABSMAX, NUM_FIELDS
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.kernels.seeded import KIND_DIAGONAL, KIND_LOWRANK, _seeded_bwd_kernel, _seeded_fwd_kernel

_KIND_IDS = {"lowrank": KIND_LOWRANK, "diagonal": KIND_DIAGONAL}
_MAX_LOWRANK_TILE_ELEMS = 4096  # rows x band columns of a lowrank tile: the backward's dots fit in shared memory
_MAX_LOWRANK_BAND = 64  # lowrank band columns: the backward's block-diagonal dots fit in shared memory


@dataclass(frozen=True)
class TilePlan:
    block_t: int  # rows per tile
    chunk_tile: int  # CP: columns of one seed in the band (lowrank: the whole chunk, padded)
    rank_tile: int  # RP: lowrank rank, padded (16 for diagonal: unused)
    seeds_per_prog: int  # SPP
    groups: int  # grid dim 1: seed bands
    splits: int  # grid dim 0: row ranges
    rows_per_split: int
    dense: bool  # chunk == chunk_tile: the band is one contiguous feature range


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton interpreter: a few programs still exercise the split path


@functools.lru_cache(maxsize=1024)
def plan_tiles(kind: str, rows: int, seeds: int, chunk: int, rank: int, opts: KernelOptions, device) -> TilePlan:
    pow2_chunk = triton.next_power_of_2(chunk)
    if kind == "lowrank":
        chunk_tile = max(16, pow2_chunk)  # tl.dot needs every dim >= 16
        rank_tile = max(16, triton.next_power_of_2(rank))
    else:
        chunk_tile, rank_tile = min(pow2_chunk, opts.block_cols), 16
    band_cap = min(opts.block_cols, _MAX_LOWRANK_BAND) if kind == "lowrank" else opts.block_cols
    seeds_per_prog = max(1, min(band_cap // chunk_tile, triton.next_power_of_2(seeds)))
    band = seeds_per_prog * chunk_tile
    block_t = opts.block_rows
    while kind == "lowrank" and block_t > 16 and block_t * band > _MAX_LOWRANK_TILE_ELEMS:
        block_t //= 2
    groups = triton.cdiv(seeds, seeds_per_prog)
    tiles = triton.cdiv(rows, block_t)
    splits = max(1, min(tiles, triton.cdiv(_target_programs(device), groups)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    return TilePlan(
        block_t, chunk_tile, rank_tile, seeds_per_prog, groups, splits, tiles_per_split * block_t, chunk == chunk_tile
    )


def _plan(kind, x2, stage, p0, opts) -> tuple[TilePlan, int, int, int, int]:
    rows, hidden = x2.shape
    seeds = stage.numel()
    chunk = hidden // seeds
    rank = p0.shape[2] if kind == "lowrank" else 1
    return plan_tiles(kind, rows, seeds, chunk, rank, opts, x2.device), rows, seeds, chunk, rank


def _constexprs(kind, act, plan: TilePlan, opts: KernelOptions, has_stats: bool, num_warps: int) -> dict:
    return dict(
        KIND=_KIND_IDS[kind], ACT=ACT_IDS[act], BLOCK_T=plan.block_t, CP=plan.chunk_tile, RP=plan.rank_tile,
        SPP=plan.seeds_per_prog, USE_ATOMICS=not opts.deterministic, HAS_STATS=has_stats,
        DOT_PRECISION=opts.dot_precision, DENSE=plan.dense, num_warps=num_warps,
    )  # fmt: skip


def _merge_partials(telemetry: torch.Tensor, parts: torch.Tensor) -> None:
    """Deterministic path: fold per-split partials in a fixed order, then add them to the telemetry."""
    total = parts.sum(0)
    total[:, F_ABSMAX] = torch.maximum(telemetry[:, F_ABSMAX], parts[:, :, F_ABSMAX].amax(0))
    telemetry[:, F_ABSMAX] = 0.0
    telemetry.add_(total)


def seeded_forward(x2, stage, blend, alpha, p0, p1, telemetry, *, kind, act, dead_eps, opts: KernelOptions):
    plan, rows, seeds, chunk, rank = _plan(kind, x2, stage, p0, opts)
    y2 = torch.empty_like(x2)
    has_stats = telemetry is not None
    if opts.deterministic:
        stats = torch.zeros(plan.splits, seeds, NUM_FIELDS, device=x2.device) if has_stats else x2
        rec = torch.zeros(plan.splits * plan.groups, device=x2.device)
    else:
        stats = telemetry if has_stats else x2  # an unused pointer when there is no telemetry
        rec = torch.zeros(1, device=x2.device)
    _seeded_fwd_kernel[(plan.splits, plan.groups)](
        x2, y2, stage, blend, alpha, p0, p1, stats, rec,
        rows, x2.shape[1], seeds, chunk, rank, plan.rows_per_split,
        seeds * NUM_FIELDS if opts.deterministic else 0, 1 if opts.deterministic else 0,
        dead_eps, 0.5 / (rows * chunk),
        **_constexprs(kind, act, plan, opts, has_stats, opts.num_warps),
    )  # fmt: skip
    if opts.deterministic and has_stats:
        _merge_partials(telemetry, stats)
    return y2, rec.sum() if opts.deterministic else rec.view(())


def seeded_backward(x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry, *, kind, act, opts: KernelOptions):
    plan, rows, seeds, chunk, rank = _plan(kind, x2, stage, p0, opts)
    dx2 = torch.empty_like(x2)
    lead = (plan.splits,) if opts.deterministic else ()
    g0 = torch.zeros(*lead, *p0.shape, device=x2.device)
    g1 = torch.zeros(*lead, *p1.shape, device=x2.device)
    has_stats = telemetry is not None
    if opts.deterministic:
        stats = torch.zeros(plan.splits, seeds, NUM_FIELDS, device=x2.device) if has_stats else x2
    else:
        stats = telemetry if has_stats else x2
    _seeded_bwd_kernel[(plan.splits, plan.groups)](
        x2, dy2, dx2, stage, blend, alpha, p0, p1, drec, g0, g1, stats,
        rows, x2.shape[1], seeds, chunk, rank, plan.rows_per_split,
        seeds * NUM_FIELDS if opts.deterministic else 0, p0.numel() if opts.deterministic else 0,
        1.0 / (rows * chunk),
        **_constexprs(kind, act, plan, opts, has_stats, opts.bwd_num_warps),
    )  # fmt: skip
    if opts.deterministic:
        if has_stats:
            _merge_partials(telemetry, stats)
        g0, g1 = g0.sum(0), g1.sum(0)
    return dx2, g0.to(p0.dtype), g1.to(p1.dtype)
