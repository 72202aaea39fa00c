"""SeededCalls: the seeded op for a caller that makes the same call every step (SeededLayer).

`seeded()` checks every argument and plans its launches on every call, which costs tens of microseconds of
Python a call. A training step calls each layer with the same shapes, dtypes, tensors and options step after
step; `SeededCalls` checks a call once, keeps its launch plans (morpho_dist.ops.triton_op.PreparedCall) and
makes the later calls of the same kind straight from them. A call is "of the same kind" when x has the same
shape, dtype and device, the state tensors are the same objects with the same parameter shapes and dtypes, the
configuration objects are the same, and the idle promise and training mode (telemetry or None) match; anything
else is checked again (and planned again: the plans themselves are cached per shape in kernels.launch).

Calls that have no prepared form go through `seeded()` unchanged: the reference backend, kernel.autotune (its
choice can change per shape on first use), and calls traced by torch.compile (the custom ops there).
"""

from __future__ import annotations

import torch

from morpho_dist.kernels.options import KernelOptions

_MAX_ENTRIES = 8  # input shapes kept per layer (train and eval batches, a last short batch, ...)


class _Entry:
    """One kind of call: what it was checked for, and its prepared form (None: no prepared form)."""

    __slots__ = (
        "call", "x_shape", "x_dtype", "x_device", "all_idle", "stage", "blend", "alpha", "p0", "p1", "telemetry",
        "kind", "act", "dead_eps", "backend", "options", "p0_shape", "p0_dtype", "p1_shape", "p1_dtype",
    )  # fmt: skip

    def __init__(
        self, call, x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle
    ):
        self.call = call
        self.x_shape, self.x_dtype, self.x_device, self.all_idle = x.shape, x.dtype, x.device, all_idle
        self.stage, self.blend, self.alpha, self.p0, self.p1, self.telemetry = stage, blend, alpha, p0, p1, telemetry
        self.kind, self.act, self.dead_eps, self.backend, self.options = kind, act, dead_eps, backend, options
        self.p0_shape, self.p0_dtype, self.p1_shape, self.p1_dtype = p0.shape, p0.dtype, p1.shape, p1.dtype

    def matches(self, x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle):
        """Whether a call is of this kind: the same objects for the state tensors and the configuration, the same
        shape, dtype and device of x, and the same parameter shapes and dtypes (a Parameter's .data can be replaced
        in place). Cheapest and likeliest to differ first."""
        return (
            self.stage is stage
            and self.all_idle is all_idle
            and self.telemetry is telemetry
            and self.x_shape == x.shape
            and self.x_dtype == x.dtype
            and self.x_device == x.device
            and self.p0 is p0
            and self.p1 is p1
            and self.blend is blend
            and self.alpha is alpha
            and self.options is options
            and self.kind is kind
            and self.act is act
            and self.dead_eps is dead_eps
            and self.backend is backend
            and self.p0_shape == p0.shape
            and self.p1_shape == p1.shape
            and self.p0_dtype == p0.dtype
            and self.p1_dtype == p1.dtype
        )


class SeededCalls:
    """Calls the seeded op for one layer, checking and planning each kind of call once (module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry] = {}
        self._last: _Entry | None = None  # the kind of the latest call: checked first, field by field

    def clear(self) -> None:
        """Forget every prepared call (the layer's tensors were replaced, e.g. by ``.to()``)."""
        self._entries.clear()
        self._last = None

    def __call__(
        self, x, stage, blend, alpha, p0, p1, telemetry, kind: str, act: str, dead_eps: float, backend: str,
        options: KernelOptions, all_idle: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling():
            e = self._last
            if e is None or not e.matches(
                x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle
            ):
                e = self._entry(
                    x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle
                )
            if e.call is not None:
                return e.call(x, stage, blend, alpha, p0, p1, telemetry)
        from morpho_dist.ops import seeded

        return seeded(
            x, stage, blend, alpha, p0, p1, telemetry, kind=kind, act=act, dead_eps=dead_eps, backend=backend,
            options=options, check_ids=False, all_idle=all_idle,
        )  # fmt: skip

    def _entry(self, x, *args) -> _Entry:
        """The entry of this kind of call: a kept one where everything it was checked for still holds, else a new
        one, checked and prepared."""
        stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle = args
        key = (x.shape, x.dtype, x.device, telemetry is None, all_idle)
        e = self._entries.get(key)
        if e is None or not e.matches(x, *args):
            e = _Entry(self._prepare(x, *args), x, *args)
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = e
        self._last = e
        return e

    @staticmethod
    def _prepare(x, stage, blend, alpha, p0, p1, telemetry, kind, act, dead_eps, backend, options, all_idle):
        """The prepared form of a call (None where it has none), after the checks seeded() makes."""
        from morpho_dist.ops import MAX_KERNEL_ELEMENTS, resolve_backend
        from morpho_dist.ops.validation import check_seeded_args

        state = (stage, blend, alpha, p0, p1) + (() if telemetry is None else (telemetry,))
        if not (
            resolve_backend(backend, x.device) == "triton"
            and not options.autotune
            and x.numel() <= MAX_KERNEL_ELEMENTS
            and all(t.is_contiguous() for t in state)
        ):
            return None
        # the same checks seeded() makes (ids are the caller's: SeededLayer validates them as it writes them)
        check_seeded_args(
            x, stage, blend, alpha, p0, p1, telemetry, kind=kind, act=act, dead_eps=dead_eps, check_ids=False,
            all_idle=all_idle,
        )  # fmt: skip
        from morpho_dist.ops.triton_op import prepare_triton

        return prepare_triton(
            x, stage, p0, telemetry, kind=kind, act=act, dead_eps=dead_eps, all_idle=all_idle, opts=options
        )
