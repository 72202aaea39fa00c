"""Benchmark the fused seeded op against a plain copy of the same bytes and the PyTorch reference.

    python scripts/bench_op.py --out results/bench_op.json [--quick]

For every workload x {dormant, third} x {fp32, bf16} x {fwd, fwd+bwd}: the op's time (triton.testing.do_bench,
median), GB/s of the minimal traffic (fwd: read x + write y; fwd+bwd: also read dy + write dx), the ratio to a
device copy of the same number of bytes measured in the same run, and the speedup over the reference in eager
mode and under torch.compile. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton

from morpho_dist.blends import Blend
from morpho_dist.kernels import autotune
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.lifecycle import Stage, all_idle
from morpho_dist.ops import seeded, seeded_reference

# name: (rows T, seeds N, chunk C, kind, rank)
WORKLOADS = {
    "seed-1000": (32, 1000, 64, "lowrank", 16),
    "wide": (8192, 256, 16, "lowrank", 16),
    "coarse": (8192, 16, 256, "lowrank", 16),
    "big": (16384, 512, 16, "lowrank", 16),
    "per-node": (1024, 4096, 1, "diagonal", 0),
    "llm": (8192, 256, 16, "lowrank", 16),  # hidden 4096
}
BLENDED_CYCLE = (Stage.GRAFTING, Stage.STABILIZATION, Stage.FINE_TUNING, Stage.FOSSILIZED, Stage.EVALUATING)


def make_inputs(t, n, c, kind, rank, mix, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    h = n * c
    x = torch.randn(t, h, generator=g).to(device=device, dtype=dtype)
    stage = torch.zeros(n, dtype=torch.int8)
    blend = torch.zeros(n, dtype=torch.int8)
    if mix == "third":  # every third seed blended, with mixed blends and stages
        idx = torch.arange(0, n, 3)
        stage[idx] = torch.tensor([BLENDED_CYCLE[i % len(BLENDED_CYCLE)] for i in range(len(idx))], dtype=torch.int8)
        blend[idx] = torch.tensor([i % len(Blend) for i in range(len(idx))], dtype=torch.int8)
    alpha = torch.rand(n, generator=g)
    if kind == "lowrank":
        p0, p1 = torch.randn(n, c, rank, generator=g) / c**0.5, torch.randn(n, rank, c, generator=g) * 0.1
    else:
        p0, p1 = 1 + 0.1 * torch.randn(n, c, generator=g), 0.1 * torch.randn(n, c, generator=g)
    p0, p1 = (p.to(device).requires_grad_(requires_grad) for p in (p0, p1))
    tel = torch.zeros(n, 8, device=device)
    return x.requires_grad_(requires_grad), stage.to(device), blend.to(device), alpha.to(device), p0, p1, tel


def make_copy(x: torch.Tensor, pairs: int):
    """The bandwidth reference: `pairs` plain copies of a tensor shaped like x (fwd: x -> y; fwd+bwd: also
    dy -> dx), the op's minimal traffic in its own dtype and layout. Rows take the faster of its do_bench and
    graph-replayed timings: on an H200 (torch 2.11) a graph-replayed copy of a 512 MiB tensor ran at 2.8 TB/s,
    do_bench of the same copy at 4.2 TB/s, and a graph-only reference put the big workload past 100%."""
    bufs = [(x.detach().clone(), torch.empty_like(x)) for _ in range(pairs)]

    def copy() -> None:
        for src, dst in bufs:
            dst.copy_(src)

    return copy


def row_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def profile_call(fn, label: str) -> None:
    """Kernel-level GPU times of one call (torch.profiler) next to its host wall time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 20 * 1e6
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [(e.key, e.device_time_total) for e in events if e.device_time_total > 0]
    gpu = sum(t for _, t in kernels)
    top = ", ".join(f"{n[:28]}={t:.1f}" for n, t in sorted(kernels, key=lambda k: -k[1])[:4])
    host = sorted(((e.key, e.self_cpu_time_total) for e in events), key=lambda k: -k[1])[:6]
    host_top = ", ".join(f"{n[:32]}={t:.0f}" for n, t in host)
    print(f"  profile {label}: wall {wall:.1f} us/call, GPU {gpu:.1f} us: {top}\n    host: {host_top}", flush=True)
    import cProfile
    import io
    import pstats

    prof_py = cProfile.Profile()
    prof_py.enable()
    for _ in range(20):
        fn()
    prof_py.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof_py, stream=out).sort_stats("tottime").print_stats(8)
    print("\n".join("    " + line for line in out.getvalue().splitlines()[6:20]), flush=True)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def host_us(fn, calls: int = 50) -> float:
    """Host time per call: the wall clock of back-to-back calls, measured while the device keeps up."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def graph_us(fn) -> float:
    """Device time per call with the launches replayed from a CUDA graph (no host overhead)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def tiling_of(opts: KernelOptions, tuned_before: set) -> str:
    """The tiling the op ran with: what autotune picked for this workload, else the fixed options."""
    if not opts.autotune:
        return _short(opts)
    picked = autotune.chosen_tilings()
    return " / ".join(f"{key[0]} {_short(o)}" for key, o in picked.items() if key not in tuned_before)


