"""Element-wise math shared by the seeded kernels: activations, blends and their derivatives.

Stage and blend ids are the ones of morpho_dist.lifecycle.Stage and morpho_dist.blends.Blend.
"""

import triton
import triton.language as tl

ACT_RELU = 0
ACT_GELU_TANH = 1
ACT_IDS = {"relu": ACT_RELU, "gelu_tanh": ACT_GELU_TANH}


@triton.jit
def _tanh(v):
    # 1 - 2 / (exp(2v) + 1): saturates cleanly to +-1 (exp overflows to inf or underflows to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def _act(hp, ACT: tl.constexpr):
    # gelu_tanh: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
    if ACT == 0:  # NaN stays NaN, as in torch's relu: a diverging bank shows in its own telemetry
        return tl.maximum(hp, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        t = _tanh((hp + 0.044715 * hp * hp * hp) * 0.7978845608028654)
        return 0.5 * hp * (1.0 + t)


@triton.jit
def _act_grad(hp, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(hp > 0.0, 1.0, 0.0)
    else:
        t = _tanh((hp + 0.044715 * hp * hp * hp) * 0.7978845608028654)
        return 0.5 * (1.0 + t) + 0.5 * hp * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * hp * hp)


@triton.jit
def _blend(x, u, a, bl):
    """blend(x, u, alpha) for blend ids additive=0, multiplicative=1, linear=2 (bl broadcasts)."""
    mul = x * (1.0 + a * _tanh(u))
    return tl.where(bl == 0, x + a * u, tl.where(bl == 1, mul, x + a * (u - x)))


@triton.jit
def _blend_full_delta(x, u, th, bl):
    """blend(x, u, 1) - x, the benefit and TRAINING delta term (th = tanh(u))."""
    return tl.where(bl == 0, u, tl.where(bl == 1, x * th, u - x))


@triton.jit
def _blend_grads(x, th, dy, a, bl):
    """(d/dx, d/du) of sum(dy * blend(x, u, a)) holding the other fixed (th = tanh(u))."""
    dx = tl.where(bl == 0, dy, tl.where(bl == 1, dy * (1.0 + a * th), dy * (1.0 - a)))
    du = tl.where(bl == 1, dy * x * a * (1.0 - th * th), a * dy)
    return dx, du


@triton.jit
def _add_x_stats(acc_sum, acc_sq, acc_dead, acc_max, x, m, dead_eps):
    """Fold a tile x [rows, cols] (masked by m) into the per-column sum, sum of squares, dead count and |max|."""
    ax = tl.abs(x)
    acc_sum += tl.sum(x, axis=0)
    acc_sq += tl.sum(x * x, axis=0)
    acc_dead += tl.sum(tl.where(m & (ax <= dead_eps), 1.0, 0.0), axis=0)
    acc_max = tl.maximum(acc_max, tl.max(ax, axis=0))
    return acc_sum, acc_sq, acc_dead, acc_max


@triton.jit
def _seed_flags(stage_ptr, blend_ptr, alpha_ptr, seeds, N):
    """Per-seed (blend id, TRAINING, blended, trainable, reconstructs, effective alpha) of `seeds` (any shape)."""
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
def _put(ptr, value, mask, USE_ATOMICS: tl.constexpr, IS_MAX: tl.constexpr):
    """Write a per-program partial result: atomically into a shared total, or plainly into its own slot."""
    if USE_ATOMICS:
        if IS_MAX:
            tl.atomic_max(ptr, value, mask=mask, sem="relaxed")
        else:
            tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _with_field(tile, field: tl.constexpr, value):
    """tile [S, 8] with column `field` set to value [S]."""
    return tl.where(tl.arange(0, 8)[None, :] == field, value[:, None], tile)


@triton.jit
def _put_fields(rows_ptr, tile, fields, own, USE_ATOMICS: tl.constexpr):
    """Add (or store) the `fields` columns of tile [S, 8] into the telemetry rows at rows_ptr [S]: per seed one
    vector atomic over contiguous fields instead of one scalar atomic per field."""
    mask = own[:, None] & fields[None, :]
    ptrs = rows_ptr[:, None] + tl.arange(0, 8)[None, :]
    if USE_ATOMICS:
        tl.atomic_add(ptrs, tile, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tile, mask=mask)


@triton.jit
def _put1(ptr, value, USE_ATOMICS: tl.constexpr, IS_MAX: tl.constexpr):
    """_put for one scalar."""
    if USE_ATOMICS:
        if IS_MAX:
            tl.atomic_max(ptr, value, sem="relaxed")
        else:
            tl.atomic_add(ptr, value, sem="relaxed")
    else:
        tl.store(ptr, value)
