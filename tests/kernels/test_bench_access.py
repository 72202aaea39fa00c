"""scripts/bench_access.py's copies move exactly the bytes they stand for (Triton interpreter or GPU): the
blended pattern every third seed's columns (in either grid order), the idle pattern the rest (with or without
dense loads), the one-kernel variant all of them."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_access import blended_columns, copy_blended, copy_idle  # noqa: E402

from morpho_dist.kernels.options import KernelOptions  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# gpu: the documented GPU command (-m gpu) runs it; interpret: it runs in Triton's interpreter on the CPU too
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.interpret,
    pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1"),
]


@pytest.mark.parametrize("rows, seeds, chunk", [(40, 12, 16), (33, 7, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_access_copies_touch_exactly_their_columns(rows, seeds, chunk, dtype):
    x = torch.randn(rows, seeds * chunk).to(device=DEVICE, dtype=dtype)
    blended = blended_columns(seeds * chunk, seeds, x.device)
    assert blended.sum() == chunk * len(range(0, seeds, 3))
    opts = KernelOptions()
    for copy, want in (
        (lambda y: copy_blended(x, y, seeds, opts), blended),
        (lambda y: copy_blended(x, y, seeds, opts, seed_major=True), blended),
        (lambda y: copy_idle(x, y, seeds, opts), ~blended),
        (lambda y: copy_idle(x, y, seeds, opts, dense_loads=True), ~blended),
        (lambda y: copy_idle(x, y, seeds, opts, one_kernel=True, seed_rows=16), torch.ones_like(blended)),
    ):
        y = torch.full_like(x, float("nan"))
        copy(y)
        assert torch.equal(y[:, want], x[:, want])
        assert y[:, ~want].isnan().all()  # untouched
