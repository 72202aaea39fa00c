"""The lowrank kernels (forward, backward): the TRAINING and blended seeds of a lowrank layer.

Grid = (row splits, seeds). A program owns one seed and a contiguous range of rows; it returns at once unless
its seed is TRAINING or blended (the column kernels own every other seed), so dormant seeds cost one
scalar load. Its [BLOCK_T, CP] tiles (CP = the chunk padded to a power of two >= 16, the smallest tl.dot
dimension) run the blueprint as two tensor-core dots against the seed's own A [CP, RP] and B [RP, CP]; the
backward recomputes x @ A. Telemetry, rec_loss and the seed's parameter gradients are reduced inside the
program and written once (atomically, or into the program's own slot when deterministic).
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import (
    _act,
    _act_grad,
    _add_x_stats,
    _blend,
    _blend_full_delta,
    _blend_grads,
    _put1,
    _seed_flags,
    _tanh,
)


@triton.jit
def _seed_weights(a_ptr, b_ptr, seed, C, R, CP: tl.constexpr, RP: tl.constexpr):
    """The seed's A [CP, RP] and B [RP, CP] (fp32, zero-padded) and the chunk mask [CP]."""
    c = tl.arange(0, CP)
    r = tl.arange(0, RP)
    cmask = c < C
    wmask = cmask[:, None] & (r < R)[None, :]
    a = tl.load(a_ptr + seed * C * R + c[:, None] * R + r[None, :], mask=wmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + seed * R * C + r[:, None] * C + c[None, :], mask=tl.trans(wmask), other=0.0)
    return a, b.to(tl.float32), c, cmask, wmask


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, stats_ptr, rec_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, rec_prog_stride, dead_eps, rec_scale,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    seed = tl.program_id(1)
    bl, training, blended, _trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seed, N)
    if training | blended:
        row_lo = split * rows_per_split
        a, b, c, cmask, _wmask = _seed_weights(a_ptr, b_ptr, seed, C, R, CP, RP)
        feats = seed * C + c
        offs_t = tl.arange(0, BLOCK_T)
        acc_sum = tl.zeros([CP], tl.float32)
        acc_sq = tl.zeros([CP], tl.float32)
        acc_dead = tl.zeros([CP], tl.float32)
        acc_max = tl.zeros([CP], tl.float32)
        acc_delta = tl.zeros([CP], tl.float32)
        for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
            rows = t0 + offs_t
            m = (rows < T)[:, None] & cmask[None, :]
            offs = rows[:, None] * H + feats[None, :]
            xr = tl.load(x_ptr + offs, mask=m, other=0.0)
            x = xr.to(tl.float32)
            acc_sum, acc_sq, acc_dead, acc_max = _add_x_stats(acc_sum, acc_sq, acc_dead, acc_max, x, m, dead_eps)
            hh = _act(tl.dot(x, a, input_precision=DOT_PRECISION), ACT)
            u = tl.dot(hh, b, input_precision=DOT_PRECISION)
            z = _blend(x, u, a_eff, bl)
            d = tl.where(m, z - x, 0.0)
            acc_delta += tl.sum(d * d, axis=0)
            if blended:
                tl.store(y_ptr + offs, z.to(xr.dtype), mask=m)
            else:  # TRAINING: y is x, bit for bit
                tl.store(y_ptr + offs, xr, mask=m)
        delta = tl.sum(acc_delta, axis=0)
        rec_slot = rec_ptr + (split * tl.num_programs(1) + seed) * rec_prog_stride
        if reconstruct:
            _put1(rec_slot, delta * rec_scale, USE_ATOMICS, False)
        if HAS_STATS:
            rows_here = tl.minimum(tl.maximum(T - row_lo, 0), rows_per_split)
            p = stats_ptr + split * stats_split_stride + seed * 8
            _put1(p, (rows_here * C).to(tl.float32), USE_ATOMICS, False)
            _put1(p + 1, tl.sum(acc_sum, axis=0), USE_ATOMICS, False)
            _put1(p + 2, tl.sum(acc_sq, axis=0), USE_ATOMICS, False)
            _put1(p + 3, tl.sum(acc_dead, axis=0), USE_ATOMICS, False)
            _put1(p + 4, tl.max(acc_max, axis=0), USE_ATOMICS, True)
            _put1(p + 7, delta, USE_ATOMICS, False)


