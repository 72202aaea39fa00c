"""scripts/bench_host_path.py on the CPU with a tiny chain: its rows are written as JSON, the dormant layers launch
one kernel each way and the one-third-blended layers two, and the function calls it counts per layer call are the
same run to run (the figure to follow on a loaded machine). A subprocess: the script stubs the launchers of the
process it runs in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS, STEPS = 2, 5


def run_bench(tmp_path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    argv = ["--layers", str(LAYERS), "--steps", str(STEPS), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_host_path.py"), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_rows_launches_and_call_counts(tmp_path):
    first, second = run_bench(tmp_path, "a"), run_bench(tmp_path, "b")
    rows = first["rows"]
    assert set(rows) == {"dormant", "third", "bare"}
    assert rows["dormant"]["known_idle"] is True and rows["third"]["known_idle"] is False
    for row in rows.values():
        assert row["fwd_us"] > 0 and row["bwd_us"] > 0
        assert abs(row["fwd_bwd_us"] - row["fwd_us"] - row["bwd_us"]) < 1e-6
    # Each seeded row's chain runs STEPS timed passes, a warm-up pass and a counted pass: the column kernel in
    # both rows, the lowrank kernel in the one-third row only; the bare row launches nothing.
    passes = LAYERS * (STEPS + 2)
    want = {"_columns_fwd_kernel": 2 * passes, "_columns_bwd_kernel": 2 * passes}
    want |= {"_lowrank_fwd_kernel": passes, "_lowrank_bwd_kernel": passes}
    assert first["launches"] == want
    counts = ("fwd_py_calls", "fwd_c_calls", "bwd_py_calls", "bwd_c_calls")
    for name in rows:
        assert [rows[name][k] for k in counts] == [second["rows"][name][k] for k in counts], name
        assert all(rows[name][k] > 0 for k in counts), name
    # A prepared call stays within a dozen Python calls of one bare autograd.Function call each way.
    for k in ("fwd_py_calls", "bwd_py_calls"):
        assert rows["dormant"][k] - rows["bare"][k] <= 12, (k, rows["dormant"][k], rows["bare"][k])
