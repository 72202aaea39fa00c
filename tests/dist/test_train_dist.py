"""Two gloo processes train data-parallel and end with identical seed states; torchrun shares one run dir."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from tests.dist._harness import free_port, run_launcher, torchrun_cmd

pytestmark = pytest.mark.dist

WORLD = 2
OVERRIDES = [
    "kernel.backend=reference",
    "train.progress=false",
    "controller.interval=5",
    "controller.fine_tuning_steps=20",
    "schedule.ramp_steps=10",
    "train.steps=100",
]


def _worker(rank: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from hydra import compose, initialize_config_dir

    from morpho_dist.cli import CONF_DIR
    from morpho_dist.config import register_configs
    from morpho_dist.train import run

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*OVERRIDES, "logger=jsonl", f"run_dir={run_dir}"])
    summary = run(cfg)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(summary, fh)


def test_ranks_end_with_identical_seed_states(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=WORLD, join=True)
    s0, s1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert s0["world_size"] == s1["world_size"] == WORLD
    assert s0["seed_state_digest"] == s1["seed_state_digest"]
    assert s0["seed_states"] == s1["seed_states"] and s0["seeds_identical_across_ranks"]
    assert s0["stage_counts"]["FOSSILIZED"] >= 1
    assert s0["val_loss"] == s1["val_loss"]  # identical host weights (DDP) and seeds
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["seed_state_digest"] == s0["seed_state_digest"]


def test_torchrun_shares_one_run_dir(tmp_path):
    res = run_launcher([*torchrun_cmd(2), "-m", "morpho_dist.train", *OVERRIDES, "logger=jsonl"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dirs = [os.path.dirname(p) for p in (tmp_path / "outputs").glob("*/*/summary.json")]
    assert len(run_dirs) == 1, list((tmp_path / "outputs").rglob("*"))
    # no second run dir from another rank (outputs/.elastic holds the restart marker, not a run)
    assert len([p for p in (tmp_path / "outputs").glob("*/*") if not p.parent.name.startswith(".")]) == 1
    summary = json.loads((tmp_path / "outputs").joinpath(run_dirs[0], "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["seeds_identical_across_ranks"]
    assert (tmp_path / "outputs").joinpath(run_dirs[0], ".hydra", "config.yaml").exists()
