"""Time one training step (forward, backward, optimizer) of a host with SeededLayers against the same host without.

    python scripts/bench_step.py --out /tmp/bench_step.json    # defaults: 4 MLP blocks of hidden 4096, 8192 tokens
    python scripts/bench_step.py --host llama --hidden 1024 --layers 8 --modes eager,compile,cudagraph
    python scripts/bench_step.py --device cpu --hidden 64 --tokens 32 --layers 2 --seeds-per-layer 4 --steps 3

Hosts (scripts/bench_hosts.py): ``transformer`` (default), ``--layers`` pre-norm MLP blocks
``x + down(gelu(up(norm(x))))`` of width ``--hidden`` over ``--tokens`` rows, MSE against a fixed target, seeds
on ``down``; ``mlp`` the same without norm and residual; ``llama``, a ``transformers`` LlamaForCausalLM built from
a config (random init: ``--hidden``, ``--layers``, ``--intermediate``, ``--heads``, ``--vocab``), ``--tokens``
tokens a step in sequences of ``--seq``, its own causal-LM loss, seeds on ``up_proj`` and ``down_proj``
(``--targets`` overrides either). Params and activations in ``--dtype``; the host optimizer is AdamW (fused and
capturable on CUDA), the seed banks' the train loop's SeedOptimizer.

Variants: ``baseline`` (the host alone), ``dormant`` (a SeededLayer at every target, lowrank seeds,
``--seeds-per-layer`` of them, rank ``--rank``, all DORMANT), ``third`` (every third seed moved through the
lifecycle commands to a blended stage: GRAFTING, STABILIZATION, FINE_TUNING, FOSSILIZED, EVALUATING in turn, mixed
blends, alpha in (0, 1), a non-zero bank). The seeded step is the train loop's: forward in training mode
(telemetry on), loss plus ``--rec-weight`` times each layer's ``rec_loss``, backward, host optimizer +
SeedOptimizer step, the alpha schedule's ``step_`` and ``tick_`` on every layer. ``--guard`` adds eager rows with
the reliability guard on (``SeedGuard`` and ``optim.guarded_step``; the baseline runs the same guard).

Modes (``--modes``): ``eager``; ``compile``, every block compiled with ``torch.compile`` (torchtitan's per-block
compile: the seeded op runs as its custom ops inside the blocks' graphs); ``cudagraph``, the whole step captured
into one CUDA graph (morpho_dist.capture.CapturedStep) and replayed. Each row warms up (``--warmup`` steps:
compile, autotune, capture happen there), then ``--steps`` steps are timed one by one with CUDA events (CPU: wall
clock); reported: the median, the overhead over the same mode's baseline, and the device time per step (the
kernels' summed time over ``--profile-steps`` profiled steps; the gap to the step time is the device waiting on the
host), and the host time to issue one step from an idle device (``host_ms``; ``--profile-table N`` adds the
eager rows' top N host ops by the profiler). On CUDA the timed steps run under
``torch.cuda.set_sync_debug_mode("error")``: a step that synchronises with the host is reported in the row's
``host_syncs`` (the op and where it was called), and the row is then timed again without the check. A row that
fails records its error and the run goes on.

Host time per seeded-layer call (``--host-calls`` passes, 0: off): a chain of 16 layers configured like the host's
first seeded layer, all DORMANT and with a third blended, called on 8 rows (device time negligible), wall clock
per call of the forward and of the backward (scripts/bench_host_path.py's chain), under the sync check too.

Imports neither Hydra nor wandb: the few config values the train loop reads are plain arguments here.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_* modules, however this is run

from bench_host_path import time_calls  # noqa: E402
from bench_hosts import build_host  # noqa: E402

from morpho_dist.blends import NUM_BLENDS  # noqa: E402
from morpho_dist.capture import CapturedStep  # noqa: E402
from morpho_dist.commands import advance, germinate, tick_  # noqa: E402
from morpho_dist.kernels.options import KernelOptions  # noqa: E402
from morpho_dist.layer import SeededLayer, with_rec_losses  # noqa: E402
from morpho_dist.lifecycle import Stage, count_stages  # noqa: E402
from morpho_dist.optim import Optimizers, SeedOptimizer, host_parameters  # noqa: E402
from morpho_dist.reliability import SeedGuard  # noqa: E402
from morpho_dist.schedules import make_schedule  # noqa: E402
from morpho_dist.wrap import seeded_layers, wrap  # noqa: E402

VARIANTS = ("baseline", "dormant", "third")
MODES = ("eager", "compile", "cudagraph")
# Step-time overhead targets (%) of the performance issue, per mode and variant.
TARGET_PCT = {
    "eager": {"dormant": 3.0, "third": 8.0},
    "compile": {"dormant": 3.0, "third": 8.0},
    "cudagraph": {"dormant": 2.0, "third": 6.0},
}
HOST_CALL_TARGET_US = 20.0  # host time per seeded-layer call, forward + backward
# The blended stages "third" cycles through (as scripts/bench_op.py's make_inputs).
BLENDED_CYCLE = (Stage.GRAFTING, Stage.STABILIZATION, Stage.FINE_TUNING, Stage.FOSSILIZED, Stage.EVALUATING)
GRAFTING_RATE = 1e-4  # alpha_rate of GRAFTING seeds: the ramp runs every step but alpha stays inside (0, 1)
CHAIN = 16  # layers in the host-call chain


def seeds_config(args: argparse.Namespace, targets: list[str]) -> SimpleNamespace:
    """What ``wrap`` reads of the ``seeds`` config group."""
    return SimpleNamespace(
        targets=targets, exclude=None, per_layer=args.seeds_per_layer, kind="lowrank", rank=args.rank,
        act=args.act, blend="additive", dead_eps=1e-6,
    )  # fmt: skip


def make_optimizers(args, model, layers, device: torch.device) -> Optimizers:
    """AdamW over the host (fused and capturable on CUDA: device-side step counters, one kernel a step) and the
    train loop's SeedOptimizer over the banks."""
    cuda = device.type == "cuda"
    host = torch.optim.AdamW(
        host_parameters(model, layers), lr=args.lr, weight_decay=0.0, fused=cuda or None, capturable=cuda
    )
    seeds = SeedOptimizer(layers, name="adamw", lr=args.lr) if layers else None
    return Optimizers(host, seeds)


