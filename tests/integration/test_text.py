"""The text workload as users run it: the CLI on data=text model=gpt task=causal_lm, a user's own model class
through model._target_, and transformers' Llama through model=hf_llama (random init, no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.train import run

register_configs()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_TEXT = ["data=text", "task=causal_lm", "data.max_bytes=300000", "data.seq_len=32", "data.val_windows=8"]
FAST = ["kernel.backend=reference", "train.progress=false", "logger=none", "checkpoint.save_final=false"]


class UserNet(nn.Module):
    """A model the project did not write: its own argument names, seeded at ``hidden``."""

    def __init__(self, in_features: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def _run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, f"run_dir={tmp_path}", *overrides])
    return run(cfg)


def test_cli_text_gpt_prints_bits_per_byte(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MORPHO_CACHE"] = str(tmp_path / "cache")
    args = [*SMALL_TEXT, "model=gpt", "model.width=32", "model.mlp_width=64", "train.steps=8", "train.batch_size=8"]
    args += ["logger=jsonl", "controller.interval=4", "train.log_every=4", f"hydra.run.dir={tmp_path}/run"]
    cmd = [sys.executable, "-m", "morpho_dist.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    bpb = float(line.split("val_bpb=")[1].split()[0])
    assert 1.0 < bpb < 8.5  # near 8 (uniform over bytes) after 8 steps
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bpb"] == pytest.approx(bpb, abs=1e-4) and summary["task"] == "causal_lm"
    assert summary["flops"] >= 8 * summary["host_flops_per_step"] > 0 and summary["tokens_per_s"] > 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    last = last.get("metrics", last)
    assert "val/bpb" in last and "throughput/tokens_per_s" in last and "flops/total" in last


def test_user_model_class_trains_with_seeds(tmp_path):
    summary = _run(
        tmp_path,
        f"model._target_={__name__}.UserNet",
        "+model.width=32",
        "seeds.targets=[hidden]",
        "train.steps=30",
        "controller.interval=5",
    )
    assert summary["host_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert summary["val_acc"] > 0.3 and summary["stage_counts"]["DORMANT"] < 2  # seeds were germinated


def test_hf_llama_trains_as_a_byte_level_model(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("MORPHO_CACHE", str(tmp_path / "cache"))
    summary = _run(
        tmp_path,
        *SMALL_TEXT,
        "model=hf_llama",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
        "train.steps=10",
        "train.batch_size=4",
        "controller.interval=5",
    )
    assert summary["val_bpb"] < 8.5 and summary["host_params"] > 0
    assert list(summary["seed_states"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
