"""Launchers of the seeded kernels: tile planning, result buffers, deterministic reductions.

A diagonal layer runs the column kernel alone; a lowrank layer runs the column kernel over its idle seeds and
the lowrank kernel over its TRAINING and blended seeds (each leaves the other's columns untouched). With
all_idle (the caller's promise that no seed is TRAINING or blended) the column kernel alone covers every seed of
either kind, with no seed math, and writes NaN into the columns of any seed that breaks the promise. On a CUDA
device with kernel.overlap the lowrank kernel runs on a side stream that forks from the caller's stream and joins
it again before the launcher returns, so the two kernels share the device: the memory-bound column kernel fills
what the lowrank kernel, bound by its blueprint math, leaves of the bandwidth. Fork and join are stream events:
no host synchronisation, and they capture into CUDA graphs.

`seeded_forward` -> (y, rec_loss) and `seeded_backward` -> (dx, dp0, dp1); both add their telemetry fields to
the [N, 8] buffer in place when one is given. Plain tensors in, plain tensors out: autograd lives in
morpho_dist.ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from morpho_dist.kernels import autotune
from morpho_dist.kernels.columns import _columns_bwd_kernel, _columns_fwd_kernel
from morpho_dist.kernels.common import ACT_IDS
from morpho_dist.kernels.layout import F_ABSMAX, NUM_FIELDS
from morpho_dist.kernels.lowrank import _lowrank_bwd_kernel, _lowrank_fwd_kernel
from morpho_dist.kernels.options import KernelOptions

# The row loops stream tiles once; Triton's software pipeliner (3 stages by default on sm_90) gains nothing there
# and mis-compiled the lowrank backward's conditional dA accumulation (wrong fp32 dA on an H100, Triton 3.6).
_NUM_STAGES = 1
_MAX_LOWRANK_TILE_ELEMS = 4096  # rows x chunk of a lowrank tile: the backward's dots stay in registers
_MIN_SEED_ELEMS = 256  # elements of each of its seeds a column program covers, at least (rows allowing)
_MIN_AUTO_WIDTH = 64  # features: auto-width column tiles are narrowed down to this, no further
# Rows per lowrank program, per unit of rank: each backward program adds its [C, R] + [R, C] parameter gradients
# atomically once, so a program must cover enough rows for those adds to stay a small share of its traffic.
_LOWRANK_ROWS_PER_RANK = 16
# Lowrank grid: about this many programs per multiprocessor, planned as if a quarter of the seeds were active
# (programs of idle seeds return at once). kernel.programs_per_sm sizes the column kernels alone.
_LOWRANK_PROGRAMS_PER_SM = 32
# The lowrank backward keeps per-thread partials of its telemetry (no cross-thread reduction per tile) only for
# chunks up to this wide: for wider ones the partials push the kernel, already at the register limit, to spill.
_MAX_FOLDED_BWD_CHUNK = 32
# The lowrank backward's dots over the chunk (x @ A, du @ B^T) run as batched dots over K slices this wide: for
# chunk 256 the unsplit dots spill (4.9 KB stack) and the backward takes 5.8x as long (H100, coarse workload).
# The forward holds less and runs fastest unsplit.
_DOT_K_SLICE = 64
# lowrank_math=auto runs the blueprint as fp32 rank-1 updates where the dots would be exact fp32 (dot_precision
# ieee) and the chunk is at most this wide, else as dots. On an H200, wide (chunk 16) with one third blended, the
# lowrank forward took 76 us as rank-1 updates against 110 us as ieee dots and 55 us as tf32 dots; for chunks of
# 64 and 256 the ieee dots were as fast or faster.
_MAX_RANK1_CHUNK = 32


@dataclass(frozen=True)
class GridPlan:
    block_t: int  # rows per tile
    chunk_tile: int  # CP: columns of one seed in a tile
    seeds_per_prog: int  # SPP (1 for the lowrank kernels)
    groups: int  # grid dim 1
    splits: int  # grid dim 0: row ranges
    rows_per_split: int
    dense: bool  # chunk == chunk_tile: a group's features are one contiguous range


@dataclass(frozen=True)
class TilePlan:
    columns: GridPlan
    lowrank: GridPlan | None  # None for diagonal layers
    rank_tile: int  # RP: lowrank rank, padded to a power of two >= 16
    rank1: bool  # lowrank: the blueprint as rank-1 updates (but the parameter gradients), not dots


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 0  # Triton interpreter: a few programs still exercise the split path


def _target_programs(device: torch.device, opts: KernelOptions) -> int:
    return opts.programs_per_sm * _multiprocessors(device) or 4


def _grid(rows: int, groups: int, block_t: int, target: int, max_splits: int) -> tuple[int, int]:
    """(row splits, rows per split) for about `target` programs over `groups`, at most max_splits."""
    tiles = triton.cdiv(rows, block_t)
    splits = max(1, min(tiles, triton.cdiv(target, groups), max_splits))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_t


def column_tile_width(opts: KernelOptions, warps: int, elem_size: int) -> int:
    """block_cols, or for block_cols=0 the width at which every warp covers 512 contiguous bytes of a row: the
    tile's warps then all lie along the row and the per-seed row sums of the telemetry stay in-thread."""
    return opts.block_cols or warps * 512 // elem_size