@torch.no_grad()
def make_third(layers: dict, seed: int = 1) -> None:
    """Every third seed to a blended stage through legal lifecycle commands; mixed blends, alpha in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        chosen = list(range(0, layer.num_seeds, 3))
        target = {i: BLENDED_CYCLE[k % len(BLENDED_CYCLE)] for k, i in enumerate(chosen)}
        for k, i in enumerate(chosen):
            germinate(layer, layer.seed_offset + i, 0, blend=k % NUM_BLENDS)
            stage = Stage.GERMINATED
            while stage != target[i]:  # along the main path, one legal command at a time
                stage = advance(layer, layer.seed_offset + i, 0)
        idx = torch.tensor(chosen, device=layer.alpha.device)
        layer.alpha[idx] = (0.1 + 0.8 * torch.rand(len(chosen), generator=gen)).to(layer.alpha.device)
        grafting = layer.stage == int(Stage.GRAFTING)
        layer.alpha_rate.copy_(torch.where(grafting, GRAFTING_RATE, 0.0))
        p1 = layer.bank.p1  # B starts at zero on germination; a trained-looking B makes the blends real
        p1[idx] = (0.02 * torch.randn(len(chosen), *p1.shape[1:], generator=gen)).to(p1.device, p1.dtype)


def build_variant(args, variant: str, device, dtype, backend: str, kernel: KernelOptions):
    host = build_host(args, device, dtype)
    layers = {}
    if variant != "baseline":
        # after the dtype cast: banks, state and telemetry stay fp32 (the op's contract), host params are dtype
        wrap(host.model, seeds_config(args, host.targets), kernel=kernel, backend=backend, base_seed=0)
        layers = seeded_layers(host.model)
        if variant == "third":
            make_third(layers)
    optimizers = make_optimizers(args, host.model, layers, device)
    host.model.train()  # telemetry on
    return host, layers, optimizers


def make_step(host, layers, optimizers, *, rec_weight: float, guard: bool, device: torch.device):
    """One train-loop step (morpho_dist.train without the controller interval): no host sync, no .item()."""
    model = host.model
    schedule = make_schedule(SimpleNamespace(name="fixed_ramp", ramp_steps=50, shape="linear"))
    host_ids = {id(p) for p in host_parameters(model, layers)}  # sharding.named_host_parameters imports Hydra
    host_named = [(n, p) for n, p in model.named_parameters() if id(p) in host_ids]
    seed_guard = SeedGuard(layers, embargo_steps=10, device=device) if guard else None
    seeded = list(layers.values())
    counter = [0]

    def step(*inputs: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        done = counter[0]
        if seed_guard is not None:
            seed_guard.before_forward(done)
        loss = host.loss(model, *inputs)
        total = with_rec_losses(loss, seeded, rec_weight)
        optimizers.zero_grad()
        total.backward()
        ok = seed_guard.after_backward(loss, done, host_named) if seed_guard is not None else None
        optimizers.step(ok)
        for layer in seeded:
            schedule.step_(layer)
        tick_(seeded)
        return loss.detach()

    return step


def _ours(frame: traceback.FrameSummary) -> bool:
    return "morpho_dist" in frame.filename or frame.filename.endswith("bench_step.py")


def _where(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame (where the op was called) and the innermost frames of this project, innermost first."""
    frames = [f for f in frames if not f.filename.endswith("warnings.py")]
    picked = [f for f in frames if _ours(f)][-3:]
    if frames and (not picked or picked[-1] is not frames[-1]):
        picked.append(frames[-1])
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}: {f.line}" for f in picked[::-1])


