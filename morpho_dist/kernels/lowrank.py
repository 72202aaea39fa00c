"""Fused seeded kernels for `lowrank` blueprints: u = act(x_c @ A_n) @ B_n.

Grid: (row splits, seed groups). A program owns SEEDS_PER_PROG consecutive seeds (a contiguous feature band)
and a contiguous range of rows, walked in BLOCK_T tiles; per-seed telemetry and parameter gradients are
reduced inside the program and written once per program: atomically into the totals, or (deterministic)
into the program's own slot of a partials buffer that the launcher sums in a fixed order.
Idle seeds skip both dots; the backward recomputes x @ A rather than saving it.
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import _act, _act_grad, _blend, _blend_full_delta, _blend_grads, _put, _tanh


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, stats_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, dead_eps,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    SEEDS_PER_PROG: tl.constexpr, USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    rmask = offs_r < R
    stats_base = stats_ptr + split * stats_split_stride
    for s in tl.static_range(SEEDS_PER_PROG):
        n = group * SEEDS_PER_PROG + s
        if n < N:
            st = tl.load(stage_ptr + n).to(tl.int32)
            bl = tl.load(blend_ptr + n).to(tl.int32)
            alpha = tl.load(alpha_ptr + n)
            blended = (st >= 3) & (st <= 7)
            active = (st == 2) | blended
            a_eff = tl.where(blended, alpha, 1.0)  # TRAINING measures the full graft (alpha = 1)
            a_tile = tl.load(
                a_ptr + n * C * R + offs_c[:, None] * R + offs_r[None, :],
                mask=cmask[:, None] & rmask[None, :], other=0.0,
            ).to(tl.float32)
            b_tile = tl.load(
                b_ptr + n * R * C + offs_r[:, None] * C + offs_c[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0,
            ).to(tl.float32)
            acc_sum = tl.zeros([BLOCK_C], tl.float32)
            acc_sq = tl.zeros([BLOCK_C], tl.float32)
            acc_dead = tl.zeros([BLOCK_C], tl.float32)
            acc_max = tl.zeros([BLOCK_C], tl.float32)
            acc_delta = tl.zeros([BLOCK_C], tl.float32)
            cols = n * C + offs_c
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None] & cmask[None, :]
                ptrs = rows[:, None].to(tl.int64) * H + cols[None, :]
                xr = tl.load(x_ptr + ptrs, mask=m, other=0.0)
                x = xr.to(tl.float32)
                ax = tl.abs(x)
                acc_sum += tl.sum(x, axis=0)
                acc_sq += tl.sum(x * x, axis=0)
                acc_dead += tl.sum(tl.where(m & (ax <= dead_eps), 1.0, 0.0), axis=0)
                acc_max = tl.maximum(acc_max, tl.max(ax, axis=0))
                out = xr  # idle and TRAINING seeds: y is x, bit for bit
                if active:
                    hh = _act(tl.dot(x, a_tile, input_precision=DOT_PRECISION), ACT)
                    u = tl.dot(hh, b_tile, input_precision=DOT_PRECISION)
                    z = _blend(x, u, a_eff, bl)
                    d = tl.where(m, z - x, 0.0)
                    acc_delta += tl.sum(d * d, axis=0)
                    if blended:
                        out = z.to(xr.dtype)
                tl.store(y_ptr + ptrs, out, mask=m)
            p = stats_base + n * 8
            _put(p + 1, tl.sum(acc_sum, axis=0), None, USE_ATOMICS, False)
            _put(p + 2, tl.sum(acc_sq, axis=0), None, USE_ATOMICS, False)
            _put(p + 3, tl.sum(acc_dead, axis=0), None, USE_ATOMICS, False)
            _put(p + 4, tl.max(acc_max, axis=0), None, USE_ATOMICS, True)
            _put(p + 7, tl.sum(acc_delta, axis=0), None, USE_ATOMICS, False)


@triton.jit
def _lowrank_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, drec_ptr,
    da_ptr, db_ptr, stats_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    SEEDS_PER_PROG: tl.constexpr, USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    cmask = offs_c < C
    rmask = offs_r < R
    amask = cmask[:, None] & rmask[None, :]
    bmask = rmask[:, None] & cmask[None, :]
    stats_base = stats_ptr + split * stats_split_stride
    grad_off = split * grad_split_stride
    drec_scaled = tl.load(drec_ptr) * inv_count
    for s in tl.static_range(SEEDS_PER_PROG):
        n = group * SEEDS_PER_PROG + s
        if n < N:
            st = tl.load(stage_ptr + n).to(tl.int32)
            bl = tl.load(blend_ptr + n).to(tl.int32)
            alpha = tl.load(alpha_ptr + n)
            training = st == 2
            blended = (st >= 3) & (st <= 7)
            active = training | blended
            trainable = training | (st == 3) | (st == 6)
            reconstruct = training & (bl == 2)
            a_eff = tl.where(blended, alpha, 1.0)
            a_offs = n * C * R + offs_c[:, None] * R + offs_r[None, :]
            b_offs = n * R * C + offs_r[:, None] * C + offs_c[None, :]
            a_tile = tl.load(a_ptr + a_offs, mask=amask, other=0.0).to(tl.float32)
            b_tile = tl.load(b_ptr + b_offs, mask=bmask, other=0.0).to(tl.float32)
            acc_gsq = tl.zeros([BLOCK_C], tl.float32)
            acc_ben = tl.zeros([BLOCK_C], tl.float32)
            d_a = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
            d_b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            cols = n * C + offs_c
            for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
                rows = t0 + offs_t
                m = (rows < T)[:, None] & cmask[None, :]
                ptrs = rows[:, None].to(tl.int64) * H + cols[None, :]
                dyr = tl.load(dy_ptr + ptrs, mask=m, other=0.0)
                dy = dyr.to(tl.float32)
                acc_gsq += tl.sum(dy * dy, axis=0)
                out = dyr  # idle and TRAINING seeds: dx is dy, bit for bit
                if active:
                    x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
                    hp = tl.dot(x, a_tile, input_precision=DOT_PRECISION)
                    hh = _act(hp, ACT)
                    u = tl.dot(hh, b_tile, input_precision=DOT_PRECISION)
                    th = _tanh(u)
                    acc_ben += tl.sum(dy * _blend_full_delta(x, u, th, bl), axis=0)
                    gx, gu = _blend_grads(x, th, dy, a_eff, bl)
                    du = tl.where(reconstruct, drec_scaled * (u - x), gu)
                    du = tl.where(m, du, 0.0)
                    dhp = tl.dot(du, tl.trans(b_tile), input_precision=DOT_PRECISION) * _act_grad(hp, ACT)
                    if blended:
                        out = (gx + tl.dot(dhp, tl.trans(a_tile), input_precision=DOT_PRECISION)).to(dyr.dtype)
                    if trainable:
                        d_a += tl.dot(tl.trans(x), dhp, input_precision=DOT_PRECISION)
                        d_b += tl.dot(tl.trans(hh), du, input_precision=DOT_PRECISION)
                tl.store(dx_ptr + ptrs, out, mask=m)
            p = stats_base + n * 2
            _put(p, tl.sum(acc_gsq, axis=0), None, USE_ATOMICS, False)
            _put(p + 1, tl.sum(acc_ben, axis=0), None, USE_ATOMICS, False)
            if USE_ATOMICS:
                if trainable:
                    tl.atomic_add(da_ptr + a_offs, d_a, mask=amask)
                    tl.atomic_add(db_ptr + b_offs, d_b, mask=bmask)
            else:
                tl.store(da_ptr + grad_off + a_offs, d_a, mask=amask)
                tl.store(db_ptr + grad_off + b_offs, d_b, mask=bmask)


def launch_lowrank_forward(x2, y2, stage, blend, alpha, a, b, stats, plan, *, act_id, dead_eps, opts):
    t, h = x2.shape
    n, c, r = a.shape
    _lowrank_fwd_kernel[(plan.splits, plan.groups)](
        x2, y2, stage, blend, alpha, a, b, stats,
        t, h, n, c, r, plan.rows_per_split, plan.stats_split_stride(n, 8), dead_eps,
        ACT=act_id, BLOCK_T=plan.block_t, BLOCK_C=plan.block_c, BLOCK_R=max(16, triton.next_power_of_2(r)),
        SEEDS_PER_PROG=plan.seeds_per_prog, USE_ATOMICS=not opts.deterministic, DOT_PRECISION=opts.dot_precision,
        num_warps=opts.num_warps,
    )


def launch_lowrank_backward(x2, dy2, dx2, stage, blend, alpha, a, b, drec, da, db, stats, plan, *, act_id, opts):
    t, h = x2.shape
    n, c, r = a.shape
    _lowrank_bwd_kernel[(plan.splits, plan.groups)](
        x2, dy2, dx2, stage, blend, alpha, a, b, drec, da, db, stats,
        t, h, n, c, r, plan.rows_per_split, plan.stats_split_stride(n, 2),
        0 if not opts.deterministic else n * c * r, 1.0 / (t * c),
        ACT=act_id, BLOCK_T=plan.block_t, BLOCK_C=plan.block_c, BLOCK_R=max(16, triton.next_power_of_2(r)),
        SEEDS_PER_PROG=plan.seeds_per_prog, USE_ATOMICS=not opts.deterministic, DOT_PRECISION=opts.dot_precision,
        num_warps=opts.num_warps,
    )
