"""The column kernels (forward, backward): every seed whose math is element-wise, at memory speed.

They serve every seed of a diagonal layer and the idle seeds of a lowrank layer (DORMANT, GERMINATED,
CULLED, ...: y = x, dx = dy, telemetry only); a lowrank layer's TRAINING and blended seeds are left to the
lowrank kernels (morpho_dist.kernels.lowrank), whose columns these kernels neither read nor write.

ALL_IDLE (the launcher's all_idle: the caller promised that no seed is TRAINING or blended, so no lowrank kernel
runs): the kernels own every seed of either kind, as a diagonal layer's (masks constant over the whole tile, so
loads and stores stay vectors even for chunk 1), and run no seed math; the backward also zeroes the parameter
gradients, which no kernel adds to then. After the row loops a program whose seeds break the promise writes
NaN over their columns (y, dx), so that a stale promise shows rather than passing x through. That check sits
outside the loops: inside them, a branch made the big fp32 forward take 26% longer (H200).

Tiling. Grid = (row splits, seed groups). A program owns SPP consecutive seeds and a contiguous range of rows,
walked in [BLOCK_T, SPP * CP] tiles (CP = chunk tile; chunks wider than CP are walked in CP-wide steps). The
tile is 2-D with the features contiguous, so every Triton version lays a warp's threads along the row: loads
and stores stay 16-byte vectors (per-seed values are gathered per column and keep the chunk's constancy, so
masks do too), and the telemetry's row sums stay inside each thread. Per-column sums fold into per-seed
sums once per program. (A 3-D [rows, seeds, chunk] tile let Triton 3.6 put threads along the rows: 255
registers and a warp shuffle per reduction step, 25% of copy bandwidth in bf16 on an H100.)

Results. Per-seed telemetry, rec_loss and parameter gradients are reduced inside the program and written once:
atomically into the totals, or (deterministic) into the program's own slot that the launcher sums in a fixed
order. Only the seeds a program owns are written.
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import (
    _add_x_stats,
    _blend,
    _blend_full_delta,
    _blend_grads,
    _put,
    _put_fields,
    _seed_flags,
    _tanh,
    _with_field,
)


@triton.jit
def _program_seeds(
    stage_ptr, blend_ptr, alpha_ptr, group, N, SPP: tl.constexpr, DIAGONAL: tl.constexpr, ALL_IDLE: tl.constexpr
):  # fmt: skip
    """The program's SPP seeds: (ids, owned by this kernel, any owned seed active, reconstructing)."""
    seeds = group * SPP + tl.arange(0, SPP)
    _bl, training, blended, _tr, reconstruct, _a = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seeds, N)
    active = training | blended
    if DIAGONAL or ALL_IDLE:
        own = seeds < N
    else:  # a lowrank layer's active seeds belong to the lowrank kernels
        own = (seeds < N) & ~active
    any_math = tl.max((active & own).to(tl.int32), axis=0) > 0
    return seeds, own, any_math, reconstruct


@triton.jit
def _tile_columns(
    stage_ptr, blend_ptr, alpha_ptr, group, c0, N, C,
    SPP: tl.constexpr, CP: tl.constexpr, DENSE: tl.constexpr, DIAGONAL: tl.constexpr, ALL_IDLE: tl.constexpr,
):  # fmt: skip
    """Per column of the tile's SPP * CP columns at chunk offset c0: feature offset, owned by this kernel, owned
    and active, and its seed's flags (blend id, blended, trainable, reconstructs, effective alpha)."""
    j = tl.arange(0, SPP * CP)
    s = group * SPP + j // CP
    if DENSE:  # C == CP: the group is one contiguous feature range
        feats = group * (SPP * CP) + j
        cmask = s < N
    else:
        c = c0 + j % CP
        feats = s * C + c
        cmask = (s < N) & (c < C)
    bl, training, blended, trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, s, N)
    active = training | blended
    if DIAGONAL or ALL_IDLE:
        own = cmask
    else:
        own = cmask & ~active
    return feats, own, active & own, bl, blended, trainable, reconstruct, a_eff


@triton.jit
def _nan_live_columns(
    out_ptr, stage_ptr, blend_ptr, alpha_ptr, group, row_lo, rows_per_split, T, H, N, C, any_live,
    BLOCK_T: tl.constexpr, CP: tl.constexpr, SPP: tl.constexpr, DENSE: tl.constexpr,
):  # fmt: skip
    """ALL_IDLE: NaN in the program's rows of the columns of its seeds that are TRAINING or blended after all
    (any_live: _program_seeds' any_math, which under ALL_IDLE covers every seed of the program)."""
    if any_live:
        tl.debug_barrier()  # after the loops' stores of the same elements
        offs_t = tl.arange(0, BLOCK_T)
        nan = tl.full([BLOCK_T, SPP * CP], float("nan"), out_ptr.dtype.element_ty)
        for c0 in range(0, C, CP):
            # as a diagonal layer's: every in-range column owned, so `live` marks the TRAINING and blended ones
            feats, _own, live, _bl, _b, _t, _r, _a = _tile_columns(
                stage_ptr, blend_ptr, alpha_ptr, group, c0, N, C, SPP, CP, DENSE, True, False
            )
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None] & live[None, :]
                tl.store(out_ptr + rows[:, None] * H + feats[None, :], nan, mask=m)


