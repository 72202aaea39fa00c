"""CPU counterparts (Triton's interpreter) of test_seeded_kernels.py's GPU-only tests, and of kernel.dot_precision=tf32:

- the two-stream launch (kernel.overlap): its own buffer zeroing and its fork / launch / join order, with a
  recording side stream in place of a CUDA one;
- check_ids=True refused by name inside a graph capture (the emulated one of tests/kernels/cpu_graph.py), and
  check_ids=False recorded there;
- tf32 dots: the interpreter computes every tl.dot in exact fp32 whatever its input_precision, so a hook gives the
  dots that ask for tf32 what a tensor core does (operands cut to tf32's 10 mantissa bits, fp32 accumulation).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from triton._C.libtriton import ir
from triton.runtime.interpreter import InterpreterBuilder

from morpho_dist.kernels import launch
from morpho_dist.kernels.layout import TELEMETRY_FIELDS
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.ops import seeded
from tests.kernels.cpu_graph import CpuGraph, cpu_graphs
from tests.kernels.test_seeded_kernels import assert_matches, make_case, run_op

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")
KERNELS = ("_columns_fwd_kernel", "_columns_bwd_kernel", "_lowrank_fwd_kernel", "_lowrank_bwd_kernel")


# ---- kernel.overlap: the two-stream launch ----------------------------------------------------------------------


class RecordingSideStream:
    """launch.SideStream's fork / enter / join, recorded into ``log`` (the CPU has one stream: nothing to wait for)."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.entered = log, False

    def fork(self):
        self.log.append("fork")
        return "caller"

    def enter(self) -> None:
        self.log.append("enter")
        self.entered = True

    def join(self, main) -> None:
        assert main == "caller", main
        self.log.append("join")
        self.entered = False


class Logged:
    """Wraps a @triton.jit kernel: logs each launch (marked ``side`` when on the side stream), then launches."""

    def __init__(self, name: str, kernel, side: RecordingSideStream) -> None:
        self.name, self.kernel, self.side = name, kernel, side

    def __getitem__(self, grid):
        self.side.log.append(f"{self.name} side" if self.side.entered else self.name)
        return self.kernel[grid]


@pytest.fixture
def fresh_plans():
    """The launch plans are cached per shape and options: plan afresh here, and leave no plan made here behind."""
    launch.plan_forward.cache_clear()
    launch.plan_backward.cache_clear()
    yield
    launch.plan_forward.cache_clear()
    launch.plan_backward.cache_clear()


