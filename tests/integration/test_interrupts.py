"""Ctrl-C and SIGTERM as a user sends them: the signal goes to the whole process group, the run stops after a
step, saves a checkpoint, prints one line with the resume command and exits 130 / 143; that command continues
to the summary of an uninterrupted run. One process here; 2 ranks under torchrun in tests/dist."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["kernel.backend=reference", "train.progress=false", "controller.interval=5", "logger=jsonl"]
SAME = ("val_loss", "val_acc", "stage_counts", "seed_states", "seed_state_digest", "steps")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MORPHO_RUN_DIR")}
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def start(cmd: list[str], cwd) -> subprocess.Popen:
    """In its own session and process group, as a terminal's foreground job is."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_checkpoint(proc: subprocess.Popen, run_dir, timeout: float = 240) -> None:
    """Until the run has written its first complete checkpoint (it is training), or it ended."""
    deadline = time.time() + timeout
    ckpts = run_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any((p / "checkpoint.json").exists() for p in ckpts.iterdir()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint before the interrupt; exit {proc.poll()}")


def interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str, str]:
    os.killpg(proc.pid, sig)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, "the run took more than a minute to stop"
    return proc.returncode, out, err


def the_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    found = [line for line in lines if line.startswith("interrupted")]
    assert len(found) == 1, stderr
    return found[0]


def resume_args(line: str) -> list[str]:
    """The overrides of the printed resume command (after its launcher)."""
    cmd = line.split("resume with: ", 1)[1]
    return cmd.split(" -m morpho_dist.train ", 1)[1].split()


def summary(run_dir) -> dict:
    with open(run_dir / "summary.json") as fh:
        return json.load(fh)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_process_interrupt(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    args = [*FAST, "train.steps=120", "checkpoint.every=10", f"hydra.run.dir={run_dir}"]
    proc = start([sys.executable, "-m", "morpho_dist.train", *args], tmp_path)
    wait_for_checkpoint(proc, run_dir)
    rc, _, err = interrupt(proc, sig)
    assert rc == code, err
    line = the_line(err)
    assert f"interrupted ({signal.Signals(sig).name}) after step" in line
    step = int(re.search(r"after step (\d+)", line).group(1))
    assert 0 < step < 120
    ckpt = re.search(r"last complete checkpoint (\S+);", line).group(1)
    assert ckpt.endswith(f"step_{step:07d}"), line  # the final checkpoint is at the step it stopped after
    assert os.path.isfile(os.path.join(tmp_path, ckpt, "checkpoint.json"))
    assert line.split("resume with: ")[1].startswith("python -m morpho_dist.train ")
    if sig != signal.SIGINT:
        return  # the same stop; resuming it is checked once

    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", *resume_args(line)],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    plain = tmp_path / "plain"
    res = subprocess.run(
        [sys.executable, "-m", "morpho_dist.train", *args[:-1], f"hydra.run.dir={plain}"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    resumed, uninterrupted = summary(run_dir), summary(plain)
    assert {k: resumed[k] for k in SAME} == {k: uninterrupted[k] for k in SAME}


def test_interrupt_without_checkpoints_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        [sys.executable, "-m", "morpho_dist.train", *FAST, "train.steps=100000", f"hydra.run.dir={run_dir}"], tmp_path
    )
    deadline = time.time() + 240
    while not (run_dir / "telemetry.jsonl").exists() or not (run_dir / "telemetry.jsonl").stat().st_size:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    rc, _, err = interrupt(proc, signal.SIGINT)
    assert rc == 130
    assert "no checkpoint to resume from" in the_line(err)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["torchrun", "morpho_dist.torchrun"])
def test_two_rank_interrupt_resumes_to_the_same_summary(tmp_path, launcher):
    """Ctrl-C to torchrun's process group mid-run: every rank stops after the same step, the final checkpoint is
    written, rank 0 prints one line, no worker prints a traceback; the printed command ends where an
    uninterrupted 2-rank run ends. morpho_dist.torchrun also drops torchrun's own report and exits 130.
    (The resume is run for morpho_dist.torchrun's command; torchrun's differs only in its launcher.)"""
    port = f"--master_port={free_port()}"
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, "-m", "morpho_dist.train"]
    else:
        prefix = [sys.executable, "-m", "morpho_dist.torchrun", "--nproc_per_node=2", port]
    run_dir = tmp_path / "run"
    args = [*FAST, "train.steps=120", "checkpoint.every=20", f"hydra.run.dir={run_dir}"]
    proc = start([*prefix, *args], tmp_path)
    wait_for_checkpoint(proc, run_dir)
    rc, _, err = interrupt(proc, signal.SIGINT)
    lines = [line for line in err.splitlines() if line.strip()]
    if launcher == "torchrun":  # torchrun's agent adds its own SignalException traceback; the workers none
        worker_err = err.split("Traceback (most recent call last):")[0]
        assert "SignalException" in err.split("Traceback (most recent call last):")[-1]
        line = the_line(worker_err)
    else:
        assert rc == 130 and lines == [the_line(err)], err
        line = lines[0]
    step = int(re.search(r"after step (\d+)", line).group(1))
    assert 0 < step < 120 and re.search(rf"checkpoint \S+step_{step:07d};", line), line
    resume = line.split("resume with: ")[1]
    if launcher == "torchrun":
        assert resume.startswith("torchrun --nproc_per_node=2 -m morpho_dist.train ")
        return  # the continuation is the same as below; run once
    assert resume.startswith(f"python -m morpho_dist.torchrun --nproc_per_node=2 {port} ")

    cont = [*prefix[:4], f"--master_port={free_port()}", *resume_args_any(resume)]
    res = subprocess.run(cont, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    plain = tmp_path / "plain"
    res = subprocess.run(
        [*prefix, *args[:-1], f"hydra.run.dir={plain}"], cwd=tmp_path, env=env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    resumed, uninterrupted = summary(run_dir), summary(plain)
    assert {k: resumed[k] for k in SAME} == {k: uninterrupted[k] for k in SAME}


def resume_args_any(cmd: str) -> list[str]:
    """The Hydra overrides of a printed resume command, whatever its launcher."""
    return [w for w in cmd.split() if "=" in w and not w.startswith("--")]


def test_resume_auto_finds_the_newest_fitting_run(tmp_path):
    """checkpoint.resume=auto from a fresh launch: the newest run under outputs/ with a complete checkpoint
    of a config that fits, said in one line; a config that fits none starts fresh, and says so."""

    def train(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "morpho_dist.train", *FAST, *args]
        res = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return res

    train("train.steps=20", "hydra.run.dir=outputs/first")
    res = train("train.steps=40", "checkpoint.resume=auto", "hydra.run.dir=outputs/second")
    assert "checkpoint.resume=auto: resuming from " in res.stderr and "first/checkpoints/step_0000020" in res.stderr
    assert summary(tmp_path / "outputs" / "second")["steps"] == 40
    res = train("train.steps=40", "seeds.per_layer=1", "checkpoint.resume=auto", "hydra.run.dir=outputs/third")
    assert "checkpoint.resume=auto: no complete checkpoint that fits this config under outputs; starting fresh" in (
        res.stderr
    )
