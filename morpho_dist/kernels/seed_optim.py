"""One launch per layer for the seed optimizer's step (morpho_dist.optim.SeedOptimizer, fused path).

The unfused step is some thirty small PyTorch ops per layer (the trainable mask, the moments, the per-seed bias
corrections, the masked update, for each of the two banks): on a model with a dozen seeded layers, a few hundred
launches a step, host time the device then waits for. Here one program per seed reads the seed's stage (and the
step's ``ok`` flag), and for a trainable seed (TRAINING, GRAFTING, FINE_TUNING) bumps its step counter and updates
both banks' slices with the same formulas, in the same order; other seeds are left untouched.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from morpho_dist.lifecycle import Stage

_BLOCK = 1024


@triton.jit
def _update_slice(p_ptr, g_ptr, m_ptr, v_ptr, base, E, lr, beta1, beta2, eps, momentum, bc1, bc2,
                  SGD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs0 = tl.arange(0, BLOCK)
    for o in range(0, E, BLOCK):
        offs = base + o + offs0
        mask = o + offs0 < E
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        if SGD:
            m = momentum * m + g
            update = m
        else:
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            update = (m / bc1) / (tl.sqrt_rn(v / bc2) + eps)
            tl.store(v_ptr + offs, v, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(p_ptr + offs, p - lr * update, mask=mask)


@triton.jit
def _seed_step_kernel(
    stage_ptr, ok_ptr, t_ptr, p0_ptr, g0_ptr, m0_ptr, v0_ptr, p1_ptr, g1_ptr, m1_ptr, v1_ptr,
    E0, E1, lr, beta1, beta2, log2_beta1, log2_beta2, eps, momentum,
    TRAINING: tl.constexpr, GRAFTING: tl.constexpr, FINE_TUNING: tl.constexpr,
    HAS_OK: tl.constexpr, SGD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    st = tl.load(stage_ptr + n).to(tl.int32)
    trainable = (st == TRAINING) | (st == GRAFTING) | (st == FINE_TUNING)
    if HAS_OK:
        trainable = trainable & (tl.load(ok_ptr).to(tl.int32) != 0)
    if trainable:
        t = tl.load(t_ptr + n) + 1.0
        tl.store(t_ptr + n, t)
        bc1 = 1.0 - tl.exp2(t * log2_beta1)  # 1 - beta1 ** t
        bc2 = 1.0 - tl.exp2(t * log2_beta2)
        _update_slice(p0_ptr, g0_ptr, m0_ptr, v0_ptr, n * E0, E0, lr, beta1, beta2, eps, momentum, bc1, bc2,
                      SGD, BLOCK)  # fmt: skip
        _update_slice(p1_ptr, g1_ptr, m1_ptr, v1_ptr, n * E1, E1, lr, beta1, beta2, eps, momentum, bc1, bc2,
                      SGD, BLOCK)  # fmt: skip


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0.0 else float("-inf")


def seed_step_(
    stage: torch.Tensor, ok: torch.Tensor | None, t: torch.Tensor, banks: tuple, *, sgd: bool, lr: float,
    beta1: float, beta2: float, eps: float, momentum: float,
) -> None:  # fmt: skip
    """One optimizer step of every trainable seed of a layer, in place. ``banks``: two (param, grad, m, v) tuples
    (v unused for SGD), each [N, ...] contiguous fp32 with one seed's slice per leading index."""
    (p0, g0, m0, v0), (p1, g1, m1, v1) = banks
    seeds = stage.numel()
    _seed_step_kernel[(seeds,)](
        stage, stage if ok is None else ok, t, p0, g0, m0, m0 if v0 is None else v0, p1, g1, m1,
        m1 if v1 is None else v1, p0.numel() // seeds, p1.numel() // seeds, float(lr), float(beta1), float(beta2),
        _log2(float(beta1)), _log2(float(beta2)), float(eps), float(momentum),
        TRAINING=int(Stage.TRAINING), GRAFTING=int(Stage.GRAFTING), FINE_TUNING=int(Stage.FINE_TUNING),
        HAS_OK=ok is not None, SGD=sgd, BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip
