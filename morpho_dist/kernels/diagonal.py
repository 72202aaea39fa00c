"""Fused seeded kernels for `diagonal` blueprints: u = g_n * x_c + b_n (any chunk size, also 1).

Grid: (row splits, seed groups). A program's tile is BLOCK_T rows x (SEEDS_PER_PROG * CP) features: column j
belongs to seed j // CP at chunk offset j % CP (CP = chunk tile, a power of two; chunks wider than CP are
walked in CP-wide steps). Per-column partial sums are folded into per-seed values with a reshape, so one
program serves many narrow seeds (per-node mode: C = 1) with coalesced loads.
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import _blend, _blend_full_delta, _blend_grads, _put, _tanh


@triton.jit
def _diag_params(stage_ptr, blend_ptr, alpha_ptr, seeds, smask):
    st = tl.load(stage_ptr + seeds, mask=smask, other=0).to(tl.int32)
    bl = tl.load(blend_ptr + seeds, mask=smask, other=0).to(tl.int32)
    alpha = tl.load(alpha_ptr + seeds, mask=smask, other=0.0)
    return st, bl, alpha


@triton.jit
def _diag_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, stats_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, dead_eps,
    BLOCK_T: tl.constexpr, CP: tl.constexpr, SEEDS_PER_PROG: tl.constexpr, USE_ATOMICS: tl.constexpr,
):
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, SEEDS_PER_PROG * CP)
    seeds = group * SEEDS_PER_PROG + j // CP
    smask = seeds < N
    st, bl, alpha = _diag_params(stage_ptr, blend_ptr, alpha_ptr, seeds, smask)
    blended = (st >= 3) & (st <= 7)
    active = (st == 2) | blended
    a_eff = tl.where(blended, alpha, 1.0)
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    acc_sum = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    acc_sq = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    acc_dead = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    acc_max = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    acc_delta = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    for c0 in range(0, C, CP):
        c = c0 + j % CP
        fmask = smask & (c < C)
        feats = seeds * C + c
        g = tl.load(g_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
        for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
            rows = t0 + offs_t
            m = (rows < T)[:, None] & fmask[None, :]
            ptrs = rows[:, None].to(tl.int64) * H + feats[None, :]
            xr = tl.load(x_ptr + ptrs, mask=m, other=0.0)
            x = xr.to(tl.float32)
            ax = tl.abs(x)
            acc_sum += tl.sum(x, axis=0)
            acc_sq += tl.sum(x * x, axis=0)
            acc_dead += tl.sum(tl.where(m & (ax <= dead_eps), 1.0, 0.0), axis=0)
            acc_max = tl.maximum(acc_max, tl.max(ax, axis=0))
            out = xr  # idle and TRAINING seeds: y is x, bit for bit
            if any_active:
                u = g[None, :] * x + b[None, :]
                z = _blend(x, u, a_eff[None, :], bl[None, :])
                d = tl.where(m & active[None, :], z - x, 0.0)
                acc_delta += tl.sum(d * d, axis=0)
                out = tl.where(blended[None, :], z.to(xr.dtype), xr)
            tl.store(y_ptr + ptrs, out, mask=m)
    seed_out = group * SEEDS_PER_PROG + tl.arange(0, SEEDS_PER_PROG)
    omask = seed_out < N
    p = stats_ptr + split * stats_split_stride + seed_out * 8
    _put(p + 1, tl.sum(tl.reshape(acc_sum, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)
    _put(p + 2, tl.sum(tl.reshape(acc_sq, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)
    _put(p + 3, tl.sum(tl.reshape(acc_dead, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)
    _put(p + 4, tl.max(tl.reshape(acc_max, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, True)
    _put(p + 7, tl.sum(tl.reshape(acc_delta, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)


@triton.jit
def _diag_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, g_ptr, b_ptr, drec_ptr,
    dg_ptr, db_ptr, stats_ptr,
    T, H, N, C, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    BLOCK_T: tl.constexpr, CP: tl.constexpr, SEEDS_PER_PROG: tl.constexpr, USE_ATOMICS: tl.constexpr,
):
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, SEEDS_PER_PROG * CP)
    seeds = group * SEEDS_PER_PROG + j // CP
    smask = seeds < N
    st, bl, alpha = _diag_params(stage_ptr, blend_ptr, alpha_ptr, seeds, smask)
    training = st == 2
    blended = (st >= 3) & (st <= 7)
    active = training | blended
    trainable = training | (st == 3) | (st == 6)
    reconstruct = training & (bl == 2)
    a_eff = tl.where(blended, alpha, 1.0)
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    drec_scaled = tl.load(drec_ptr) * inv_count
    acc_gsq = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    acc_ben = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
    for c0 in range(0, C, CP):
        c = c0 + j % CP
        fmask = smask & (c < C)
        feats = seeds * C + c
        g = tl.load(g_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
        acc_dg = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
        acc_db = tl.zeros([SEEDS_PER_PROG * CP], tl.float32)
        for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
            rows = t0 + offs_t
            m = (rows < T)[:, None] & fmask[None, :]
            ptrs = rows[:, None].to(tl.int64) * H + feats[None, :]
            dyr = tl.load(dy_ptr + ptrs, mask=m, other=0.0)
            dy = dyr.to(tl.float32)
            acc_gsq += tl.sum(dy * dy, axis=0)
            out = dyr  # idle and TRAINING seeds: dx is dy, bit for bit
            if any_active:
                x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
                u = g[None, :] * x + b[None, :]
                th = _tanh(u)
                ben = dy * _blend_full_delta(x, u, th, bl[None, :])
                acc_ben += tl.sum(tl.where(m & active[None, :], ben, 0.0), axis=0)
                gx, gu = _blend_grads(x, th, dy, a_eff[None, :], bl[None, :])
                du = tl.where(reconstruct[None, :], drec_scaled * (u - x), gu)
                du = tl.where(m, du, 0.0)
                out = tl.where(blended[None, :], (gx + du * g[None, :]).to(dyr.dtype), dyr)
                acc_dg += tl.sum(du * x, axis=0)
                acc_db += tl.sum(du, axis=0)
            tl.store(dx_ptr + ptrs, out, mask=m)
        acc_dg = tl.where(trainable, acc_dg, 0.0)
        acc_db = tl.where(trainable, acc_db, 0.0)
        if USE_ATOMICS:
            tl.atomic_add(dg_ptr + feats, acc_dg, mask=fmask & trainable)
            tl.atomic_add(db_ptr + feats, acc_db, mask=fmask & trainable)
        else:
            tl.store(dg_ptr + split * grad_split_stride + feats, acc_dg, mask=fmask)
            tl.store(db_ptr + split * grad_split_stride + feats, acc_db, mask=fmask)
    seed_out = group * SEEDS_PER_PROG + tl.arange(0, SEEDS_PER_PROG)
    omask = seed_out < N
    p = stats_ptr + split * stats_split_stride + seed_out * 2
    _put(p, tl.sum(tl.reshape(acc_gsq, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)
    _put(p + 1, tl.sum(tl.reshape(acc_ben, [SEEDS_PER_PROG, CP]), axis=1), omask, USE_ATOMICS, False)


def launch_diagonal_forward(x2, y2, stage, blend, alpha, g, b, stats, plan, *, dead_eps, opts):
    t, h = x2.shape
    n, c = g.shape
    _diag_fwd_kernel[(plan.splits, plan.groups)](
        x2, y2, stage, blend, alpha, g, b, stats,
        t, h, n, c, plan.rows_per_split, plan.stats_split_stride(n, 8), dead_eps,
        BLOCK_T=plan.block_t, CP=plan.block_c, SEEDS_PER_PROG=plan.seeds_per_prog,
        USE_ATOMICS=not opts.deterministic, num_warps=opts.num_warps,
    )


def launch_diagonal_backward(x2, dy2, dx2, stage, blend, alpha, g, b, drec, dg, db, stats, plan, *, opts):
    t, h = x2.shape
    n, c = g.shape
    _diag_bwd_kernel[(plan.splits, plan.groups)](
        x2, dy2, dx2, stage, blend, alpha, g, b, drec, dg, db, stats,
        t, h, n, c, plan.rows_per_split, plan.stats_split_stride(n, 2),
        0 if not opts.deterministic else n * c, 1.0 / (t * c),
        BLOCK_T=plan.block_t, CP=plan.block_c, SEEDS_PER_PROG=plan.seeds_per_prog,
        USE_ATOMICS=not opts.deterministic, num_warps=opts.num_warps,
    )