def _nan_empty(monkeypatch) -> None:
    """torch.empty / empty_like hand out NaN-filled floats: a buffer the overlap path allocates empty and forgets to
    zero shows (a device's caching allocator hands back old values, never zeros by luck)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.mark.parametrize("deterministic", [False, True])
def test_overlapped_streams_match_one_stream_and_replay_from_a_graph(monkeypatch, fresh_plans, deterministic):
    """With a side stream the lowrank kernels' outputs are allocated empty and zeroed there (rec_loss forward; dA,
    dB backward): the results are the reference's and, deterministic, bit for bit the one-stream ones. The side
    stream forks before the column kernel, carries the lowrank kernel alone, and joins before the launcher returns.
    Captured into a graph, the zeroing is recorded with the kernels: a replay gives the same results."""
    case = make_case((40,), 6, 16, kind="lowrank", rank=8, blend="mixed", dtype=torch.float32, device="cpu", seed=3)
    want = run_op(case, kind="lowrank", act="relu", backend="reference")
    opts = dict(deterministic=deterministic, block_rows=16, lowrank_rows=16)
    serial = run_op(case, kind="lowrank", act="relu", backend="triton", options=KernelOptions(overlap=False, **opts))

    log: list[str] = []
    side = RecordingSideStream(log)
    monkeypatch.setattr(launch, "_overlaps", lambda device, overlap: overlap)  # as on a CUDA device
    monkeypatch.setattr(launch, "side_stream", lambda device: side)
    for name in KERNELS:
        monkeypatch.setattr(launch, name, Logged(name, getattr(launch, name), side))
    _nan_empty(monkeypatch)
    overlapped = KernelOptions(overlap=True, **opts)
    got = run_op(case, kind="lowrank", act="relu", backend="triton", options=overlapped)
    one_call = [
        "fork", "_columns_fwd_kernel", "enter", "_lowrank_fwd_kernel side", "join",
        "fork", "_columns_bwd_kernel", "enter", "_lowrank_bwd_kernel side", "join",
    ]  # fmt: skip
    assert log == one_call, log
    assert not side.entered
    assert_matches(got, want, torch.float32, 1e-5, 1e-5)
    if deterministic:  # fixed-order sums: the same bits whichever stream ran what
        for name in want:
            assert torch.equal(got[name], serial[name]), name

    x, dy, stage, blend, alpha, p0, p1 = case
    x, p0, p1 = (t.clone().requires_grad_() for t in (x, p0, p1))
    tel = torch.zeros(stage.numel(), len(TELEMETRY_FIELDS))
    cpu_graphs(monkeypatch)
    graph = CpuGraph()
    log.clear()
    with torch.cuda.graph(graph):
        y, rec = seeded(
            x, stage, blend, alpha, p0, p1, tel, kind="lowrank", act="relu", backend="triton", options=overlapped,
            check_ids=False,
        )  # fmt: skip
        grads = torch.autograd.grad(torch.sum(y * dy) + 0.7 * rec, (x, p0, p1))
    assert log == one_call, log
    graph.replay()
    replayed = {"y": y, "rec_loss": rec, "dx": grads[0], "dp0": grads[1], "dp1": grads[2], "tel": tel}
    monkeypatch.undo()
    assert_matches(replayed, want, torch.float32, 1e-5, 1e-5)


def test_a_call_promising_every_seed_idle_forks_no_side_stream(monkeypatch, fresh_plans):
    case = make_case((20,), 4, 16, kind="lowrank", rank=4, blend="mixed", dtype=torch.float32, device="cpu")
    x, dy, _, blend, alpha, p0, p1 = case
    stage = torch.zeros(4, dtype=torch.int8)  # every seed DORMANT: the promise holds
    log: list[str] = []
    side = RecordingSideStream(log)
    monkeypatch.setattr(launch, "_overlaps", lambda device, overlap: overlap)
    monkeypatch.setattr(launch, "side_stream", lambda device: side)
    for name in KERNELS:
        monkeypatch.setattr(launch, name, Logged(name, getattr(launch, name), side))
    x = x.clone().requires_grad_()
    y, _ = seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend="triton", all_idle=True)
    y.backward(dy)
    assert log == ["_columns_fwd_kernel", "_columns_bwd_kernel"], log
    assert torch.equal(y, x) and torch.equal(x.grad, dy)


# ---- check_ids inside a capture ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_check_ids_inside_a_capture_is_refused_by_name(monkeypatch, backend):
    """Reading the ids is a host sync, which a capture does not allow: one line naming check_ids and what is
    allowed, before anything is recorded; check_ids=False is recorded and replays to the eager result."""
    x, _dy, stage, blend, alpha, p0, p1 = make_case(
        (20,), 4, 16, kind="lowrank", rank=4, blend="mixed", dtype=torch.float32, device="cpu"
    )
    want, _ = seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend=backend)
    cpu_graphs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the check asks CUDA whether it captures
    graph = CpuGraph()
    refused = pytest.raises(ValueError, match=r"^check_ids=True .* allowed inside a capture: check_ids=False")
    with refused, torch.cuda.graph(graph):
        seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend=backend, check_ids=True)
    graph = CpuGraph()
    with torch.cuda.graph(graph):
        y, _ = seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend=backend, check_ids=False)
    y.zero_()
    graph.replay()
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend=backend, check_ids=True)  # not capturing


# ---- kernel.dot_precision=tf32 ------------------------------------------------------------------------------------


def _to_tf32(data: np.ndarray) -> np.ndarray:
    """fp32 cut to tf32 (8-bit exponent, 10-bit mantissa): a tensor core reads the top 19 bits of each operand."""
    return (np.ascontiguousarray(data, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_dots(monkeypatch) -> dict[str, int]:
    """The interpreter's tl.dot with tf32 operands where the kernel asks for tf32; counts dots by precision."""
    create_dot = InterpreterBuilder.create_dot
    counts = {"tf32": 0, "ieee": 0}

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        fp32 = a.data.dtype == np.float32 and b.data.dtype == np.float32
        if fp32 and input_precision == ir.INPUT_PRECISION.TF32:
            counts["tf32"] += 1
            a, b = type(a)(_to_tf32(a.data), a.dtype), type(b)(_to_tf32(b.data), b.dtype)
        elif fp32:
            counts["ieee"] += 1
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", dot)
    return counts


# tf32 keeps 10 of fp32's 23 mantissa bits: cut (not rounded) each operand is off by up to 2**-10 relative and a
# product by up to 2**-9 (about 2e-3), so a dot is off by up to 2e-3 of its sum of |products|. Relative to each
# field's largest value the outputs, gradients and telemetry here come out up to 2.5e-3 off: 5e-3 holds them,
# an exact fp32 run stays within 1e-5 (test_seeded_kernels), a wrong result is off by order 1.
TF32_TOL = 5e-3


@pytest.mark.parametrize("lead, n, c", [((37,), 11, 16), ((3, 3), 11, 200)], ids=["T37-N11-C16", "3x3-N11-C200"])
def test_tf32_dots_match_reference_at_tf32_precision(monkeypatch, lead, n, c):
    """dot_precision=tf32 reaches every fp32 dot of the lowrank kernels (auto picks dots, not rank-1 updates, for
    tf32 on any chunk), and the results are the reference's within tf32's precision and no closer than that allows:
    they differ from the exact-fp32 run."""
    case = make_case(lead, n, c, kind="lowrank", rank=5, blend="mixed", dtype=torch.float32, device="cpu", seed=9)
    want = run_op(case, kind="lowrank", act="gelu_tanh", backend="reference")
    ieee = run_op(case, kind="lowrank", act="gelu_tanh", backend="triton", options=KernelOptions(dot_precision="ieee"))
    counts = tf32_dots(monkeypatch)
    opts = KernelOptions(dot_precision="tf32")
    got = run_op(case, kind="lowrank", act="gelu_tanh", backend="triton", options=opts)
    assert counts["tf32"] > 0 and counts["ieee"] == 0, counts
    for name in ("y", "dx", "dp0", "dp1", "rec_loss"):
        scale = want[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got[name], want[name], atol=TF32_TOL * scale, rtol=0, msg=lambda m, k=name: f"{k}: {m}"
        )
    for i, field in enumerate(TELEMETRY_FIELDS):
        scale = want["tel"][:, i].abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got["tel"][:, i], want["tel"][:, i], atol=TF32_TOL * scale, rtol=0, msg=lambda m, f=field: f"{f}: {m}"
        )
    for name in ("y", "dp0"):  # forward and backward dots
        assert not torch.equal(got[name], ieee[name]), f"{name}: the tf32 run gave the exact fp32 run's bits"
