"""The text workload on the GPU (Triton backend): a short data=text model=gpt task=causal_lm run that grows seeds
logs tokens/s and MFU, and its first losses follow the reference backend's within float tolerance.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_text_gpu.py
"""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.train import run

pytestmark = pytest.mark.gpu
register_configs()
TEXT = ["data=text", "model=gpt", "task=causal_lm", "data.max_bytes=2000000", "train.steps=60", "train.log_every=20"]
FAST = ["logger=none", "train.progress=false", "checkpoint.save_final=false", "controller.interval=5"]
GROW = ["controller.min_training_steps=5", "schedule.ramp_steps=5", "controller.fine_tuning_steps=10"]


def _run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TEXT, *FAST, *GROW, f"run_dir={tmp_path}", *overrides])
    record: dict = {}
    return run(cfg, record=record), record


def test_text_run_on_gpu_logs_throughput_and_grows(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHO_CACHE", str(tmp_path / "cache"))
    summary, _ = _run(tmp_path / "triton", "kernel.backend=triton")
    assert summary["device"].startswith("cuda") and math.isfinite(summary["val_bpb"]) and summary["val_bpb"] < 8
    assert summary["tokens_per_s"] > 0 and summary["mfu"] is not None and 0 < summary["mfu"] < 1
    assert summary["seed_flops"] > 0  # seeds went live, and their FLOPs were counted
    assert summary["flops"] > 60 * summary["host_flops_per_step"]


def test_triton_and_reference_backends_train_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHO_CACHE", str(tmp_path / "cache"))
    tri, rec_t = _run(tmp_path / "t", "kernel.backend=triton", "kernel.dot_precision=ieee")
    ref, rec_r = _run(tmp_path / "r", "kernel.backend=reference")
    for (s, a), (_, b) in zip(rec_t["losses"][:20], rec_r["losses"][:20]):  # before chaos amplifies rounding
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3), s
