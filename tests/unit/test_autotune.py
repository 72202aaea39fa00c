"""kernel.autotune: choice logic with a fake timer (no device), and the no-CUDA fallback."""

import dataclasses

import pytest
import torch

from morpho_dist.kernels import autotune
from morpho_dist.kernels.options import KernelOptions


def test_select_picks_the_fastest_and_skips_failures():
    cands = [KernelOptions(block_rows=r) for r in (4, 8, 16)]
    cost = {4: 3.0, 8: 1.0, 16: 2.0}

    def run(o):
        if o.block_rows == 8 and o.block_cols == 256 and o.num_warps == 99:
            raise AssertionError("unreachable")
        return o

    def timer(fn):
        return cost[fn().block_rows]

    assert autotune.select(cands, run, timer).block_rows == 8

    def failing_timer(fn):
        o = fn()
        if o.block_rows == 8:
            raise RuntimeError("out of resources")
        return cost[o.block_rows]

    assert autotune.select(cands, run, failing_timer).block_rows == 16
    with pytest.raises(RuntimeError, match="every candidate tiling failed"):
        autotune.select(cands, run, lambda fn: (_ for _ in ()).throw(RuntimeError("no")))


def test_tuned_is_a_no_op_without_autotune_or_cuda():
    opts = KernelOptions(block_rows=16)
    calls = []
    assert autotune.tuned("fwd", ("k",), opts, torch.device("cuda"), lambda: calls.append, lowrank=True) is opts
    tuned_opts = dataclasses.replace(opts, autotune=True)
    got = autotune.tuned("fwd", ("k",), tuned_opts, torch.device("cpu"), lambda: calls.append, lowrank=True)
    assert got is tuned_opts
    assert calls == []


def test_tuned_times_columns_then_lowrank_and_caches(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    seen = []

    def timer(fn):
        o = fn()
        seen.append(o)
        # fastest column tiling: 32 x 256 with 2 warps; fastest lowrank tiling: 128 rows
        return abs(o.block_rows - 32) + abs(o.block_cols - 256) / 64 + abs(o.lowrank_rows - 128) / 32

    opts = KernelOptions(autotune=True)
    made = []

    def trials():
        made.append(1)
        return lambda o: o

    chosen = autotune.tuned("fwd", ("shape",), opts, torch.device("cuda"), trials, lowrank=True, timer=timer)
    assert (chosen.block_rows, chosen.block_cols, chosen.lowrank_rows) == (32, 256, 128)
    assert chosen.autotune is False and all(o.autotune is False for o in seen)
    assert len(seen) == len(autotune.COLUMN_TILES) + len(autotune.LOWRANK_TILES)
    again = autotune.tuned("fwd", ("shape",), opts, torch.device("cuda"), trials, lowrank=True, timer=timer)
    assert again is chosen and len(seen) == len(autotune.COLUMN_TILES) + len(autotune.LOWRANK_TILES)
    assert made == [1]  # scratch buffers are made on a cache miss only
    bwd = autotune.tuned("bwd", ("shape",), opts, torch.device("cuda"), trials, lowrank=False, timer=timer)
    assert bwd.bwd_num_warps in {w for _, _, w in autotune.COLUMN_TILES}
    assert autotune.chosen_tilings()[("fwd", ("shape",), opts)] is chosen


def test_capture_uses_the_cached_choice_and_never_times(monkeypatch):
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    opts = KernelOptions(autotune=True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def no_timing(fn):
        raise AssertionError("timed inside a capture")

    assert autotune.tuned("fwd", ("s",), opts, cuda, lambda: lambda o: o, lowrank=False, timer=no_timing) is opts
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    chosen = autotune.tuned("fwd", ("s",), opts, cuda, lambda: lambda o: o, lowrank=False, timer=lambda fn: 1.0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.tuned("fwd", ("s",), opts, cuda, lambda: lambda o: o, lowrank=False, timer=no_timing) is chosen
