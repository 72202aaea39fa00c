"""The fused Triton path bound to autograd as torch.library custom ops (traceable by torch.compile).

`morpho_dist::seeded_fwd` returns (y, rec_loss) and updates telemetry's forward fields in place;
`morpho_dist::seeded_bwd` returns (dx, dp0, dp1) and adds grad_sq and benefit to telemetry in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from morpho_dist.grafting import Blend
from morpho_dist.kernels import launch
from morpho_dist.kernels.layout import F_ABSMAX, F_BENEFIT, F_DELTA_SQ, F_GRAD_SQ, TRAINING_ID
from morpho_dist.kernels.options import KernelOptions


def _options(block_rows: int, block_cols: int, num_warps: int, deterministic: bool, dot_precision: str):
    return KernelOptions(block_rows, block_cols, num_warps, deterministic, dot_precision)


@torch.library.custom_op("morpho_dist::seeded_fwd", mutates_args=("telemetry",))
def seeded_fwd(
    x: Tensor,
    stage: Tensor,
    blend: Tensor,
    alpha: Tensor,
    p0: Tensor,
    p1: Tensor,
    telemetry: Tensor | None,
    kind: str,
    act: str,
    dead_eps: float,
    block_rows: int,
    block_cols: int,
    num_warps: int,
    deterministic: bool,
    dot_precision: str,
) -> tuple[Tensor, Tensor]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    opts = _options(block_rows, block_cols, num_warps, deterministic, dot_precision)
    y2, stats = launch.seeded_forward(x2, stage, blend, alpha, p0, p1, kind=kind, act=act, dead_eps=dead_eps, opts=opts)
    if telemetry is not None:
        # stats holds zeros in the backward-only columns, so one add covers every sum field; absmax is a max.
        absmax = torch.maximum(telemetry[:, F_ABSMAX], stats[:, F_ABSMAX])
        telemetry.add_(stats)
        telemetry[:, F_ABSMAX] = absmax
    # rec_loss = sum over linear TRAINING seeds of 0.5 * mean((u - x)^2); delta_sq of such a seed is sum((u - x)^2).
    reconstruct = (stage == TRAINING_ID) & (blend == Blend.LINEAR)
    elems = x2.shape[0] * (hidden // stage.numel())
    rec_loss = (0.5 / elems) * torch.where(reconstruct, stats[:, F_DELTA_SQ], 0.0).sum()
    return y2.view(x.shape), rec_loss


@seeded_fwd.register_fake
def _(
    x,
    stage,
    blend,
    alpha,
    p0,
    p1,
    telemetry,
    kind,
    act,
    dead_eps,
    block_rows,
    block_cols,
    num_warps,
    deterministic,
    dot_precision,
):
    return torch.empty_like(x), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("morpho_dist::seeded_bwd", mutates_args=("telemetry",))
def seeded_bwd(
    dy: Tensor,
    drec: Tensor,
    x: Tensor,
    stage: Tensor,
    blend: Tensor,
    alpha: Tensor,
    p0: Tensor,
    p1: Tensor,
    telemetry: Tensor | None,
    kind: str,
    act: str,
    block_rows: int,
    block_cols: int,
    num_warps: int,
    deterministic: bool,
    dot_precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    dy2 = dy.reshape(-1, hidden).contiguous()
    opts = _options(block_rows, block_cols, num_warps, deterministic, dot_precision)
    dx2, dp0, dp1, bstats = launch.seeded_backward(
        x2, dy2, drec, stage, blend, alpha, p0, p1, kind=kind, act=act, opts=opts
    )
    if telemetry is not None:
        telemetry[:, F_GRAD_SQ : F_BENEFIT + 1] += bstats  # adjacent fields: a slice, no index tensor
    return dx2.view(x.shape), dp0, dp1


@seeded_bwd.register_fake
def _(
    dy,
    drec,
    x,
    stage,
    blend,
    alpha,
    p0,
    p1,
    telemetry,
    kind,
    act,
    block_rows,
    block_cols,
    num_warps,
    deterministic,
    dot_precision,
):
    return torch.empty_like(x), torch.empty_like(p0), torch.empty_like(p1)


class _SeededFunction(torch.autograd.Function):
    """Binds the two custom ops (each mutating telemetry) into one differentiable call.

    torch.library forbids an autograd formula on a mutating op, so the pairing lives here; Dynamo traces
    autograd.Function and treats the custom ops as opaque nodes with fake implementations.
    """

    @staticmethod
    def forward(ctx, x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, opts: KernelOptions):
        static = (opts.block_rows, opts.block_cols, opts.num_warps, opts.deterministic, opts.dot_precision)
        y, rec_loss = torch.ops.morpho_dist.seeded_fwd(
            x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, *static
        )
        ctx.save_for_backward(x, stage, blend, alpha, p0, p1)
        # Later calls update telemetry in place, so it stays off the saved-tensor version check.
        ctx.telemetry = telemetry
        ctx.static = (kind, act, *static)
        ctx.mark_non_differentiable(rec_loss) if not (p0.requires_grad or p1.requires_grad) else None
        return y, rec_loss

    @staticmethod
    def backward(ctx, dy, drec):
        x, stage, blend, alpha, p0, p1 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        if drec is None:
            drec = torch.zeros((), dtype=torch.float32, device=x.device)
        dx, dp0, dp1 = torch.ops.morpho_dist.seeded_bwd(
            dy, drec.float(), x, stage, blend, alpha, p0, p1, ctx.telemetry, *ctx.static
        )
        return dx, None, None, None, dp0, dp1, None, None, None, None, None


def seeded_triton(x, stage, blend, alpha, p0, p1, telemetry, *, kind, act, dead_eps, opts: KernelOptions):
    return _SeededFunction.apply(x, stage, blend, alpha, p0, p1, telemetry, kind, act, float(dead_eps), opts)
