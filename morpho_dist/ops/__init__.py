"""The seeded op: one functional entry point, two backends (fused Triton, PyTorch reference).

y, rec_loss = morpho_dist.ops.seeded(x, stage, blend, alpha, p0, p1, telemetry, kind="lowrank")
"""

from __future__ import annotations

import os

import torch

from morpho_dist.kernels.options import KernelOptions
from morpho_dist.ops.reference import seeded_reference
from morpho_dist.ops.validation import BACKENDS, check_backend, check_seeded_args

__all__ = ["BACKENDS", "KernelOptions", "resolve_backend", "seeded", "seeded_reference"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


MAX_KERNEL_ELEMENTS = 2**31 - 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'reference' otherwise; 'triton' off CUDA needs TRITON_INTERPRET=1."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (x is on {device}); allowed on this device: "
            "['reference', 'auto'], or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    return backend


def seeded(
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
    backend: str = "auto",
    options: KernelOptions | None = None,
    check_ids: bool = True,
    all_idle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply every seed of a layer to x[..., H] and gather telemetry; returns (y, rec_loss).

    (p0, p1) is (A, B) for kind='lowrank' and (g, b) for kind='diagonal'. ``telemetry`` ([N, 8] fp32 or None)
    is updated in place: forward fields now, grad_sq and benefit in the backward. ``options`` are the Triton
    launch options; ``check_ids=False`` skips reading stage/blend values (a host sync on GPU) for callers
    that already guarantee them.

    ``all_idle=True`` is the caller's promise that no seed is TRAINING or blended (SeededLayer keeps the host
    record that lets it promise so, morpho_dist.layer). The Triton path then launches the column kernel alone: a
    lowrank layer skips its lowrank kernel and the side-stream fork. A promise that does not hold is not
    silently wrong: the columns of the seeds that break it are NaN in y and dx, on both backends (the rest of
    their telemetry and gradients is then unspecified).
    """
    if not isinstance(x, torch.Tensor):  # before x.device below: a ValueError naming x, like every other check
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return seeded_reference(
            x, stage, blend, alpha, p0, p1, telemetry, kind=kind, act=act, dead_eps=dead_eps, check_ids=check_ids,
            all_idle=all_idle,
        )  # fmt: skip
    check_seeded_args(
        x, stage, blend, alpha, p0, p1, telemetry, kind=kind, act=act, dead_eps=dead_eps, check_ids=check_ids,
        all_idle=all_idle,
    )  # fmt: skip
    if x.numel() > MAX_KERNEL_ELEMENTS:  # the kernels index x in int32: a bigger x would wrap, silently
        raise ValueError(
            f"x has {x.numel()} elements; backend='triton' takes at most {MAX_KERNEL_ELEMENTS} (int32 indexing): "
            "split the batch, or use backend='reference'"
        )
    from morpho_dist.ops.triton_op import seeded_triton  # Triton is only imported when it is used

    return seeded_triton(
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
        all_idle=all_idle,
        opts=options or KernelOptions(),
    )
