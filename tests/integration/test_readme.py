"""Every shell command and Python block of README.md runs, as written, and succeeds.

Conventions (so that the README can show real commands and CI stays short):
- Each ```bash block runs top to bottom in one scratch directory (``scripts/`` and ``launch/`` linked there),
  so a later command may use what an earlier one wrote (``outputs/a``).
- A training command that sets no ``train.steps=`` gets ``train.steps=40`` appended; commands that set it
  run with their own value. ``torchrun`` gets a free ``--master_port``.
- A line whose comment says ``needs: cuda`` runs only with CUDA; ``needs: cluster`` / ``needs: slurm`` lines are
  checked for syntax (``bash -n`` of the script they call), since CI has neither.
- ``pip install`` steps are not run here; they and the README's test command must be exactly what ``.ci/run``
  runs (CI runs them itself).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
TEST_STEPS = "train.steps=40"
TRAINS = (
    "morpho_dist.train",
    "launch/cpu.sh",
    "launch/gpus.sh",
    "launch/gpu_shared.sh",
    "launch/multinode.sh",
    "launch/slurm.sbatch",
)


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced block of that language in README.md."""
    out, current, start = [], None, 0
    with open(README) as fh:
        for no, line in enumerate(fh, 1):
            if current is None and line.rstrip() == f"```{lang}":
                current, start = [], no + 1
            elif current is not None and line.rstrip() == "```":
                out.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return out


def commands(body: str) -> list[str]:
    """The logical command lines of a bash block (backslash continuations joined, blank lines dropped)."""
    lines, pending = [], ""
    for raw in body.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment); the README's commands hold no quoted '#'."""
    idx = line.find(" #")
    return (line[:idx].rstrip(), line[idx + 2 :].strip()) if idx >= 0 else (line, "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def for_test(cmd: str) -> str:
    """The command as the test runs it (see the module docstring)."""
    if any(t in cmd for t in TRAINS) and "train.steps=" not in cmd:
        cmd = f"{cmd} {TEST_STEPS}"
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run --master_port={free_port()} "
    return re.sub(r"^torchrun ", torchrun, cmd)


def ci_script() -> str:
    with open(os.path.join(REPO, ".ci", "run")) as fh:
        return fh.read()


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORPHO_RUN_DIR")}
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    out["WANDB_MODE"] = "offline"
    bindir = os.path.dirname(sys.executable)  # `python` in the README is this interpreter
    out["PATH"] = bindir + os.pathsep + out.get("PATH", "")
    return out


def scratch(tmp_path) -> str:
    for name in ("scripts", "launch"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    return str(tmp_path)


def run_line(line: str, cwd: str) -> None:
    cmd, comment = split_comment(line)
    needs = re.search(r"needs: (\w+)", comment)
    if needs and needs.group(1) == "cuda" and not torch.cuda.is_available():
        return
    if needs and needs.group(1) in ("cluster", "slurm"):
        script = next(w for w in shlex.split(cmd) if w.startswith("launch/"))
        res = subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{line}\n{res.stderr}"
        return
    parts = [p.strip() for p in cmd.split("&&")]
    if "pytest" in cmd:  # the test command: .ci/run runs exactly these steps (and it is what runs this test)
        ci = ci_script().splitlines()
        for part in parts:
            assert part in ci or f"python -m {part}" in ci, f"README step {part!r} is not a line of .ci/run"
        return
    parts = [p for p in parts if not p.startswith("pip install")]
    for part in parts:
        res = subprocess.run(
            for_test(part), shell=True, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, f"{part}\nexit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        assert "Traceback" not in res.stderr, f"{part}\n{res.stderr[-4000:]}"


BASH = blocks("bash")
PYTHON = blocks("python")


def test_readme_has_blocks():
    assert len(BASH) >= 5 and len(PYTHON) >= 1


@pytest.mark.parametrize("start, body", BASH, ids=[f"bash@{s}" for s, _ in BASH])
def test_bash_block(start, body, tmp_path):
    cwd = scratch(tmp_path)
    for line in commands(body):
        run_line(line, cwd)


@pytest.mark.parametrize("start, body", PYTHON, ids=[f"python@{s}" for s, _ in PYTHON])
def test_python_block(start, body, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", body], cwd=scratch(tmp_path), env=env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"README block at line {start}:\n{res.stderr[-4000:]}"


def test_ci_runs_the_readme_test_command():
    (line,) = [c for _, b in BASH for c in commands(b) if "pytest" in c]
    assert line.split("&&")[-1].strip() in ci_script().splitlines()
