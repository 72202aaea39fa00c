"""A CPU stand-in for CUDA graph capture, so that CI (no GPU, Triton's interpreter) runs what a captured step does.

What a CUDA graph is, to the code that captures it: inside ``torch.cuda.graph(g)`` the step's Python runs once and
every device operation it issues is recorded, not run; ``g.replay()`` runs the recorded operations again on the
same memory, and none of the Python. Host decisions made during the capture (which kernels a layer launches, a
Python number passed to a kernel) are frozen into the graph; device tensors written in place between replays
(stages, alphas, banks, the static inputs) are read afresh by every replay; a host read of a device value inside
the capture is an error.

``cpu_graphs(monkeypatch)`` puts the same behaviour behind ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` (and
makes streams no-ops) for CPU tensors: a TorchDispatchMode records every aten operation of the capture and a hook
on the interpreter records every Triton launch; replay() runs them again and writes each result into the tensor the
capture produced. The capture runs the operations once to learn their outputs and then restores every tensor it
wrote, so that, as on a device, a capture changes no state. ``empty`` allocations come back NaN-filled at each
replay (device memory reused by a graph holds old values, never zeros by luck). A host read of a tensor value
(``.item()``, ``bool(t)``, ``torch.equal``, ``.tolist()``, ``.numpy()``) inside the capture raises
HostReadInCapture.

Not emulated: concurrency between streams, the caching allocator's pools, host reads through the raw memory
(``data_ptr()``, the buffer protocol).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from triton.runtime.interpreter import InterpretedFunction

aten = torch.ops.aten
_HOST_READS = (aten._local_scalar_dense, aten.equal, aten.is_nonzero)
_EMPTY = (aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided)


class HostReadInCapture(RuntimeError):
    """A device value read on the host inside a capture (CUDA: 'operation not permitted when stream is
    capturing')."""


class CpuGraph:
    """The recorded operations of one capture; ``replay()`` runs them again."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []  # (callable, args, kwargs, outputs recorded at capture, refill NaN)
        self.replays = 0

    def replay(self) -> None:
        # the recorded operations sit below autograd (as a device graph's kernels do): run them there
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            self._run()
        self.replays += 1

    def _run(self) -> None:
        for fn, args, kwargs, outs, empty in self.ops:
            if empty:
                for out in outs:
                    if isinstance(out, torch.Tensor) and out.is_floating_point():
                        out.fill_(float("nan"))
                continue
            result = fn(*args, **kwargs)
            if outs is None:  # a Triton launch: it wrote its tensor arguments
                continue
            results = tree_flatten(result)[0]
            for out, res in zip(outs, results, strict=True):
                if isinstance(res, torch.Tensor) and res.numel() and out.data_ptr() != res.data_ptr():
                    out.copy_(res)  # an out-of-place result: into the tensor the captured ops read


class _Capture(TorchDispatchMode):
    def __init__(self, graph: CpuGraph) -> None:
        super().__init__()
        self.graph = graph
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def save(self, tensors) -> None:
        """Keep the contents of every storage the capture writes, as it was before the capture's first write."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.saved:
                    self.saved[storage.data_ptr()] = (storage, storage.clone())

    def restore(self) -> None:
        for storage, before in self.saved.values():
            storage.copy_(before)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _HOST_READS:
            raise HostReadInCapture(f"{func} reads a tensor value on the host inside a graph capture")
        if func._schema.is_mutable:
            self.save(tree_flatten((args, kwargs))[0])
        out = func(*args, **kwargs)
        outs = tree_flatten(out)[0]
        self.graph.ops.append((func, args, kwargs, outs, func.overloadpacket in _EMPTY))
        return out


_ACTIVE: list[_Capture] = []
_LAUNCHING: list[bool] = []  # inside a Triton launch: the interpreter reads its arguments on the host, as it must


def _refusing_host_copy(original):
    """``Tensor.tolist`` / ``numpy``: host reads that do not pass the dispatcher for a CPU tensor."""

    def read(self, *args, **kwargs):
        if _ACTIVE and not _LAUNCHING:
            raise HostReadInCapture(f"Tensor.{original.__name__}() reads a tensor on the host inside a graph capture")
        return original(self, *args, **kwargs)

    return read


def _recording_run(original):
    def run(self, *args, grid, warmup, **kwargs):
        if warmup or not _ACTIVE:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        capture = _ACTIVE[-1]
        launch = lambda: original(self, *args, grid=grid, warmup=False, **kwargs)  # noqa: E731
        capture.graph.ops.append((launch, (), {}, None, False))
        # neither the copies kept here nor the interpreter's own tensor copies are the step's operations
        with _disable_current_modes():
            capture.save(list(args) + list(kwargs.values()))  # a kernel writes its tensor arguments in place
            _LAUNCHING.append(True)
            try:
                return launch()
            finally:
                _LAUNCHING.pop()

    return run


@contextlib.contextmanager
def _graph(graph: CpuGraph, *args, **kwargs):
    capture = _Capture(graph)
    _ACTIVE.append(capture)
    try:
        with capture:
            yield
    finally:
        _ACTIVE.pop()
        capture.restore()  # a capture records; it leaves every tensor as it found it


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def is_capturing() -> bool:
    return bool(_ACTIVE)


def cpu_graphs(monkeypatch) -> None:
    """CUDA graph capture and streams, emulated on the CPU for the rest of the test (module docstring)."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CpuGraph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", is_capturing)
    monkeypatch.setattr(InterpretedFunction, "run", _recording_run(InterpretedFunction.run))
    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, _refusing_host_copy(getattr(torch.Tensor, name)))