def describe_sync(err: BaseException) -> str:
    """The error's first line and the innermost Python frames that led to the synchronising op."""
    return f"{str(err).strip().splitlines()[0]} at {_where(traceback.extract_tb(err.__traceback__))}"


def find_sync_sites(step) -> list[str]:
    """Every synchronising call of one step: run it under sync debug mode "warn" and note where each warning
    was raised (the Python stack at that moment; ops run by the autograd engine show their Python caller)."""
    sites: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        site = f"{str(message).strip().splitlines()[0][:120]} at {_where(traceback.extract_stack()[:-1])}"
        if site not in sites:
            sites.append(site)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def time_steps(step, steps: int, warmup: int, device: torch.device, sync_check: bool) -> tuple[list[float], dict]:
    """(per-step times in ms, sync report) after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, {"host_syncs": "n/a (cpu)"}
    torch.cuda.synchronize(device)
    report: dict = {"host_syncs": "none" if sync_check else "not checked"}

    def timed() -> list:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        return events

    events = None
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
        try:
            events = timed()
        except RuntimeError as err:
            report["host_syncs"] = describe_sync(err)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if events is None:  # unchecked, or a step synchronised: time it again without the check
        if sync_check:
            try:
                report["sync_sites"] = find_sync_sites(step)
            except Exception as err:  # noqa: BLE001  the diagnosis is a bonus; the timing still runs
                report["sync_sites"] = [f"could not list the sync sites: {type(err).__name__}: {err}"]
        torch.cuda.synchronize(device)
        events = timed()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], report


def stage_summary(layers: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers.values():
        for name, n in count_stages(layer.stage.tolist()).items():
            if n:
                counts[name] = counts.get(name, 0) + n
    return counts


def device_ms_per_step(step, steps: int) -> float | None:
    """The kernels' summed device time per step over ``steps`` profiled steps (kernels of both streams add up)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / steps / 1e3 if total_us else None


def host_ms_per_step(step, steps: int) -> float:
    """Host time to issue one step: wall clock from an idle device to the step's return (median over ``steps``).
    Where it exceeds the device time, the device waits on the host."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def host_profile_table(step, rows: int) -> str:
    """The host-side ops of two steps by self CPU time (torch.profiler), the launch counts among them."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def prepare_mode(mode: str, host, layers, step, batch):
    """The step as the mode runs it: a callable of no arguments, and what the row reports about the mode."""
    info: dict = {}
    if mode == "compile":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for block in host.blocks:
            block.compile()
    if mode == "cudagraph":
        captured = CapturedStep(step, layers, warmup=2)
        info["captured"] = captured
        return (lambda: captured(*batch)), info
    return (lambda: step(*batch)), info


def mode_report(mode: str, info: dict) -> dict:
    out: dict = {}
    if mode == "compile":
        counters = torch._dynamo.utils.counters
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    if mode == "cudagraph":
        out["captures"] = info["captured"].captures
    return out


