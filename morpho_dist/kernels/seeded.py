"""The fused seeded kernels (forward, backward) for both blueprint kinds.

Tiling. Grid = (row splits, seed groups). A program owns a *band* of SEEDS_PER_PROG consecutive seeds and a
contiguous range of rows, walked in BLOCK_T-row tiles. Band column j belongs to seed j // CP at chunk offset
j % CP (CP = chunk tile, a power of two >= C for lowrank; diagonal chunks wider than CP are walked in CP-wide
steps), so loads and stores are whole coalesced row segments and per-seed values come from folding per-column
partial sums with a reshape.

Lowrank blueprints run as two plain 2-D tensor-core dots per tile against *block-diagonal* weights
(A_bd[(s, c), (s', r)] = A[s, c, r] if s == s' else 0): one dot serves every seed of the band. A band with no
TRAINING or blended seed skips all blueprint math (dormant seeds cost no FLOPs); the backward recomputes x @ A.

Results. Per-seed telemetry, rec_loss and parameter gradients are reduced inside the program and written once:
atomically into the totals (the telemetry buffer itself), or, deterministic, into the program's own slot of a
partials buffer that the launcher sums in a fixed order.
"""

import triton
import triton.language as tl

from morpho_dist.kernels.common import _act, _act_grad, _blend, _blend_full_delta, _blend_grads, _put, _tanh

KIND_LOWRANK = 0
KIND_DIAGONAL = 1


@triton.jit
def _band(group, N, C, c0, SPP: tl.constexpr, CP: tl.constexpr, DENSE: tl.constexpr):
    """Per band column: its seed, whether it is a real feature, and its feature index.

    DENSE (C == CP): the band is one contiguous feature range, written so that the compiler can prove it and
    issue vector loads and stores.
    """
    j = tl.arange(0, SPP * CP)
    seeds = group * SPP + j // CP
    if DENSE:
        feats = tl.max_contiguous(tl.multiple_of(group * (SPP * CP) + j, SPP * CP), SPP * CP)
        return seeds, feats < N * CP, feats
    else:
        c = c0 + j % CP
        return seeds, (seeds < N) & (c < C), seeds * C + c


@triton.jit
def _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seeds, N):
    smask = seeds < N
    st = tl.load(stage_ptr + seeds, mask=smask, other=0).to(tl.int32)
    bl = tl.load(blend_ptr + seeds, mask=smask, other=0).to(tl.int32)
    alpha = tl.load(alpha_ptr + seeds, mask=smask, other=0.0)
    training = st == 2
    blended = (st >= 3) & (st <= 7)
    trainable = training | (st == 3) | (st == 6)
    reconstruct = training & (bl == 2)
    a_eff = tl.where(blended, alpha, 1.0)  # TRAINING measures the full graft (alpha = 1)
    return bl, training, blended, trainable, reconstruct, a_eff


@triton.jit
def _lowrank_weights(a_ptr, b_ptr, seeds, fmask, active, c, group, N, C, R, SPP: tl.constexpr, RP: tl.constexpr):
    """Block-diagonal A_bd [SPP*CP, SPP*RP] and B_bd [SPP*RP, SPP*CP] of the band (fp32).

    Idle seeds' weights are never loaded: a non-finite value there would leak into the neighbours' columns
    through the zero blocks (0 * inf = nan).
    """
    k = tl.arange(0, SPP * RP)
    seeds_k = group * SPP + k // RP
    r = k % RP
    kmask = (seeds_k < N) & (r < R)
    same = seeds[:, None] == seeds_k[None, :]
    a_bd = tl.load(
        a_ptr + seeds[:, None] * C * R + (c % C)[:, None] * R + r[None, :],
        mask=same & (fmask & active)[:, None] & kmask[None, :],
        other=0.0,
    ).to(tl.float32)
    b_bd = tl.load(
        b_ptr + seeds_k[:, None] * R * C + r[:, None] * C + (c % C)[None, :],
        mask=tl.trans(same) & kmask[:, None] & (fmask & active)[None, :],
        other=0.0,
    ).to(tl.float32)
    return a_bd, b_bd, same & fmask[:, None] & kmask[None, :]


