"""Growth against static hosts at equal data: final validation loss, and the FLOPs and wall time to reach loss levels.

    python scripts/compare_growth.py --preset digits --out outputs/compare_digits          # CPU, minutes
    python scripts/compare_growth.py --preset text --out outputs/compare_text --parallel 12  # one GPU
    python scripts/compare_growth.py --preset text --set train.steps=400 --seeds 3 --out /tmp/cmp

Variants (every one sees the same batches: same run seeds, same data, same steps, same lr; only the model differs):
- grown:          the narrow host with seeds (the controller grows it); ``--alt LABEL="k=v k=v"`` adds a variant
                  "grown LABEL" with those overrides on top (several growth settings side by side)
- static narrow:  the same host, no seeds
- static wide:    the preset's wide host, no seeds
- static at size: a host of the preset's family whose parameter count is the nearest to the grown runs' mean
                  effective parameters (the host plus the parameters of the blended seeds), no seeds; it starts
                  when the grown runs have finished
Each (variant, run seed) is one ``python -m morpho_dist.train`` process (logger=jsonl); ``--parallel`` of them run
side by side (on one GPU, small models leave it mostly idle). A run's training FLOPs are the host's plus its live
seeds' FLOPs of every step (morpho_dist/flops.py) and its wall time excludes the logged evaluations, both logged
at every ``train.log_every`` step; the time to reach a level is interpolated between those points. Wall times of
runs sharing a device are measured while sharing it.

Writes <out>/compare.json (settings, device and versions, every run's curve and summary, the table) and
<out>/compare.png (the metric against FLOPs and against wall time, every run a thin line, the seed mean thick).
The headline ratios: FLOPs of the grown run to reach the static wide host's final metric, over the static wide
run's total FLOPs (paired by run seed; a seed that never reaches it counts as not reached), and the grown run's
final metric minus the static narrow's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "digits": {
        "doc": "sklearn digits, the default narrow MLP (64 -> 32 -> 4 -> 10), seeds at its embedding",
        "common": [],
        "grown": [],
        "narrow": ["seeds.enabled=false"],
        "wide": ["model=mlp_wide", "seeds.enabled=false"],
        "size_key": "model.hidden",  # static at size: model.hidden=[h]
        "size_format": "[{}]",
        "metric": "val/loss",
    },
    "text": {
        "doc": "stdlib bytes, a narrow GPT (mlp_width = width) grown by lowrank seeds on each MLP hidden layer",
        "common": [
            "data=text",
            "task=causal_lm",
            "model=gpt",
            "model.width=128",
            "model.depth=4",
            "model.heads=4",
            "data.seq_len=128",
            "train.batch_size=32",
            "train.steps=3000",
            "train.lr=0.001",  # at 3e-3 a 64-wide GPT with a 256-wide MLP trains worse than with a 64-wide one
            "data.val_windows=256",
            "train.log_every=100",
            "controller=scaled",
            "schedule.ramp_steps=${steps:0.03}",
        ],
        "grown": ["model.mlp_width=128", "seeds.per_layer=2", "seeds.rank=128"],
        "narrow": ["model.mlp_width=128", "seeds.enabled=false"],
        "wide": ["model.mlp_width=512", "seeds.enabled=false"],
        "size_key": "model.mlp_width",
        "size_format": "{}",
        "metric": "val/bpb",
    },
}
VARIANTS = ("grown", "static narrow", "static wide", "static at size")
PRESET_KEY = {"grown": "grown", "static narrow": "narrow", "static wide": "wide"}


def parse_overrides(values: list[str]) -> list[str]:
    return [v for v in values if v]


def run_one(name: str, seed: int, overrides: list[str], out: str, env: dict, deadline: float | None = None) -> dict:
    """One training process; returns its summary, its logged curve and its exit status. A run still going at
    ``deadline`` (time.time()) is stopped and recorded as failed, so the report is written in time."""
    run_dir = os.path.join(out, "runs", f"{name.replace(' ', '_')}_{seed}")
    args = [
        f"seed={seed}",
        "logger=jsonl",
        "train.progress=false",
        "checkpoint.save_final=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    t0 = time.time()
    cmd = [sys.executable, "-m", "morpho_dist.train", *args]
    timeout = None if deadline is None else max(1.0, deadline - t0)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"STOPPED {name} seed {seed}: --time-limit reached", flush=True)
        return {"variant": name, "seed": seed, "overrides": args, "returncode": None, "error": "time limit"}
    record = {"variant": name, "seed": seed, "overrides": args, "returncode": proc.returncode}
    record["process_s"] = time.time() - t0
    if proc.returncode != 0:
        record["error"] = (proc.stderr or proc.stdout)[-3000:]
        print(f"FAILED {name} seed {seed}: {record['error'][-400:]}", flush=True)
        return record
    with open(os.path.join(run_dir, "summary.json")) as fh:
        record["summary"] = {k: v for k, v in json.load(fh).items() if k != "ranks"}
    curve = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            m = json.loads(line)
            curve.append(m)
    record["curve"] = curve
    s = record["summary"]
    print(
        f"{name:15s} seed {seed}: val_loss={s['val_loss']:.4f} "
        + (f"val_bpb={s['val_bpb']:.4f} " if s.get("val_bpb") is not None else "")
        + (f"val_acc={s['val_acc']:.4f} " if s.get("val_acc") is not None else "")
        + f"effective_params={s['effective_params']} flops={s['flops']:.3g} train_s={s['train_time_s']:.1f} "
        f"stages={ {k: v for k, v in s['stage_counts'].items() if v} }",
        flush=True,
    )
    return record


def final_metric(record: dict, metric: str) -> float:
    key = metric.split("/", 1)[1]
    return float(record["summary"][f"val_{key}"])


def points(record: dict, metric: str) -> list[tuple[float, float, float]]:
    """(flops, train seconds, metric) at every logged evaluation (the start counts as 0 FLOPs at no metric)."""
    return [(m["flops/total"], m["time/train_s"], m[metric]) for m in record.get("curve", []) if metric in m]


def cost_to_reach(record: dict, metric: str, level: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) at which the run's metric first reaches ``level`` (linear between logged points)."""
    prev = None
    for f, t, v in points(record, metric):
        if v <= level:
            if prev is None or prev[2] == v:
                return f, t
            w = (prev[2] - level) / (prev[2] - v)
            return prev[0] + w * (f - prev[0]), prev[1] + w * (t - prev[1])
        prev = (f, t, v)
    return None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def size_value(overrides: list[str], key: str, fmt: str, target_params: float) -> int:
    """The integer of ``key`` whose host has the parameter count nearest to ``target_params``."""
    from hydra import compose, initialize_config_dir

    from morpho_dist.config import register_configs
    from morpho_dist.data import data_spec
    from morpho_dist.models import build_model, count_params

    register_configs()
    import torch

    def params(v: int) -> int:
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"{key}={fmt.format(v)}", "seeds.enabled=false"])
        with torch.device("meta"):
            return count_params(build_model(cfg.model, data_spec(cfg.data, 0)))

    lo, hi = 1, 2
    while params(hi) < target_params:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < target_params else (lo, mid)
    return lo if abs(params(lo) - target_params) <= abs(params(hi) - target_params) else hi


