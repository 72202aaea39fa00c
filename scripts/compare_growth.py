"""Growth vs static hosts on digits: val accuracy (mean/std over seeds) and parameter counts.

    python scripts/compare_growth.py                   # 3 seeds, the default config
    python scripts/compare_growth.py --seeds 5 --set train.steps=2000 --set seeds.rank=32

Variants (same data, steps, lr, batches; only the model differs):
- growth:        the default narrow mlp with seeds (controller grows it)
- static narrow: the same host without seeds
- static wide:   model=mlp_wide (a 32-unit core instead of 4) without seeds
Runs train.run in-process (compose API), one process, logger=none; run dirs under a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from hydra import compose, initialize_config_dir

from morpho_dist.config import register_configs
from morpho_dist.train import run

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
VARIANTS = {
    "growth": [],
    "static narrow": ["seeds.enabled=false"],
    "static wide": ["model=mlp_wide", "seeds.enabled=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of run seeds (0..N-1)")
    parser.add_argument("--set", action="append", default=[], help="extra override for every variant (repeatable)")
    parser.add_argument("--json", default=None, help="also write the per-run results here")
    args = parser.parse_args()
    register_configs()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for seed in range(args.seeds):
            for name, extra in VARIANTS.items():
                overrides = [
                    f"seed={seed}",
                    "logger=none",
                    "train.progress=false",
                    "checkpoint.save_final=false",
                    f"run_dir={tmp}/{name.replace(' ', '_')}_{seed}",
                    *extra,
                    *args.set,
                ]
                summary = run(compose("config", overrides=overrides))
                results[name].append(summary)
                print(
                    f"seed {seed} {name:14s} val_acc={summary['val_acc']:.4f} "
                    f"effective_params={summary['effective_params']} "
                    f"fossilized={summary['stage_counts'].get('FOSSILIZED', 0)}",
                    flush=True,
                )
    print(f"\n{args.seeds} seeds, {time.time() - t0:.0f}s; extra overrides: {args.set or 'none'}")
    header = f"{'variant':14s} | {'val acc mean':>12s} | {'std':>6s} | {'host params':>11s} | {'effective params':>16s}"
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        accs = [100 * r["val_acc"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        eff = statistics.mean(r["effective_params"] for r in runs)
        print(f"{name:14s} | {statistics.mean(accs):11.2f}% | {std:6.2f} | {runs[0]['host_params']:11d} | {eff:16.0f}")
    gain = statistics.mean(r["val_acc"] for r in results["growth"]) - statistics.mean(
        r["val_acc"] for r in results["static narrow"]
    )
    print(f"growth - static narrow: {100 * gain:+.2f} points")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
