"""The CLI as a user runs it: one-line errors naming the key, no traceback, non-zero exit; a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("WANDB_MODE", "offline")
    return subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, key",
    [
        (["train.stepz=5"], "train.stepz"),  # unknown key
        (["model.embedd=4"], "model.embedd"),  # unknown key inside a group
        (["sharding=tensor"], "sharding"),  # unknown group option
        (["model=cnn", "sharding=seed"], "sharding.mode"),  # cnn: data parallel only
        (["model=resnet"], "model"),
        (["kernel.block_rows=48"], "kernel.block_rows"),  # not a power of two
        (["seeds.per_layer=3"], "seeds.per_layer"),  # does not divide the width
        (["train.steps=-5"], "train.steps"),  # negative steps
        (["train.steps=abc"], "train.steps"),  # wrong type
        (["+train.foo=1"], "train.foo"),
    ],
)
def test_config_errors_are_one_line(args, key):
    res = _cli(*args)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert key in lines[0] and "Traceback" not in res.stderr
    assert res.stdout.strip() == ""


def test_missing_cifar_names_the_path(tmp_path):
    res = _cli("data=cifar10", f"data.root={tmp_path}/nope", "logger=none", f"hydra.run.dir={tmp_path}/run")
    lines = [line for line in res.stderr.splitlines() if line.strip() and "%|" not in line]
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert any("data.root" in line and "nope" in line for line in lines), res.stderr


def test_tiny_run_writes_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    res = _cli(
        "train.steps=30",
        "logger=jsonl",
        "kernel.backend=reference",
        "controller.interval=5",
        "train.progress=false",
        f"hydra.run.dir={run_dir}",
    )
    assert res.returncode == 0, res.stderr
    for name in ("summary.json", "events.jsonl", "telemetry.jsonl", "metrics.jsonl", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == 1
