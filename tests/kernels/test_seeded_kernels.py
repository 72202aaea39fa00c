"""The fused Triton seeded op against the one reference, over kinds, activations, blends, stages, dtypes and
odd shapes: y, rec_loss, dx, blueprint grads and all 8 telemetry fields.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); on a GPU machine
`TRITON_INTERPRET=0 pytest -m gpu tests/kernels` runs the same matrix natively.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from morpho_dist.blends import Blend
from morpho_dist.kernels.layout import TELEMETRY_FIELDS
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.lifecycle import BLENDED_STAGES, Stage
from morpho_dist.ops import seeded

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(INTERPRET, reason="native GPU run needs TRITON_INTERPRET=0"),
        ],
    ),
]

# (dtype, atol, rtol) for y and dx; gradients and telemetry accumulate in fp32 in both backends.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
]
GRAD_TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-3, 1e-3), torch.float16: (1e-3, 1e-3)}

# (leading dims, seeds, chunk): rows not a multiple of the block, seed counts not powers of two, 3-D inputs.
SHAPES = [
    pytest.param((37,), 11, 16, id="T37-N11-C16"),
    pytest.param((3, 13), 13, 24, id="3x13-N13-C24"),
    pytest.param((3, 3), 11, 200, id="3x3-N11-C200"),  # a wide chunk: the backward splits its dots' K
]
DIAG_SHAPES = [
    pytest.param((37,), 11, 3, id="T37-N11-C3"),
    pytest.param((3, 13), 40, 1, id="3x13-N40-C1"),
    pytest.param((21,), 11, 37, id="T21-N11-C37"),
]
BLENDS = ["additive", "multiplicative", "linear", "mixed"]
LOWRANK_MATHS = ["dots", "rank1"]  # both ways of running the blueprint, on every shape (auto picks per chunk)


def make_case(lead, n, c, *, kind, rank, blend, dtype, device, seed=0):
    """All 11 stages present (cycled over the seeds), random alphas, parameters big enough to matter."""
    g = torch.Generator().manual_seed(seed)
    h = n * c
    x = torch.randn(*lead, h, generator=g).to(dtype)
    dy = torch.randn(*lead, h, generator=g).to(dtype)
    stage = torch.tensor([i % len(Stage) for i in range(n)], dtype=torch.int8)
    if blend == "mixed":
        blend_ids = torch.tensor([(i * 7 // 3) % 3 for i in range(n)], dtype=torch.int8)
    else:
        blend_ids = torch.full((n,), int(Blend[blend.upper()]), dtype=torch.int8)
    alpha = torch.rand(n, generator=g)
    if kind == "lowrank":
        p0 = torch.randn(n, c, rank, generator=g) / c**0.5
        p1 = torch.randn(n, rank, c, generator=g) * 0.5
    else:
        p0 = 1 + 0.5 * torch.randn(n, c, generator=g)
        p1 = 0.5 * torch.randn(n, c, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return to(x), to(dy), to(stage), to(blend_ids), to(alpha), to(p0), to(p1)


def run_op(case, *, kind, act, backend, options=None, rec_weight=0.7, all_idle=False):
    x, dy, stage, blend, alpha, p0, p1 = case
    x = x.clone().requires_grad_()
    p0 = p0.clone().requires_grad_()
    p1 = p1.clone().requires_grad_()
    tel = torch.zeros(stage.numel(), len(TELEMETRY_FIELDS), device=x.device)
    op = dict(kind=kind, act=act, backend=backend, options=options, all_idle=all_idle)
    y, rec = seeded(x, stage, blend, alpha, p0, p1, tel, **op)
    (torch.sum(y.float() * dy.float()) + rec_weight * rec).backward()
    return {"y": y.detach(), "rec_loss": rec.detach(), "dx": x.grad, "dp0": p0.grad, "dp1": p1.grad, "tel": tel}


def assert_matches(got, want, dtype, atol, rtol):
    torch.testing.assert_close(got["y"], want["y"], atol=atol, rtol=rtol)
    torch.testing.assert_close(got["dx"], want["dx"], atol=atol, rtol=rtol)
    gatol, grtol = GRAD_TOL[dtype]
    torch.testing.assert_close(got["rec_loss"].float(), want["rec_loss"].float(), atol=gatol, rtol=grtol)
    for name in ("dp0", "dp1"):
        torch.testing.assert_close(got[name], want[name], atol=gatol, rtol=grtol, msg=lambda m, n=name: f"{n}: {m}")
    for i, field in enumerate(TELEMETRY_FIELDS):
        scale = want["tel"][:, i].abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            got["tel"][:, i],
            want["tel"][:, i],
            atol=gatol * scale,
            rtol=grtol,
            msg=lambda m, f=field: f"telemetry field {f}: {m}",
        )


def assert_passthrough(out, case, c):
    """Idle and TRAINING seeds: y bit-identical to x, dx bit-identical to dy."""
    x, dy, stage = case[0], case[1], case[2]
    keep = torch.tensor([Stage(int(s)) not in BLENDED_STAGES for s in stage.tolist()], device=x.device)
    cols = keep.repeat_interleave(c)
    assert torch.equal(out["y"][..., cols], x[..., cols])
    assert torch.equal(out["dx"][..., cols], dy[..., cols])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("lead, n, c", SHAPES)
@pytest.mark.parametrize("math", LOWRANK_MATHS)
def test_lowrank_matches_reference(device, dtype, atol, rtol, blend, act, lead, n, c, math):
    case = make_case(lead, n, c, kind="lowrank", rank=5, blend=blend, dtype=dtype, device=device)
    opts = KernelOptions(block_rows=16, block_cols=32, lowrank_math=math)
    got = run_op(case, kind="lowrank", act=act, backend="triton", options=opts)
    want = run_op(case, kind="lowrank", act=act, backend="reference")
    assert_matches(got, want, dtype, atol, rtol)
    assert_passthrough(got, case, c)
    assert_passthrough(want, case, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("lead, n, c", DIAG_SHAPES)
def test_diagonal_matches_reference(device, dtype, atol, rtol, blend, lead, n, c):
    case = make_case(lead, n, c, kind="diagonal", rank=0, blend=blend, dtype=dtype, device=device)
    opts = KernelOptions(block_rows=16, block_cols=16)
    got = run_op(case, kind="diagonal", act="relu", backend="triton", options=opts)
    want = run_op(case, kind="diagonal", act="relu", backend="reference")
    assert_matches(got, want, dtype, atol, rtol)
    assert_passthrough(got, case, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n, c", [("lowrank", 6, 16), ("diagonal", 24, 2)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_block_shapes_and_paths_agree(device, kind, n, c, deterministic):
    """Different tilings, row splits, the atomic vs deterministic result paths and the one- vs two-stream launch
    (overlap: off, the column kernel zeroes the lowrank total; on, it comes zero-filled) give the reference's answer."""
    case = make_case((70,), n, c, kind=kind, rank=16, blend="mixed", dtype=torch.float32, device=device, seed=3)
    want = run_op(case, kind=kind, act="gelu_tanh", backend="reference")
    tilings = [  # (block_rows, block_cols, lowrank_rows, overlap)
        (16, 16, 16, True), (32, 64, 32, False), (8, 0, 64, True), (4, 128, 16, True), (1, 512, 128, False),
        (2, 0, 16, False),
    ]  # fmt: skip
    maths = LOWRANK_MATHS if kind == "lowrank" else ["auto"]
    for (rows, cols, lowrank_rows, overlap), math in itertools.product(tilings, maths):
        opts = KernelOptions(
            block_rows=rows, block_cols=cols, deterministic=deterministic, lowrank_rows=lowrank_rows,
            lowrank_math=math, overlap=overlap,
        )  # fmt: skip
        got = run_op(case, kind=kind, act="gelu_tanh", backend="triton", options=opts)
        try:
            assert_matches(got, want, torch.float32, 1e-5, 1e-5)
        except AssertionError as e:
            raise AssertionError(f"{opts}: {e}") from None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n, c", [("lowrank", 6, 16), ("diagonal", 24, 2)])
