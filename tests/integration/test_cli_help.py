"""--help lists the user's groups (not the schema/ ones) and every key with its value and a description."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _help(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", *args, "--help"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout


def test_help_lists_groups_and_described_keys():
    out = _help()
    assert "schema/" not in out
    groups = out.split("Groups")[1].split("Keys")[0]
    assert "  sharding    data*, hybrid, seed" in groups and "  model " in groups
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if "=" in line and line.startswith("  ")}
    assert "optimizer steps" in lines["train.steps"] and "train.steps=1200" in lines["train.steps"]
    assert "must divide its width" in lines["seeds.per_layer"]
    assert "steps between controller decisions" in lines["controller.interval"]
    described = [k for k in lines if "." in k and not k.endswith(("._target_", ".name"))]
    missing = [k for k in described if len(lines[k].split(None, 1)) < 2]
    assert len(missing) <= len(described) // 10, missing  # nearly every key says what it does


def test_help_follows_overrides():
    out = _help("model=transformer", "train.steps=7")
    assert "model.d_model=32" in out and "train.steps=7" in out and "model.embed" not in out