@functools.lru_cache(maxsize=1024)
def plan_tiles(
    kind: str, rows: int, seeds: int, chunk: int, rank: int, opts: KernelOptions, device, warps: int, elem_size: int
) -> TilePlan:
    target = _target_programs(device, opts)
    pow2_chunk = triton.next_power_of_2(chunk)
    width = column_tile_width(opts, warps, elem_size)
    cp = min(pow2_chunk, width)
    spp = max(1, min(width // cp, triton.next_power_of_2(seeds)))
    block_t = opts.block_rows
    # Each program adds its seeds' telemetry (and diagonal gradients) once: it covers at least
    # _MIN_SEED_ELEMS elements of every seed, so for narrow chunks it needs many rows.
    min_rows = max(1, _MIN_SEED_ELEMS // cp)
    if not opts.block_cols and min_rows > block_t:
        # auto width: narrower, taller tiles of the same size while too few programs would cover the rows
        while spp > 1 and cp * spp > _MIN_AUTO_WIDTH and triton.cdiv(seeds, spp) * max(1, rows // min_rows) < target:
            spp, block_t = spp // 2, block_t * 2
    groups = triton.cdiv(seeds, spp)
    splits, rows_per_split = _grid(rows, groups, block_t, target, max(1, rows // max(block_t, min_rows)))
    columns = GridPlan(block_t, cp, spp, groups, splits, rows_per_split, chunk == cp)
    if kind != "lowrank":
        return TilePlan(columns, None, 16, False)
    cp = max(16, pow2_chunk)  # tl.dot needs every dim >= 16
    block_t = min(opts.lowrank_rows, max(16, triton.next_power_of_2(rows)))
    while block_t > 16 and block_t * cp > _MAX_LOWRANK_TILE_ELEMS:
        block_t //= 2
    rank_tile = max(16, triton.next_power_of_2(rank))
    max_splits = max(1, rows // (_LOWRANK_ROWS_PER_RANK * rank_tile))
    low_target = _LOWRANK_PROGRAMS_PER_SM * _multiprocessors(device) or 16  # interpreter: a few splits still
    splits, rows_per_split = _grid(rows, seeds, block_t, low_target, max_splits)
    lowrank = GridPlan(block_t, cp, 1, seeds, splits, rows_per_split, chunk == cp)
    rank1 = opts.lowrank_math == "rank1" or (
        opts.lowrank_math == "auto" and opts.dot_precision == "ieee" and chunk <= _MAX_RANK1_CHUNK
    )
    return TilePlan(columns, lowrank, rank_tile, rank1)


def lowrank_fwd_shape_args(block_t: int, chunk_tile: int, elem_size: int, warps: int, rank1: bool) -> dict[str, int]:
    """The lowrank forward's X_FOLD and DELTA_FOLD for a [block_t, chunk_tile] tile. X_FOLD: the rows of it that one
    thread holds as Triton loads it (16-byte vectors along the row, a warp's threads spread over the row first), over
    which the forward sums its statistics of x inside each thread; rank-1 updates keep that layout for delta too,
    dots give pairs of rows. Were Triton to lay the tile out otherwise, those sums would cross threads: slower,
    never wrong."""
    threads_per_row = min(32, max(1, chunk_tile * elem_size // 16))
    x_fold = max(1, block_t // (warps * 32 // threads_per_row))
    return {"X_FOLD": x_fold, "DELTA_FOLD": x_fold if rank1 else 2}


def lowrank_bwd_shape_args(block_t: int, chunk_tile: int) -> dict[str, int]:
    """The lowrank backward's ROW_FOLD and K_SPLIT for a [block_t, chunk_tile] tile."""
    return {
        "ROW_FOLD": 2 if chunk_tile <= _MAX_FOLDED_BWD_CHUNK else block_t,
        "K_SPLIT": max(1, chunk_tile // _DOT_K_SLICE),
    }


def _plan(kind, x2, stage, p0, opts, warps) -> tuple[TilePlan, int, int, int, int]:
    rows, hidden = x2.shape
    seeds = stage.numel()
    chunk = hidden // seeds
    rank = p0.shape[2] if kind == "lowrank" else 1
    plan = plan_tiles(kind, rows, seeds, chunk, rank, opts, x2.device, warps, x2.element_size())
    return plan, rows, seeds, chunk, rank


class SideStream:
    """The lowrank kernels' side stream on one device, with the two events that fork it from the caller's stream
    and join it back. Fork and join are one event record and one stream wait each (no host synchronisation; they
    capture into CUDA graphs); the events are reused call after call (a wait takes the event's latest record)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._forked = torch.cuda.Event()
        self._done = torch.cuda.Event()

    def fork(self) -> torch.cuda.Stream:
        """The side stream starts where the caller's stream is now; returns the caller's stream. Every buffer is
        allocated before the fork, on the caller's stream, which joins the side stream before anything reads them:
        the caching allocator then hands none of them out again before the side stream is done."""
        main = torch.cuda.current_stream(self.device)
        self._forked.record(main)
        self.stream.wait_event(self._forked)
        return main

    def enter(self) -> None:
        """Launches go to the side stream from now (Triton launches on the current stream)."""
        torch.cuda.set_stream(self.stream)

    def join(self, main: torch.cuda.Stream) -> None:
        """Back to the caller's stream, which waits for everything launched on the side stream so far."""
        self._done.record(self.stream)
        torch.cuda.set_stream(main)
        main.wait_event(self._done)


@functools.lru_cache(maxsize=16)
def side_stream(device: torch.device) -> SideStream:
    return SideStream(device)


def _overlaps(device: torch.device, overlap: bool) -> bool:
    """Whether the lowrank kernels get a side stream (kernel.overlap, on a CUDA device)."""
    return overlap and device.type == "cuda"


def _merge_partials(telemetry: torch.Tensor, parts: torch.Tensor) -> None:
    """Deterministic path: fold per-split partials in a fixed order, then add them to the telemetry."""
    total = parts.sum(0)
    total[:, F_ABSMAX] = torch.maximum(telemetry[:, F_ABSMAX], parts[:, :, F_ABSMAX].amax(0))
    telemetry[:, F_ABSMAX] = 0.0
    telemetry.add_(total)


def _shape_key(kind, act, x2, stage, p0, telemetry, all_idle) -> tuple:
    shapes = (*x2.shape, stage.numel(), tuple(p0.shape), x2.dtype, p0.dtype)
    return (kind, act, *shapes, telemetry is not None, all_idle)


def _lowrank_const(plan: TilePlan, *, act: str, rank: int, opts: KernelOptions, common: dict) -> dict:
    """The compile-time arguments the lowrank forward and backward kernels share (each adds its shape arguments);
    ``common``: the direction's USE_ATOMICS, HAS_STATS and num_stages (num_warps: kernel.lowrank_warps)."""
    low = plan.lowrank
    return dict(
        ACT=ACT_IDS[act], BLOCK_T=low.block_t, CP=low.chunk_tile, RP=plan.rank_tile, RANK=rank,
        DOT_PRECISION=opts.dot_precision, RANK1=plan.rank1, **{**common, "num_warps": opts.lowrank_warps},
    )  # fmt: skip


@dataclass(frozen=True)
class ForwardLaunch:
    """Everything about a forward launch that its shapes and options fix: grids, scalar arguments, compile-time
    arguments, which buffers are zeroed where. Planned once per shape (cached); `run_forward` only allocates the
    outputs and launches."""

    det: bool
    has_stats: bool
    stats_splits: int  # deterministic: per-split telemetry slots
    seeds: int
    overlap: bool  # the lowrank kernel on the side stream
    rec_len: int
    rec_zeros: bool  # rec allocated zero-filled (else empty, zeroed by a kernel or on the side stream)
    rec_side_zero: bool  # rec zeroed on the side stream before the lowrank kernel
    n_cols: int
    cols_grid: tuple[int, int]
    cols_scalars: tuple  # T, H, N, C, rows_per_split, stats_stride, det, dead_eps, rec_scale
    cols_const: dict
    low_grid: tuple[int, int] | None  # None: no lowrank kernel
    low_scalars: tuple
    low_const: dict


@functools.lru_cache(maxsize=1024)
def plan_forward(
    kind: str, act: str, rows: int, hidden: int, seeds: int, rank: int, elem_size: int, device: torch.device,
    has_stats: bool, all_idle: bool, dead_eps: float, opts: KernelOptions,
) -> ForwardLaunch:  # fmt: skip
    chunk = hidden // seeds
    plan = plan_tiles(kind, rows, seeds, chunk, rank, opts, device, opts.num_warps, elem_size)
    cols = plan.columns
    low = None if all_idle else plan.lowrank  # the lowrank kernel, where it runs
    diagonal_math = kind == "diagonal" and not all_idle
    det = opts.deterministic
    stats_splits = max(cols.splits, plan.lowrank.splits if plan.lowrank else 0) if det and has_stats else 0
    stats_stride = seeds * NUM_FIELDS if stats_splits else 0
    n_cols = cols.splits * cols.groups
    overlap = low is not None and _overlaps(device, opts.overlap)
    # Only diagonal math and the lowrank kernel add to the total; elsewhere whoever runs first zeroes it rather
    # than a fill on the caller's stream: the column kernel, or the side stream (before the lowrank kernel) where
    # the two overlap. A fill ahead of the column kernel delays every output.
    zero_rec = not (det or overlap or diagonal_math)
    common = dict(USE_ATOMICS=not det, HAS_STATS=has_stats, num_warps=opts.num_warps, num_stages=_NUM_STAGES)
    rec_scale = 0.5 / (rows * chunk)
    cols_const = dict(
        DIAGONAL=diagonal_math, ALL_IDLE=all_idle, BLOCK_T=cols.block_t, CP=cols.chunk_tile,
        SPP=cols.seeds_per_prog, DENSE=cols.dense, ZERO_REC=zero_rec, **common,
    )  # fmt: skip
    cols_scalars = (rows, hidden, seeds, chunk, cols.rows_per_split, stats_stride, int(det), dead_eps, rec_scale)
    low_grid, low_scalars, low_const = None, (), {}
    if low is not None:
        low_grid = (low.splits, low.groups)
        low_scalars = (
            rows, hidden, seeds, chunk, rank, low.rows_per_split, stats_stride, int(det), dead_eps, rec_scale
        )  # fmt: skip
        low_const = dict(
            **_lowrank_const(plan, act=act, rank=rank, opts=opts, common=common),
            **lowrank_fwd_shape_args(low.block_t, low.chunk_tile, elem_size, opts.lowrank_warps, plan.rank1),
        )
    return ForwardLaunch(
        det=det, has_stats=has_stats, stats_splits=stats_splits, seeds=seeds, overlap=overlap,
        rec_len=n_cols + (low.splits * low.groups if low else 0) if det else 1,
        rec_zeros=det or diagonal_math, rec_side_zero=overlap and not det, n_cols=n_cols,
        cols_grid=(cols.splits, cols.groups), cols_scalars=cols_scalars, cols_const=cols_const,
        low_grid=low_grid, low_scalars=low_scalars, low_const=low_const,
    )  # fmt: skip


def run_forward(fl: ForwardLaunch, x2, stage, blend, alpha, p0, p1, telemetry, scalar=None):
    """Launch a planned forward on contiguous tensors (x2 may keep its leading dims); returns (y, rec_loss).
    ``scalar``: a 0-d float32 tensor on x2's device whose metadata rec_loss copies (faster than torch.empty)."""
    y2 = torch.empty_like(x2)
    device = x2.device
    if fl.stats_splits:
        stats = torch.zeros(fl.stats_splits, fl.seeds, NUM_FIELDS, device=device)
    else:
        stats = x2 if telemetry is None else telemetry  # x2: an unused pointer
    if fl.det or scalar is None:
        rec = (torch.zeros if fl.rec_zeros else torch.empty)(fl.rec_len if fl.det else (), device=device)
    else:
        rec = (torch.zeros_like if fl.rec_zeros else torch.empty_like)(scalar)
    side = side_stream(device) if fl.overlap else None
    main = side.fork() if side is not None else None
    _columns_fwd_kernel[fl.cols_grid](
        x2, y2, stage, blend, alpha, p0, p1, stats, rec, *fl.cols_scalars, **fl.cols_const
    )  # fmt: skip
    if fl.low_grid is not None:
        if side is not None:
            side.enter()
        try:
            if fl.rec_side_zero:
                rec.zero_()
            _lowrank_fwd_kernel[fl.low_grid](
                x2, y2, stage, blend, alpha, p0, p1, stats, rec[fl.n_cols :] if fl.det else rec, *fl.low_scalars,
                **fl.low_const,
            )  # fmt: skip
        finally:
            if side is not None:
                side.join(main)
    if fl.det:
        if fl.has_stats:
            _merge_partials(telemetry, stats)
        return y2, rec.sum()
    return y2, rec


def seeded_forward(
    x2, stage, blend, alpha, p0, p1, telemetry, *, kind, act, dead_eps, all_idle=False, opts: KernelOptions
):
    if opts.autotune:

        def trials():  # made on a cache miss only: the trials write a scratch copy of the telemetry
            scratch = None if telemetry is None else telemetry.clone()
            return lambda o: _forward(x2, stage, blend, alpha, p0, p1, scratch, kind, act, dead_eps, all_idle, o)

        key = _shape_key(kind, act, x2, stage, p0, telemetry, all_idle)
        lowrank = kind == "lowrank" and not all_idle
        opts = autotune.tuned("fwd", key, opts, x2.device, trials, lowrank=lowrank)
    return _forward(x2, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts)


def _rank_of(kind: str, p0) -> int:
    return p0.shape[2] if kind == "lowrank" else 1


def _forward(x2, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts: KernelOptions):
    rows, hidden = x2.shape
    fl = plan_forward(
        kind, act, rows, hidden, stage.numel(), _rank_of(kind, p0), x2.element_size(), x2.device,
        telemetry is not None, all_idle, float(dead_eps), opts,
    )  # fmt: skip
    return run_forward(fl, x2, stage, blend, alpha, p0, p1, telemetry)


@dataclass(frozen=True)
class BackwardLaunch:
    """The backward's counterpart of ForwardLaunch."""

    det: bool
    has_stats: bool
    stats_splits: int
    seeds: int
    overlap: bool
    grad_lead: tuple  # deterministic: (splits,) per-split gradient slots
    grad_alloc_empty: bool  # gradients allocated empty (zeroed by the column kernel or on the side stream)
    cols_grid: tuple[int, int]
    cols_scalars: tuple  # T, H, N, C, rows_per_split, stats_stride, grad_stride, inv_count, grad_seed_elems
    cols_const: dict
    low_grid: tuple[int, int] | None
    low_scalars: tuple
    low_const: dict


@functools.lru_cache(maxsize=1024)
def plan_backward(
    kind: str, rows: int, hidden: int, seeds: int, p0_shape: tuple, act: str, elem_size: int, device: torch.device,
    has_stats: bool, all_idle: bool, opts: KernelOptions,
) -> BackwardLaunch:  # fmt: skip
    chunk = hidden // seeds
    rank = p0_shape[2] if kind == "lowrank" else 1
    plan = plan_tiles(kind, rows, seeds, chunk, rank, opts, device, opts.bwd_num_warps, elem_size)
    cols = plan.columns
    low = None if all_idle else plan.lowrank
    det = opts.deterministic
    grad_splits = (low or cols).splits  # lowrank: only the lowrank kernels have parameter gradients
    overlap = low is not None and _overlaps(device, opts.overlap)
    # Off the caller's stream where they can be: with a side stream the lowrank gradients are zeroed there (as rec
    # in the forward); with all_idle (atomics) the column kernel zeroes them, as nothing adds to them.
    zero_grads = all_idle and not det
    stats_splits = max(cols.splits, plan.lowrank.splits if plan.lowrank else 0) if det and has_stats else 0
    stats_stride = seeds * NUM_FIELDS if stats_splits else 0
    p0_numel = 1
    for d in p0_shape:
        p0_numel *= d
    grad_stride = p0_numel if det else 0
    inv_count = 1.0 / (rows * chunk)
    common = dict(USE_ATOMICS=not det, HAS_STATS=has_stats, num_warps=opts.bwd_num_warps, num_stages=_NUM_STAGES)
    cols_const = dict(
        DIAGONAL=kind == "diagonal" and not all_idle, ALL_IDLE=all_idle, BLOCK_T=cols.block_t,
        CP=cols.chunk_tile, SPP=cols.seeds_per_prog, DENSE=cols.dense, ZERO_GRADS=zero_grads, **common,
    )  # fmt: skip
    cols_scalars = (
        rows, hidden, seeds, chunk, cols.rows_per_split, stats_stride, grad_stride, inv_count, p0_numel // seeds
    )  # fmt: skip
    low_grid, low_scalars, low_const = None, (), {}
    if low is not None:
        low_grid = (low.splits, low.groups)
        low_scalars = (rows, hidden, seeds, chunk, rank, low.rows_per_split, stats_stride, grad_stride, inv_count)
        low_const = dict(
            **_lowrank_const(plan, act=act, rank=rank, opts=opts, common=common),
            **lowrank_bwd_shape_args(low.block_t, low.chunk_tile),
        )
    return BackwardLaunch(
        det=det, has_stats=has_stats, stats_splits=stats_splits, seeds=seeds, overlap=overlap,
        grad_lead=(grad_splits,) if det else (), grad_alloc_empty=overlap or zero_grads,
        cols_grid=(cols.splits, cols.groups), cols_scalars=cols_scalars, cols_const=cols_const,
        low_grid=low_grid, low_scalars=low_scalars, low_const=low_const,
    )  # fmt: skip


def run_backward(bl: BackwardLaunch, x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry):
    """Launch a planned backward on contiguous tensors; returns (dx, dp0, dp1)."""
    dx2 = torch.empty_like(dy2)
    device = x2.device
    # Two fp32 buffers, not views of one: the custom ops (torch.compile) may not return outputs that alias each
    # other. p0 and p1 are contiguous: *_like gives contiguous buffers, faster than from a shape.
    if bl.grad_lead:
        alloc = torch.empty if bl.grad_alloc_empty else torch.zeros
        g0 = alloc(*bl.grad_lead, *p0.shape, device=device, dtype=torch.float32)
        g1 = alloc(*bl.grad_lead, *p1.shape, device=device, dtype=torch.float32)
    else:
        alloc = torch.empty_like if bl.grad_alloc_empty else torch.zeros_like
        g0 = alloc(p0, dtype=torch.float32)
        g1 = alloc(p1, dtype=torch.float32)
    if bl.stats_splits:
        stats = torch.zeros(bl.stats_splits, bl.seeds, NUM_FIELDS, device=device)
    else:
        stats = x2 if telemetry is None else telemetry
    side = side_stream(device) if bl.overlap else None
    main = side.fork() if side is not None else None
    _columns_bwd_kernel[bl.cols_grid](
        x2, dy2, dx2, stage, blend, alpha, p0, p1, drec, g0, g1, stats, *bl.cols_scalars, **bl.cols_const
    )  # fmt: skip
    if bl.low_grid is not None:
        if side is not None:
            side.enter()
        try:
            if bl.overlap:
                torch._foreach_zero_((g0, g1))  # one launch for both
            _lowrank_bwd_kernel[bl.low_grid](
                x2, dy2, dx2, stage, blend, alpha, p0, p1, drec, g0, g1, stats, *bl.low_scalars, **bl.low_const
            )  # fmt: skip
        finally:
            if side is not None:
                side.join(main)
    if bl.det:
        if bl.has_stats:
            _merge_partials(telemetry, stats)
        g0, g1 = g0.sum(0), g1.sum(0)
    if g0.dtype != p0.dtype:
        g0, g1 = g0.to(p0.dtype), g1.to(p1.dtype)
    return dx2, g0, g1


def seeded_backward(
    x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry, *, kind, act, all_idle=False, opts: KernelOptions
):
    if opts.autotune:

        def trials():
            scratch = None if telemetry is None else telemetry.clone()
            return lambda o: _backward(x2, dy2, drec, stage, blend, alpha, p0, p1, scratch, kind, act, all_idle, o)

        key = _shape_key(kind, act, x2, stage, p0, telemetry, all_idle)
        lowrank = kind == "lowrank" and not all_idle
        opts = autotune.tuned("bwd", key, opts, x2.device, trials, lowrank=lowrank)
    return _backward(x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry, kind, act, all_idle, opts)


def _backward(x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry, kind, act, all_idle, opts: KernelOptions):
    rows, hidden = x2.shape
    bl = plan_backward(
        kind, rows, hidden, stage.numel(), tuple(p0.shape), act, x2.element_size(), x2.device,
        telemetry is not None, all_idle, opts,
    )  # fmt: skip
    return run_backward(bl, x2, dy2, drec, stage, blend, alpha, p0, p1, telemetry)
