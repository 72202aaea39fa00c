"""The one PyTorch reference of the seeded op (DESIGN.md section 2).

Every kernel, the fallback path and the benchmarks compare against this module; nothing copies it.
It is written for clarity, not speed: plain autograd for the true gradients, one small
autograd.Function for what is not a gradient of y (the TRAINING incubator and the backward telemetry).
Accepts float64 (x and parameters) so that ``torch.autograd.gradcheck`` can check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morpho_dist.blends import Blend
from morpho_dist.kernels.layout import (
    BLENDED_HI,
    BLENDED_LO,
    F_ABSMAX,
    F_BENEFIT,
    F_COUNT,
    F_DEAD,
    F_DELTA_SQ,
    F_GRAD_SQ,
    F_SUM,
    F_SUMSQ,
    TRAINING_ID,
)
from morpho_dist.lifecycle import Stage
from morpho_dist.ops.validation import check_seeded_args

# Plain ints, not the IntEnum members, where they meet tensors: torch.compile (Dynamo in torch 2.13) folds
# ``tensor == IntEnum`` to a constant False instead of comparing values.
_ADDITIVE, _MULTIPLICATIVE, _LINEAR = int(Blend.ADDITIVE), int(Blend.MULTIPLICATIVE), int(Blend.LINEAR)
_GRAFTING, _FINE_TUNING = int(Stage.GRAFTING), int(Stage.FINE_TUNING)


def blueprint_output(kind: str, xc: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, act: str) -> torch.Tensor:
    """u = bp_n(x_c) for every seed at once; xc is [T, N, C]."""
    if kind == "diagonal":
        return p0[None] * xc + p1[None]
    h = torch.einsum("tnc,ncr->tnr", xc, p0)
    h = F.relu(h) if act == "relu" else F.gelu(h, approximate="tanh")
    return torch.einsum("tnr,nrc->tnc", h, p1)


def blend_values(x: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
    """blend(x, u, alpha) with a per-seed blend id; x, u are [T, N, C], alpha and blend broadcast over [1, N, 1]."""
    additive = x + alpha * u
    multiplicative = x * (1 + alpha * torch.tanh(u))
    linear = (1 - alpha) * x + alpha * u
    return torch.where(blend == _ADDITIVE, additive, torch.where(blend == _MULTIPLICATIVE, multiplicative, linear))


class _IncubatorTap(torch.autograd.Function):
    """y passes through unchanged; the backward sends dy to the incubator target and records telemetry.

    The TRAINING incubator's blueprint gradient is grad of sum(dy * blend(x̄, u(x̄), 1)): not a gradient of y
    (y = x there), so it is routed explicitly: z receives dy on incubator columns and zero elsewhere.
    """

    @staticmethod
    def forward(ctx, y, z, incubator_cols, benefit_term, telemetry, seeds):
        ctx.save_for_backward(incubator_cols, benefit_term)
        ctx.telemetry, ctx.seeds = telemetry, seeds
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        incubator_cols, benefit_term = ctx.saved_tensors
        dyc = dy.to(benefit_term.dtype)
        if ctx.telemetry is not None:
            d = dyc.reshape(dyc.shape[0], ctx.seeds, -1)
            with torch.no_grad():
                ctx.telemetry[:, F_GRAD_SQ] += (d * d).sum((0, 2)).float()
                ctx.telemetry[:, F_BENEFIT] += (d * benefit_term).sum((0, 2)).float()
        dz = torch.where(incubator_cols, dyc, torch.zeros((), dtype=dyc.dtype, device=dyc.device))
        return dy, dz, None, None, None, None


def seeded_reference(
    x: torch.Tensor,
    stage: torch.Tensor,
    blend: torch.Tensor,
    alpha: torch.Tensor,
    p0: torch.Tensor,
    p1: torch.Tensor,
    telemetry: torch.Tensor | None,
    *,
    kind: str,
    act: str = "relu",
    dead_eps: float = 1e-6,
    check_ids: bool = True,
    all_idle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference seeded op: returns (y, rec_loss) and updates ``telemetry`` in place (forward fields now,
    grad_sq and benefit when y's gradient arrives). ``all_idle`` is the caller's promise that no seed is TRAINING
    or blended (morpho_dist.ops.seeded): the columns of seeds that break it are NaN in y and in dx."""
    shp = check_seeded_args(
        x,
        stage,
        blend,
        alpha,
        p0,
        p1,
        telemetry,
        kind=kind,
        act=act,
        dead_eps=dead_eps,
        allow_float64=True,
        check_ids=check_ids,
        all_idle=all_idle,
    )
    t, h, n, c = shp.rows, shp.hidden, shp.seeds, shp.chunk
    cdt = torch.float64 if torch.float64 in (x.dtype, p0.dtype) else torch.float32
    x2 = x.reshape(t, h)
    xc = x2.to(cdt).view(t, n, c)
    xd = xc.detach()

    st = stage.long()
    training = st == TRAINING_ID
    blended = (st >= BLENDED_LO) & (st <= BLENDED_HI)
    trainable = (st == _GRAFTING) | (st == _FINE_TUNING)
    bl = blend.long()[None, :, None]
    is_linear = blend.long() == _LINEAR
    incubator = training & ~is_linear
    reconstruct = training & is_linear

    # A bank enters only the math of its own stage: a non-finite bank of an idle seed must not reach dx (0 * nan
    # through torch.where's backward), nor that of a TRAINING seed (dx = dy there), so u_live sees blended banks only.
    per_seed = lambda mask: mask.view(n, *([1] * (p0.dim() - 1)))  # noqa: E731
    zero = torch.zeros((), dtype=cdt, device=x.device)  # every argument is on x's device (validated)
    amask, pmask, bmask = per_seed(training | blended), per_seed(trainable), per_seed(blended)
    q0, q1 = torch.where(amask, p0.to(cdt), zero), torch.where(amask, p1.to(cdt), zero)
    q0_live = torch.where(bmask, torch.where(pmask, q0, q0.detach()), zero)
    q1_live = torch.where(bmask, torch.where(pmask, q1, q1.detach()), zero)
    u_live = blueprint_output(kind, xc, q0_live, q1_live, act)  # blended seeds: grads to x (+ params if trainable)
    u_bar = blueprint_output(kind, xd, q0, q1, act)  # TRAINING seeds: on x̄, grads to params only

    a = alpha.to(cdt)[None, :, None]
    one = torch.ones_like(a)
    z_blend = blend_values(xc, u_live, a, bl)
    cols = lambda mask: mask.repeat_interleave(c)  # noqa: E731  per-seed mask -> per-feature mask
    y = torch.where(cols(blended), z_blend.reshape(t, h).to(x.dtype), x2)

    z_incubator = blend_values(xd, u_bar, one, bl).reshape(t, h)
    full = blend_values(xd, u_bar.detach(), one, bl) - xd  # blend(x, u, 1) - x
    active = (training | blended)[None, :, None]
    benefit_term = torch.where(active, full, zero)

    per_seed_rec = 0.5 * ((u_bar - xd) ** 2).mean((0, 2))
    rec_loss = torch.where(reconstruct, per_seed_rec, zero).sum()

    if telemetry is not None:
        with torch.no_grad():
            delta = torch.where(
                training[None, :, None], full, torch.where(blended[None, :, None], z_blend.detach() - xd, zero)
            )
            telemetry[:, F_COUNT] += float(t * c)
            telemetry[:, F_SUM] += xd.sum((0, 2)).float()
            telemetry[:, F_SUMSQ] += (xd * xd).sum((0, 2)).float()
            telemetry[:, F_DEAD] += (xd.abs() <= dead_eps).sum((0, 2)).float()
            telemetry[:, F_ABSMAX] = torch.maximum(telemetry[:, F_ABSMAX], xd.abs().amax((0, 2)).float())
            telemetry[:, F_DELTA_SQ] += (delta * delta).sum((0, 2)).float()

    if all_idle:  # a broken promise: y = x * NaN there, so that dx is NaN there too (and only there)
        live_cols = cols(training | blended)
        nan_there = torch.where(live_cols, float("nan"), 1.0).to(x2.dtype)
        y = torch.where(live_cols, x2 * nan_there, y)
    y = _IncubatorTap.apply(y, z_incubator, cols(incubator), benefit_term, telemetry, n)
    return y.reshape(x.shape), rec_loss
