"""seed / data / hybrid sharding on gloo match the single-process run: losses, telemetry tables, decisions."""

from __future__ import annotations

import os

import pytest

from tests.dist._harness import assert_matches, launch_shapes, train

pytestmark = pytest.mark.dist

STEPS = 55
RUN = [f"train.steps={STEPS}", "checkpoint.save_final=false", "train.log_every=0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(1, RUN, tmp_path_factory.mktemp("single"))[0]


@pytest.mark.parametrize("world, mode", [(2, "seed"), (2, "data"), (4, "hybrid")])
def test_sharded_run_matches_single_process(tmp_path, single, world, mode):
    assert_matches(single, train(world, [*RUN, f"sharding={mode}"], tmp_path), STEPS)


STEPS_TRITON = 10
INTERPRETED = [f"train.steps={STEPS_TRITON}", "kernel.backend=triton", "train.device=cpu", "controller.interval=5"]


@pytest.fixture(scope="module")
def single_interpreted(tmp_path_factory):
    return train(1, [*RUN, *INTERPRETED], tmp_path_factory.mktemp("one"), launches=True)[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("world, mode", [(2, "seed"), (4, "hybrid")])
def test_sharded_triton_kernels_match_single_process(tmp_path, single_interpreted, world, mode):
    """Each rank runs the (interpreted) Triton kernels on its seed shard; the run equals the one-process one."""
    single = single_interpreted
    outs = train(world, [*RUN, *INTERPRETED, f"sharding={mode}"], tmp_path / "many", launches=True)
    assert_matches(single, outs, STEPS_TRITON)
    full = launch_shapes(single)
    assert full == {("fwd", 32, 2), ("bwd", 32, 2)}  # the default host's embed: 32 features, 2 seeds
    seed = outs[0]["summary"]["mesh"]["seed"]
    for out in outs:
        assert launch_shapes(out) == {(d, f // seed, s // seed) for d, f, s in full}