@triton.jit
def _zero_range(a_ptr, b_ptr, lo, hi, BLOCK: tl.constexpr = 1024):
    """a[lo:hi] = b[lo:hi] = 0."""
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], a_ptr.dtype.element_ty)
    for o in range(lo, hi, BLOCK):
        m = o + offs < hi
        tl.store(a_ptr + o + offs, zero, mask=m)
        tl.store(b_ptr + o + offs, zero, mask=m)


@triton.jit
def _load_rows(ptr, rows, row_hi, H, feats, own):
    """The [rows, feats] tile of a [T, H] tensor, zero outside the program's rows and owned columns."""
    m = (rows < row_hi)[:, None] & own[None, :]
    return tl.load(ptr + rows[:, None] * H + feats[None, :], mask=m, other=0.0)


@triton.jit
def _per_seed(acc, SPP: tl.constexpr, CP: tl.constexpr, IS_MAX: tl.constexpr):
    """Fold a per-column accumulator [SPP * CP] into per-seed values [SPP]."""
    acc2 = tl.reshape(acc, [SPP, CP])
    if IS_MAX:
        return tl.max(acc2, axis=1)
    else:
        return tl.sum(acc2, axis=1)


@triton.jit
def _columns_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, stats_ptr, rec_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, rec_prog_stride, dead_eps, rec_scale,
    DIAGONAL: tl.constexpr, ALL_IDLE: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, SPP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DENSE: tl.constexpr, ZERO_REC: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, T)
    seeds, s_own, any_math, s_reconstruct = _program_seeds(
        stage_ptr, blend_ptr, alpha_ptr, group, N, SPP, DIAGONAL, ALL_IDLE
    )
    acc_sum = tl.zeros([SPP * CP], tl.float32)
    acc_sq = tl.zeros([SPP * CP], tl.float32)
    acc_dead = tl.zeros([SPP * CP], tl.float32)
    acc_max = tl.zeros([SPP * CP], tl.float32)
    acc_delta = tl.zeros([SPP * CP], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    if tl.max(s_own.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, CP):
            feats, own, act, bl, blended, _trainable, _rec, a_eff = _tile_columns(
                stage_ptr, blend_ptr, alpha_ptr, group, c0, N, C, SPP, CP, DENSE, DIAGONAL, ALL_IDLE
            )
            if DIAGONAL:  # every in-range column is owned
                g = tl.load(g_ptr + feats, mask=own, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + feats, mask=own, other=0.0).to(tl.float32)
            # The next tile's x is loaded before this tile is reduced and stored: two tiles in flight per program
            xr_next = _load_rows(x_ptr, row_lo + offs_t, row_hi, H, feats, own)
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None] & own[None, :]
                offs = rows[:, None] * H + feats[None, :]
                xr = xr_next
                xr_next = _load_rows(x_ptr, rows + BLOCK_T, row_hi, H, feats, own)
                x = xr.to(tl.float32)
                acc_sum, acc_sq, acc_dead, acc_max = _add_x_stats(acc_sum, acc_sq, acc_dead, acc_max, x, m, dead_eps)
                out = xr  # idle and TRAINING seeds: y is x, bit for bit
                if DIAGONAL:  # noqa: SIM102  a constexpr test of its own: g and b exist only then
                    if any_math:
                        u = g[None, :] * x + b[None, :]
                        z = _blend(x, u, a_eff[None, :], bl[None, :])
                        d = tl.where(m & act[None, :], z - x, 0.0)
                        acc_delta += tl.sum(d * d, axis=0)
                        out = tl.where(blended[None, :], z.to(xr.dtype), xr)
                tl.store(y_ptr + offs, out, mask=m)
    if ALL_IDLE:
        _nan_live_columns(
            y_ptr, stage_ptr, blend_ptr, alpha_ptr, group, row_lo, rows_per_split, T, H, N, C, any_math,
            BLOCK_T, CP, SPP, DENSE,
        )  # fmt: skip
    delta = _per_seed(acc_delta, SPP, CP, False)
    rec_part = tl.sum(tl.where(s_reconstruct & s_own, delta, 0.0), axis=0) * rec_scale
    rec_slot = rec_ptr + (split * tl.num_programs(1) + group) * rec_prog_stride
    if USE_ATOMICS:
        if DIAGONAL:
            tl.atomic_add(rec_slot, rec_part, sem="relaxed")
        elif ZERO_REC:  # noqa: SIM102  lowrank layer: the lowrank kernel, launched next, adds into a zeroed total
            if split + group == 0:
                tl.store(rec_ptr, 0.0)
    else:
        tl.store(rec_slot, rec_part)
    if HAS_STATS:
        rows_here = tl.minimum(tl.maximum(T - row_lo, 0), rows_per_split)
        p = stats_ptr + split * stats_split_stride + seeds * 8
        tile = tl.zeros([SPP, 8], tl.float32) + (rows_here * C).to(tl.float32)  # field 0: count
        tile = _with_field(tile, 1, _per_seed(acc_sum, SPP, CP, False))
        tile = _with_field(tile, 2, _per_seed(acc_sq, SPP, CP, False))
        tile = _with_field(tile, 3, _per_seed(acc_dead, SPP, CP, False))
        tile = _with_field(tile, 7, delta)
        f = tl.arange(0, 8)
        _put_fields(p, tile, (f < 4) | (f == 7), s_own, USE_ATOMICS)
        _put(p + 4, _per_seed(acc_max, SPP, CP, True), s_own, USE_ATOMICS, True)


