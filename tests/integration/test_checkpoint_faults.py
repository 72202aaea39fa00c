"""Saves that fail, checkpoints that do not fit, and two runs on one run dir, each ending in one line.

The save failures are real: a tmpfs too small for the next checkpoint (ENOSPC from the kernel) and a read-only
remount (EROFS) when this process may mount (root in a container; skipped otherwise), and errors raised at the
lowest Python layer DCP and ``os.makedirs`` go through (``io.open`` returning files whose writes fail with
ENOSPC, ``os.mkdir`` failing with EACCES) everywhere. DCP itself runs and wraps them in its
``CheckpointException`` (a ``BaseException``); nothing of ours is monkeypatched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir

from morpho_dist import checkpoint, resume
from morpho_dist.cli import CONF_DIR
from morpho_dist.config import register_configs
from morpho_dist.train import run

register_configs()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = [
    "kernel.backend=reference",
    "kernel.deterministic=true",
    "train.progress=false",
    "train.log_every=0",
    "logger=jsonl",
    "controller.interval=5",
]


def _cfg(run_dir, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*FAST, f"run_dir={run_dir}", *overrides])


def _run(run_dir, *overrides: str) -> dict:
    return run(_cfg(run_dir, *overrides))


def _ckpts(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def _markers(run_dir) -> dict:
    return {p: checkpoint.validate(os.path.join(run_dir, "checkpoints", p)) for p in _ckpts(run_dir)}


# ---- OS-level fault injection -------------------------------------------------------------------------------------
class _FailingFile(io.FileIO):
    """A real file whose writes fail with ``code`` once ``budget`` bytes were written (a disk that fills up)."""

    budget = 0
    code = errno.ENOSPC

    def write(self, b):
        if _FailingFile.budget < len(b):
            raise OSError(_FailingFile.code, os.strerror(_FailingFile.code))
        _FailingFile.budget -= len(b)
        return super().write(b)


@pytest.fixture
def disk_fills_under(monkeypatch):
    """``fill(dir, after_bytes)``: binary writes to files under ``dir`` fail with ENOSPC after ``after_bytes``."""
    real_open = io.open

    def fill(root: str, after_bytes: int = 0, code: int = errno.ENOSPC) -> None:
        _FailingFile.budget, _FailingFile.code = after_bytes, code
        root = os.path.abspath(root)

        def failing_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(root) and "w" in mode:
                raw = _FailingFile(os.fspath(file), mode.replace("b", "").replace("+", "") or "w")
                return io.BufferedWriter(raw) if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", failing_open)

    return fill


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(dir, size_bytes)``: a tmpfs of that size at ``dir`` (unmounted after the test); skips when this
    process may not mount."""
    mounted: list[str] = []

    def mount(path, size: int, *options: str) -> str:
        os.makedirs(path, exist_ok=True)
        opts = ",".join([f"size={size}", *options])
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(str(path))
        return str(path)

    def remount_ro(path) -> None:
        res = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot remount read-only: {res.stderr.strip()}")

    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield mount, remount_ro
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _checkpoint_bytes(run_dir) -> int:
    path = os.path.join(run_dir, "checkpoints", _ckpts(run_dir)[-1])
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _assert_one_line_save_failure(err: BaseException, path_part: str, cause: str) -> str:
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert path_part in msg and cause in msg, msg
    return msg