def test_autotune_matches_reference_and_trials_leave_telemetry_alone(device, kind, n, c):
    """kernel.autotune times candidate tilings on scratch buffers: one call's telemetry is counted once."""
    case = make_case((70,), n, c, kind=kind, rank=16, blend="mixed", dtype=torch.float32, device=device, seed=4)
    want = run_op(case, kind=kind, act="relu", backend="reference")
    got = run_op(case, kind=kind, act="relu", backend="triton", options=KernelOptions(autotune=True))
    assert_matches(got, want, torch.float32, 1e-5, 1e-5)
    assert got["tel"][:, 0].tolist() == [70.0 * c] * n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n, c", [("lowrank", 5, 16), ("diagonal", 9, 3)])
def test_deterministic_is_bit_identical(device, kind, n, c):
    case = make_case((300,), n, c, kind=kind, rank=8, blend="mixed", dtype=torch.float32, device=device, seed=5)
    opts = KernelOptions(block_rows=16, block_cols=16, deterministic=True)
    first = run_op(case, kind=kind, act="relu", backend="triton", options=opts)
    second = run_op(case, kind=kind, act="relu", backend="triton", options=opts)
    for name in ("y", "dx", "dp0", "dp1", "tel", "rec_loss"):
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_telemetry_accumulates_until_read(device):
    case = make_case((20,), 4, 16, kind="lowrank", rank=4, blend="mixed", dtype=torch.float32, device=device)
    x, dy, stage, blend, alpha, p0, p1 = case
    tel = torch.zeros(4, 8, device=device)
    singles = []
    for scale in (1.0, 3.0):
        one = torch.zeros(4, 8, device=device)
        for buf in (tel, one):
            xx = (x * scale).requires_grad_()
            y, _ = seeded(xx, stage, blend, alpha, p0, p1, buf, kind="lowrank", backend="triton")
            y.backward(dy)
        singles.append(one)
    expect = singles[0] + singles[1]
    expect[:, 4] = torch.maximum(singles[0][:, 4], singles[1][:, 4])
    torch.testing.assert_close(tel, expect)
    assert tel[:, 0].tolist() == [2 * 20 * 16.0] * 4


