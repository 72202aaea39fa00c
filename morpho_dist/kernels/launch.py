"""Launchers of the seeded kernels: tile planning, output/partial buffers, deterministic reductions.

`seeded_forward` -> (y, per-call stats [N, 8]); `seeded_backward` -> (dx, dp0, dp1, [N, 2] = grad_sq, benefit).
Plain tensors in, plain tensors out: autograd and telemetry merging live in morpho_dist.ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from morpho_dist.kernels.common import ACT_IDS
from morpho_dist.kernels.diagonal import launch_diagonal_backward, launch_diagonal_forward
from morpho_dist.kernels.layout import F_ABSMAX, F_COUNT, NUM_FIELDS
from morpho_dist.kernels.lowrank import launch_lowrank_backward, launch_lowrank_forward
from morpho_dist.kernels.options import KernelOptions

_MAX_TILE_ELEMS = 16384  # rows x features of one diagonal tile
_MAX_LOWRANK_TILE_ELEMS = 4096  # rows x chunk of one lowrank tile: the backward's dots stay within shared memory


@dataclass(frozen=True)
class TilePlan:
    block_t: int  # rows per tile
    block_c: int  # chunk tile (lowrank: whole chunk, padded; diagonal: CP)
    seeds_per_prog: int
    groups: int  # grid dim 1
    splits: int  # grid dim 0: row ranges
    rows_per_split: int
    deterministic: bool

    def stats_split_stride(self, n: int, width: int) -> int:
        return n * width if self.deterministic else 0


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton interpreter: a few programs still exercise the split path


def plan_tiles(kind: str, rows: int, seeds: int, chunk: int, opts: KernelOptions, device: torch.device) -> TilePlan:
    if kind == "lowrank":
        block_c = max(16, triton.next_power_of_2(chunk))
    else:
        block_c = min(triton.next_power_of_2(chunk), opts.block_cols)
    seeds_per_prog = max(1, opts.block_cols // block_c)
    seeds_per_prog = min(seeds_per_prog, triton.next_power_of_2(seeds))
    block_t = opts.block_rows
    tile_cols, cap = (block_c, _MAX_LOWRANK_TILE_ELEMS) if kind == "lowrank" else (block_c * seeds_per_prog, _MAX_TILE_ELEMS)
    while block_t > 16 and block_t * tile_cols > cap:
        block_t //= 2
    groups = triton.cdiv(seeds, seeds_per_prog)
    tiles = triton.cdiv(rows, block_t)
    splits = max(1, min(tiles, triton.cdiv(_target_programs(device), groups)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    return TilePlan(block_t, block_c, seeds_per_prog, groups, splits, tiles_per_split * block_t, opts.deterministic)


def _buffer(plan: TilePlan, *shape: int, device) -> torch.Tensor:
    """Atomics accumulate into one zeroed total; deterministic programs write their own slot."""
    lead = plan.splits if plan.deterministic else 1
    return torch.zeros(lead, *shape, dtype=torch.float32, device=device)


def seeded_forward(x2, stage, blend, alpha, p0, p1, *, kind, act, dead_eps, opts: KernelOptions):
    rows, hidden = x2.shape
    seeds = stage.numel()
    chunk = hidden // seeds
    plan = plan_tiles(kind, rows, seeds, chunk, opts, x2.device)
    y2 = torch.empty_like(x2)
    parts = _buffer(plan, seeds, NUM_FIELDS, device=x2.device)
    if kind == "lowrank":
        launch_lowrank_forward(
            x2, y2, stage, blend, alpha, p0, p1, parts, plan, act_id=ACT_IDS[act], dead_eps=dead_eps, opts=opts
        )
    else:
        launch_diagonal_forward(x2, y2, stage, blend, alpha, p0, p1, parts, plan, dead_eps=dead_eps, opts=opts)
    stats = parts.sum(0)
    if plan.deterministic:
        stats[:, F_ABSMAX] = parts[:, :, F_ABSMAX].amax(0)
    stats[:, F_COUNT] = float(rows * chunk)
    return y2, stats


def seeded_backward(x2, dy2, drec, stage, blend, alpha, p0, p1, *, kind, act, opts: KernelOptions):
    rows, hidden = x2.shape
    seeds = stage.numel()
    chunk = hidden // seeds
    plan = plan_tiles(kind, rows, seeds, chunk, opts, x2.device)
    dx2 = torch.empty_like(x2)
    g0 = _buffer(plan, *p0.shape, device=x2.device)
    g1 = _buffer(plan, *p1.shape, device=x2.device)
    parts = _buffer(plan, seeds, 2, device=x2.device)
    drec = drec.reshape(()).to(device=x2.device, dtype=torch.float32)
    if kind == "lowrank":
        launch_lowrank_backward(
            x2, dy2, dx2, stage, blend, alpha, p0, p1, drec, g0, g1, parts, plan, act_id=ACT_IDS[act], opts=opts
        )
    else:
        launch_diagonal_backward(x2, dy2, dx2, stage, blend, alpha, p0, p1, drec, g0, g1, parts, plan, opts=opts)
    return dx2, g0.sum(0).to(p0.dtype), g1.sum(0).to(p1.dtype), parts.sum(0)