def run_variant(args, mode: str, variant: str, guard: bool, device, dtype, backend, kernel) -> dict:
    row: dict = {"mode": mode, "variant": variant, "guard": guard}
    try:
        host, layers, optimizers = build_variant(args, variant, device, dtype, backend, kernel)
        batch = host.batch(device)
        step = make_step(host, layers, optimizers, rec_weight=args.rec_weight, guard=guard, device=device)
        run, info = prepare_mode(mode, host, layers, step, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, syncs = time_steps(run, args.steps, args.warmup, device, sync_check=not args.no_sync_check)
        row.update(
            median_ms=statistics.median(times), mean_ms=statistics.fmean(times), min_ms=min(times),
            max_ms=max(times), **syncs, **mode_report(mode, info), seeded_layers=len(layers),
            stages=stage_summary(layers),
        )  # fmt: skip
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if args.profile_steps:
                row["device_ms"] = device_ms_per_step(run, args.profile_steps)
                row["host_ms"] = host_ms_per_step(run, args.profile_steps)
            if args.profile_table and mode == "eager" and not guard:
                row["profile_table"] = host_profile_table(run, args.profile_table)
        row["host"] = host.describe
        del host, layers, optimizers, step, run, info, batch
    except Exception as err:  # noqa: BLE001  one failing row is reported; the others still run
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        row["traceback"] = traceback.format_exc(limit=8)[-3000:]
    if mode == "compile":
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def host_call_rows(args, device, backend: str, kernel: KernelOptions) -> list[dict]:
    """Host time per seeded-layer call: a chain of CHAIN layers like the host's first seeded layer, 8 rows."""
    host = build_host(args, torch.device("meta"), getattr(torch, args.dtype))
    wrap(host.model, seeds_config(args, host.targets), kernel=kernel, backend=backend, base_seed=0)
    first = next(iter(seeded_layers(host.model).values()))
    rows = []
    for variant in ("dormant", "third"):
        chain = [
            SeededLayer(
                first.hidden, first.num_seeds, rank=first.bank.rank, act=first.act, backend=backend, kernel=kernel
            ).to(device)
            for _ in range(CHAIN)
        ]
        if variant == "third":
            make_third({str(i): layer for i, layer in enumerate(chain)})
        x = torch.randn(8, first.hidden, device=device, dtype=getattr(torch, args.dtype), requires_grad=True)
        row = {"variant": variant, "hidden": first.hidden, "seeds": first.num_seeds, "rank": first.bank.rank}
        time_calls(chain, 10, x)  # compile the kernels, prepare the calls
        if device.type == "cuda":
            torch.cuda.synchronize()
            if not args.no_sync_check:
                torch.cuda.set_sync_debug_mode("error")
        try:
            fwd, bwd = time_calls(chain, args.host_calls, x)
            row.update(fwd_us=fwd, bwd_us=bwd, fwd_bwd_us=fwd + bwd, meets_target=fwd + bwd <= HOST_CALL_TARGET_US)
            row["host_syncs"] = "none" if device.type == "cuda" and not args.no_sync_check else "not checked"
        except RuntimeError as err:
            row["host_syncs"] = describe_sync(err)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
        rows.append(row)
    return rows


def add_overheads(rows: list[dict]) -> None:
    base = {(r["mode"], r["guard"]): r.get("median_ms") for r in rows if r["variant"] == "baseline"}
    for r in rows:
        b = base.get((r["mode"], r["guard"]))
        ok = b and r.get("median_ms")
        r["overhead_pct"] = 100.0 * (r["median_ms"] / b - 1.0) if ok else None
        r["target_pct"] = TARGET_PCT[r["mode"]].get(r["variant"])
        met = r["target_pct"] is not None and r["overhead_pct"] is not None
        r["meets_target"] = bool(r["overhead_pct"] <= r["target_pct"]) if met else None


def print_table(rows: list[dict], calls: list[dict]) -> None:
    head = (
        f"{'mode':9s} {'variant':9s} {'guard':5s} {'median ms':>10s} {'device ms':>10s} {'host ms':>8s} "
        f"{'overhead':>10s} {'target':>7s}  host_syncs"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:9s} {r['variant']:9s} {'on' if r['guard'] else 'off':5s} ERROR {r['error']}")
            continue
        over = "" if r["overhead_pct"] is None or r["variant"] == "baseline" else f"{r['overhead_pct']:+8.2f}%"
        tgt = "" if r["target_pct"] is None else f"<={r['target_pct']:g}%"
        dev = f"{r['device_ms']:10.3f}" if r.get("device_ms") else f"{'':10s}"
        dev += f" {r['host_ms']:8.3f}" if r.get("host_ms") else f" {'':8s}"
        print(
            f"{r['mode']:9s} {r['variant']:9s} {'on' if r['guard'] else 'off':5s} {r['median_ms']:10.3f} {dev} "
            f"{over:>10s} {tgt:>7s}  {r['host_syncs']}"
        )
    for r in rows:
        for site in r.get("sync_sites", []):
            print(f"  sync in {r['mode']} {r['variant']} (guard {'on' if r['guard'] else 'off'}): {site}")
    for c in calls:
        if "fwd_us" in c:
            print(
                f"host time per seeded-layer call ({c['variant']}, hidden {c['hidden']}, {c['seeds']} seeds): "
                f"fwd {c['fwd_us']:.1f} us, bwd {c['bwd_us']:.1f} us, fwd+bwd {c['fwd_bwd_us']:.1f} us "
                f"(target <= {HOST_CALL_TARGET_US:g}); host_syncs {c['host_syncs']}"
            )
        else:
            print(f"host time per seeded-layer call ({c['variant']}): host_syncs {c['host_syncs']}")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", choices=("transformer", "mlp", "llama"), default="transformer")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=0, help="llama: MLP width (default 4 x hidden)")
    ap.add_argument("--heads", type=int, default=0, help="llama: attention heads (default hidden / 64)")
    ap.add_argument("--vocab", type=int, default=32000, help="llama: vocabulary size")
    ap.add_argument("--seq", type=int, default=2048, help="llama: sequence length (tokens / seq sequences)")
    ap.add_argument("--targets", default=None, help="comma-separated seed targets (default per host)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seeds-per-layer", type=int, default=None, help="default: 256 (stack), 64 (llama)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--act", choices=("relu", "gelu_tanh"), default="relu")
    ap.add_argument("--rec-weight", type=float, default=1.0, help="train.rec_weight")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--backend", choices=("triton", "reference"), default=None, help="default: triton on CUDA")
    ap.add_argument("--kernel-autotune", action="store_true", help="KernelOptions(autotune=True)")
    ap.add_argument("--dot-precision", default="tf32", help="KernelOptions.dot_precision")
    ap.add_argument("--lowrank-math", default=KernelOptions.lowrank_math, help="KernelOptions.lowrank_math")
    ap.add_argument("--no-overlap", action="store_true", help="KernelOptions(overlap=False): one stream")
    ap.add_argument("--guard", action="store_true", help="also time the eager variants with the reliability guard")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} (default: eager)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3, help="CUDA: steps profiled for the device time (0: off)")
    ap.add_argument("--profile-table", type=int, default=0, help="CUDA eager rows: top N host ops of two steps")
    ap.add_argument("--host-calls", type=int, default=100, help="passes of the host-call chain (0: off)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-sync-check", action="store_true", help="time without set_sync_debug_mode('error')")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS) or "baseline" not in variants:
        ap.error(f"--variants must include baseline and be a subset of {list(VARIANTS)}, got {args.variants!r}")
    args.modes = args.modes or "eager"
    if not set(args.modes.split(",")) <= set(MODES):
        ap.error(f"--modes must be a subset of {list(MODES)}, got {args.modes!r}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if args.seeds_per_layer is None:
        args.seeds_per_layer = 64 if args.host == "llama" else 256
    args.targets = args.targets.split(",") if args.targets else None
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    backend = args.backend or ("triton" if device.type == "cuda" else "reference")
    kernel = KernelOptions(
        dot_precision=args.dot_precision,
        autotune=args.kernel_autotune,
        lowrank_math=args.lowrank_math,
        overlap=not args.no_overlap,
    )
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backend": backend,
        "kernel": {k: getattr(kernel, k) for k in kernel.__dataclass_fields__},
    }
    print(
        f"bench_step: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, backend {backend}", flush=True
    )
    rows: list[dict] = []
    calls: list[dict] = []

    def write() -> None:  # after every row: a run cut short by a time limit still leaves what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "args": vars(args), "rows": rows, "host_calls": calls}, f, indent=1)

    if args.host_calls:  # first: a few seconds, and the figure a time limit must not cut
        calls.extend(host_call_rows(args, device, backend, kernel))
        write()
    for mode in args.modes.split(","):
        if mode == "cudagraph" and device.type != "cuda":
            print("  cudagraph mode needs CUDA: skipped", flush=True)
            continue
        for guard in (False, True) if args.guard and mode == "eager" else (False,):
            for variant in args.variants.split(","):
                t0 = time.perf_counter()
                rows.append(run_variant(args, mode, variant, guard, device, dtype, backend, kernel))
                r = rows[-1]
                took = time.perf_counter() - t0
                what = f"median {r['median_ms']:.3f} ms" if "median_ms" in r else f"ERROR {r['error']}"
                print(f"  {mode} {variant} (guard {'on' if guard else 'off'}): {what} ({took:.0f} s)", flush=True)
                add_overheads(rows)
                write()
    if rows and "host" in rows[0]:
        print(rows[0]["host"])
    print_table(rows, calls)
    write()
    if args.out:
        print(f"wrote {args.out}")
    return {"meta": meta, "args": vars(args), "rows": rows, "host_calls": calls}


if __name__ == "__main__":
    main(sys.argv[1:])