@triton.jit
def _fold(v, SPP: tl.constexpr, CP: tl.constexpr):
    """Per-column partial sums -> per-seed sums."""
    return tl.sum(tl.reshape(v, [SPP, CP]), axis=1)


@triton.jit
def _seeded_fwd_kernel(
    x_ptr, y_ptr, stage_ptr, blend_ptr, alpha_ptr, p0_ptr, p1_ptr, stats_ptr, rec_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, rec_prog_stride, dead_eps, rec_scale,
    KIND: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr,
    SPP: tl.constexpr, USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DENSE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    seeds, fmask, feats = _band(group, N, C, 0, SPP, CP, DENSE)
    bl, training, blended, _trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seeds, N)
    active = training | blended
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    acc_sum = tl.zeros([SPP * CP], tl.float32)
    acc_sq = tl.zeros([SPP * CP], tl.float32)
    acc_dead = tl.zeros([SPP * CP], tl.float32)
    acc_max = tl.zeros([SPP * CP], tl.float32)
    acc_delta = tl.zeros([SPP * CP], tl.float32)
    for c0 in range(0, C, CP):  # lowrank: CP >= C, one pass
        seeds, fmask, feats = _band(group, N, C, c0, SPP, CP, DENSE)
        if KIND == 0:
            a_bd, b_bd, _wmask = _lowrank_weights(
                p0_ptr, p1_ptr, seeds, fmask, active, feats - seeds * C, group, N, C, R, SPP, RP
            )
        else:
            g = tl.load(p0_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
            b = tl.load(p1_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
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
                if KIND == 0:
                    hh = _act(tl.dot(x, a_bd, input_precision=DOT_PRECISION), ACT)
                    u = tl.dot(hh, b_bd, input_precision=DOT_PRECISION)
                else:
                    u = g[None, :] * x + b[None, :]
                z = _blend(x, u, a_eff[None, :], bl[None, :])
                d = tl.where(m & active[None, :], z - x, 0.0)
                acc_delta += tl.sum(d * d, axis=0)
                out = tl.where(blended[None, :], z.to(xr.dtype), xr)
            tl.store(y_ptr + ptrs, out, mask=m)
    # per-seed results of this program
    seed_out = group * SPP + tl.arange(0, SPP)
    omask = seed_out < N
    delta = _fold(acc_delta, SPP, CP)
    rec_seed = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seed_out, N)[4]
    rec_part = tl.sum(tl.where(rec_seed & omask, delta, 0.0), axis=0) * rec_scale
    rec_slot = rec_ptr + (split * tl.num_programs(1) + group) * rec_prog_stride
    if USE_ATOMICS:
        tl.atomic_add(rec_slot, rec_part)
    else:
        tl.store(rec_slot, rec_part)
    if HAS_STATS:
        rows_here = tl.minimum(tl.maximum(T - row_lo, 0), rows_per_split)
        p = stats_ptr + split * stats_split_stride + seed_out * 8
        _put(p, tl.zeros([SPP], tl.float32) + (rows_here * C).to(tl.float32), omask, USE_ATOMICS, False)
        _put(p + 1, _fold(acc_sum, SPP, CP), omask, USE_ATOMICS, False)
        _put(p + 2, _fold(acc_sq, SPP, CP), omask, USE_ATOMICS, False)
        _put(p + 3, _fold(acc_dead, SPP, CP), omask, USE_ATOMICS, False)
        _put(p + 4, tl.max(tl.reshape(acc_max, [SPP, CP]), axis=1), omask, USE_ATOMICS, True)
        _put(p + 7, delta, omask, USE_ATOMICS, False)


@triton.jit
def _seeded_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, stage_ptr, blend_ptr, alpha_ptr, p0_ptr, p1_ptr, drec_ptr,
    g0_ptr, g1_ptr, stats_ptr,
    T, H, N, C, R, rows_per_split, stats_split_stride, grad_split_stride, inv_count,
    KIND: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr,
    SPP: tl.constexpr, USE_ATOMICS: tl.constexpr, HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DENSE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    group = tl.program_id(1)
    row_lo = split * rows_per_split
    offs_t = tl.arange(0, BLOCK_T)
    seeds, fmask, feats = _band(group, N, C, 0, SPP, CP, DENSE)
    bl, training, blended, trainable, reconstruct, a_eff = _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seeds, N)
    active = training | blended
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    drec_scaled = tl.load(drec_ptr) * inv_count
    acc_gsq = tl.zeros([SPP * CP], tl.float32)
    acc_ben = tl.zeros([SPP * CP], tl.float32)
    grad_base = split * grad_split_stride
    for c0 in range(0, C, CP):  # lowrank: CP >= C, one pass
        seeds, fmask, feats = _band(group, N, C, c0, SPP, CP, DENSE)
        if KIND == 0:
            a_bd, b_bd, wmask = _lowrank_weights(
                p0_ptr, p1_ptr, seeds, fmask, active, feats - seeds * C, group, N, C, R, SPP, RP
            )
            acc_g0 = tl.zeros([SPP * CP, SPP * RP], tl.float32)
            acc_g1 = tl.zeros([SPP * RP, SPP * CP], tl.float32)
        else:
            g = tl.load(p0_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
            b = tl.load(p1_ptr + feats, mask=fmask, other=0.0).to(tl.float32)
            acc_g0 = tl.zeros([SPP * CP], tl.float32)
            acc_g1 = tl.zeros([SPP * CP], tl.float32)
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
                if KIND == 0:
                    hp = tl.dot(x, a_bd, input_precision=DOT_PRECISION)
                    hh = _act(hp, ACT)
                    u = tl.dot(hh, b_bd, input_precision=DOT_PRECISION)
                else:
                    u = g[None, :] * x + b[None, :]
                th = _tanh(u)
                ben = dy * _blend_full_delta(x, u, th, bl[None, :])
                acc_ben += tl.sum(tl.where(m & active[None, :], ben, 0.0), axis=0)
                gx, gu = _blend_grads(x, th, dy, a_eff[None, :], bl[None, :])
                du = tl.where(reconstruct[None, :], drec_scaled * (u - x), gu)
                du = tl.where(m & active[None, :], du, 0.0)
                if KIND == 0:
                    dhp = tl.dot(du, tl.trans(b_bd), input_precision=DOT_PRECISION) * _act_grad(hp, ACT)
                    dxu = tl.dot(dhp, tl.trans(a_bd), input_precision=DOT_PRECISION)
                    acc_g0 += tl.dot(tl.trans(x), dhp, input_precision=DOT_PRECISION)
                    acc_g1 += tl.dot(tl.trans(hh), du, input_precision=DOT_PRECISION)
                else:
                    dxu = du * g[None, :]
                    acc_g0 += tl.sum(du * x, axis=0)
                    acc_g1 += tl.sum(du, axis=0)
                out = tl.where(blended[None, :], (gx + dxu).to(dyr.dtype), dyr)
            tl.store(dx_ptr + ptrs, out, mask=m)
        # parameter gradients of this chunk: only TRAINING / GRAFTING / FINE_TUNING seeds have any
        if KIND == 0:
            k = tl.arange(0, SPP * RP)
            r = k % RP
            cc = feats - seeds * C
            g0_mask = wmask & trainable[:, None]
            g0_offs = seeds[:, None] * C * R + cc[:, None] * R + r[None, :]
            g1_mask = tl.trans(wmask) & trainable[None, :]
            g1_offs = (group * SPP + k // RP)[:, None] * R * C + r[:, None] * C + cc[None, :]
        else:
            g0_mask = fmask & trainable
            g0_offs = feats
            g1_mask = g0_mask
            g1_offs = feats
        if USE_ATOMICS:
            if any_active:
                tl.atomic_add(g0_ptr + g0_offs, acc_g0, mask=g0_mask)
                tl.atomic_add(g1_ptr + g1_offs, acc_g1, mask=g1_mask)
        else:
            tl.store(g0_ptr + grad_base + g0_offs, acc_g0, mask=g0_mask)
            tl.store(g1_ptr + grad_base + g1_offs, acc_g1, mask=g1_mask)
    if HAS_STATS:
        seed_out = group * SPP + tl.arange(0, SPP)
        omask = seed_out < N
        p = stats_ptr + split * stats_split_stride + seed_out * 8
        _put(p + 5, _fold(acc_gsq, SPP, CP), omask, USE_ATOMICS, False)
        _put(p + 6, _fold(acc_ben, SPP, CP), omask, USE_ATOMICS, False)
