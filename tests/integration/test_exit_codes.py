"""Every user-facing error is one line (on rank 0) with its class's exit code, in one process and under
``python -m morpho_dist.torchrun`` on 2 ranks, and a failed launch leaves no run dir behind (README: Exit codes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["kernel.backend=reference", "train.progress=false", "logger=none"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORPHO_RUN_DIR")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"--master_port={s.getsockname()[1]}"


def launch(cwd, ranks: int, *args: str) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "morpho_dist.train", *FAST, *args]
    else:
        cmd = [sys.executable, "-m", "morpho_dist.torchrun", f"--nproc_per_node={ranks}", _port(), *FAST, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run dir with a complete checkpoint at step 20."""
    root = tmp_path_factory.mktemp("saved")
    res = launch(root, 1, "train.steps=20", f"hydra.run.dir={root / 'run'}")
    assert res.returncode == 0, res.stderr
    return root / "run"


CASES = {  # name -> (overrides, exit code, words the line must hold)
    "unknown key": (["train.stepz=5"], 2, "train.stepz"),
    "seed degree": (["sharding=hybrid", "sharding.seed_degree=2", "seeds.per_layer=1"], 2, "degree"),
    "cuda without cuda": (["train.device=cuda"], 2, "train.device='cuda'"),
    "resume past train.steps": (["train.steps=10", "checkpoint.resume={ckpt}"], 2, "past train.steps=10"),
    "missing checkpoint": (["checkpoint.resume={missing}"], 3, "no such checkpoint"),
}


# the launcher's own config check, a worker's check before the process group, one after the run dir exists
TORCHRUN_CASES = ("unknown key", "seed degree", "resume past train.steps")


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.dist)])
@pytest.mark.parametrize("case", list(CASES))
def test_error_is_one_line_with_its_exit_code(case, ranks, saved, tmp_path):
    overrides, code, words = CASES[case]
    if case == "cuda without cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    if ranks == 2 and case not in TORCHRUN_CASES:
        pytest.skip("the same code path as in one process; the torchrun cases cover the launcher")
    fill = {"ckpt": saved / "checkpoints" / "step_0000020", "missing": tmp_path / "nope"}
    args = [o.format(**fill) for o in overrides]
    res = launch(tmp_path, ranks, *args, "hydra.run.dir=outputs/failed")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert res.stdout.strip() == ""
    assert not (tmp_path / "outputs").exists()  # no run dir left behind, nor an empty outputs/