def table(results: dict[str, list[dict]], metric: str, levels: list[float]) -> dict:
    out = {}
    for name, runs in results.items():
        ok = [r for r in runs if r.get("summary")]
        if not ok:
            continue
        fm, fs = mean_std([final_metric(r, metric) for r in ok])
        row = {
            "runs": len(ok),
            "final_mean": fm,
            "final_std": fs,
            "host_params": ok[0]["summary"]["host_params"],
            "effective_params": statistics.mean(r["summary"]["effective_params"] for r in ok),
            "flops": statistics.mean(r["summary"]["flops"] for r in ok),
            "train_s": statistics.mean(r["summary"]["train_time_s"] for r in ok),
            "fossilized": statistics.mean(r["summary"]["stage_counts"].get("FOSSILIZED", 0) for r in ok),
            "reach": {},
        }
        if ok[0]["summary"].get("val_acc") is not None:
            row["val_acc_mean"], row["val_acc_std"] = mean_std([r["summary"]["val_acc"] for r in ok])
        for level in levels:
            hits = [cost_to_reach(r, metric, level) for r in ok]
            got = [h for h in hits if h is not None]
            row["reach"][f"{level:.4f}"] = {
                "reached": len(got),
                "flops_mean": mean_std([h[0] for h in got])[0],
                "seconds_mean": mean_std([h[1] for h in got])[0],
            }
        out[name] = row
    return out


