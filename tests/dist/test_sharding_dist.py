"""seed / data / hybrid sharding on gloo match the single-process run: losses, telemetry tables, decisions."""

from __future__ import annotations

import pytest

from tests.dist._harness import train

pytestmark = pytest.mark.dist

STEPS = 55
RUN = [f"train.steps={STEPS}", "checkpoint.save_final=false", "train.log_every=0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(1, RUN, tmp_path_factory.mktemp("single"))[0]


def _global_losses(outs: list[dict]) -> list[tuple[int, float]]:
    """Per step, the mean over the dp replicas (seed shard 0) of their local-batch mean losses."""
    reps = [o for o in outs if _coords(o)[1] == 0]
    steps = [s for s, _ in reps[0]["record"]["losses"]]
    return [(s, sum(o["record"]["losses"][i][1] for o in reps) / len(reps)) for i, s in enumerate(steps)]


def _coords(out: dict) -> tuple[int, int]:
    rank = out["record"].get("rank", None)
    ranks = out["summary"]["ranks"]
    me = ranks[rank] if rank is not None else ranks[0]
    return me["dp_rank"], me["seed_rank"]


def _decisions(events: list[dict]) -> list[tuple]:
    return [(e["step"], e["layer"], e["seed"], e["command"], e["from"], e["to"]) for e in events]


@pytest.mark.parametrize("world, mode", [(2, "seed"), (2, "data"), (4, "hybrid")])
def test_sharded_run_matches_single_process(tmp_path, single, world, mode):
    outs = train(world, [*RUN, f"sharding={mode}"], tmp_path)
    for r, o in enumerate(outs):
        o["record"]["rank"] = r
    ref_losses = single["record"]["losses"]
    assert len(ref_losses) == STEPS
    got = _global_losses(outs)
    assert [s for s, _ in got] == [s for s, _ in ref_losses]
    for (step, a), (_, b) in zip(ref_losses, got):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    ref_tables = single["record"]["tables"]
    assert len(ref_tables) == STEPS // 5
    for o in outs:
        tables = o["record"]["tables"]
        assert [s for s, _ in tables] == [s for s, _ in ref_tables]
        for (step, want), (_, have) in zip(ref_tables, tables):
            scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # per layer and field
            err = ((have - want).abs() / scale).max()
            assert err <= 1e-5, (step, float(err))
        assert _decisions(o["record"]["events"]) == _decisions(single["record"]["events"])
    assert _decisions(single["record"]["events"]), "the controller made no decision"
    s0 = outs[0]["summary"]
    assert s0["seed_states"] == single["summary"]["seed_states"]
    assert s0["seeds_identical_across_ranks"]
    assert s0["params"] == single["summary"]["params"]
    # each seed shard holds 1/seed of the blueprint banks and of the seed optimizer state
    full = single["summary"]["ranks"][0]
    seed = s0["mesh"]["seed"]
    for info in s0["ranks"]:
        assert info["blueprint_bytes"] * seed == full["blueprint_bytes"]
        assert info["seed_optimizer_bytes"] * seed == full["seed_optimizer_bytes"]
