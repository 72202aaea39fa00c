"""The bandwidth bound of the blended workloads' access pattern, with no math: copies of exactly the bytes the
seeded kernels move, in the order they move them, against a plain copy of x measured in the same run.

    python scripts/bench_access.py [--out bench_access.json] [--workloads wide,big,coarse]

With every third seed blended (bench_op's "third" mix), a lowrank layer's bytes split in two patterns:
- blended: the lowrank kernel's, one seed's [BLOCK_T, C] tiles per program (C * element bytes per row: 64 B
  for wide in fp32), every third chunk of each row;
- idle: the column kernel's, [BLOCK_T, SPP * C] tiles with the blended seeds' columns masked out.
Timed alone, and on two streams at once as kernel.overlap runs them. A third variant is the one-kernel
alternative: dense [BLOCK_T, SPP * C] loads, the idle columns stored from them, each blended seed's rows
re-read (from cache) and stored per seed. Two more test ways of reading DRAM in longer runs with the op's two
kernels: the blended programs launched seed-major (the programs resident together hold neighbouring seeds of
the same rows, not one seed's row ranges), and the idle copy loading every column of its tiles (whole rows read
at once, so that the blended copy beside it could find its bytes in the L2). Each figure is its own bytes over
its time, as % of the copy's bandwidth. The tilings are the op's own (morpho_dist.kernels.launch.plan_tiles).
Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from morpho_dist.kernels.launch import plan_tiles
from morpho_dist.kernels.options import KernelOptions

PERIOD = 3  # every third seed blended, as in bench_op's "third" mix


@triton.jit
def _copy_blended_kernel(x_ptr, y_ptr, T, H, rows_per_split, C: tl.constexpr, BLOCK_T: tl.constexpr,
                         PERIOD: tl.constexpr, SEED_MAJOR: tl.constexpr):  # fmt: skip
    """Grid (row splits, seeds), as the lowrank kernel, or (seeds, row splits) with SEED_MAJOR: a program copies
    its seed's rows if the seed is blended."""
    if SEED_MAJOR:
        seed = tl.program_id(0)
        split = tl.program_id(1)
    else:
        split = tl.program_id(0)
        seed = tl.program_id(1)
    if seed % PERIOD == 0:
        c = tl.arange(0, C)
        for t0 in range(split * rows_per_split, (split + 1) * rows_per_split, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            m = (rows < T)[:, None]
            offs = rows[:, None] * H + seed * C + c[None, :]
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


@triton.jit
def _copy_groups_kernel(x_ptr, y_ptr, T, H, N, rows_per_split, C: tl.constexpr, SPP: tl.constexpr,
                        BLOCK_T: tl.constexpr, PERIOD: tl.constexpr, ONE_KERNEL: tl.constexpr,
                        SEED_ROWS: tl.constexpr, DENSE_LOADS: tl.constexpr):  # fmt: skip
    """Grid (row splits, groups of SPP seeds), as the column kernel: [BLOCK_T, SPP * C] tiles with the blended
    columns masked out. DENSE_LOADS: the loads take every column, the stores still only the idle ones.
    ONE_KERNEL: dense loads, and after every SEED_ROWS rows each blended seed of the group copies those rows as
    its own [SEED_ROWS, C] tile."""
    split = tl.program_id(0)
    group = tl.program_id(1)
    j = tl.arange(0, SPP * C)
    seeds = group * SPP + j // C
    idle = (seeds < N) & (seeds % PERIOD != 0)
    feats = group * SPP * C + j
    for r0 in range(split * rows_per_split, (split + 1) * rows_per_split, SEED_ROWS):
        for t0 in range(r0, r0 + SEED_ROWS, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            offs = rows[:, None] * H + feats[None, :]
            m_store = (rows < T)[:, None] & idle[None, :]
            m_load = (rows < T)[:, None] & (seeds < N)[None, :] if ONE_KERNEL or DENSE_LOADS else m_store
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m_load), mask=m_store)
        if ONE_KERNEL:
            c = tl.arange(0, C)
            rows = r0 + tl.arange(0, SEED_ROWS)
            for i in range(SPP):
                seed = group * SPP + i
                if (seed < N) & (seed % PERIOD == 0):
                    m = (rows < T)[:, None]
                    offs = rows[:, None] * H + seed * C + c[None, :]
                    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


def plans(x: torch.Tensor, seeds: int, opts: KernelOptions):
    """The op's column and lowrank grids for x [T, H] with `seeds` lowrank seeds of rank 16."""
    rows, hidden = x.shape
    chunk = hidden // seeds
    if chunk * seeds != hidden or chunk & (chunk - 1):
        raise ValueError(f"H / seeds must be a power of two, got H={hidden}, seeds={seeds}")
    plan = plan_tiles("lowrank", rows, seeds, chunk, 16, opts, x.device, opts.num_warps, x.element_size())
    if plan.columns.chunk_tile != chunk or plan.lowrank.chunk_tile != chunk:
        raise ValueError(f"chunk {chunk}: the op tiles it in pieces; this benchmark covers whole-chunk tiles only")
    return plan.columns, plan.lowrank