@pytest.mark.parametrize("device", DEVICES)
def test_counterfactual_alpha_zero_is_the_host(device):
    """A seed's contribution is measured by calling the op with its alpha at 0: same code path, y = x there."""
    case = make_case((9,), 11, 16, kind="lowrank", rank=4, blend="additive", dtype=torch.float32, device=device)
    x, _, stage, blend, alpha, p0, p1 = case
    y, _ = seeded(x, stage, blend, torch.zeros_like(alpha), p0, p1, None, kind="lowrank", backend="triton")
    torch.testing.assert_close(y, x, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["lowrank", "diagonal"])
def test_nonfinite_idle_bank_does_not_leak(device, backend, kind):
    """A NaN/inf bank slice of an idle seed changes nothing: not its own passthrough, not its band neighbours."""
    case = make_case((9,), 11, 16, kind=kind, rank=4, blend="mixed", dtype=torch.float32, device=device, seed=7)
    clean = run_op(case, kind=kind, act="relu", backend=backend)
    x, dy, stage, blend, alpha, p0, p1 = case
    idle = [i for i, s in enumerate(stage.tolist()) if Stage(s) not in BLENDED_STAGES and s != Stage.TRAINING]
    p0, p1 = p0.clone(), p1.clone()
    p0[idle[0]] = float("nan")
    p1[idle[1]] = float("inf")
    dirty = run_op((x, dy, stage, blend, alpha, p0, p1), kind=kind, act="relu", backend=backend)
    for name in ("y", "dx", "rec_loss", "tel"):
        assert torch.equal(dirty[name], clean[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
def test_nonfinite_live_seed_stays_in_its_columns(device, backend, act):
    """A diverging TRAINING seed (NaN bank) and an inf in a blended seed's input reach no other seed, and the
    TRAINING seed's y and dx stay x and dy; the divergence shows in that seed's own telemetry."""
    case = make_case((9,), 11, 16, kind="lowrank", rank=4, blend="additive", dtype=torch.float32, device=device, seed=8)
    clean = run_op(case, kind="lowrank", act=act, backend=backend)
    x, dy, stage, blend, alpha, p0, p1 = case
    training = stage.tolist().index(int(Stage.TRAINING))
    blended = next(i for i, s in enumerate(stage.tolist()) if Stage(s) in BLENDED_STAGES)
    p0 = p0.clone()
    p0[training] = float("nan")
    x = x.clone()
    x[3, blended * 16 + 5] = float("inf")
    dirty = run_op((x, dy, stage, blend, alpha, p0, p1), kind="lowrank", act=act, backend=backend)
    others = [i for i in range(11) if i not in (training, blended)]
    keep = torch.zeros(11, dtype=torch.bool, device=device)
    keep[[*others, training]] = True
    cols = keep.repeat_interleave(16)  # per-seed mask -> per-feature mask, as in assert_passthrough
    for name in ("y", "dx"):
        assert torch.equal(dirty[name][:, cols], clean[name][:, cols]), name
    for name in ("dp0", "dp1", "tel"):
        assert torch.equal(dirty[name][others], clean[name][others]), name
    assert dirty["tel"][training, 7].isnan()  # delta_sq of the diverging seed
    assert not torch.isfinite(dirty["y"][3, blended * 16 + 5])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="streams need a CUDA device")
@pytest.mark.parametrize("deterministic", [False, True])
def test_overlapped_streams_match_one_stream_and_replay_from_a_graph(deterministic):
    """kernel.overlap runs the lowrank kernels on a side stream: the same results as one stream (bit for bit on
    the pass-through and blended outputs, which no two programs share), the same from a captured CUDA graph,
    and the caller's stream waits for the side stream before it returns."""
    case = make_case((4096,), 96, 16, kind="lowrank", rank=16, blend="mixed", dtype=torch.float32, device="cuda")
    serial = KernelOptions(overlap=False, deterministic=deterministic)
    overlapped = KernelOptions(overlap=True, deterministic=deterministic)
    want = run_op(case, kind="lowrank", act="relu", backend="triton", options=serial)
    got = run_op(case, kind="lowrank", act="relu", backend="triton", options=overlapped)
    if deterministic:  # fixed-order sums: identical however the two streams interleave
        for name in want:
            assert torch.equal(got[name], want[name]), name
    else:  # float atomics: only their order differs
        assert_matches(got, want, torch.float32, 0, 0)

    x, dy, stage, blend, alpha, p0, p1 = case
    x, p0, p1 = (t.clone().requires_grad_() for t in (x, p0, p1))
    tel = torch.zeros(stage.numel(), len(TELEMETRY_FIELDS), device="cuda")

    def step():
        # check_ids=False: checking the ids reads them on the host, and no host sync may run inside a capture
        opts = dict(kind="lowrank", act="relu", backend="triton", options=overlapped, check_ids=False)
        y, rec = seeded(x, stage, blend, alpha, p0, p1, tel, **opts)
        return (y, *torch.autograd.grad(torch.sum(y * dy) + 0.7 * rec, (x, p0, p1)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) off the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    tel.zero_()
    graph.replay()
    torch.testing.assert_close(outs[0], want["y"], atol=0, rtol=0)
    torch.testing.assert_close(outs[1], want["dx"], atol=0, rtol=0)
    torch.testing.assert_close(outs[2], want["dp0"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[3], want["dp1"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tel, want["tel"], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="graph capture needs a CUDA device")
def test_check_ids_inside_a_capture_is_refused_by_name():
    x, _dy, stage, blend, alpha, p0, p1 = make_case(
        (64,), 4, 16, kind="lowrank", rank=4, blend="mixed", dtype=torch.float32, device="cuda"
    )
    graph = torch.cuda.CUDAGraph()
    refused = pytest.raises(ValueError, match=r"check_ids=True .* allowed inside a capture: check_ids=False")
    with refused, torch.cuda.graph(graph):
        seeded(x, stage, blend, alpha, p0, p1, None, kind="lowrank", backend="triton", check_ids=True)
