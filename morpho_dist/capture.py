"""A whole training step of a seeded model captured into one CUDA graph, replayed step after step.

    step = CapturedStep(train_step, layers)        # train_step(*inputs): forward, backward, optimizer step
    for batch in loader:
        step(batch["x"], batch["y"])               # copied into the graph's static inputs, then one replay

What a captured step may rely on. Seed state lives in device tensors that the kernels read on every launch
(stage, blend, alpha, the banks, the telemetry buffer), and the launch grids depend on shapes only, never on the
stages: lifecycle commands (germinate, advance, cull, ...) and the alpha schedule write those tensors in place,
so the replayed kernels see them. The one host-side input of a seeded launch is each layer's idle promise (its
idle record, morpho_dist.layer): a layer known to be idle launches its column kernel alone, one that is not
launches the lowrank kernel too. A graph captured under one set of promises would be stale under another (a
seed gone live in a layer captured as idle would come out NaN, the op's safety net), so every call compares the
layers' promises and training modes with those of the capture and captures again when they differ: never a
stale graph. Nothing else about a layer may change between replays: its shapes, dtypes, device, options, or
the tensors themselves (``.to()``, a new optimizer); build a new CapturedStep after such a change. Python
numbers the step passes to kernels are recorded as they were at capture: a learning rate that changes must
live in a tensor (torch's capturable optimizers take ``lr`` as a tensor), the seed optimizer's ``lr`` as well.

A capture costs ``warmup`` eager steps (on a side stream, as CUDA graphs need) plus one recorded step, and each
of those calls is a real training step: the step the graph was recorded for is replayed at once. The step
function sets the gradients to None before its backward, so that the graph allocates its own (its backward
writes them, the optimizer inside it reads them); between replays they hold the last step's gradients. It must
return tensors only (or nothing): a replay returns the tensors the capture returned, rewritten. It must make no
host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` finds any) and its host optimizer must be
capturable (``torch.optim.AdamW(..., capturable=True)``, fused or not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from morpho_dist.layer import SeededLayer


def launch_key(layers: Iterable[SeededLayer]) -> tuple:
    """What the host decides about each layer's launches: (idle promise, training mode) per layer."""
    return tuple((layer.known_idle(), layer.training) for layer in layers)


class CapturedStep:
    """``step_fn(*inputs)`` captured into a CUDA graph and replayed; captured again whenever ``launch_key`` of the
    layers changes (module docstring). ``step_fn`` sets the gradients to None before its backward
    (``optimizer.zero_grad()``, PyTorch's default ``set_to_none=True``): recorded that way, the graph's backward
    writes gradients of its own, which the optimizer inside the graph reads."""

    def __init__(
        self,
        step_fn: Callable[..., object],
        layers: Mapping[str, SeededLayer] | Iterable[SeededLayer],
        *,
        warmup: int = 2,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before each capture), got {warmup}")
        self.step_fn = step_fn
        self.layers = list(layers.values() if isinstance(layers, Mapping) else layers)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)
        self._eager_left = warmup
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._output = None

    def __call__(self, *inputs: torch.Tensor):
        key = launch_key(self.layers)
        if key != self.key:  # first call, or a promise changed: warm up again, then record
            self.graph, self.key, self._eager_left = None, key, self.warmup
        if self.graph is not None:
            for static, new in zip(self._inputs, inputs, strict=True):
                if static is not new:
                    static.copy_(new)
            self.graph.replay()
            return self._output
        if self._eager_left > 0:
            self._eager_left -= 1
            return self._eager(inputs)
        return self._capture(inputs)

    def _eager(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step_fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs):
        self._inputs = tuple(t.clone() for t in inputs)  # static inputs: replays read them, calls copy into them
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._output = self.step_fn(*self._inputs)
        self.captures += 1
        self.graph.replay()  # this call's step
        return self._output
