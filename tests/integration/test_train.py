"""train.run in-process: the run dir's files, the summary, resume equality, the offline wandb run."""

from __future__ import annotations

import glob
import json

import pytest
from hydra import compose, initialize_config_dir

from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.train import run

register_configs()
FAST = [
    "kernel.backend=reference",
    "train.progress=false",
    "controller.interval=5",
    "controller.fine_tuning_steps=20",
    "schedule.ramp_steps=10",
]
SUMMARY_KEYS = {"val_loss", "val_acc", "stage_counts", "steps", "world_size", "sharding", "params"}
RUN_SPECIFIC = {"runtime_s", "run_dir", "train_time_s", "samples_per_s", "mfu"}


def _run(run_dir, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, f"run_dir={run_dir}", *overrides])
    return run(cfg)


def test_short_run_files_and_summary(tmp_path):
    summary = _run(tmp_path, "train.steps=120", "logger=none")
    assert set(summary) >= SUMMARY_KEYS
    assert summary["steps"] == 120 and summary["world_size"] == 1 and summary["sharding"] == "data"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["val_acc"] == summary["val_acc"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events, "the controller made no decision"
    for e in events:
        assert {"step", "layer", "seed", "from", "to", "reason", "signals"} <= set(e)
    telemetry = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert {r["step"] for r in telemetry} == set(range(5, 121, 5))
    # one seed goes the whole way, and events.jsonl says why at every move
    path = [(e["from"], e["to"]) for e in events if e["layer"] == "embed" and e["seed"] == events[0]["seed"]]
    assert path[0] == ("DORMANT", "GERMINATED")
    assert ("FINE_TUNING", "FOSSILIZED") in path, path
    assert summary["stage_counts"]["FOSSILIZED"] >= 1
    assert summary["effective_params"] > summary["host_params"]


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a", "train.steps=90", "logger=jsonl")
    _run(tmp_path / "b", "train.steps=47", "logger=jsonl", "checkpoint.every=20")  # stops mid-interval
    resumed = _run(tmp_path / "b", "train.steps=90", "logger=jsonl", "checkpoint.resume=auto")
    for key in set(straight) - RUN_SPECIFIC:
        assert straight[key] == resumed[key], key
    for name in ("events.jsonl", "telemetry.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("a", "b")]
    logged = [[json.loads(line) for line in m if json.loads(line)["step"] != 47] for m in metrics]  # b stopped at 47
    timing = ("time/", "throughput/")  # wall-clock measurements differ run to run; the FLOPs must not
    logged = [[{k: v for k, v in rec.items() if not k.startswith(timing)} for rec in m] for m in logged]
    assert logged[0] == logged[1] and "flops/total" in logged[0][-1]


def test_resume_from_explicit_checkpoint(tmp_path):
    straight = _run(tmp_path / "a", "train.steps=60", "logger=none")
    _run(tmp_path / "b", "train.steps=60", "logger=none", "checkpoint.every=30")
    ckpt = tmp_path / "b" / "checkpoints" / "step_0000030"  # a torch.distributed.checkpoint directory
    resumed = _run(tmp_path / "c", "train.steps=60", "logger=none", f"checkpoint.resume={ckpt}")
    assert resumed["val_loss"] == straight["val_loss"] and resumed["seed_states"] == straight["seed_states"]


def test_static_host_has_no_seeds(tmp_path):
    summary = _run(tmp_path, "train.steps=20", "logger=none", "seeds.enabled=false")
    assert summary["params"] == summary["host_params"] and summary["grown_params"] == 0
    assert not (tmp_path / "events.jsonl").read_text()


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_other_hosts_train(tmp_path, model):
    summary = _run(tmp_path, f"model={model}", "train.steps=20", "logger=none")
    assert summary["params"] > summary["host_params"]  # banks were added


def test_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _run(tmp_path, "train.steps=40", "logger=wandb")
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    assert runs, list(tmp_path.iterdir())
