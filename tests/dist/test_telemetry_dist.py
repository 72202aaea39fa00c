"""Two gloo processes: the all-reduced telemetry table, the collective count, and the decision check."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

WORLD = 2


def _layers(rank: int):
    from morpho_dist.layer import SeededLayer

    gen = torch.Generator().manual_seed(100 + rank)
    a = SeededLayer(32, 2, kind="diagonal", backend="reference", layer_key="a")  # replicated (data parallel)
    b = SeededLayer(16, 4, kind="diagonal", backend="reference", layer_key="b")
    # seed-sharded: rank r holds global seeds 2r, 2r+1 of 4
    c = SeededLayer(16, 2, kind="diagonal", backend="reference", layer_key="c", seed_offset=2 * rank)
    c.num_global_seeds = 4
    for layer in (a, b, c):
        layer.telemetry.copy_(torch.rand(layer.telemetry.shape, generator=gen) * 10)
    a.stage[1], a.alpha[1], a.steps_in_stage[1] = 3, 0.5, 4  # same state on both ranks
    c.stage[0], c.alpha[0] = (2, 0.0) if rank == 0 else (6, 1.0)  # each rank owns different seeds
    return {"a": a, "b": b, "c": c}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from morpho_dist.controller import Controller, decisions_checksum, verify_same_decisions
    from morpho_dist.telemetry import build_report

    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        layers = _layers(rank)
        local = {k: v.telemetry.clone() for k, v in layers.items()}
        calls = []
        real = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            names = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}
            calls.append(next((v for k, v in names.items() if op == k), "other"))
            return real(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        try:
            report = build_report(layers, step=7)
        finally:
            dist.all_reduce = real
        reset = all(int(torch.count_nonzero(v.telemetry)) == 0 for v in layers.values())

        decisions = Controller().decide(report, 7)
        same = decisions_checksum(decisions, {k: layers[k] for k in ("a", "b")})
        verify_same_decisions(same, step=7)  # identical reports -> identical decisions: passes
        try:
            verify_same_decisions(1000 + rank, step=7)
            mismatch = "no error"
        except RuntimeError as err:
            mismatch = str(err)
        torch.save(
            {
                "local": local,
                "table": report.table,
                "calls": calls,
                "reset": reset,
                "stages": [(s.layer, s.seed, int(s.stage), s.alpha) for s in report.seeds],
                "events": [d.to_event(7) for d in decisions],
                "mismatch": mismatch,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_rank_report_sum_max_and_decision_check(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]
    for out in r:
        assert out["calls"] == ["sum", "max"]  # exactly two collectives
        assert out["reset"]
        assert "step 7" in out["mismatch"]  # both ranks raise, naming the step
    # expected table: local tables placed at their global ranges, summed; absmax (field 4) takes the max
    expected = torch.zeros(3, 4, 8)
    for i in range(WORLD):
        for li, (name, off) in enumerate((("a", 0), ("b", 0), ("c", 2 * i))):
            t = r[i]["local"][name]
            n = t.shape[0]
            cur = expected[li, off : off + n]
            summed = cur + t
            summed[:, 4] = torch.maximum(cur[:, 4], t[:, 4])
            expected[li, off : off + n] = summed
    for out in r:
        torch.testing.assert_close(out["table"], expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(r[0]["table"], r[1]["table"], rtol=0, atol=0)
    # state: replicated seeds agree, sharded seeds are filled in from their owners
    assert r[0]["stages"] == r[1]["stages"]
    st = {(layer, seed): (stage, alpha) for layer, seed, stage, alpha in r[0]["stages"]}
    assert st[("a", 1)] == (3, 0.5)
    assert st[("c", 0)] == (2, 0.0) and st[("c", 2)] == (6, 1.0) and st[("c", 3)][0] == 0
    assert len(st) == 2 + 4 + 4
    assert r[0]["events"] == r[1]["events"]
