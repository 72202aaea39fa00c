"""Host (Python) time of one SeededLayer call, forward and backward, with the Triton launches stubbed out.

    TRITON_INTERPRET=1 python scripts/bench_host_path.py            # CPU tensors, every kernel launch a no-op
    TRITON_INTERPRET=1 python scripts/bench_host_path.py --out /tmp/host_path.json

What it times is everything a seeded-layer call does on the host but the kernel launches themselves: argument
checks, option handling, planning, allocations, the autograd Function, the layer's idle record. The launches are
replaced by no-ops (the kernels' outputs are left as allocated), so the figure does not depend on a device or on
Triton's interpreter; the launch cost of the real kernels (Triton's launcher, on the device) comes on top and is
measured on the device by scripts/bench_step.py's per-call rows.

Layers: lowrank, 64 seeds of chunk 16, rank 16; one all DORMANT (idle record: known idle, one launch each way),
one with a third of its seeds GRAFTING (two launches each way); and "bare", a module over the same tensors whose
forward is one autograd.Function call with the same inputs, saved tensors and outputs and nothing else: what torch
itself costs for such a call, under which no seeded layer can go. Reported: median microseconds per call over
``--steps`` passes through a chain of ``--layers`` layers: per layer call, the forward, the backward (one
``y.backward(dy)`` through the whole chain, so the autograd engine's start is shared as in a training step) and
their sum; and the function calls the interpreter makes per layer call (Python functions, and C functions called
from Python, counted with sys.setprofile over one pass), which do not depend on the machine or its load. With
``--compiled`` also the dormant and one-third chains under torch.compile (aot_eager: the traced calls run through
the op's custom ops, which the eager layer does not use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors take the Triton path

import torch  # noqa: E402

from morpho_dist.kernels import launch  # noqa: E402
from morpho_dist.layer import SeededLayer  # noqa: E402
from morpho_dist.lifecycle import Stage  # noqa: E402

KERNELS = ("_columns_fwd_kernel", "_columns_bwd_kernel", "_lowrank_fwd_kernel", "_lowrank_bwd_kernel")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.launches += 1


def stub_launches() -> dict[str, _NoLaunch]:
    stubs = {name: _NoLaunch(name) for name in KERNELS}
    for name, stub in stubs.items():
        setattr(launch, name, stub)
    return stubs


def make_layer(third: bool) -> SeededLayer:
    layer = SeededLayer(1024, 64, rank=16, backend="triton").train()
    if third:
        live = list(range(0, 64, 3))
        for i in live:
            layer.germinate(i, step=0)
        for stage in (Stage.TRAINING, Stage.GRAFTING):
            layer.apply_stage_changes([(i, stage) for i in live], step=0)
    return layer


class _BareFunction(torch.autograd.Function):
    """The least a seeded call can cost in torch: the same inputs, saved tensors and allocated outputs as the
    layer's autograd Function, and nothing else (no checks, no plans, no launches)."""

    @staticmethod
    def forward(ctx, x, stage, blend, alpha, p0, p1, telemetry, scalar):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, stage, blend, alpha, p0, p1)
        ctx.telemetry = telemetry
        return torch.empty_like(x), torch.empty_like(scalar)

    @staticmethod
    def backward(ctx, dy, drec):
        x, stage, blend, alpha, p0, p1 = ctx.saved_tensors
        return torch.empty_like(dy), None, None, None, torch.empty_like(p0), torch.empty_like(p1), None, None


_bare_apply = super(torch.autograd.Function, _BareFunction).apply  # the C apply, as the layer's prepared calls


