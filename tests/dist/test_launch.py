"""launch/cpu.sh runs the job on N gloo processes and passes Hydra overrides through (CI runs this)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.dist._harness import REPO, launcher_env

pytestmark = pytest.mark.dist


def test_cpu_launch_script_runs_seed_sharding(tmp_path):
    env = launcher_env()
    res = subprocess.run(
        [
            "bash",
            os.path.join(REPO, "launch", "cpu.sh"),
            "2",
            "sharding=seed",
            "train.steps=30",
            "kernel.backend=reference",
            "train.progress=false",
            "logger=jsonl",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == "seed" and summary["steps"] == 30
    assert [r["seed_ranges"]["embed"] for r in summary["ranks"]] == [[0, 1], [1, 2]]
