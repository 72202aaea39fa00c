"""The host optimizer's CUDA code paths, held on gloo: torch takes the multi-tensor (foreach) path by default on
CUDA, and the fused kernel on request. Under seed sharding the host holds tensor-parallel DTensor parameters
beside plain ones; in one param group both paths stop at the first step ("aten._foreach_lerp_.Scalar: got mixed
torch.Tensor and DTensor"). Forced here on the CPU, each matches the one-process run with the same options; so
does gradient clipping, whose global norm counts every element of the sharded host once (with SGD, whose update
scales with that norm: Adam's barely does)."""

from __future__ import annotations

import pytest

from tests.dist._harness import assert_matches, train

pytestmark = pytest.mark.dist

STEPS = 20
RUN = [f"train.steps={STEPS}", "checkpoint.save_final=false", "train.log_every=0"]


@pytest.mark.parametrize(
    "world, mode, options",
    [
        (2, "seed", ["optim.foreach=true"]),
        (2, "seed", ["optim.fused=true"]),
        (2, "seed", ["optim=sgd", "optim.foreach=true"]),
        (4, "hybrid", ["optim=sgd", "optim.max_grad_norm=0.05"]),
    ],
    ids=["seed-adamw-foreach", "seed-adamw-fused", "seed-sgd-foreach", "hybrid-sgd-clipped"],
)
def test_sharded_run_with_cuda_optimizer_paths(tmp_path, world, mode, options):
    single = train(1, [*RUN, *options], tmp_path / "one")[0]
    assert_matches(single, train(world, [*RUN, *options, f"sharding={mode}"], tmp_path / "many"), STEPS)
