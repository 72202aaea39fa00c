"""Checkpoints (torch.distributed.checkpoint) load under another sharding mode or world size."""

from __future__ import annotations

import pytest
import torch

from tests.dist._harness import read_full, resave_on, train

pytestmark = pytest.mark.dist

STEPS, EVERY = 40, 20
RUN = [f"train.steps={STEPS}", "train.log_every=0"]


def _same(a: dict, b: dict, *, exact: bool) -> None:
    assert set(a) == set(b)
    for key in a:
        if key == "meta":
            continue
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "save, load",
    [((2, "seed"), (1, "data")), ((1, "data"), (2, "seed")), ((2, "data"), (2, "seed"))],
    ids=["seed2-to-1", "1-to-seed2", "data2-to-seed2"],
)
def test_checkpoint_loads_under_another_mesh(tmp_path, save, load):
    world, mode = save
    saved = train(world, [*RUN, f"sharding={mode}", f"checkpoint.every={EVERY}"], tmp_path / "a")
    ckpt = saved[0]["summary"]["run_dir"] + f"/checkpoints/step_{EVERY:07d}"
    # 1. loading restores every seed state, bank, optimizer slice and host tensor exactly
    resave_on(load[0], [f"sharding={load[1]}"], ckpt, tmp_path / "resaved")
    original = read_full(ckpt)
    _same(original, read_full(tmp_path / "resaved"), exact=True)
    assert original["seeds.embed.bank.p0"].shape[0] == 2  # the whole population, whatever the mesh
    # 2. training continues as the uninterrupted run did
    resumed = train(load[0], [*RUN, f"sharding={load[1]}", f"checkpoint.resume={ckpt}"], tmp_path / "b")
    s_a, s_b = saved[0]["summary"], resumed[0]["summary"]
    assert s_b["seed_states"] == s_a["seed_states"]
    assert abs(s_b["val_loss"] - s_a["val_loss"]) <= 1e-5 * abs(s_a["val_loss"])
    ev = lambda out: [(e["step"], e["seed"], e["command"]) for e in out["record"].get("events", [])]  # noqa: E731
    assert ev(resumed[0]) == [e for e in ev(saved[0]) if e[0] > EVERY]
    final_a = read_full(s_a["run_dir"] + f"/checkpoints/step_{STEPS:07d}")
    final_b = read_full(s_b["run_dir"] + f"/checkpoints/step_{STEPS:07d}")
    _same(final_a, final_b, exact=False)
    for key in final_a:
        if key.startswith("seeds.") and not key.endswith(("telemetry", "p0", "p1", "alpha")):
            assert torch.equal(final_a[key], final_b[key]), key  # stages, generations, ... identical
