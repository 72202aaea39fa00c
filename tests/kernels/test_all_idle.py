"""The op's all_idle promise (no seed TRAINING or blended): kept, the column kernel alone gives the reference's
answer for every output, gradient and telemetry field; broken, the seeds that break it get NaN in their columns
of y and dx on both backends, and every other column is as without the promise."""

from __future__ import annotations

import pytest
import torch

from morpho_dist.kernels.options import KernelOptions
from morpho_dist.lifecycle import IDLE_STAGES, Stage
from tests.kernels.test_seeded_kernels import DEVICES, DTYPES, assert_matches, make_case, run_op

IDLE = sorted(int(s) for s in IDLE_STAGES)
CASES = [  # (kind, leading dims, seeds, chunk): odd rows and seed counts, a wide lowrank chunk
    pytest.param("lowrank", (37,), 11, 16, id="lowrank-T37-N11-C16"),
    pytest.param("lowrank", (3, 3), 5, 200, id="lowrank-3x3-N5-C200"),
    pytest.param("diagonal", (21,), 11, 37, id="diagonal-T21-N11-C37"),
    pytest.param("diagonal", (3, 13), 40, 1, id="diagonal-3x13-N40-C1"),
]


def _with_stages(case, stages):
    x, dy, _stage, blend, alpha, p0, p1 = case
    return x, dy, torch.tensor(stages, dtype=torch.int8, device=x.device), blend, alpha, p0, p1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
@pytest.mark.parametrize("kind, lead, n, c", CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_kept_promise_matches_reference(device, dtype, atol, rtol, kind, lead, n, c, deterministic):
    """Every idle stage present: y, rec_loss, dx, blueprint grads and telemetry as the reference computes them,
    and bit for bit as the same kernels without the promise."""
    case = make_case(lead, n, c, kind=kind, rank=8, blend="mixed", dtype=dtype, device=device, seed=5)
    case = _with_stages(case, [IDLE[i % len(IDLE)] for i in range(n)])
    opts = KernelOptions(deterministic=deterministic)
    want = run_op(case, kind=kind, act="gelu_tanh", backend="reference")
    got = run_op(case, kind=kind, act="gelu_tanh", backend="triton", options=opts, all_idle=True)
    assert_matches(got, want, dtype, atol, rtol)
    plain = run_op(case, kind=kind, act="gelu_tanh", backend="triton", options=opts)
    for name in ("y", "dx", "dp0", "dp1", "rec_loss"):
        assert torch.equal(got[name], plain[name]), name
    assert torch.equal(got["y"], case[0]) and torch.equal(got["dx"], case[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind, lead, n, c", CASES)
def test_broken_promise_is_nan_in_the_live_columns(device, backend, kind, lead, n, c):
    """Stages cycle over all 11 (TRAINING and blended ones among them) while the caller promises all idle."""
    case = make_case(lead, n, c, kind=kind, rank=8, blend="mixed", dtype=torch.float32, device=device, seed=6)
    live = torch.tensor([Stage(int(s)) not in IDLE_STAGES for s in case[2].tolist()], device=device)
    assert live.any() and not live.all()
    cols = live.repeat_interleave(c)
    honest = run_op(case, kind=kind, act="relu", backend=backend)
    broken = run_op(case, kind=kind, act="relu", backend=backend, all_idle=True)
    for name in ("y", "dx"):
        assert broken[name][..., cols].isnan().all(), name
        assert torch.equal(broken[name][..., ~cols], honest[name][..., ~cols]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel launches are counted on a CUDA device")
@pytest.mark.parametrize("live", [False, True])
def test_a_known_idle_lowrank_layer_launches_the_column_kernel_alone(live):
    from torch.profiler import ProfilerActivity, profile

    from morpho_dist.layer import SeededLayer

    layer = SeededLayer(256, 16, rank=4, backend="triton").cuda()
    if live:
        layer.germinate(3, step=0)
        layer.apply_stage_changes([(3, Stage.TRAINING)], step=1)
    assert layer.known_idle() is not live
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # compiles the kernels off the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x).sum().backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_time_total > 0]
    lowrank = [n for n in names if "_lowrank_" in n]
    assert any("_columns_fwd_kernel" in n for n in names) and any("_columns_bwd_kernel" in n for n in names)
    assert len(lowrank) == (2 if live else 0), names