# ---- save failures ---------------------------------------------------------------------------------------------
def test_disk_full_on_a_real_filesystem(tmp_path, tmpfs):
    mount, _ = tmpfs
    probe = tmp_path / "probe"
    _run(probe, "train.steps=5", "checkpoint.every=5")
    size = _checkpoint_bytes(probe)
    run_dir = tmp_path / "run"
    mount(run_dir / "checkpoints", size + size // 2 + 8192)  # room for one checkpoint, not two
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(run_dir, "train.steps=10", "checkpoint.every=5", "checkpoint.keep=0")
    # DCP's tensor writes meet ENOSPC; torch's serializer (the small pickled items) reports 'unexpected pos':
    # either way the line names the full device
    msg = _assert_one_line_save_failure(info.value, "step_0000010", "o space left on ")
    assert "ENOSPC" in msg or "bytes free" in msg, msg
    assert _ckpts(run_dir) == ["step_0000005"]  # the .tmp removed, the good one there and valid
    assert checkpoint.validate(str(run_dir / "checkpoints" / "step_0000005"))["step"] == 5


def test_read_only_filesystem(tmp_path, tmpfs):
    mount, remount_ro = tmpfs
    run_dir = tmp_path / "run"
    mount(run_dir / "checkpoints", 64 << 20)
    _run(run_dir, "train.steps=5", "checkpoint.every=5")
    before = _markers(run_dir)
    remount_ro(run_dir / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(run_dir, "train.steps=10", "checkpoint.every=5", "checkpoint.resume=auto")
    msg = _assert_one_line_save_failure(info.value, "step_0000010", "Read-only file system")
    assert "EROFS" in msg
    assert _markers(run_dir) == before


def test_disk_full_inside_dcp_is_one_line(tmp_path, disk_fills_under):
    """ENOSPC halfway through DCP's writes: DCP raises its CheckpointException (a BaseException, many lines);
    the save reports one line with the cause, removes the .tmp and leaves the earlier checkpoints as they were."""
    _run(tmp_path, "train.steps=10", "checkpoint.every=5")
    before = _markers(tmp_path)
    disk_fills_under(str(tmp_path / "checkpoints"), after_bytes=1000)
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(tmp_path, "train.steps=15", "checkpoint.every=5", "checkpoint.resume=auto")
    assert isinstance(info.value.__context__, dcp.api.CheckpointException) or "rank 0" in str(info.value)
    _assert_one_line_save_failure(info.value, "step_0000015", "No space left on device")
    assert _ckpts(tmp_path) == sorted(before) and _markers(tmp_path) == before


def test_permission_denied_creating_the_tmp_dir(tmp_path, monkeypatch):
    """``os.makedirs`` of the .tmp fails (EACCES from os.mkdir, where makedirs meets the OS)."""
    _run(tmp_path, "train.steps=5", "checkpoint.every=5")
    before = _markers(tmp_path)
    real_mkdir = os.mkdir

    def denied(path, *args, **kwargs):
        if str(path).endswith(checkpoint.TMP_SUFFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(tmp_path, "train.steps=10", "checkpoint.every=5", "checkpoint.resume=auto")
    msg = _assert_one_line_save_failure(info.value, "step_0000010.tmp", "Permission denied")
    assert "EACCES" in msg
    assert _markers(tmp_path) == before


def test_cli_save_failure_exits_3_with_one_line(tmp_path):
    """The real command line: a disk that fills up during the final save is `error: ...` on one line, exit 3."""
    run_dir = tmp_path / "run"
    script = (
        "import errno, io, os, sys\n"
        "real = io.open\n"
        "class Full(io.FileIO):\n"
        "    def write(self, b):\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "def fopen(f, mode='r', *a, **k):\n"
        "    if isinstance(f, (str, os.PathLike)) and '.tmp' in os.fspath(f) and 'w' in mode and 'b' in mode:\n"
        "        return io.BufferedWriter(Full(os.fspath(f), 'w'))\n"
        "    return real(f, mode, *a, **k)\n"
        "io.open = fopen\n"
        "from morpho_dist.cli import main\n"
        "sys.argv[0] = 'morpho_dist.train'\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", script, *FAST, "logger=none", "train.steps=5", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 3, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: saving checkpoint") and "step_0000005" in lines[0]
    assert "No space left on device" in lines[0]
    assert not os.path.exists(run_dir / "checkpoints" / "step_0000005.tmp")


# ---- what a checkpoint holds and what loading accepts ----------------------------------------------------------
def test_marker_lists_every_file_and_its_step(tmp_path):
    _run(tmp_path, "train.steps=10", "checkpoint.every=5")
    last = tmp_path / "checkpoints" / "step_0000010"
    marker = json.loads((last / checkpoint.MARKER).read_text())
    on_disk = sorted(f for f in os.listdir(last) if f != checkpoint.MARKER)
    assert sorted(marker["files"]) == on_disk and ".metadata" in on_disk
    assert marker["config"]["model.embed"] == 32 and marker["config"]["seeds.kind"] == "lowrank"

    (last / "extra.distcp").write_bytes(b"planted")  # a file the marker does not list
    with pytest.raises(checkpoint.CheckpointError, match="'extra.distcp' is not listed"):
        checkpoint.validate(str(last))
    os.remove(last / "extra.distcp")
    victim = next(f for f in on_disk if f.endswith(".distcp"))
    shutil.move(last / victim, tmp_path / victim)  # a listed file missing
    with pytest.raises(checkpoint.CheckpointError, match=f"'{victim}' is missing"):
        checkpoint.validate(str(last))
    shutil.move(tmp_path / victim, last / victim)
    checkpoint.validate(str(last))

    marker["step"] = 5  # a marker that names another step
    (last / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(checkpoint.CheckpointError, match="its marker says step 5"):
        checkpoint.validate(str(last))
    # an edited marker that drops a file from its list is refused too (the file is then unlisted)
    marker["step"] = 10
    del marker["files"][victim]
    (last / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(checkpoint.CheckpointError, match="not listed"):
        checkpoint.validate(str(last))


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.embed=64", "model.embed=64 (checkpoint: 32)"),
        ("seeds.kind=diagonal", "seeds.kind='diagonal' (checkpoint: 'lowrank')"),
        ("seeds.rank=16", "seeds.rank=16 (checkpoint: 32)"),
        ("seeds.enabled=false", "seeds.enabled=False (checkpoint: True)"),
    ],
)
def test_resume_under_a_config_that_does_not_fit(tmp_path, override, named):
    _run(tmp_path / "a", "train.steps=5", "checkpoint.every=5")
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000005"
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(tmp_path / "b", "train.steps=10", f"checkpoint.resume={ckpt}", override)
    msg = str(info.value)
    assert "\n" not in msg and "does not fit this config" in msg and named in msg, msg
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_an_old_marker_without_config_still_names_the_shape_that_differs(tmp_path):
    _run(tmp_path / "a", "train.steps=5", "checkpoint.every=5")
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000005"
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    del marker["config"]
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(checkpoint.CheckpointError) as info:
        _run(tmp_path / "b", "train.steps=10", f"checkpoint.resume={ckpt}", "model.embed=64")
    msg = str(info.value)
    assert "\n" not in msg and "does not fit this model" in msg and "(checkpoint: (" in msg, msg


# ---- one run per run dir -------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_run_dir_is_refused(tmp_path):
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        with pytest.raises(resume.RunDirBusy) as info:
            _run(tmp_path, "train.steps=5")
        msg = str(info.value)
        assert "\n" not in msg and "is in use by another run" in msg and f"pid {os.getpid()}" in msg
        assert not os.path.exists(tmp_path / "metrics.jsonl")  # refused before writing anything
    s = _run(tmp_path, "train.steps=5")  # released on exit
    assert s["steps"] == 5
    assert (tmp_path / resume.LOCK).read_text() == ""  # released by the run too


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capfd):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / resume.LOCK).write_text(f"{dead.pid} {os.uname().nodename} 2026-01-01T00:00:00\n")
    s = _run(tmp_path, "train.steps=5")
    assert s["steps"] == 5
    assert f"taking over the stale lock of pid {dead.pid} (not running)" in capfd.readouterr().err


def test_cli_second_run_exits_2_with_one_line(tmp_path):
    """A live holder (another process) keeps the lock; the CLI's run on that dir stops at once, exit 2."""
    run_dir = tmp_path / "run"
    ready = tmp_path / f"ready-{uuid.uuid4().hex}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from morpho_dist import resume\n"
            f"with resume.run_dir_lock({str(run_dir)!r}, True):\n"
            f"    open({str(ready)!r}, 'w').close(); time.sleep(120)\n",
        ],
        env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE")}
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "morpho_dist.train",
                *FAST,
                "logger=none",
                "train.steps=5",
                f"hydra.run.dir={run_dir}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")},
            timeout=300,
        )
        # the refused run left the holder's dir alone (it holds only launch leftovers, but it is in use)
        assert (run_dir / resume.LOCK).read_text().split()[0] == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use by another run" in lines[0], res.stderr
    assert not os.path.exists(run_dir / "checkpoints")
