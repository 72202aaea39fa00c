"""GPU tier of distribution: data / seed / hybrid sharding with the Triton kernels on CUDA, each rank on its shard.

With one GPU the ranks share it (train.ranks_per_device = world, gloo); with at least as many GPUs as ranks each
rank gets its own and the process group is NCCL. The tests are the same either way (``cuda_overrides``). Each
sharded run is compared with the one-process GPU run (deterministic fp32): global-batch losses and telemetry
tables within 1e-5 relative, identical lifecycle decisions and seed states.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch

from tests.dist._harness import assert_matches, launch_shapes, train

pytestmark = pytest.mark.gpu

STEPS = 20
RUN = [f"train.steps={STEPS}", "checkpoint.save_final=false", "train.log_every=0", "kernel.deterministic=true"]
MODELS = {"mlp": [], "transformer": ["model=transformer"]}
# (direction, features, seeds) of every launch of the one-process run: mlp's embed (32 features, 2 seeds),
# transformer's blocks.{0,1}.mlp.fc1 (64 features, 2 seeds each)
FULL_LAUNCHES = {"mlp": (32, 2), "transformer": (64, 2)}


def ranks_per_device(world: int) -> int:
    return -(-world // torch.cuda.device_count())


def cuda_overrides(world: int) -> list[str]:
    """One GPU per rank (NCCL) when there are enough, else ranks share GPUs (gloo: NCCL refuses that)."""
    shared = [f"train.ranks_per_device={ranks_per_device(world)}", "sharding.backend=auto"]
    return ["train.device=cuda", *shared, "kernel.backend=triton"]


@pytest.fixture(scope="module", params=list(MODELS))
def single(request, tmp_path_factory):
    model = request.param
    out = train(1, [*RUN, *MODELS[model], *cuda_overrides(1)], tmp_path_factory.mktemp(f"one-{model}"), launches=True)
    return model, out[0]


@pytest.mark.parametrize("world, mode", [(2, "data"), (2, "seed"), (4, "hybrid")])
def test_sharded_gpu_run_matches_one_process(tmp_path, single, world, mode):
    model, one = single
    outs = train(world, [*RUN, *MODELS[model], *cuda_overrides(world), f"sharding={mode}"], tmp_path, launches=True)
    assert_matches(one, outs, STEPS)
    summary = outs[0]["summary"]
    assert summary["device"].startswith("cuda") and summary["backend"] == "triton"
    dp, seed = summary["mesh"]["dp"], summary["mesh"]["seed"]
    features, seeds = FULL_LAUNCHES[model]
    assert launch_shapes(one) == {("fwd", features, seeds), ("bwd", features, seeds)}
    backward = lambda out: [r for d, _, r, _, _, _ in out["record"]["launches"] if d == "bwd"]  # noqa: E731
    per_device = ranks_per_device(world)
    for rank, out in enumerate(outs):
        # this rank's kernels ran on its own device, on its 1/seed of the features and seeds, and (training
        # steps: the backward launches) on its 1/dp of the batch rows, once per step and seeded layer
        assert {dev for _, dev, _, _, _, _ in out["record"]["launches"]} == {f"cuda:{rank // per_device}"}
        assert launch_shapes(out) == {(d, features // seed, seeds // seed) for d in ("fwd", "bwd")}
        assert backward(out) == [r // dp for r in backward(one)]


def test_checkpoint_saved_under_seed_resumes_under_data(tmp_path):
    every, steps = 10, 20
    run = [f"train.steps={steps}", "train.log_every=0", "kernel.deterministic=true", *cuda_overrides(2)]
    saved = train(2, [*run, "sharding=seed", f"checkpoint.every={every}"], tmp_path / "seed")
    ckpt = saved[0]["summary"]["run_dir"] + f"/checkpoints/step_{every:07d}"
    resumed = train(2, [*run, "sharding=data", f"checkpoint.resume={ckpt}"], tmp_path / "data")
    a, b = saved[0]["summary"], resumed[0]["summary"]
    assert b["sharding"] == "data" and b["device"].startswith("cuda")
    assert b["seed_states"] == a["seed_states"]
    assert abs(b["val_loss"] - a["val_loss"]) <= 1e-5 * abs(a["val_loss"])
    events = lambda out: [(e["step"], e["seed"], e["command"]) for e in out["record"].get("events", [])]  # noqa: E731
    assert events(resumed[0]) == [e for e in events(saved[0]) if e[0] > every]
