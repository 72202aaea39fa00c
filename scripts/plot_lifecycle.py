"""events.jsonl -> a PNG swimlane: one lane per (layer, seed), coloured by stage over the training steps.

Every seed of the run gets a lane (a seed no decision touched stays DORMANT). A run resumed into a new run dir
carries the earlier run's events, so its plot shows the whole history from step 0.

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
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from morpho_dist.lifecycle import Stage  # noqa: E402
from morpho_dist.plots import STAGE_COLORS  # noqa: E402


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


def all_seeds(run_dir: str, events: list[dict]) -> list[tuple[str, int]]:
    """Every (layer, seed) of the run, also the ones no decision touched: summary.json's seed states, else the
    telemetry records, else the events."""
    seeds: set[tuple[str, int]] = set()
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        with open(summary) as fh:
            for layer, states in json.load(fh).get("seed_states", {}).items():
                seeds.update((layer, i) for i in range(len(states)))
    telemetry = os.path.join(run_dir, "telemetry.jsonl")
    if not seeds and os.path.exists(telemetry):
        with open(telemetry) as fh:
            seeds.update((r["layer"], int(r["seed"])) for r in map(json.loads, filter(str.strip, fh)))
    seeds.update((e["layer"], int(e["seed"])) for e in events if e.get("to") is not None)
    return sorted(seeds)


def timelines(events: list[dict], last: int, seeds: list[tuple[str, int]]) -> dict[tuple[str, int], list]:
    """(layer, seed) -> [(start, length, stage name)] from the from/to transitions (DORMANT before the first)."""
    lanes: dict[tuple[str, int], list[tuple[int, str]]] = {key: [] for key in seeds}
    for e in events:
        if e.get("to") is None:
            continue
        key = (e["layer"], int(e["seed"]))
        changes = lanes.setdefault(key, [])
        if not changes:
            changes.append((0, e.get("from") or "DORMANT"))
        changes.append((int(e["step"]), e["to"]))
    out = {}
    for key, changes in lanes.items():
        changes = changes or [(0, "DORMANT")]
        spans = []
        for (start, stage), (stop, _) in zip(changes, [*changes[1:], (last, None)]):
            if stop > start:
                spans.append((start, stop - start, stage))
        out[key] = spans
    return out


# Marks drawn over the lanes: event target stage -> (marker, colour, legend label).
MARKS = {
    "FOSSILIZED": ("|", "black", "fossilized (kept for good)"),
    "CULLED": ("x", "black", "culled"),
    "ROLLED_BACK": ("v", "black", "rolled back after a host divergence"),
}


def plot(events: list[dict], last: int, out: str, title: str, seeds: list[tuple[str, int]] | None = None) -> None:
    lanes = timelines(events, last, seeds or [])
    keys = sorted(lanes)
    fig, ax = plt.subplots(figsize=(11, max(2.8, 1.4 + 0.45 * len(keys))))
    for row, key in enumerate(keys):
        for start, length, stage in lanes[key]:
            color = [c / 255 for c in STAGE_COLORS[Stage[stage]]]
            ax.broken_barh([(start, length)], (row - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.5)
    marked = set()
    for e in events:
        if e.get("to") in MARKS:
            marker, color, _ = MARKS[e["to"]]
            ax.plot(e["step"], keys.index((e["layer"], int(e["seed"]))), marker=marker, color=color, markersize=12)
            marked.add(e["to"])
    restores = [e for e in events if e.get("command") == "restore"]
    for e in restores:
        ax.axvline(e["step"], color="red", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(keys)), [f"{layer}[{seed}]" for layer, seed in keys])
    ax.set_xlim(0, last)
    ax.set_ylim(-0.6, len(keys) - 0.4)
    ax.set_xlabel("step")
    ax.set_ylabel("layer[seed]")
    ax.invert_yaxis()
    seen = {stage for spans in lanes.values() for *_, stage in spans}
    handles = [Patch(color=[c / 255 for c in STAGE_COLORS[s]], label=s.name) for s in Stage if s.name in seen]
    handles += [
        Line2D([], [], marker=MARKS[t][0], color=MARKS[t][1], linestyle="none", markersize=10, label=MARKS[t][2])
        for t in MARKS
        if t in marked
    ]
    if restores:
        handles.append(Line2D([], [], color="red", linestyle="--", label="host divergence: checkpoint restored"))
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
    plot(events, end_step(run_dir, events), out, f"seed lifecycle: {run_dir}", all_seeds(run_dir, events))
    print(out)


if __name__ == "__main__":
    main()
