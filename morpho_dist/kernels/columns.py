"""The column kernels (forward, backward): every seed whose math is element-wise, at memory speed.

They serve every seed of a diagonal layer and the idle seeds of a lowrank layer (DORMANT, GERMINATED,
CULLED, ...: y = x, dx = dy, telemetry only); a lowrank layer's TRAINING and blended seeds are left to the
lowrank kernels (morpho_dist.kernels.lowrank), whose columns these kernels neither read nor write.

Tiling. Grid = (row splits, seed groups). A program owns SPP consecutive seeds and a contiguous range of rows,
walked in [BLOCK_T, SPP, CP] tiles (CP = chunk tile; chunks wider than CP are walked in CP-wide steps). The
tile is 3-D so that per-seed values broadcast along the chunk axis: masks stay constant over 16-byte vectors
and loads and stores stay vectorised, and Triton spreads a warp's threads over columns first, so the row sums
of the telemetry are mostly in-thread.

Results. Per-seed telemetry, rec_loss and parameter gradients are reduced inside the program and written once:
atomically into the totals, or (deterministic) into the program's own slot that the launcher sums in a fixed
order. Only the seeds a program owns are written.
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import (
    _blend,
    _blend_full_delta,
    _blend_grads,
    _put,
    _seed_flags,
    _tanh,
)


@triton.jit
def _tile_offsets(group, c0, N, C, SPP: tl.constexpr, CP: tl.constexpr, DENSE: tl.constexpr):
    """[SPP, CP] feature offsets and column mask of the group's seeds at chunk offset c0."""
    s = group * SPP + tl.arange(0, SPP)
    c = tl.arange(0, CP)
    if DENSE:  # C == CP: the group is one contiguous feature range
        feats = (s * CP)[:, None] + c[None, :]
        cmask = tl.broadcast_to((s < N)[:, None], [SPP, CP])
    else:
        feats = (s * C)[:, None] + (c0 + c)[None, :]
        cmask = (s < N)[:, None] & ((c0 + c) < C)[None, :]
    return feats, cmask


@triton.jit
def _columns_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, stats_ptr, rec_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, rec_prog_stride, dead_eps, rec_scale,
    DIAGONAL: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, SPP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DENSE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    s = group * SPP + tl.arange(0, SPP)
    bl, training, blended, _trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, s, N)
    active = training | blended
    if DIAGONAL:
        own = s < N
    else:  # a lowrank layer's active seeds belong to the lowrank kernels
        own = (s < N) & ~active
    own3 = own[None, :, None]
    act3 = (active & own)[None, :, None]
    bl3, a3, blended3 = bl[None, :, None], a_eff[None, :, None], blended[None, :, None]
    any_math = tl.max((active & own).to(tl.int32), axis=0) > 0
    acc_sum = tl.zeros([SPP, CP], tl.float32)
    acc_sq = tl.zeros([SPP, CP], tl.float32)
    acc_dead = tl.zeros([SPP, CP], tl.float32)
    acc_max = tl.zeros([SPP, CP], tl.float32)
    acc_delta = tl.zeros([SPP, CP], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    if tl.max(own.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, CP):
            feats, cmask = _tile_offsets(group, c0, N, C, SPP, CP, DENSE)
            if DIAGONAL:
                g = tl.load(g_ptr + feats, mask=cmask, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + feats, mask=cmask, other=0.0).to(tl.float32)
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None, None] & cmask[None, :, :] & own3
                offs = rows[:, None, None] * H + feats[None, :, :]
                xr = tl.load(x_ptr + offs, mask=m, other=0.0)
                x = xr.to(tl.float32)
                ax = tl.abs(x)
                acc_sum += tl.sum(x, axis=0)
                acc_sq += tl.sum(x * x, axis=0)
                acc_dead += tl.sum(tl.where(m & (ax <= dead_eps), 1.0, 0.0), axis=0)
                acc_max = tl.maximum(acc_max, tl.max(ax, axis=0))
                out = xr  # idle and TRAINING seeds: y is x, bit for bit
                if DIAGONAL:  # noqa: SIM102  a constexpr test of its own: g and b exist only then
                    if any_math:
                        u = g[None, :, :] * x + b[None, :, :]
                        z = _blend(x, u, a3, bl3)
                        d = tl.where(m & act3, z - x, 0.0)
                        acc_delta += tl.sum(d * d, axis=0)
                        out = tl.where(blended3, z.to(xr.dtype), xr)
                tl.store(y_ptr + offs, out, mask=m)
    delta = tl.sum(acc_delta, axis=1)
    rec_part = tl.sum(tl.where(reconstruct & own, delta, 0.0), axis=0) * rec_scale
    rec_slot = rec_ptr + (split * tl.num_programs(1) + group) * rec_prog_stride
    if USE_ATOMICS:
        if DIAGONAL:
            tl.atomic_add(rec_slot, rec_part, sem="relaxed")
    else:
        tl.store(rec_slot, rec_part)
    if HAS_STATS:
        rows_here = tl.minimum(tl.maximum(T - row_lo, 0), rows_per_split)
        p = stats_ptr + split * stats_split_stride + s * 8
        _put(p, tl.zeros([SPP], tl.float32) + (rows_here * C).to(tl.float32), own, USE_ATOMICS, False)
        _put(p + 1, tl.sum(acc_sum, axis=1), own, USE_ATOMICS, False)
        _put(p + 2, tl.sum(acc_sq, axis=1), own, USE_ATOMICS, False)
        _put(p + 3, tl.sum(acc_dead, axis=1), own, USE_ATOMICS, False)
        _put(p + 4, tl.max(acc_max, axis=1), own, USE_ATOMICS, True)
        _put(p + 7, delta, own, USE_ATOMICS, False)