@triton.jit
def _lowrank_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, drec_ptr, ga_ptr, gb_ptr, stats_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    seed = tl.program_id(1)
    bl, training, blended, trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seed, N)
    if training | blended:
        row_lo = split * rows_per_split
        a, b, c, cmask, wmask = _seed_weights(a_ptr, b_ptr, seed, C, R, CP, RP)
        feats = seed * C + c
        offs_t = tl.arange(0, BLOCK_T)
        drec_scaled = tl.load(drec_ptr) * inv_count
        acc_gsq = tl.zeros([CP], tl.float32)
        acc_ben = tl.zeros([CP], tl.float32)
        acc_ga = tl.zeros([CP, RP], tl.float32)
        acc_gb = tl.zeros([RP, CP], tl.float32)
        for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
            rows = t0 + offs_t
            m = (rows < T)[:, None] & cmask[None, :]
            offs = rows[:, None] * H + feats[None, :]
            dyr = tl.load(dy_ptr + offs, mask=m, other=0.0)
            dy = dyr.to(tl.float32)
            acc_gsq += tl.sum(dy * dy, axis=0)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            hp = tl.dot(x, a, input_precision=DOT_PRECISION)
            hh = _act(hp, ACT)
            u = tl.dot(hh, b, input_precision=DOT_PRECISION)
            th = _tanh(u)
            acc_ben += tl.sum(tl.where(m, dy * _blend_full_delta(x, u, th, bl), 0.0), axis=0)
            gx, gu = _blend_grads(x, th, dy, a_eff, bl)
            du = tl.where(m, tl.where(reconstruct, drec_scaled * (u - x), gu), 0.0)
            dhp = tl.dot(du, tl.trans(b), input_precision=DOT_PRECISION) * _act_grad(hp, ACT)
            if trainable:
                acc_ga += tl.dot(tl.trans(x), dhp, input_precision=DOT_PRECISION)
                acc_gb += tl.dot(tl.trans(hh), du, input_precision=DOT_PRECISION)
            if blended:
                dxu = tl.dot(dhp, tl.trans(a), input_precision=DOT_PRECISION)
                tl.store(dx_ptr + offs, (gx + dxu).to(dyr.dtype), mask=m)
            else:  # TRAINING: dx is dy, bit for bit
                tl.store(dx_ptr + offs, dyr, mask=m)
        if trainable:  # only TRAINING / GRAFTING / FINE_TUNING seeds have parameter gradients
            r = tl.arange(0, RP)
            ga_offs = seed * C * R + c[:, None] * R + r[None, :]
            gb_offs = seed * R * C + r[:, None] * C + c[None, :]
            if USE_ATOMICS:
                tl.atomic_add(ga_ptr + ga_offs, acc_ga, mask=wmask, sem="relaxed")
                tl.atomic_add(gb_ptr + gb_offs, acc_gb, mask=tl.trans(wmask), sem="relaxed")
            else:
                tl.store(ga_ptr + split * grad_split_stride + ga_offs, acc_ga, mask=wmask)
                tl.store(gb_ptr + split * grad_split_stride + gb_offs, acc_gb, mask=tl.trans(wmask))
        if HAS_STATS:
            p = stats_ptr + split * stats_split_stride + seed * 8
            _put1(p + 5, tl.sum(acc_gsq, axis=0), USE_ATOMICS, False)
            _put1(p + 6, tl.sum(acc_ben, axis=0), USE_ATOMICS, False)
