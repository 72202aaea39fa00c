"""reliability's rollback marking, desync diagnosis and test hooks in one process (fast; the mutation script's
tests for reliability.py): which seeds a restore marks ROLLED_BACK, the per-seed digests and the first
difference between ranks that DesyncError names, the checksum collective in a one-rank gloo group, and the
fault-injection kill switch."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from morpho_dist import reliability
from morpho_dist.commands import advance, germinate
from morpho_dist.controller import Decision
from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import Stage
from morpho_dist.reliability import (
    DesyncError,
    _first_difference,
    _seed_digests,
    blending_seeds,
    check_same_decisions,
    hook,
    mark_rolled_back,
    maybe_kill,
)


def _layer(stages: list[Stage], key: str = "fc", seed_offset: int = 0) -> SeededLayer:
    layer = SeededLayer(
        4 * len(stages), len(stages), kind="diagonal", backend="reference", layer_key=key, seed_offset=seed_offset
    )
    for i, stage in enumerate(stages):
        if stage == Stage.DORMANT:
            continue
        germinate(layer, seed_offset + i, 0)
        while Stage(int(layer.stage[i])) != stage:
            advance(layer, seed_offset + i, 0)
    return layer


class Resets:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def reset_seed(self, key: str, index: int) -> None:
        self.calls.append((key, index))


def test_mark_rolled_back_takes_live_seeds_this_rank_holds():
    layer = _layer([Stage.GRAFTING, Stage.FOSSILIZED, Stage.TRAINING, Stage.DORMANT])
    resets = Resets()
    seeds = [("fc", 0), ("fc", 1), ("fc", 2), ("fc", 3), ("fc", 9)]  # seed 9: another shard's
    done = mark_rolled_back({"fc": layer}, seeds, step=40, optimizers=resets)
    assert done == [("fc", 0, "GRAFTING"), ("fc", 2, "TRAINING")]
    assert layer.stages() == [Stage.ROLLED_BACK, Stage.FOSSILIZED, Stage.ROLLED_BACK, Stage.DORMANT]
    assert resets.calls == [("fc", 0), ("fc", 2)]


def test_blending_seeds_are_grafting_to_fine_tuning():
    stages = [Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING]
    report = SimpleNamespace(seeds=[SimpleNamespace(layer="fc", seed=i, stage=s) for i, s in enumerate(stages)])
    assert blending_seeds(report) == [("fc", 1), ("fc", 2), ("fc", 3), ("fc", 4)]


def test_seed_digests_follow_decisions_streaks_and_state():
    layer = _layer([Stage.TRAINING, Stage.DORMANT])
    other = _layer([Stage.DORMANT, Stage.DORMANT], key="g", seed_offset=2)  # holds global seeds 2, 3 of 0..3
    layers = {"fc": layer, "g": other}
    ctl = SimpleNamespace(streaks={"fc:0": 1})
    base = _seed_digests([], layers, ctl)
    assert set(base) == {("fc", 0), ("fc", 1), ("g", 0), ("g", 1), ("g", 2), ("g", 3)}
    assert base[("fc", 0)]["stage"] == "TRAINING" and base[("fc", 0)]["generation"] == 1
    assert "state" not in base[("g", 0)] and base[("g", 2)]["stage"] == "DORMANT"  # not held here: no state
    cull = Decision("fc", 1, "cull", Stage.CULLED, 5.0, "x", {})
    decided = _seed_digests([cull], layers, ctl)
    assert decided[("fc", 1)]["decision"] != base[("fc", 1)]["decision"]
    assert decided[("fc", 0)] == base[("fc", 0)]
    assert _seed_digests([], layers, SimpleNamespace(streaks={}))[("fc", 0)]["decision"] != base[("fc", 0)]["decision"]
    with torch.no_grad():
        layer.bank.p1[1] += 1.0
    moved = _seed_digests([], layers, ctl)
    assert moved[("fc", 1)]["state"] != base[("fc", 1)]["state"] and moved[("fc", 0)] == base[("fc", 0)]
    layer.alpha[0] = 0.5
    assert _seed_digests([], layers, ctl)[("fc", 0)]["state"] != base[("fc", 0)]["state"]


def test_first_difference_names_the_first_seed_and_what_differs():
    same = {"decision": "a", "state": "s", "stage": "TRAINING", "generation": 1}
    r0 = {("fc", 0): same, ("fc", 1): dict(same), ("g", 0): dict(same)}
    r1 = {("fc", 0): same, ("fc", 1): {**same, "state": "t", "stage": "CULLED"}, ("g", 0): {**same, "decision": "b"}}
    order = [("fc", 0), ("fc", 1), ("g", 0)]
    assert _first_difference([r0, r1], order) == (
        "first differing seed: layer 'fc' seed 1 (state differ; rank 0: stage TRAINING generation 1, "
        "rank 1: stage CULLED generation 1)"
    )
    assert _first_difference([r0, r1], [("g", 0)]).startswith("first differing seed: layer 'g' seed 0 (decisions")
    assert _first_difference([r0, r0], order).startswith("no seed differs")
    held_once = {("fc", 1): {"decision": "a"}}  # a seed only rank 0 holds: its state is compared with nothing
    assert _first_difference([r0, held_once], [("fc", 1)]).startswith("no seed differs")


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_check_same_decisions_in_a_one_rank_group(one_rank, monkeypatch, tmp_path):
    """One rank agrees with itself; a checksum that comes back different (as another rank's would) raises
    DesyncError naming the step, and here no seed differs (one rank's digests only)."""
    layers = {"fc": _layer([Stage.TRAINING, Stage.DORMANT]), "g": _layer([Stage.DORMANT] * 3, key="g")}
    check_same_decisions([], layers, None, None, step=10)
    dist.destroy_process_group()
    check_same_decisions([], layers, None, None, step=10)  # without a process group: nothing to compare
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store2", rank=0, world_size=1)
    real = dist.all_reduce

    def other_rank_differs(t, op=None, group=None):
        real(t, op=op)
        t[0] += 1  # the MAX of (checksum, -checksum) over ranks: some rank's checksum is one larger

    monkeypatch.setattr(dist, "all_reduce", other_rank_differs)
    with pytest.raises(DesyncError, match=r"^step 20: ranks are desynchronised .*no seed differs.*every rank stops$"):
        check_same_decisions([], layers, None, None, step=20)

    def a_second_rank(out, obj):  # as if a rank 1 held other states for seeds 2 and 1 of layer g and seed 1 of fc
        other = {k: dict(v) for k, v in obj.items()}
        for key in (("g", 2), ("g", 1), ("fc", 1)):
            if key in other:
                other[key]["state"] = "different"
        out[:] = [obj, other]

    monkeypatch.setattr(dist, "all_gather_object", a_second_rank)
    with pytest.raises(DesyncError, match=r"first differing seed: layer 'fc' seed 1 \(state differ"):
        check_same_decisions([], layers, None, None, step=30)
    del layers["fc"]
    with pytest.raises(DesyncError, match=r"first differing seed: layer 'g' seed 1 \(state differ"):
        check_same_decisions([], layers, None, None, step=40)


@pytest.mark.parametrize("key", ["g", "blocks.0.mlp", "layers.7.up_proj"])
def test_desync_names_the_lowest_differing_seed_of_a_layer(one_rank, monkeypatch, key):
    """Seeds 1-63 of a 64-seed layer differ on the other rank: the message names seed 1, whatever order a set of
    (layer, seed) keys iterates in (string hashes vary per process; three layer names make a lucky order for a
    wrong sort key about a 1-in-250,000 event)."""
    layers = {key: _layer([Stage.DORMANT] * 64, key=key)}
    real = dist.all_reduce

    def other_rank_differs(t, op=None, group=None):
        real(t, op=op)
        t[0] += 1

    def a_second_rank(out, obj):
        other = {k: dict(v) for k, v in obj.items()}
        for k in other:
            if k[1] >= 1:
                other[k]["state"] = "different"
        out[:] = [obj, other]

    monkeypatch.setattr(dist, "all_reduce", other_rank_differs)
    monkeypatch.setattr(dist, "all_gather_object", a_second_rank)
    with pytest.raises(DesyncError, match=rf"first differing seed: layer '{re.escape(key)}' seed 1 \(state differ"):
        check_same_decisions([], layers, None, None, step=50)


def test_mark_rolled_back_gathers_every_ranks_seeds(one_rank, monkeypatch):
    layer = _layer([Stage.GRAFTING, Stage.DORMANT])
    assert mark_rolled_back({"fc": layer}, [("fc", 0), ("fc", 1)], 9, Resets()) == [("fc", 0, "GRAFTING")]
    layer = _layer([Stage.GRAFTING, Stage.DORMANT])

    def and_a_second_rank(out, obj):
        out[:] = [obj, [("fc", 7, "TRAINING")]]

    monkeypatch.setattr(dist, "all_gather_object", and_a_second_rank)
    done = mark_rolled_back({"fc": layer}, [("fc", 0), ("fc", 7)], 9, Resets())
    assert done == [("fc", 0, "GRAFTING"), ("fc", 7, "TRAINING")]


def test_maybe_kill_once_at_its_step_and_rank(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    monkeypatch.delenv(reliability.KILL_STEP_ENV, raising=False)
    maybe_kill(3, 0, str(tmp_path))
    monkeypatch.setenv(reliability.KILL_STEP_ENV, "3")
    maybe_kill(2, 0, str(tmp_path))  # another step
    monkeypatch.setenv(reliability.KILL_RANK_ENV, "1")
    maybe_kill(3, 0, str(tmp_path))  # another rank
    assert exits == [] and not os.listdir(tmp_path)
    maybe_kill(3, 1, str(tmp_path))
    assert exits == [1] and os.path.exists(tmp_path / reliability.KILL_MARKER)
    maybe_kill(3, 1, str(tmp_path))  # the restarted attempt lives
    assert exits == [1]
    monkeypatch.delenv(reliability.KILL_RANK_ENV)
    other = tmp_path / "other"
    other.mkdir()
    maybe_kill(3, 0, str(other))  # rank 0 by default
    assert exits == [1, 1]


def test_hooks_default_to_identity_and_call_the_registered_function(monkeypatch):
    assert hook("loss", 5, 1.25) == 1.25 and hook("before_step", 5, object()) is None
    monkeypatch.setitem(reliability.HOOKS, "loss", lambda step, loss: loss * step)
    assert hook("loss", 4, 1.25) == 5.0
