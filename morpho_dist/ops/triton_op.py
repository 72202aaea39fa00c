"""The fused Triton path bound to autograd, with torch.library custom ops for torch.compile.

`morpho_dist::seeded_fwd` returns (y, rec_loss) and adds the forward telemetry fields in place;
`morpho_dist::seeded_bwd` returns (dx, dp0, dp1) and adds grad_sq and benefit in place. torch.library allows
no autograd formula on a mutating op, so `_SeededFunction` pairs them. Eager calls run the same launchers
directly: the custom-op dispatcher costs tens of microseconds a call, which matters for small layers.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from morpho_dist.blueprints import KINDS
from morpho_dist.kernels import launch
from morpho_dist.kernels.common import ACT_IDS
from morpho_dist.kernels.options import DOT_PRECISIONS, LOWRANK_MATHS, KernelOptions
from morpho_dist.ops import promises


def _contiguous_state(stage, blend, alpha, p0, p1):
    # The kernels index seed state and parameters with unit stride.
    return stage.contiguous(), blend.contiguous(), alpha.contiguous(), p0.contiguous(), p1.contiguous()


def _with_telemetry(telemetry, fn):
    """Run fn on a contiguous telemetry buffer (the kernels write it at unit stride); copy back a strided view."""
    if telemetry is None or telemetry.is_contiguous():
        return fn(telemetry)
    dense = telemetry.contiguous()
    out = fn(dense)
    telemetry.copy_(dense)
    return out


def _forward_impl(x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts):
    hidden = x.shape[-1]
    state = _contiguous_state(stage, blend, alpha, p0, p1)
    y2, rec_loss = _with_telemetry(
        telemetry,
        lambda tel: launch.seeded_forward(
            x.reshape(-1, hidden).contiguous(),
            *state,
            tel,
            kind=kind,
            act=act,
            dead_eps=dead_eps,
            all_idle=all_idle,
            opts=opts,
        ),  # fmt: skip
    )
    return y2.view(x.shape), rec_loss


def _backward_impl(dy, drec, x, stage, blend, alpha, p0, p1, telemetry, kind, act, all_idle, opts):
    hidden = x.shape[-1]
    x2, dy2 = x.reshape(-1, hidden).contiguous(), dy.reshape(-1, hidden).contiguous()
    stage, blend, alpha, p0, p1 = _contiguous_state(stage, blend, alpha, p0, p1)
    dx2, dp0, dp1 = _with_telemetry(
        telemetry,
        lambda tel: launch.seeded_backward(
            x2, dy2, drec, stage, blend, alpha, p0, p1, tel, kind=kind, act=act, all_idle=all_idle, opts=opts
        ),
    )
    return dx2.view(x.shape), dp0, dp1


# The custom ops take kind, act, all_idle and the KernelOptions fields as one int[] ("config"): torch.library's
# Python wrapper of a mutating op walks the schema per call at a cost that grows with the square of the argument
# count (torch 2.13: utils.fill_defaults; 164 us a call for 23 arguments on the CPU against 53 us for 9).
_STR_FIELDS = {"dot_precision": DOT_PRECISIONS, "lowrank_math": LOWRANK_MATHS}  # str fields: index in these
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(KernelOptions))
_KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}
_ACT_NAMES = tuple(ACT_IDS)
_ACT_INDEX = {act: i for i, act in enumerate(_ACT_NAMES)}


def _config(kind: str, act: str, all_idle: bool, opts: KernelOptions) -> list[int]:
    """The custom ops' config: kind, act and all_idle, then the options in KernelOptions' field order (bools as
    0/1, str fields as their index in the allowed values). Not dataclasses.astuple: it deep-copies every field,
    which Dynamo (torch 2.11) cannot trace (a graph break under torch.compile)."""
    config = [_KIND_IDS[kind], _ACT_INDEX[act], int(all_idle)]
    for name in _OPTION_FIELDS:
        value = getattr(opts, name)
        if name in _STR_FIELDS:
            value = _STR_FIELDS[name].index(value)
        config.append(int(value))
    return config


@functools.lru_cache(maxsize=64)
def _decoded(config: tuple[int, ...]) -> tuple[str, str, bool, KernelOptions]:
    """(kind, act, all_idle, KernelOptions) of a config, built (and validated) once per distinct one."""
    kind, act, all_idle, *fields = config
    values = {}
    for name, value, default in zip(_OPTION_FIELDS, fields, dataclasses.astuple(KernelOptions()), strict=True):
        if name in _STR_FIELDS:
            value = _STR_FIELDS[name][value]
        elif isinstance(default, bool):
            value = bool(value)
        values[name] = value
    return KINDS[kind], _ACT_NAMES[act], bool(all_idle), KernelOptions(**values)


@torch.library.custom_op("morpho_dist::seeded_fwd", mutates_args=("telemetry",))
def seeded_fwd(
    x: Tensor, stage: Tensor, blend: Tensor, alpha: Tensor, p0: Tensor, p1: Tensor, telemetry: Tensor | None,
    dead_eps: float, config: list[int],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    kind, act, all_idle, opts = _decoded(tuple(config))
    all_idle = all_idle or promises.holds(stage)  # traced calls promise nothing; the layer's record may, now
    return _forward_impl(x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts)


@seeded_fwd.register_fake
def _(x, stage, blend, alpha, p0, p1, telemetry, *args):
    return torch.empty_like(x), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("morpho_dist::seeded_bwd", mutates_args=("telemetry",))
def seeded_bwd(
    dy: Tensor, drec: Tensor, x: Tensor, stage: Tensor, blend: Tensor, alpha: Tensor, p0: Tensor, p1: Tensor,
    telemetry: Tensor | None, config: list[int],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    kind, act, all_idle, opts = _decoded(tuple(config))
    all_idle = all_idle or promises.holds(stage)
    return _backward_impl(dy, drec, x, stage, blend, alpha, p0, p1, telemetry, kind, act, all_idle, opts)


@seeded_bwd.register_fake
def _(dy, drec, x, stage, blend, alpha, p0, p1, telemetry, *args):
    return torch.empty_like(x), torch.empty_like(p0), torch.empty_like(p1)


class _SeededFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts: KernelOptions):
        if torch.compiler.is_compiling():
            config = _config(kind, act, all_idle, opts)
            y, rec_loss = torch.ops.morpho_dist.seeded_fwd(x, stage, blend, alpha, p0, p1, telemetry, dead_eps, config)
        else:
            y, rec_loss = _forward_impl(x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, all_idle, opts)
        ctx.save_for_backward(x, stage, blend, alpha, p0, p1)
        # Later calls update telemetry in place, so it stays off the saved-tensor version check.
        ctx.telemetry = telemetry
        ctx.kind, ctx.act, ctx.all_idle, ctx.opts = kind, act, all_idle, opts
        return y, rec_loss

    @staticmethod
    def backward(ctx, dy, drec):
        x, stage, blend, alpha, p0, p1 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        drec = torch.zeros((), device=x.device) if drec is None else drec.float()
        args = (dy, drec, x, stage, blend, alpha, p0, p1, ctx.telemetry)
        if torch.compiler.is_compiling():
            config = _config(ctx.kind, ctx.act, ctx.all_idle, ctx.opts)
            dx, dp0, dp1 = torch.ops.morpho_dist.seeded_bwd(*args, config)
        else:
            dx, dp0, dp1 = _backward_impl(*args, ctx.kind, ctx.act, ctx.all_idle, ctx.opts)
        return dx, None, None, None, dp0, dp1, None, None, None, None, None, None


def seeded_triton(x, stage, blend, alpha, p0, p1, telemetry, *, kind, act, dead_eps, all_idle, opts: KernelOptions):
    return _SeededFunction.apply(
        x, stage, blend, alpha, p0, p1, telemetry, kind, act, float(dead_eps), bool(all_idle), opts
    )


class PreparedCall:
    """The fixed part of a seeded-op call on the Triton backend, planned once for one set of shapes, dtypes and
    options (morpho_dist.ops.prepared validates the call before it makes one): the forward and backward launch
    plans. Calling it launches the kernels with no further checks or planning."""

    __slots__ = ("fwd", "bwd", "all_idle", "scalar")

    def __init__(self, fwd: launch.ForwardLaunch, bwd: launch.BackwardLaunch, all_idle: bool, device) -> None:
        self.fwd, self.bwd, self.all_idle = fwd, bwd, all_idle
        # A 0-d float32 tensor on the device, never read: the template of rec_loss and of a zero rec gradient
        # (torch.empty_like from a template is about twice as fast as torch.empty from a shape and a device).
        self.scalar = torch.empty((), device=device)

    def __call__(self, x, stage, blend, alpha, p0, p1, telemetry):
        if not x.is_contiguous():
            x = x.contiguous()
        if _functorch_transforms_active():  # torch.func transforms: autograd.Function.apply's own handling
            return _PreparedFunction.apply(x, stage, blend, alpha, p0, p1, telemetry, self)
        # What autograd.Function.apply does outside functorch transforms, without its Python layer: x may be a
        # wrapper escaped from a finished transform (the state tensors are the layer's own), then the C apply.
        return _apply_prepared(_unwrap_if_dead(x), stage, blend, alpha, p0, p1, telemetry, self)


def prepare_triton(x, stage, p0, telemetry, *, kind, act, dead_eps, all_idle, opts: KernelOptions) -> PreparedCall:
    """Plan both directions of a validated call (x: the input as the op sees it, any leading dims)."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    seeds = stage.numel()
    rank = p0.shape[2] if kind == "lowrank" else 1
    has_stats = telemetry is not None
    fwd = launch.plan_forward(
        kind, act, rows, hidden, seeds, rank, x.element_size(), x.device, has_stats, bool(all_idle), float(dead_eps),
        opts,
    )  # fmt: skip
    bwd = launch.plan_backward(
        kind, rows, hidden, seeds, tuple(p0.shape), act, x.element_size(), x.device, has_stats, bool(all_idle), opts
    )
    return PreparedCall(fwd, bwd, bool(all_idle), x.device)


