"""launch/cpu.sh runs the job on N gloo processes and passes Hydra overrides through (CI runs this)."""

from __future__ import annotations

import json
import os

import pytest

from tests.dist._harness import REPO, run_launcher

pytestmark = pytest.mark.dist


def test_cpu_launch_script_runs_seed_sharding(tmp_path):
    cmd = ["bash", os.path.join(REPO, "launch", "cpu.sh"), "2", "sharding=seed", "train.steps=30"]
    cmd += ["kernel.backend=reference", "train.progress=false", "logger=jsonl", f"hydra.run.dir={tmp_path}/run"]
    res = run_launcher(cmd, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == "seed" and summary["steps"] == 30
    assert [r["seed_ranges"]["embed"] for r in summary["ranks"]] == [[0, 1], [1, 2]]
