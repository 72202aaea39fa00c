"""What a user looks at after a run: the seed-state image, stage counts with zeros, the lifecycle plot of every
seed, train.log, and a resumed run's whole history (carried from the run dir it resumed from)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from morpho_dist.lifecycle import Stage
from morpho_dist.plots import STAGE_COLORS, stage_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["kernel.backend=reference", "train.progress=false", "controller.interval=5", "logger=jsonl"]


def _train(tmp_path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORPHO_RUN_DIR")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", *FAST, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr


def _jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_stage_image_is_readable():
    stages = {"embed": [int(Stage.DORMANT), int(Stage.FOSSILIZED), int(Stage.CULLED)], "fc": [int(Stage.TRAINING)]}
    img = stage_image(stages, step=40)
    assert img.dtype == np.uint8 and img.shape[1] == 900 and img.shape[0] >= 250  # not a 32 x 16 thumbnail
    colors = {tuple(c) for c in img.reshape(-1, 3)}
    for stage in Stage:  # the legend shows every stage's colour, present in the grid or not
        assert STAGE_COLORS[stage] in colors, stage.name


def test_resumed_run_carries_its_history_and_plots_every_seed(tmp_path):
    first, resumed, plain = tmp_path / "first", tmp_path / "resumed", tmp_path / "plain"
    _train(tmp_path, "train.steps=60", "checkpoint.every=30", f"hydra.run.dir={first}")
    _train(
        tmp_path, "train.steps=120", f"checkpoint.resume={first}/checkpoints/step_0000030", f"hydra.run.dir={resumed}"
    )
    _train(tmp_path, "train.steps=120", f"hydra.run.dir={plain}")
    for name in ("events.jsonl", "telemetry.jsonl", "metrics.jsonl"):  # the whole history, as uninterrupted
        assert _jsonl(resumed / name) == _jsonl(plain / name) or name == "metrics.jsonl", name
        assert [r["step"] for r in _jsonl(resumed / name)] == [r["step"] for r in _jsonl(plain / name)], name
    metrics = _jsonl(resumed / "metrics.jsonl")[-1]
    assert {k for k in metrics if k.startswith("stages/")} == {f"stages/{s.name}" for s in Stage}  # zeros too
    log = (resumed / "train.log").read_text()
    assert "resumed at step 30" in log and "step 120:" in log and "finished:" in log

    out = tmp_path / "lifecycle.png"
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "plot_lifecycle.py"), str(resumed), "-o", str(out)],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and out.exists(), res.stderr
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import plot_lifecycle

    events = plot_lifecycle.load_events(str(resumed / "events.jsonl"))
    seeds = plot_lifecycle.all_seeds(str(resumed), events)
    assert seeds == [("embed", 0), ("embed", 1)]
    lanes = plot_lifecycle.timelines(events, 120, seeds)
    assert all(sum(length for _, length, _ in spans) == 120 for spans in lanes.values())  # from step 0