def headline(results: dict[str, list[dict]], metric: str, grown_name: str = "grown") -> dict:
    """Per run seed: grown FLOPs to reach the static wide's final metric / static wide's FLOPs; grown - narrow."""
    by_seed = {name: {r["seed"]: r for r in runs if r.get("summary")} for name, runs in results.items()}
    ratios, time_ratios, gaps, gaps_wide = [], [], [], []
    for seed, grown in by_seed.get(grown_name, {}).items():
        wide = by_seed.get("static wide", {}).get(seed)
        narrow = by_seed.get("static narrow", {}).get(seed)
        if wide is not None:
            hit = cost_to_reach(grown, metric, final_metric(wide, metric))
            ratios.append(hit[0] / wide["summary"]["flops"] if hit else math.inf)
            time_ratios.append(hit[1] / wide["summary"]["train_time_s"] if hit else math.inf)
            gaps_wide.append(final_metric(grown, metric) - final_metric(wide, metric))
        if narrow is not None:
            gaps.append(final_metric(grown, metric) - final_metric(narrow, metric))
    rm, rs = mean_std(ratios)
    return {
        "flops_ratio_to_reach_wide_final": ratios,
        "flops_ratio_mean": rm if len([r for r in ratios if math.isfinite(r)]) == len(ratios) else None,
        "flops_ratio_std": rs,
        "time_ratio_to_reach_wide_final": time_ratios,
        "grown_minus_narrow_final": gaps,
        "grown_minus_narrow_mean_std": mean_std(gaps),
        "grown_minus_wide_final": gaps_wide,
        "grown_minus_wide_mean_std": mean_std(gaps_wide),
    }


