"""Time one training step (forward, backward, optimizer) of a host with SeededLayers against the same host without.

    python scripts/bench_step.py --out /tmp/bench_step.json    # defaults: hidden 4096, 8192 tokens, bf16, triton
    python scripts/bench_step.py --guard                       # also the rows with the reliability guard on
    python scripts/bench_step.py --device cpu --hidden 64 --tokens 32 --layers 2 --seeds-per-layer 4 --steps 3

Host: ``--layers`` pre-norm transformer MLP blocks, ``x + down(gelu(up(norm(x))))`` (``--host mlp``: no norm, no
residual), hidden ``--hidden``, ``--tokens`` rows, params and activations in ``--dtype``; the loss is the mean
square error against a fixed random target. Variants:

- ``baseline``: the host alone, with the host optimizer the train loop builds (``optim.make_optimizers``: AdamW).
- ``dormant``: the same host with a SeededLayer after every block's down projection (``wrap``, lowrank seeds,
  ``--seeds-per-layer`` of them, rank ``--rank``), every seed DORMANT.
- ``third``: every third seed moved through the lifecycle commands (germinate, then TRAINING, GRAFTING, ...) to
  a blended stage (GRAFTING, STABILIZATION, FINE_TUNING, FOSSILIZED, EVALUATING in turn), mixed blends
  (additive, multiplicative, linear in turn), alpha in (0, 1) and a non-zero bank.

The seeded step is the train loop's (``morpho_dist.train``): forward in training mode (telemetry on), loss plus
``--rec-weight`` times each layer's ``rec_loss``, backward, host optimizer + SeedOptimizer step, the alpha
schedule's ``step_`` and ``tick_`` on every layer. ``--guard`` adds rows with the reliability guard on
(``SeedGuard.before_forward`` / ``after_backward`` and the step committed through ``optim.guarded_step``; the
baseline then runs the same guard over its host parameters). Each variant warms up (``--warmup`` steps: Triton
compile and autotune happen there), then ``--steps`` steps are timed one by one with CUDA events (CPU: wall
clock) and the median is reported with the overhead over the baseline. On CUDA the timed steps run under
``torch.cuda.set_sync_debug_mode("error")``: a step that synchronises with the host is reported in the row's
``host_syncs`` (the op and where it was called), and the variant is then timed again without the check.

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
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from morpho_dist.blends import NUM_BLENDS
from morpho_dist.commands import advance, germinate, tick_
from morpho_dist.kernels.options import KernelOptions
from morpho_dist.layer import with_rec_losses
from morpho_dist.lifecycle import Stage, count_stages
from morpho_dist.optim import host_parameters, make_optimizers
from morpho_dist.reliability import SeedGuard
from morpho_dist.schedules import make_schedule
from morpho_dist.wrap import seeded_layers, wrap

VARIANTS = ("baseline", "dormant", "third")
TARGET_PCT = {"dormant": 5.0, "third": 15.0}  # step-time overhead targets of the GPU performance issue
# The blended stages "third" cycles through (as scripts/bench_op.py's make_inputs).
BLENDED_CYCLE = (Stage.GRAFTING, Stage.STABILIZATION, Stage.FINE_TUNING, Stage.FOSSILIZED, Stage.EVALUATING)
GRAFTING_RATE = 1e-4  # alpha_rate of GRAFTING seeds: the ramp runs every step but alpha stays inside (0, 1)


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP block ``x + down(gelu(up(norm(x))))``; ``residual=False``: ``down(gelu(up(x)))``."""

    def __init__(self, hidden: int, mult: int = 4, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(hidden) if residual else nn.Identity()
        self.up = nn.Linear(hidden, mult * hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(mult * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(self.act(self.up(self.norm(x))))
        return x + out if self.residual else out


def build_host(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)  # every variant starts from the same host weights
    with torch.device(device):
        blocks = [MLPBlock(args.hidden, residual=args.host == "transformer") for _ in range(args.layers)]
        return nn.Sequential(*blocks).to(dtype)


def seeds_config(args: argparse.Namespace) -> SimpleNamespace:
    """What ``wrap`` reads of the ``seeds`` config group: one layer at each block's down projection."""
    return SimpleNamespace(
        targets=["down"], exclude=None, per_layer=args.seeds_per_layer, kind="lowrank", rank=args.rank,
        act=args.act, blend="additive", dead_eps=1e-6,
    )  # fmt: skip


def optim_config() -> SimpleNamespace:
    """conf/optim/adamw.yaml (the train loop's default optimizer)."""
    return SimpleNamespace(name="adamw", weight_decay=0.0, betas=(0.9, 0.999), momentum=0.9, seed_lr_scale=1.0)


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


def build_variant(args, variant: str, device: torch.device, dtype: torch.dtype, backend: str, kernel: KernelOptions):
    model = build_host(args, device, dtype)
    layers = {}
    if variant != "baseline":
        # after the dtype cast: banks, state and telemetry stay fp32 (the op's contract), host params are dtype
        wrap(model, seeds_config(args), kernel=kernel, backend=backend, base_seed=0)
        layers = seeded_layers(model)
        if variant == "third":
            make_third(layers)
    optimizers = make_optimizers(optim_config(), args.lr, model, layers)
    model.train()  # telemetry on
    return model, layers, optimizers


def make_step(model, layers, optimizers, x, target, *, rec_weight: float, guard: bool, device: torch.device):
    """One train-loop step (morpho_dist.train._run without the controller interval): no host sync, no .item()."""
    schedule = make_schedule(SimpleNamespace(name="fixed_ramp", ramp_steps=50, shape="linear"))
    host_ids = {id(p) for p in host_parameters(model, layers)}  # sharding.named_host_parameters imports Hydra
    host_named = [(n, p) for n, p in model.named_parameters() if id(p) in host_ids]
    seed_guard = SeedGuard(layers, embargo_steps=10, device=device) if guard else None
    counter = [0]

    def step() -> None:
        counter[0] += 1
        done = counter[0]
        if seed_guard is not None:
            seed_guard.before_forward(done)
        y = model(x)
        loss = F.mse_loss(y.float(), target)
        total = with_rec_losses(loss, layers.values(), rec_weight)
        optimizers.zero_grad()
        total.backward()
        ok = seed_guard.after_backward(loss, done, host_named) if seed_guard is not None else None
        optimizers.step(ok)
        for layer in layers.values():
            schedule.step_(layer)
        tick_(layers)

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


def run_variant(args, variant: str, guard: bool, device, dtype, backend, kernel) -> dict:
    model, layers, optimizers = build_variant(args, variant, device, dtype, backend, kernel)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    target = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
    step = make_step(model, layers, optimizers, x, target, rec_weight=args.rec_weight, guard=guard, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, syncs = time_steps(step, args.steps, args.warmup, device, sync_check=not args.no_sync_check)
    host = optimizers.host
    row = {
        "variant": variant,
        "guard": guard,
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        **syncs,
        "seeded_layers": len(layers),
        "stages": stage_summary(layers),
        "host_optimizer": {
            "class": type(host).__name__,
            **{k: host.defaults.get(k) for k in ("foreach", "fused", "capturable")},
        },
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, layers, optimizers, step, x, target
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_overheads(rows: list[dict]) -> None:
    base = {r["guard"]: r["median_ms"] for r in rows if r["variant"] == "baseline"}
    for r in rows:
        r["overhead_pct"] = 100.0 * (r["median_ms"] / base[r["guard"]] - 1.0) if r["guard"] in base else None
        r["target_pct"] = TARGET_PCT.get(r["variant"])
        r["meets_target"] = None if r["target_pct"] is None else bool(r["overhead_pct"] <= r["target_pct"])


def print_table(rows: list[dict]) -> None:
    head = f"{'variant':9s} {'guard':5s} {'median ms':>10s} {'min ms':>9s} {'overhead':>10s} {'target':>7s}  host_syncs"
    print(head)
    print("-" * len(head))
    for r in rows:
        over = "" if r["variant"] == "baseline" else f"{r['overhead_pct']:+8.2f}%"
        tgt = "" if r["target_pct"] is None else f"<={r['target_pct']:g}%"
        print(
            f"{r['variant']:9s} {'on' if r['guard'] else 'off':5s} {r['median_ms']:10.3f} {r['min_ms']:9.3f} "
            f"{over:>10s} {tgt:>7s}  {r['host_syncs']}"
        )
    for r in rows:
        for site in r.get("sync_sites", []):
            print(f"  sync in {r['variant']} (guard {'on' if r['guard'] else 'off'}): {site}")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", choices=("transformer", "mlp"), default="transformer")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seeds-per-layer", type=int, default=256, help="chunk = hidden / seeds (default 16)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--act", choices=("relu", "gelu_tanh"), default="relu")
    ap.add_argument("--rec-weight", type=float, default=1.0, help="train.rec_weight")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--backend", choices=("triton", "reference"), default=None, help="default: triton on CUDA")
    ap.add_argument("--kernel-autotune", action="store_true", help="KernelOptions(autotune=True)")
    ap.add_argument("--dot-precision", default="tf32", help="KernelOptions.dot_precision")
    ap.add_argument("--lowrank-math", default=KernelOptions.lowrank_math, help="KernelOptions.lowrank_math")
    ap.add_argument("--no-overlap", action="store_true", help="KernelOptions(overlap=False): one stream")
    ap.add_argument("--guard", action="store_true", help="also time every variant with the reliability guard on")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-sync-check", action="store_true", help="time without set_sync_debug_mode('error')")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS) or "baseline" not in variants:
        ap.error(f"--variants must include baseline and be a subset of {list(VARIANTS)}, got {args.variants!r}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
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
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backend": backend,
        "kernel": {k: getattr(kernel, k) for k in kernel.__dataclass_fields__},
    }
    print(
        f"bench_step: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, backend {backend}", flush=True
    )
    print(
        f"host {args.host} x{args.layers}, hidden {args.hidden}, tokens {args.tokens}, {args.dtype}; "
        f"{args.seeds_per_layer} lowrank seeds/layer (chunk {args.hidden // args.seeds_per_layer}, rank {args.rank})",
        flush=True,
    )
    rows = []
    for guard in (False, True) if args.guard else (False,):
        for variant in args.variants.split(","):
            rows.append(run_variant(args, variant, guard, device, dtype, backend, kernel))
            r = rows[-1]
            print(f"  {variant} (guard {'on' if guard else 'off'}): median {r['median_ms']:.3f} ms", flush=True)
    add_overheads(rows)
    print_table(rows)
    result = {"meta": meta, "args": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