@triton.jit
def _columns_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, drec_ptr, dg_ptr, db_ptr, stats_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    DIAGONAL: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, SPP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DENSE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    s = group * SPP + tl.arange(0, SPP)
    bl, training, blended, trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, s, N)
    active = training | blended
    if DIAGONAL:
        own = s < N
    else:
        own = (s < N) & ~active
    own3 = own[None, :, None]
    act3 = (active & own)[None, :, None]
    bl3, a3, blended3 = bl[None, :, None], a_eff[None, :, None], blended[None, :, None]
    rec3 = reconstruct[None, :, None]
    any_math = tl.max((active & own).to(tl.int32), axis=0) > 0
    drec_scaled = tl.load(drec_ptr) * inv_count
    acc_gsq = tl.zeros([SPP, CP], tl.float32)
    acc_ben = tl.zeros([SPP, CP], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    if tl.max(own.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, CP):
            feats, cmask = _tile_offsets(group, c0, N, C, SPP, CP, DENSE)
            acc_dg = tl.zeros([SPP, CP], tl.float32)
            acc_db = tl.zeros([SPP, CP], tl.float32)
            if DIAGONAL:
                g = tl.load(g_ptr + feats, mask=cmask, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + feats, mask=cmask, other=0.0).to(tl.float32)
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None, None] & cmask[None, :, :] & own3
                offs = rows[:, None, None] * H + feats[None, :, :]
                dyr = tl.load(dy_ptr + offs, mask=m, other=0.0)
                dy = dyr.to(tl.float32)
                acc_gsq += tl.sum(dy * dy, axis=0)
                out = dyr  # idle and TRAINING seeds: dx is dy, bit for bit
                if DIAGONAL:  # noqa: SIM102  a constexpr test of its own: g and b exist only then
                    if any_math:
                        ma = m & act3  # x is read for the active seeds only
                        x = tl.load(x_ptr + offs, mask=ma, other=0.0).to(tl.float32)
                        u = g[None, :, :] * x + b[None, :, :]
                        th = _tanh(u)
                        ben = dy * _blend_full_delta(x, u, th, bl3)
                        acc_ben += tl.sum(tl.where(ma, ben, 0.0), axis=0)
                        gx, gu = _blend_grads(x, th, dy, a3, bl3)
                        du = tl.where(rec3, drec_scaled * (u - x), gu)
                        du = tl.where(ma, du, 0.0)
                        acc_dg += tl.sum(du * x, axis=0)
                        acc_db += tl.sum(du, axis=0)
                        out = tl.where(blended3, (gx + du * g[None, :, :]).to(dyr.dtype), dyr)
                tl.store(dx_ptr + offs, out, mask=m)
            if DIAGONAL:  # noqa: SIM102
                if any_math:  # only TRAINING / GRAFTING / FINE_TUNING seeds have parameter gradients
                    gmask = cmask & (trainable & own)[:, None]
                    goffs = feats
                    if USE_ATOMICS:
                        tl.atomic_add(dg_ptr + goffs, acc_dg, mask=gmask, sem="relaxed")
                        tl.atomic_add(db_ptr + goffs, acc_db, mask=gmask, sem="relaxed")
                    else:
                        tl.store(dg_ptr + split * grad_split_stride + goffs, acc_dg, mask=gmask)
                        tl.store(db_ptr + split * grad_split_stride + goffs, acc_db, mask=gmask)
    if HAS_STATS:
        p = stats_ptr + split * stats_split_stride + s * 8
        _put(p + 5, tl.sum(acc_gsq, axis=1), own, USE_ATOMICS, False)
        _put(p + 6, tl.sum(acc_ben, axis=1), own, USE_ATOMICS, False)
