"""kernel.autotune: pick the tiling of each (direction, layer shape) by timing a few candidates, once.

The launchers plan their grids on the host, so tuning happens here rather than in `triton.autotune`: each
candidate runs the real launcher on scratch outputs and a scratch copy of the telemetry (the caller's buffers
never see a trial), the column tiling first and then, for lowrank layers, the lowrank tiling. The choice is
kept per process. Tuning times on the device (one synchronisation per candidate), so it happens on the first
call of each shape and never during CUDA-graph capture (a capture uses the choice already made for its shape,
or the configured tiling); off CUDA the options are returned unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from morpho_dist.kernels.options import KernelOptions

# (block_rows, block_cols, warps); block_cols 0 is the auto width (every warp along the row, 512 bytes each).
COLUMN_TILES = ((8, 0, 2), (16, 0, 2), (4, 0, 4), (8, 0, 4), (16, 0, 1), (32, 0, 1), (8, 0, 8), (32, 256, 2))
LOWRANK_TILES = ((32, 2), (64, 4), (128, 4), (64, 8))  # (lowrank_rows, lowrank_warps)

_CHOSEN: dict[tuple, KernelOptions] = {}


def _bench_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


def select(
    candidates: Iterable[KernelOptions], run: Callable[[KernelOptions], object], timer=_bench_us
) -> KernelOptions:
    """The fastest candidate by `timer`; candidates that fail to compile or launch are skipped."""
    best, best_t = None, float("inf")
    for cand in candidates:
        try:
            t = timer(lambda cand=cand: run(cand))
        except Exception:  # noqa: BLE001  a tiling the compiler or the device refuses is not a choice
            continue
        if t < best_t:
            best, best_t = cand, t
    if best is None:
        raise RuntimeError("kernel.autotune: every candidate tiling failed to run")
    return best


def _column_candidates(opts: KernelOptions, direction: str) -> list[KernelOptions]:
    warps_key = "num_warps" if direction == "fwd" else "bwd_num_warps"
    return [dataclasses.replace(opts, block_rows=r, block_cols=c, **{warps_key: w}) for r, c, w in COLUMN_TILES]


def tuned(
    direction: str, key: tuple, opts: KernelOptions, device: torch.device,
    trials: Callable[[], Callable[[KernelOptions], object]], lowrank: bool, timer=_bench_us,
) -> KernelOptions:  # fmt: skip
    """The options to launch with: `opts` itself unless opts.autotune, else the cached or freshly timed choice.

    `trials()` is called on a cache miss only and returns `run(options)`, which launches one trial on scratch
    buffers; `key` names the shape (kind, rows, seeds, chunk, rank, dtype, ...).
    """
    if not opts.autotune or device.type != "cuda":
        return opts
    cache_key = (direction, key, opts)
    chosen = _CHOSEN.get(cache_key)
    if chosen is None and torch.cuda.is_current_stream_capturing():
        return opts  # no timing inside a CUDA-graph capture: an untuned shape keeps the configured tiling
    if chosen is None:
        base = dataclasses.replace(opts, autotune=False)
        run = trials()
        chosen = select(_column_candidates(base, direction), run, timer)
        if lowrank:
            tiles = [dataclasses.replace(chosen, lowrank_rows=r, lowrank_warps=w) for r, w in LOWRANK_TILES]
            chosen = select(tiles, run, timer)
        _CHOSEN[cache_key] = chosen
    return chosen


def chosen_tilings() -> dict[tuple, KernelOptions]:
    """What autotune picked so far in this process (for logs and benchmarks)."""
    return dict(_CHOSEN)
