"""The CPU counterpart (Triton's interpreter) of test_all_idle.py's GPU launch count: an eager forward and
backward of a known-idle lowrank layer launches the column kernels alone, one with a live seed also the two
lowrank kernels. Launches are counted by wrapping the kernels the launcher calls."""

import os

import pytest
import torch

from morpho_dist.kernels import launch
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")
KERNELS = ("_columns_fwd_kernel", "_columns_bwd_kernel", "_lowrank_fwd_kernel", "_lowrank_bwd_kernel")


class Counting:
    """Wraps a @triton.jit kernel: counts ``kernel[grid](...)`` launches, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("live", [False, True], ids=["known-idle", "one-training-seed"])
def test_eager_launches_follow_the_idle_record(monkeypatch, live):
    counts = {name: Counting(getattr(launch, name)) for name in KERNELS}
    for name, counting in counts.items():
        monkeypatch.setattr(launch, name, counting)
    layer = SeededLayer(64, 4, rank=4, backend="triton")
    if live:
        layer.germinate(3, step=0)
        layer.apply_stage_changes([(3, Stage.TRAINING)], step=1)
    assert layer.known_idle() is not live
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()
    launched = {name: c.launches for name, c in counts.items()}
    low = 1 if live else 0
    assert launched == {
        "_columns_fwd_kernel": 1,
        "_columns_bwd_kernel": 1,
        "_lowrank_fwd_kernel": low,
        "_lowrank_bwd_kernel": low,
    }
