"""events.jsonl -> a PNG swimlane: one lane per (layer, seed), coloured by stage over the training steps.

python scripts/plot_lifecycle.py outputs/2026-01-01/12-00-00            # writes <run_dir>/lifecycle.png
python scripts/plot_lifecycle.py path/to/events.jsonl -o lifecycle.png
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from morpho_dist.lifecycle import Stage  # noqa: E402
from morpho_dist.logging import STAGE_COLORS  # noqa: E402


def load_events(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def end_step(run_dir: str, events: list[dict]) -> int:
    """The run's last step: summary.json, else the last telemetry record, else the last event."""
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        with open(summary) as fh:
            return int(json.load(fh)["steps"])
    telemetry = os.path.join(run_dir, "telemetry.jsonl")
    if os.path.exists(telemetry):
        with open(telemetry) as fh:
            steps = [json.loads(line)["step"] for line in fh if line.strip()]
        if steps:
            return max(steps)
    return max((e["step"] for e in events), default=1)


def timelines(events: list[dict], last: int) -> dict[tuple[str, int], list[tuple[int, int, str]]]:
    """(layer, seed) -> [(start, length, stage name)] from the from/to transitions (DORMANT before the first)."""
    lanes: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for e in events:
        if e.get("to") is None:
            continue
        key = (e["layer"], int(e["seed"]))
        lanes.setdefault(key, [(0, e.get("from") or "DORMANT")]).append((int(e["step"]), e["to"]))
    out = {}
    for key, changes in lanes.items():
        spans = []
        for (start, stage), (stop, _) in zip(changes, [*changes[1:], (last, None)]):
            if stop > start:
                spans.append((start, stop - start, stage))
        out[key] = spans
    return out


def plot(events: list[dict], last: int, out: str, title: str) -> None:
    lanes = timelines(events, last)
    keys = sorted(lanes)
    fig, ax = plt.subplots(figsize=(11, max(2.8, 1.0 + 0.45 * len(keys))))
    for row, key in enumerate(keys):
        for start, length, stage in lanes[key]:
            color = [c / 255 for c in STAGE_COLORS[Stage[stage]]]
            ax.broken_barh([(start, length)], (row - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.5)
    for e in events:
        if e.get("to") == "FOSSILIZED" or e.get("to") == "CULLED":
            row = keys.index((e["layer"], int(e["seed"])))
            ax.plot(e["step"], row, marker="|", color="black", markersize=14)
    ax.set_yticks(range(len(keys)), [f"{layer}[{seed}]" for layer, seed in keys])
    ax.set_xlim(0, last)
    ax.set_ylim(-0.6, len(keys) - 0.4)
    ax.set_xlabel("step")
    ax.invert_yaxis()
    seen = {stage for spans in lanes.values() for *_, stage in spans}
    handles = [Patch(color=[c / 255 for c in STAGE_COLORS[s]], label=s.name) for s in Stage if s.name in seen]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run dir or its events.jsonl")
    parser.add_argument("-o", "--out", default=None, help="PNG path (default: <run_dir>/lifecycle.png)")
    args = parser.parse_args()
    events_path = os.path.join(args.path, "events.jsonl") if os.path.isdir(args.path) else args.path
    run_dir = os.path.dirname(os.path.abspath(events_path))
    if not os.path.exists(events_path):
        raise SystemExit(f"error: {events_path} not found")
    events = load_events(events_path)
    out = args.out or os.path.join(run_dir, "lifecycle.png")
    plot(events, end_step(run_dir, events), out, f"seed lifecycle: {run_dir}")
    print(out)


if __name__ == "__main__":
    main()