def copy_blended(x, y, seeds, opts, seed_major=False):
    _cols, low = plans(x, seeds, opts)
    rows, hidden = x.shape
    _copy_blended_kernel[(seeds, low.splits) if seed_major else (low.splits, seeds)](
        x, y, rows, hidden, low.rows_per_split, C=hidden // seeds, BLOCK_T=low.block_t, PERIOD=PERIOD,
        SEED_MAJOR=seed_major, num_warps=opts.lowrank_warps,
    )  # fmt: skip


def copy_idle(x, y, seeds, opts, one_kernel=False, seed_rows=64, dense_loads=False):
    cols, _low = plans(x, seeds, opts)
    rows, hidden = x.shape
    seed_rows = max(seed_rows, cols.block_t) if one_kernel else cols.block_t
    rows_per_split = triton.cdiv(cols.rows_per_split, seed_rows) * seed_rows
    _copy_groups_kernel[(triton.cdiv(rows, rows_per_split), cols.groups)](
        x, y, rows, hidden, seeds, rows_per_split, C=hidden // seeds, SPP=cols.seeds_per_prog,
        BLOCK_T=cols.block_t, PERIOD=PERIOD, ONE_KERNEL=one_kernel, SEED_ROWS=seed_rows, DENSE_LOADS=dense_loads,
        num_warps=opts.num_warps,
    )  # fmt: skip


def blended_columns(hidden: int, seeds: int, device) -> torch.Tensor:
    return (torch.arange(seeds, device=device) % PERIOD == 0).repeat_interleave(hidden // seeds)


def measure(x: torch.Tensor, seeds: int, opts: KernelOptions, side: torch.cuda.Stream) -> dict[str, tuple]:
    """{pattern: (device us, share of x's bytes)} for x [T, H], each copy checked first."""
    from bench_op import bench, graph_us, make_copy  # the op benchmark's timers and its copy reference

    y = torch.empty_like(x)
    blended = blended_columns(x.shape[1], seeds, x.device)

    def both(dense_loads=False, seed_major=False):
        side.wait_stream(torch.cuda.current_stream())
        copy_idle(x, y, seeds, opts, dense_loads=dense_loads)
        with torch.cuda.stream(side):
            copy_blended(x, y, seeds, opts, seed_major=seed_major)
        torch.cuda.current_stream().wait_stream(side)

    everything = torch.ones_like(blended)
    copy = make_copy(x, 1)
    out = {"copy": (min(graph_us(copy), bench(copy)), 1.0)}  # the faster of the two, as bench_op takes it
    variants = {
        "blended": (lambda: copy_blended(x, y, seeds, opts), blended),
        "blended, seed-major": (lambda: copy_blended(x, y, seeds, opts, seed_major=True), blended),
        "idle": (lambda: copy_idle(x, y, seeds, opts), ~blended),
        "both, two streams": (both, everything),
        "both, seed-major": (lambda: both(seed_major=True), everything),
        "both, dense idle loads": (lambda: both(dense_loads=True), everything),
        "one kernel": (lambda: copy_idle(x, y, seeds, opts, one_kernel=True), everything),
    }
    for label, (fn, done) in variants.items():
        y.zero_()
        fn()
        if not torch.equal(y[:, done], x[:, done]):
            raise RuntimeError(f"{label}: the copy is wrong")
        out[label] = (graph_us(fn), done.float().mean().item())
    return out


def main() -> None:
    from bench_op import WORKLOADS

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_access.json")
    ap.add_argument("--workloads", default="wide,big,coarse")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_access.py needs a CUDA device")
    opts, side = KernelOptions(), torch.cuda.Stream()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for name in args.workloads.split(","):
        t, n, c, _kind, _rank = WORKLOADS[name]
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            x = torch.randn(t, n * c, device="cuda").to(dtype)
            timed = measure(x, n, opts, side)
            copy_us = timed["copy"][0]
            for label, (us, share) in timed.items():
                dt = str(dtype).replace("torch.", "")
                row = {"workload": name, "dtype": dt, "pattern": label, "us": us, "share_of_bytes": share,
                       "copy_us": copy_us, "frac_of_copy_bw": share * copy_us / us}  # fmt: skip
                rows.append(row)
                print(
                    f"{name:7s} {row['dtype']:9s} {label:22s} {us:8.1f} us  ({100 * share:5.1f}% of the bytes)  "
                    f"{100 * row['frac_of_copy_bw']:5.1f}% of copy bandwidth",
                    flush=True,
                )
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