class _PreparedFunction(torch.autograd.Function):
    """_SeededFunction for a PreparedCall: x contiguous, state and telemetry contiguous (checked when prepared)."""

    @staticmethod
    def forward(ctx, x, stage, blend, alpha, p0, p1, telemetry, call: PreparedCall):
        y, rec_loss = launch.run_forward(call.fwd, x, stage, blend, alpha, p0, p1, telemetry, call.scalar)
        # An unused rec_loss (an idle layer's, which with_rec_losses leaves out) gets no zero-filled gradient
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, stage, blend, alpha, p0, p1)
        ctx.telemetry = telemetry  # updated in place by later calls: off the saved-tensor version check
        ctx.call = call
        return y, rec_loss

    @staticmethod
    def backward(ctx, dy, drec):
        x, stage, blend, alpha, p0, p1 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        elif not dy.is_contiguous():  # e.g. the expanded gradient of a sum()
            dy = dy.contiguous()
        call = ctx.call
        if drec is not None:
            drec = drec.float()
        elif call.all_idle:  # no seed reconstructs: the kernels never use drec, any fp32 tensor will do
            drec = alpha
        else:
            drec = torch.zeros_like(call.scalar)
        dx, dp0, dp1 = launch.run_backward(call.bwd, x, dy, drec, stage, blend, alpha, p0, p1, ctx.telemetry)
        return dx, None, None, None, dp0, dp1, None, None


_functorch_transforms_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_apply_prepared = super(torch.autograd.Function, _PreparedFunction).apply  # torch._C._FunctionBase.apply
