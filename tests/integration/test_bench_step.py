"""scripts/bench_step.py on the CPU with tiny sizes: the three variants are timed and written as JSON, and the
script imports neither Hydra, OmegaConf nor wandb (the GPU machine it is meant for has none of them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--hidden", "64", "--tokens", "16", "--layers", "2", "--seeds-per-layer", "4"]
TINY += ["--rank", "16", "--warmup", "1", "--steps", "2", "--guard", "--host-calls", "2"]
# A transformers Llama host, seeds on up_proj (width 256) and down_proj (width 64) of both decoder layers.
LLAMA = ["--device", "cpu", "--host", "llama", "--hidden", "64", "--heads", "4", "--layers", "2", "--tokens", "32"]
LLAMA += ["--seq", "16", "--vocab", "128", "--seeds-per-layer", "4", "--warmup", "1", "--steps", "2"]
LLAMA += ["--host-calls", "0"]

# Runs the script as __main__, then prints the forbidden top-level modules it pulled in.
RUNNER = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
print("FORBIDDEN", sorted({m.split('.')[0] for m in sys.modules} & {"hydra", "omegaconf", "wandb"}))
"""


def run_bench(tmp_path, argv: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench_step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT / "scripts" / "bench_step.py"), *argv, "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FORBIDDEN []" in proc.stdout, proc.stdout
    return proc, json.loads(out.read_text())


def test_bench_step_cpu_tiny(tmp_path):
    proc, result = run_bench(tmp_path, TINY)
    assert result["meta"]["torch"] == __import__("torch").__version__
    assert result["args"]["hidden"] == 64 and result["meta"]["backend"] == "reference"
    rows = result["rows"]
    assert [(r["variant"], r["guard"]) for r in rows] == [
        (v, g) for g in (False, True) for v in ("baseline", "dormant", "third")
    ]
    assert {r["mode"] for r in rows} == {"eager"}
    for r in rows:
        assert "error" not in r, r
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["min_ms"] > 0, r
        assert r["host_syncs"] == "n/a (cpu)"
    by = {(r["variant"], r["guard"]): r for r in rows}
    assert by[("baseline", False)]["seeded_layers"] == 0 and by[("baseline", False)]["overhead_pct"] == 0.0
    assert by[("dormant", False)]["stages"] == {"DORMANT": 8}
    # every third seed (0 and 3 of each layer of 4) in a blended stage, through the lifecycle commands
    third = by[("third", False)]["stages"]
    assert third["DORMANT"] == 4 and sum(third.values()) == 8 and "GRAFTING" in third
    for v in ("dormant", "third"):
        assert math.isfinite(by[(v, False)]["overhead_pct"])
    assert "overhead" in proc.stdout and "host_syncs" in proc.stdout
    calls = {c["variant"]: c for c in result["host_calls"]}
    assert set(calls) == {"dormant", "third"} and calls["dormant"]["seeds"] == 4
    assert all(c["fwd_us"] > 0 and c["bwd_us"] > 0 for c in calls.values())


def test_bench_step_cpu_llama_host(tmp_path):
    _, result = run_bench(tmp_path, [*LLAMA, "--variants", "baseline,dormant"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert "error" not in rows["dormant"], rows["dormant"]
    assert "LlamaForCausalLM x2" in rows["dormant"]["host"]
    assert rows["dormant"]["seeded_layers"] == 4  # up_proj and down_proj of both decoder layers
    assert rows["dormant"]["stages"] == {"DORMANT": 16}
    assert math.isfinite(rows["dormant"]["overhead_pct"])
