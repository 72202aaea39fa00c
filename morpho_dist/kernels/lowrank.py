"""The lowrank kernels (forward, backward): the TRAINING and blended seeds of a lowrank layer.

Grid = (row splits, seeds). A program owns one seed and a contiguous range of rows; it returns at once unless
its seed is TRAINING or blended (the column kernels own every other seed), so dormant seeds cost one
scalar load. Its [BLOCK_T, CP] tiles (CP = the chunk padded to a power of two >= 16, the smallest tl.dot
dimension) run the blueprint against the seed's own A [C, R] and B [R, C] in one of two ways (RANK1, from
kernel.lowrank_math via the launcher):
- dots: two tensor-core dots per tile. Each converts its operands between the load layout and the dot layouts
  through shared memory; for a [128, 16] tile those conversions, not DRAM, bound the kernel.
- rank-1 updates (RANK1): for each rank j, h_j = act(row sum of x * A[:, j]) and u += h_j B[j, :], in fp32
  FMAs. x, h_j and u keep the tile's load layout (a row sum crosses only the few threads that hold one row),
  so nothing goes through shared memory: exact fp32 and, for narrow chunks, faster than ieee dots (slower
  than tf32 dots). The backward of a trainable seed still runs the dots: its parameter gradients are [C, R]
  sums over rows, which rank-1 updates would reduce across warps for every j.
The backward recomputes x @ A. Telemetry, rec_loss and the seed's parameter gradients are reduced inside the
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
def _rank1_forward(x, a_ptr, b_ptr, c, cmask, C, RANK: tl.constexpr, ACT: tl.constexpr):
    """u = act(x @ A) @ B for x [T, CP] (zero past the chunk) and the seed's A at a_ptr, B at b_ptr, as RANK
    rank-1 updates. A and B (a few KB) stay in L1 across the tiles of a program. A loop, not static_range: a full
    unroll hoists every load of A and B and spills (unrolling by 2 or 4 measured the same as none)."""
    u = tl.zeros(x.shape, tl.float32)
    for j in range(RANK):
        a_j = tl.load(a_ptr + c * RANK + j, mask=cmask, other=0.0).to(tl.float32)
        b_j = tl.load(b_ptr + j * C + c, mask=cmask, other=0.0).to(tl.float32)
        u += _act(tl.sum(x * a_j[None, :], axis=1), ACT)[:, None] * b_j[None, :]
    return u


@triton.jit
def _rank1_input_grad(x, du, a_ptr, b_ptr, c, cmask, C, RANK: tl.constexpr, ACT: tl.constexpr):
    """d/dx of sum(du * u(x)) for u = act(x @ A) @ B, as rank-1 updates: (du @ B^T * act'(x @ A)) @ A^T."""
    dx = tl.zeros(x.shape, tl.float32)
    for j in range(RANK):
        a_j = tl.load(a_ptr + c * RANK + j, mask=cmask, other=0.0).to(tl.float32)
        b_j = tl.load(b_ptr + j * C + c, mask=cmask, other=0.0).to(tl.float32)
        hp = tl.sum(x * a_j[None, :], axis=1)
        dhp = tl.sum(du * b_j[None, :], axis=1) * _act_grad(hp, ACT)
        dx += dhp[:, None] * a_j[None, :]
    return dx


@triton.jit
def _fold_rows(v, FOLD: tl.constexpr):
    """A [T, C] tile as [FOLD, T // FOLD, C]: rows r, r + T // FOLD, ... on axis 0."""
    return tl.reshape(v, [FOLD, v.shape[0] // FOLD, v.shape[1]])


@triton.jit
def _total(acc):
    return tl.sum(tl.sum(acc, axis=0), axis=0)


@triton.jit
def _dot_k_split(p, w, K_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """p [M, K] @ w [K, N] as K_SPLIT batched dots over slices of K, summed. A dot of M = 16 rows cannot spread
    its rows over the warps, so each warp would hold the whole of both operands (K = 256: 128 registers for p);
    batched, each warp holds one slice."""
    if K_SPLIT == 1:
        return tl.dot(p, w, input_precision=DOT_PRECISION)
    M: tl.constexpr = p.shape[0]
    K: tl.constexpr = p.shape[1]
    pb = tl.permute(tl.reshape(p, [M, K_SPLIT, K // K_SPLIT]), [1, 0, 2])
    wb = tl.reshape(w, [K_SPLIT, K // K_SPLIT, w.shape[1]])
    return tl.sum(tl.dot(pb, wb, input_precision=DOT_PRECISION), axis=0)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, stats_ptr, rec_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, rec_prog_stride, dead_eps, rec_scale,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr, RANK: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, RANK1: tl.constexpr,
    X_FOLD: tl.constexpr, DELTA_FOLD: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    seed = tl.program_id(1)
    bl, training, blended, _trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seed, N)
    if training | blended:
        row_lo = split * rows_per_split
        c = tl.arange(0, CP)
        cmask = c < C
        if not RANK1:
            a, b, _c, _cmask, _wmask = _seed_weights(a_ptr, b_ptr, seed, C, R, CP, RP)
        feats = seed * C + c
        offs_t = tl.arange(0, BLOCK_T)
        # Per-thread partials, so that the loop makes no cross-thread reduction (one at the end): a tile's rows
        # fold X_FOLD-fold for the statistics of x (the rows one thread holds of the tile as loaded), and
        # DELTA_FOLD-fold for delta (the same with rank-1 updates; with dots, pairs: rows r and r + BLOCK_T / 2
        # share a thread in the dot's layout).
        acc_sum = tl.zeros([BLOCK_T // X_FOLD, CP], tl.float32)
        acc_sq = tl.zeros([BLOCK_T // X_FOLD, CP], tl.float32)
        acc_dead = tl.zeros([BLOCK_T // X_FOLD, CP], tl.float32)
        acc_max = tl.zeros([BLOCK_T // X_FOLD, CP], tl.float32)
        acc_delta = tl.zeros([BLOCK_T // DELTA_FOLD, CP], tl.float32)
        row_hi = tl.minimum(row_lo + rows_per_split, T)
        # The next tile's x is loaded before this tile's math: a load stays in flight while the blueprint runs.
        first = row_lo + offs_t
        first_m = (first < row_hi)[:, None] & cmask[None, :]
        xr_next = tl.load(x_ptr + first[:, None] * H + feats[None, :], mask=first_m, other=0.0)
        for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
            rows = t0 + offs_t
            m = (rows < row_hi)[:, None] & cmask[None, :]
            offs = rows[:, None] * H + feats[None, :]
            xr = xr_next
            nm = ((rows + BLOCK_T) < row_hi)[:, None] & cmask[None, :]
            xr_next = tl.load(x_ptr + offs + BLOCK_T * H, mask=nm, other=0.0)
            x = xr.to(tl.float32)
            xf, mf = _fold_rows(x, X_FOLD), _fold_rows(m, X_FOLD)
            acc_sum, acc_sq, acc_dead, acc_max = _add_x_stats(acc_sum, acc_sq, acc_dead, acc_max, xf, mf, dead_eps)
            if RANK1:
                u = _rank1_forward(x, a_ptr + seed * C * RANK, b_ptr + seed * RANK * C, c, cmask, C, RANK, ACT)
            else:
                hh = _act(tl.dot(x, a, input_precision=DOT_PRECISION), ACT)
                u = tl.dot(hh, b, input_precision=DOT_PRECISION)
            z = _blend(x, u, a_eff, bl)
            d = tl.where(m, z - x, 0.0)
            acc_delta += tl.sum(_fold_rows(d * d, DELTA_FOLD), axis=0)
            if blended:
                tl.store(y_ptr + offs, z.to(xr.dtype), mask=m)
            else:  # TRAINING: y is x, bit for bit
                tl.store(y_ptr + offs, xr, mask=m)
        delta = _total(acc_delta)
        rec_slot = rec_ptr + (split * tl.num_programs(1) + seed) * rec_prog_stride
        if reconstruct:
            _put1(rec_slot, delta * rec_scale, USE_ATOMICS, False)
        if HAS_STATS:
            rows_here = tl.maximum(row_hi - row_lo, 0)
            p = stats_ptr + split * stats_split_stride + seed * 8
            _put1(p, (rows_here * C).to(tl.float32), USE_ATOMICS, False)
            _put1(p + 1, _total(acc_sum), USE_ATOMICS, False)
            _put1(p + 2, _total(acc_sq), USE_ATOMICS, False)
            _put1(p + 3, _total(acc_dead), USE_ATOMICS, False)
            _put1(p + 4, tl.max(tl.max(acc_max, axis=0), axis=0), USE_ATOMICS, True)
            _put1(p + 7, delta, USE_ATOMICS, False)


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, rows, feats, cmask, T, H, acc_gsq, ROW_FOLD: tl.constexpr):
    """A backward tile of a seed's rows: (mask, offsets, dy as stored, dy and x in fp32, acc_gsq + its grad_sq)."""
    m = (rows < T)[:, None] & cmask[None, :]
    offs = rows[:, None] * H + feats[None, :]
    dyr = tl.load(dy_ptr + offs, mask=m, other=0.0)
    dy = dyr.to(tl.float32)
    acc_gsq += tl.sum(_fold_rows(dy * dy, ROW_FOLD), axis=0)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return m, offs, dyr, dy, x, acc_gsq


@triton.jit
def _bwd_blend(x, u, dy, m, a_eff, bl, acc_ben, ROW_FOLD: tl.constexpr):
    """The blend's (d/dx, d/du) for a tile, and acc_ben + its benefit."""
    th = _tanh(u)
    ben = tl.where(m, dy * _blend_full_delta(x, u, th, bl), 0.0)
    acc_ben += tl.sum(_fold_rows(ben, ROW_FOLD), axis=0)
    gx, gu = _blend_grads(x, th, dy, a_eff, bl)
    return gx, gu, acc_ben


@triton.jit
def _bwd_rows_dot(
    x_ptr, dy_ptr, dx_ptr, a, b, feats, cmask, row_lo, rows_per_split, T, H, bl, a_eff, blended, trainable,
    reconstruct, drec_scaled, acc_gsq, acc_ben, acc_ga, acc_gb,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_FOLD: tl.constexpr,
    K_SPLIT: tl.constexpr,
):  # fmt: skip
    """The backward over a program's rows with tensor-core dots (any seed; parameter gradients if trainable)."""
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
        m, offs, dyr, dy, x, acc_gsq = _bwd_tile(x_ptr, dy_ptr, t0 + offs_t, feats, cmask, T, H, acc_gsq, ROW_FOLD)
        hp = _dot_k_split(x, a, K_SPLIT, DOT_PRECISION)
        hh = _act(hp, ACT)
        u = tl.dot(hh, b, input_precision=DOT_PRECISION)
        gx, gu, acc_ben = _bwd_blend(x, u, dy, m, a_eff, bl, acc_ben, ROW_FOLD)
        du = tl.where(m, tl.where(reconstruct, drec_scaled * (u - x), gu), 0.0)
        dhp = _dot_k_split(du, tl.trans(b), K_SPLIT, DOT_PRECISION) * _act_grad(hp, ACT)
        if trainable:
            acc_ga += tl.dot(tl.trans(x), dhp, input_precision=DOT_PRECISION)
            acc_gb += tl.dot(tl.trans(hh), du, input_precision=DOT_PRECISION)
        if blended:
            dxu = tl.dot(dhp, tl.trans(a), input_precision=DOT_PRECISION)
            tl.store(dx_ptr + offs, (gx + dxu).to(dyr.dtype), mask=m)
        else:  # TRAINING: dx is dy, bit for bit
            tl.store(dx_ptr + offs, dyr, mask=m)
    return acc_gsq, acc_ben, acc_ga, acc_gb


@triton.jit
def _bwd_rows_rank1(
    x_ptr, dy_ptr, dx_ptr, a_ptr, b_ptr, c, feats, cmask, row_lo, rows_per_split, T, H, C, bl, a_eff,
    acc_gsq, acc_ben,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, RANK: tl.constexpr, ROW_FOLD: tl.constexpr,
):  # fmt: skip
    """The backward over a program's rows with rank-1 updates, for a blended seed without parameter gradients
    (STABILIZATION, EVALUATING, FOSSILIZED): dx only, plus telemetry."""
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(row_lo, row_lo + rows_per_split, BLOCK_T):
        m, offs, dyr, dy, x, acc_gsq = _bwd_tile(x_ptr, dy_ptr, t0 + offs_t, feats, cmask, T, H, acc_gsq, ROW_FOLD)
        u = _rank1_forward(x, a_ptr, b_ptr, c, cmask, C, RANK, ACT)
        gx, gu, acc_ben = _bwd_blend(x, u, dy, m, a_eff, bl, acc_ben, ROW_FOLD)
        dxu = _rank1_input_grad(x, tl.where(m, gu, 0.0), a_ptr, b_ptr, c, cmask, C, RANK, ACT)
        tl.store(dx_ptr + offs, (gx + dxu).to(dyr.dtype), mask=m)
    return acc_gsq, acc_ben


@triton.jit
def _lowrank_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, a_ptr, b_ptr, drec_ptr, ga_ptr, gb_ptr, stats_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr, RANK: tl.constexpr,
    USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, RANK1: tl.constexpr,
    ROW_FOLD: tl.constexpr, K_SPLIT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    seed = tl.program_id(1)
    bl, training, blended, trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seed, N)
    if training | blended:
        row_lo = split * rows_per_split
        a, b, c, cmask, wmask = _seed_weights(a_ptr, b_ptr, seed, C, R, CP, RP)
        feats = seed * C + c
        drec_scaled = tl.load(drec_ptr) * inv_count
        # Per-thread partials as in the forward where registers allow (ROW_FOLD = 2), else (ROW_FOLD = BLOCK_T)
        # one reduction per tile into [1, CP].
        acc_gsq = tl.zeros([BLOCK_T // ROW_FOLD, CP], tl.float32)
        acc_ben = tl.zeros([BLOCK_T // ROW_FOLD, CP], tl.float32)
        acc_ga = tl.zeros([CP, RP], tl.float32)
        acc_gb = tl.zeros([RP, CP], tl.float32)
        # With RANK1, the seeds without parameter gradients (STABILIZATION, EVALUATING, FOSSILIZED) run
        # as rank-1 updates and the trainable ones as dots; without it, every seed runs as dots.
        rank1 = trainable & False
        if RANK1:
            rank1 = ~trainable
        if rank1:
            acc_gsq, acc_ben = _bwd_rows_rank1(
                x_ptr, dy_ptr, dx_ptr, a_ptr + seed * C * RANK, b_ptr + seed * RANK * C, c, feats, cmask,
                row_lo, rows_per_split, T, H, C, bl, a_eff, acc_gsq, acc_ben,
                ACT, BLOCK_T, RANK, ROW_FOLD,
            )  # fmt: skip
        else:
            acc_gsq, acc_ben, acc_ga, acc_gb = _bwd_rows_dot(
                x_ptr, dy_ptr, dx_ptr, a, b, feats, cmask, row_lo, rows_per_split, T, H, bl, a_eff, blended,
                trainable, reconstruct, drec_scaled, acc_gsq, acc_ben, acc_ga, acc_gb,
                ACT, BLOCK_T, DOT_PRECISION, ROW_FOLD, K_SPLIT,
            )  # fmt: skip
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
            _put1(p + 5, _total(acc_gsq), USE_ATOMICS, False)
            _put1(p + 6, _total(acc_ben), USE_ATOMICS, False)