def _short(o: KernelOptions) -> str:
    lowrank = f"lowrank {o.lowrank_rows} w{o.lowrank_warps} {o.lowrank_math}{' overlap' if o.overlap else ''}"
    return f"cols {o.block_rows}x{o.block_cols} w{o.num_warps}/{o.bwd_num_warps} {lowrank}"


def make_call(impl, inputs, kind, grad, dy, **kw):
    """One op call; with grad, the backward through torch.autograd.grad (no .grad accumulation kernels)."""
    x, stage, blend, alpha, p0, p1, tel = inputs
    wrt = [x, p0, p1]

    def run():
        y, _ = impl(x, stage, blend, alpha, p0, p1, tel, kind=kind, **kw)
        if grad:
            torch.autograd.grad(y, wrt, dy)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_op.json")
    ap.add_argument("--quick", action="store_true", help="fp32 only, no torch.compile peer")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument(
        "--compile-on", default="all", help="workloads[:mode] that get the torch.compile peer, e.g. wide:fwd+bwd"
    )
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--block-rows", type=int, default=KernelOptions.block_rows)
    ap.add_argument("--block-cols", type=int, default=KernelOptions.block_cols)
    ap.add_argument("--num-warps", type=int, default=KernelOptions.num_warps)
    ap.add_argument("--bwd-num-warps", type=int, default=KernelOptions.bwd_num_warps)
    ap.add_argument("--lowrank-rows", type=int, default=KernelOptions.lowrank_rows)
    ap.add_argument("--lowrank-warps", type=int, default=KernelOptions.lowrank_warps)
    ap.add_argument("--programs-per-sm", type=int, default=KernelOptions.programs_per_sm)
    ap.add_argument("--lowrank-math", default=KernelOptions.lowrank_math, help="auto | dots | rank1")
    ap.add_argument("--no-overlap", action="store_true", help="kernel.overlap=false: every kernel on one stream")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dot-precision", default="tf32")
    ap.add_argument("--profile", action="store_true", help="also print each call's kernels and host time")
    ap.add_argument("--autotune", action="store_true", help="kernel.autotune: pick the tiling per shape")
    ap.add_argument("--graph", action="store_true", help="also time the op replayed from a CUDA graph")
    ap.add_argument("--mixes", default="dormant,third", help="comma-separated subset of dormant,third")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager reference (tiling sweeps)")
    ap.add_argument(
        "--no-idle-hint", action="store_true", help="never pass all_idle (SeededLayer passes it for all-idle stages)"
    )
    args = ap.parse_args()
    if not set(args.mixes.split(",")) <= {"dormant", "third"}:
        ap.error(f"--mixes must be a comma-separated subset of dormant,third, got {args.mixes!r}")
    if not torch.cuda.is_available():
        sys.exit("bench_op.py needs a CUDA device")
    dev = torch.device("cuda")
    opts = KernelOptions(
        block_rows=args.block_rows, block_cols=args.block_cols, num_warps=args.num_warps,
        dot_precision=args.dot_precision, bwd_num_warps=args.bwd_num_warps,
        autotune=args.autotune, lowrank_rows=args.lowrank_rows, lowrank_warps=args.lowrank_warps,
        programs_per_sm=args.programs_per_sm, lowrank_math=args.lowrank_math, overlap=not args.no_overlap,
    )  # fmt: skip
    ref_compiled = torch.compile(seeded_reference, dynamic=False)
    # Past dynamo's recompile limit the peer would silently run eager: fail (reported per row) instead, and start
    # every workload with an empty cache so its shapes and dtypes stay well under the limit.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    rows = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    dtypes = [torch.float32] if args.quick else [getattr(torch, d) for d in args.dtypes.split(",")]
    with_compile = not (args.quick or args.no_compile)
    for name in args.workloads.split(","):
        t, n, c, kind, rank = WORKLOADS[name]
        torch._dynamo.reset()
        for mix, dtype, mode in itertools.product(args.mixes.split(","), dtypes, args.modes.split(",")):
            label = f"{name} {mix} {row_dtype(dtype)} {mode}"
            grad = mode == "fwd+bwd"
            inputs = make_inputs(t, n, c, kind, rank, mix, dtype, dev, grad)
            dy = torch.randn_like(inputs[0])
            nbytes = inputs[0].numel() * inputs[0].element_size() * (4 if grad else 2)
            copy = make_copy(inputs[0], 2 if grad else 1)
            t_copy = bench(copy)
            # what SeededLayer's idle record would promise the op for these stages (read off the clock)
            idle = all_idle(inputs[1].tolist()) and not args.no_idle_hint
            triton_kw = dict(backend="triton", options=opts, check_ids=False, all_idle=idle)
            ours = make_call(seeded, inputs, kind, grad, dy, **triton_kw)
            tuned_before = set(autotune.chosen_tilings())
            try:
                t_ours = bench(ours)
            except Exception as e:  # noqa: BLE001  one failing workload is reported, the rest still run
                print(f"  {label}: FAILED {type(e).__name__}: {e}"[:300], flush=True)
                continue
            chosen = tiling_of(opts, tuned_before)
            t_host = host_us(ours)
            t_graph = graph_us(ours) if args.graph else float("nan")
            t_copy_graph = graph_us(copy) if args.graph else float("nan")
            if args.profile:
                profile_call(ours, label)
            t_eager = float("nan")  # the eager reference is built and timed only when asked for
            if not args.no_eager:
                t_eager = bench(make_call(seeded_reference, inputs, kind, grad, dy, check_ids=False))
            t_comp = t_comp_graph = float("nan")
            if with_compile and (args.compile_on == "all" or any(
                w == name and m in ("", mode) for w, _, m in (s.partition(":") for s in args.compile_on.split(","))
            )):  # fmt: skip
                try:
                    compiled = make_call(ref_compiled, inputs, kind, grad, dy, check_ids=False)
                    t_comp = bench(compiled)
                    # Device time against device time: on a slow host do_bench of either side times the host.
                    t_comp_graph = graph_us(compiled) if args.graph else float("nan")
                except Exception as e:  # noqa: BLE001  a peer that fails to compile is reported, not fatal
                    print(f"torch.compile peer failed on {label}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
            row = {
                "workload": name, "T": t, "N": n, "C": c, "kind": kind, "mix": mix, "dtype": row_dtype(dtype),
                "mode": mode, "us": t_ours, "GBps": nbytes / t_ours / 1e3, "copy_GBps": nbytes / t_copy / 1e3,
                "frac_of_copy": t_copy / t_ours, "speedup_eager": t_eager / t_ours, "speedup_compile": t_comp / t_ours,
                "speedup_compile_graph": t_comp_graph / t_graph,
                "host_us": t_host, "graph_us": t_graph, "copy_graph_us": t_copy_graph,
                "graph_frac_of_copy": min(t_copy, t_copy_graph) / t_graph, "tiling": chosen, "all_idle": idle,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:10s} {mix:8s} {row['dtype']:9s} {mode:8s} {t_ours:9.1f} us {row['GBps']:8.0f} GB/s "
                f"copy {row['copy_GBps']:6.0f} GB/s  {100 * row['frac_of_copy']:5.1f}% of copy  "
                f"x{row['speedup_eager']:6.1f} eager  x{row['speedup_compile']:6.2f} compile "
                f"(graph x{row['speedup_compile_graph']:5.2f})  "
                f"host {t_host:5.0f} us  graph {100 * row['graph_frac_of_copy']:5.1f}%  {chosen}"
                f"{'  all_idle' if idle else ''}",
                flush=True,
            )
            with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