def plot(results: dict[str, list[dict]], metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "grown": "tab:green",
        "static narrow": "tab:blue",
        "static wide": "tab:red",
        "static at size": "tab:purple",
    }
    extra = iter(["tab:olive", "tab:orange", "tab:brown", "tab:cyan", "tab:pink", "tab:gray"])
    colors.update({name: next(extra, "black") for name in results if name not in colors})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, runs in results.items():
        curves = [points(r, metric) for r in runs if r.get("summary")]
        for c in curves:
            axes[0].plot([p[0] for p in c], [p[2] for p in c], color=colors[name], alpha=0.25, lw=0.8)
            axes[1].plot([p[1] for p in c], [p[2] for p in c], color=colors[name], alpha=0.25, lw=0.8)
        if curves:
            n = min(len(c) for c in curves)
            mean = [statistics.mean(c[i][j] for c in curves) for i in range(n) for j in (0, 1, 2)]
            f, t, v = mean[0::3], mean[1::3], mean[2::3]
            axes[0].plot(f, v, color=colors[name], lw=2, label=f"{name} ({len(curves)} seeds)")
            axes[1].plot(t, v, color=colors[name], lw=2, label=name)
    axes[0].set_xlabel("training FLOPs (host + live seeds)")
    axes[1].set_xlabel("training wall time (s; runs shared the device)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    later = [v for runs in results.values() for r in runs for *_, v in points(r, metric)[1:]]
    if later:  # the first logged point (near the untrained loss) would squash the rest
        for ax in axes:
            ax.set_ylim(min(later) - 0.02 * abs(min(later)), max(later))
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 for every variant")
    parser.add_argument("--set", action="append", default=[], help="override for every variant (repeatable)")
    for v in ("grown", "narrow", "wide"):
        parser.add_argument(f"--{v}", action="append", default=[], help=f"extra override for the {v} variant")
    parser.add_argument("--alt", action="append", default=[], help='another grown variant: LABEL="k=v k=v"')
    parser.add_argument("--parallel", type=int, default=1, help="training processes side by side")
    parser.add_argument("--size", type=int, default=None, help="size_key value of 'static at size' (default: solved)")
    parser.add_argument("--no-at-size", action="store_true", help="skip the 'static at size' variant")
    parser.add_argument("--time-limit", type=float, default=None, help="stop runs still going after this many s")
    parser.add_argument("--levels", type=float, nargs="*", default=None, help="metric levels (default: the finals)")
    parser.add_argument("--out", required=True, help="folder for compare.json, compare.png and runs/")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    metric = preset["metric"]
    common = [*preset["common"], *args.set]
    overrides = {name: [*common, *preset[key], *getattr(args, key)] for name, key in PRESET_KEY.items()}
    alts = {}
    for spec in args.alt:
        label, _, extra = spec.partition("=")
        alts[f"grown {label}"] = [*overrides["grown"], *extra.split()]
    overrides.update(alts)
    os.makedirs(args.out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.parallel))))
    t0 = time.time()
    deadline = t0 + args.time_limit if args.time_limit else None
    results: dict[str, list[dict]] = {name: [] for name in (*VARIANTS, *alts)}
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {
            name: [pool.submit(run_one, name, s, overrides[name], args.out, env, deadline) for s in range(args.seeds)]
            for name in (*PRESET_KEY, *alts)
        }
        results["grown"] = [f.result() for f in futures["grown"]]
        at_size = []
        if not args.no_at_size:
            grown_ok = [r for r in results["grown"] if r.get("summary")]
            size = args.size
            if size is None and grown_ok:
                target = statistics.mean(r["summary"]["effective_params"] for r in grown_ok)
                size = size_value(overrides["static narrow"], preset["size_key"], preset["size_format"], target)
            if size is not None:
                extra = [*overrides["static narrow"], f"{preset['size_key']}={preset['size_format'].format(size)}"]
                overrides["static at size"] = extra
                at_size = [
                    pool.submit(run_one, "static at size", s, extra, args.out, env, deadline) for s in range(args.seeds)
                ]
        for name in ("static narrow", "static wide", *alts):
            results[name] = [f.result() for f in futures[name]]
        results["static at size"] = [f.result() for f in at_size]
    results = {k: v for k, v in results.items() if v}
    finals = {n: mean_std([final_metric(r, metric) for r in rs if r.get("summary")])[0] for n, rs in results.items()}
    levels = args.levels or sorted({round(v, 4) for v in finals.values() if v is not None}, reverse=True)
    rows = table(results, metric, levels)
    heads = {name: headline(results, metric, name) for name in results if name.startswith("grown")}
    head = heads["grown"]
    wall = time.time() - t0
    report = {
        "preset": args.preset,
        "doc": preset["doc"],
        "metric": metric,
        "seeds": args.seeds,
        "parallel": args.parallel,
        "overrides": overrides,
        "environment": environment(),
        "wall_s": wall,
        "levels": levels,
        "table": rows,
        "headline": head,
        "headlines": heads,
        "runs": results,
    }
    json_path = os.path.join(args.out, "compare.json")
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    png = os.path.join(args.out, "compare.png")
    env_info = report["environment"]
    plot(results, metric, png, f"{args.preset}: {preset['doc']}\n{env_info['device']}, torch {env_info['torch']}")

    print(f"\n{args.preset}: {args.seeds} seeds, {wall:.0f} s wall, {args.parallel} in parallel; {env_info['device']}")
    print(
        f"{'variant':15s} | {metric + ' mean':>14s} | {'std':>6s} | {'host params':>11s} | {'effective':>9s} | "
        f"{'FLOPs':>9s} | {'train s':>7s} | fossilized"
    )
    for name, r in rows.items():
        print(
            f"{name:15s} | {r['final_mean']:14.4f} | {r['final_std']:6.4f} | {r['host_params']:11d} | "
            f"{r['effective_params']:9.0f} | {r['flops']:9.3g} | {r['train_s']:7.1f} | {r['fossilized']:.1f}"
        )
        if "val_acc_mean" in r:
            print(f"{'':15s}   val_acc {100 * r['val_acc_mean']:.2f}% +- {100 * r['val_acc_std']:.2f}")
    print("FLOPs (mean over the seeds that reach it) to reach each level:")
    for level in levels:
        cells = []
        for name, r in rows.items():
            hit = r["reach"][f"{level:.4f}"]
            cells.append(
                f"{name}: " + (f"{hit['flops_mean']:.3g} ({hit['reached']}/{r['runs']})" if hit["reached"] else "never")
            )
        print(f"  {metric} <= {level:.4f}: " + "; ".join(cells))
    for name, head in heads.items():
        ratio = head["flops_ratio_mean"]
        per_seed = ["never" if not math.isfinite(x) else f"{x:.3f}" for x in head["flops_ratio_to_reach_wide_final"]]
        print(
            f"{name}: FLOPs to reach static wide's final / static wide's FLOPs, per seed: {', '.join(per_seed)}"
            + (f" (mean {ratio:.3f})" if ratio is not None else "")
        )
        for other in ("narrow", "wide"):
            m, sd = head[f"grown_minus_{other}_mean_std"]
            if m is not None:
                print(f"{name} - static {other} final {metric}: {m:+.4f} +- {sd:.4f}")
    print(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    main()