@triton.jit
def _columns_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, drec_ptr, dg_ptr, db_ptr, stats_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, grad_split_stride, inv_count, grad_seed_elems,
    DIAGONAL: tl.constexpr, ALL_IDLE: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, SPP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DENSE: tl.constexpr, ZERO_GRADS: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    seeds, s_own, any_math, _rec = _program_seeds(stage_ptr, blend_ptr, alpha_ptr, group, N, SPP, DIAGONAL, ALL_IDLE)
    drec_scaled = tl.load(drec_ptr) * inv_count
    acc_gsq = tl.zeros([SPP * CP], tl.float32)
    acc_ben = tl.zeros([SPP * CP], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    if tl.max(s_own.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, CP):
            feats, own, act, bl, blended, trainable, reconstruct, a_eff = _tile_columns(
                stage_ptr, blend_ptr, alpha_ptr, group, c0, N, C, SPP, CP, DENSE, DIAGONAL, ALL_IDLE
            )
            acc_dg = tl.zeros([SPP * CP], tl.float32)
            acc_db = tl.zeros([SPP * CP], tl.float32)
            if DIAGONAL:  # every in-range column is owned
                g = tl.load(g_ptr + feats, mask=own, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + feats, mask=own, other=0.0).to(tl.float32)
            # No prefetch of the next dy tile here: on an H200 it made wide's dormant fwd+bwd 2-3% slower.
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None] & own[None, :]
                offs = rows[:, None] * H + feats[None, :]
                dyr = tl.load(dy_ptr + offs, mask=m, other=0.0)
                dy = dyr.to(tl.float32)
                acc_gsq += tl.sum(dy * dy, axis=0)
                out = dyr  # idle and TRAINING seeds: dx is dy, bit for bit
                if DIAGONAL:  # noqa: SIM102  a constexpr test of its own: g and b exist only then
                    if any_math:
                        ma = m & act[None, :]  # x is read for the active seeds only
                        x = tl.load(x_ptr + offs, mask=ma, other=0.0).to(tl.float32)
                        u = g[None, :] * x + b[None, :]
                        th = _tanh(u)
                        bl2 = bl[None, :]
                        ben = dy * _blend_full_delta(x, u, th, bl2)
                        acc_ben += tl.sum(tl.where(ma, ben, 0.0), axis=0)
                        gx, gu = _blend_grads(x, th, dy, a_eff[None, :], bl2)
                        du = tl.where(reconstruct[None, :], drec_scaled * (u - x), gu)
                        du = tl.where(ma, du, 0.0)
                        acc_dg += tl.sum(du * x, axis=0)
                        acc_db += tl.sum(du, axis=0)
                        out = tl.where(blended[None, :], (gx + du * g[None, :]).to(dyr.dtype), dyr)
                tl.store(dx_ptr + offs, out, mask=m)
            if DIAGONAL:  # noqa: SIM102
                if any_math:  # only TRAINING / GRAFTING / FINE_TUNING seeds have parameter gradients
                    gmask = own & trainable
                    if USE_ATOMICS:
                        tl.atomic_add(dg_ptr + feats, acc_dg, mask=gmask, sem="relaxed")
                        tl.atomic_add(db_ptr + feats, acc_db, mask=gmask, sem="relaxed")
                    else:
                        tl.store(dg_ptr + split * grad_split_stride + feats, acc_dg, mask=gmask)
                        tl.store(db_ptr + split * grad_split_stride + feats, acc_db, mask=gmask)
    if ALL_IDLE:
        _nan_live_columns(
            dx_ptr, stage_ptr, blend_ptr, alpha_ptr, group, row_lo, rows_per_split, T, H, N, C, any_math,
            BLOCK_T, CP, SPP, DENSE,
        )  # fmt: skip
    if ZERO_GRADS:  # noqa: SIM102  no kernel adds to them: the first split zeroes its seeds' slices (no fills)
        if split == 0:
            lo = group * SPP * grad_seed_elems
            _zero_range(dg_ptr, db_ptr, lo, tl.minimum((group + 1) * SPP, N) * grad_seed_elems)
    if HAS_STATS:
        p = stats_ptr + split * stats_split_stride + seeds * 8
        tile = _with_field(tl.zeros([SPP, 8], tl.float32), 5, _per_seed(acc_gsq, SPP, CP, False))
        tile = _with_field(tile, 6, _per_seed(acc_ben, SPP, CP, False))
        f = tl.arange(0, 8)
        _put_fields(p, tile, (f == 5) | (f == 6), s_own, USE_ATOMICS)
