"""Argument checks shared by every backend of the seeded op: one place, one set of messages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morpho_dist.blueprints import LOWRANK_MIN_CHUNK, check_act, check_kind
from morpho_dist.kernels.layout import BLEND_ID_RANGE, NUM_FIELDS, STAGE_ID_RANGE

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("triton", "reference", "auto")


@dataclass(frozen=True)
class SeededShape:
    rows: int  # T: rows after flattening the leading dims
    hidden: int  # H
    seeds: int  # N
    chunk: int  # C = H / N
    rank: int  # R (lowrank), 0 for diagonal


def _names(dtypes) -> list[str]:
    return [str(d).replace("torch.", "") for d in dtypes]


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_seeded_args(
    x: torch.Tensor,
    stage: torch.Tensor,
    blend: torch.Tensor,
    alpha: torch.Tensor,
    p0: torch.Tensor,
    p1: torch.Tensor,
    telemetry: torch.Tensor | None,
    *,
    kind: str,
    act: str,
    dead_eps: float,
    allow_float64: bool = False,
    check_ids: bool = True,
    all_idle: bool = False,
) -> SeededShape:
    """Validate everything about a seeded-op call; raise ValueError naming the argument and allowed values.

    ``check_ids`` reads stage/blend values (a host sync on GPU); SeededLayer, which validates ids when it
    writes them, turns it off so a training step never synchronises.
    """
    check_kind(kind)
    check_act(act)
    _check_tensor("x", x)
    allowed = ACTIVATION_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in allowed:
        raise ValueError(f"x has dtype {x.dtype}; allowed dtypes: {_names(allowed)}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be non-empty with shape [..., H], got {tuple(x.shape)}")
    for name, t in (("stage", stage), ("blend", blend), ("alpha", alpha)):
        _check_tensor(name, t, ndim=1)
    n = stage.numel()
    if n < 1:
        raise ValueError("stage must hold at least one seed, got an empty tensor")
    hidden = x.shape[-1]
    if hidden % n:
        raise ValueError(
            f"x's last dim H={hidden} is not divisible by the number of seeds N={n} (stage.numel()); "
            f"N must be one of the divisors of H: {[d for d in range(1, hidden + 1) if hidden % d == 0]}"
        )
    chunk = hidden // n
    for name, t in (("blend", blend), ("alpha", alpha)):
        if t.numel() != n:
            raise ValueError(f"{name} must have shape [N]=[{n}] like stage, got {tuple(t.shape)}")
    for name, t in (("stage", stage), ("blend", blend)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int8 preferred), got dtype {t.dtype}")
    if alpha.dtype != torch.float32 and not (allow_float64 and alpha.dtype == torch.float64):
        raise ValueError(f"alpha must have dtype float32, got {alpha.dtype}")

    _check_tensor("p0", p0)
    _check_tensor("p1", p1)
    rank = 0
    if kind == "lowrank":
        if chunk < LOWRANK_MIN_CHUNK:
            raise ValueError(
                f"kind='lowrank' needs chunk C = H / N >= {LOWRANK_MIN_CHUNK}, got C={chunk} (H={hidden}, N={n}); "
                "use fewer seeds or kind='diagonal'"
            )
        if p0.dim() != 3 or p0.shape[:2] != (n, chunk):
            raise ValueError(f"p0 (A) must have shape [N, C, R] = [{n}, {chunk}, R], got {tuple(p0.shape)}")
        rank = p0.shape[2]
        if rank < 1:
            raise ValueError(f"p0 (A) must have rank R >= 1, got shape {tuple(p0.shape)}")
        if tuple(p1.shape) != (n, rank, chunk):
            raise ValueError(f"p1 (B) must have shape [N, R, C] = [{n}, {rank}, {chunk}], got {tuple(p1.shape)}")
    else:
        for name, t in (("p0 (g)", p0), ("p1 (b)", p1)):
            if tuple(t.shape) != (n, chunk):
                raise ValueError(f"{name} must have shape [N, C] = [{n}, {chunk}], got {tuple(t.shape)}")
    param_dtypes = ACTIVATION_DTYPES + ((torch.float64,) if allow_float64 else ())
    if p0.dtype not in param_dtypes or p1.dtype != p0.dtype:
        raise ValueError(f"p0 and p1 must share one dtype out of {_names(param_dtypes)}, got {p0.dtype} and {p1.dtype}")
    if telemetry is not None:
        _check_tensor("telemetry", telemetry, ndim=2)
        if tuple(telemetry.shape) != (n, NUM_FIELDS) or telemetry.dtype != torch.float32:
            raise ValueError(
                f"telemetry must be a float32 tensor of shape [N, {NUM_FIELDS}] = [{n}, {NUM_FIELDS}] or None, "
                f"got {telemetry.dtype} {tuple(telemetry.shape)}"
            )
    tensors = {"stage": stage, "blend": blend, "alpha": alpha, "p0": p0, "p1": p1}
    if telemetry is not None:
        tensors["telemetry"] = telemetry
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all arguments must share x's device")
    if not (dead_eps >= 0.0):
        raise ValueError(f"dead_eps must be >= 0, got {dead_eps}")
    if not isinstance(all_idle, bool):
        raise ValueError(f"all_idle must be a bool (True or False), got {all_idle!r}")
    if check_ids:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Reading the ids is a host sync, which would invalidate the capture with CUDA's own, opaque error.
            raise ValueError(
                "check_ids=True reads stage and blend on the host, which a CUDA graph capture does not allow; "
                "allowed inside a capture: check_ids=False (validate the ids before capturing)"
            )
        for name, t, (lo, hi) in (("stage", stage, STAGE_ID_RANGE), ("blend", blend, BLEND_ID_RANGE)):
            bad = (t < lo) | (t > hi)
            if bool(bad.any()):
                raise ValueError(
                    f"{name} holds ids {sorted(set(t[bad].tolist()))} out of range; allowed ids: {lo}..{hi}"
                )
    return SeededShape(rows=x.numel() // hidden, hidden=hidden, seeds=n, chunk=chunk, rank=rank)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; allowed values: {list(BACKENDS)}")