class BareLayer(torch.nn.Module):
    """A module over a SeededLayer's tensors (held as they are, no lookups) whose forward is one _BareFunction
    call: the reference row "bare"."""

    def __init__(self, layer: SeededLayer) -> None:
        super().__init__()
        self.hidden, self.seeded = layer.hidden, layer
        state = (layer.stage, layer.blend, layer.alpha, layer.bank.p0, layer.bank.p1, layer.telemetry)
        self.__dict__["_state"] = (*state, torch.empty(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bare_apply(x, *self._state)[0]


def time_calls(layers: list[SeededLayer], steps: int, x: torch.Tensor | None = None) -> tuple[float, float]:
    """Median microseconds per layer call (forward, backward) of ``steps`` passes through the chain of layers: one
    forward through all of them, then one backward (as in a training step: the autograd engine starts once, and
    the gradients were set to None before it, as optimizer.zero_grad() does, so the backward hands its gradient
    buffers to .grad rather than adding them to the last step's). ``x``: the chain's input (default 8 CPU rows);
    on a device, wall clock is host time while the kernels are shorter than the host path (few rows)."""
    if x is None:
        x = torch.randn(8, layers[0].hidden, requires_grad=True)
    dy = torch.randn_like(x)
    params = [p for layer in layers for p in layer.parameters()]
    fwd, bwd = [], []
    for _ in range(steps):
        x.grad = None
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y = x
        for layer in layers:
            y = layer(y)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    skip = steps // 5  # warm-up passes
    per_call = 1e6 / len(layers)
    return statistics.median(fwd[skip:]) * per_call, statistics.median(bwd[skip:]) * per_call


def count_calls(layers: list[SeededLayer], x: torch.Tensor | None = None) -> dict[str, int]:
    """Function calls per layer call over one pass through the chain (after a warm-up pass): Python functions
    ("py") and C functions called from Python ("c"), forward and backward. The CPU backward runs on this thread."""
    if x is None:
        x = torch.randn(8, layers[0].hidden, requires_grad=True)
    dy = torch.randn_like(x)
    counts = {"py": 0, "c": 0}

    def count(frame, event, arg) -> None:
        if event == "call":
            counts["py"] += 1
        elif event == "c_call":
            counts["c"] += 1

    def chain() -> torch.Tensor:
        y = x
        for layer in layers:
            y = layer(y)
        return y

    chain().backward(dy)  # warm-up: calls prepared
    for p in [x, *(p for layer in layers for p in layer.parameters())]:
        p.grad = None
    sys.setprofile(count)
    y = chain()
    sys.setprofile(None)
    fwd = dict(counts)
    counts.update(py=0, c=0)
    sys.setprofile(count)
    y.backward(dy)
    sys.setprofile(None)
    n = len(layers)
    return {
        "fwd_py_calls": round(fwd["py"] / n),
        "fwd_c_calls": round(fwd["c"] / n),
        "bwd_py_calls": round(counts["py"] / n),
        "bwd_c_calls": round(counts["c"] / n),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="layers in the chain")
    ap.add_argument("--steps", type=int, default=200, help="forward + backward passes through the chain")
    ap.add_argument(
        "--compiled", action="store_true", help="also the dormant and one-third chains under torch.compile(aot_eager)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stubs = stub_launches()
    rows = {}
    for name, third in (("dormant", False), ("third", True), ("bare", False)):
        layers = [make_layer(third) for _ in range(args.layers)]
        if name == "bare":
            layers = [BareLayer(layer) for layer in layers]
        fwd, bwd = time_calls(layers, args.steps)
        calls = count_calls(layers)
        idle = name != "bare" and layers[0].known_idle()
        rows[name] = {"known_idle": idle, "fwd_us": fwd, "bwd_us": bwd, "fwd_bwd_us": fwd + bwd, **calls}
        print(
            f"{name:8s} known_idle={idle!s:5s} fwd {fwd:6.1f} us  bwd {bwd:6.1f} us  fwd+bwd {fwd + bwd:6.1f} us  "
            f"calls per layer call: fwd {calls['fwd_py_calls']} py + {calls['fwd_c_calls']} c, "
            f"bwd {calls['bwd_py_calls']} py + {calls['bwd_c_calls']} c"
        )
    if args.compiled:
        # Dynamo + AOTAutograd with eager kernels: the traced calls run the op's custom ops, whose per-call cost
        # (torch.library's dispatch, the op's body) this row measures; compiling takes a few seconds.
        for name, third in (("dormant_compiled", False), ("third_compiled", True)):
            chain = torch.compile(
                torch.nn.Sequential(*(make_layer(third) for _ in range(args.layers))),
                backend="aot_eager",
                fullgraph=True,
            )
            fwd, bwd = (
                t / args.layers for t in time_calls([chain], args.steps, torch.randn(8, 1024, requires_grad=True))
            )
            rows[name] = {"fwd_us": fwd, "bwd_us": bwd, "fwd_bwd_us": fwd + bwd}
            print(f"{name:16s} fwd {fwd:6.1f} us  bwd {bwd:6.1f} us  fwd+bwd {fwd + bwd:6.1f} us")
    result = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "launches": {n: s.launches for n, s in stubs.items()},
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
