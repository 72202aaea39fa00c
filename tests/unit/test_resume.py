"""morpho_dist.resume without a training run (fast; the mutation script's tests for resume.py with
test_checkpoint_unit's lock tests): what ``checkpoint.resume`` resolves to (none, auto, a checkpoint, a run
directory) and each one-line refusal, which earlier run ``auto`` picks, and where it looks."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from morpho_dist import checkpoint, resume
from morpho_dist.checkpoint import CheckpointError
from morpho_dist.errors import ConfigError
from tests.fake_checkpoint import fake_checkpoint

FILES = {".metadata": b"meta", "__0_0.distcp": b"0123456789"}


def _ckpt(run_dir, step: int, config: dict | None = None, mtime: float | None = None) -> str:
    """A committed checkpoint the way save() leaves one (files in <path>.tmp, then the marker and rename)."""
    path = fake_checkpoint(run_dir, step, FILES, config=config)
    if mtime is not None:
        os.utime(os.path.join(path, checkpoint.MARKER), (mtime, mtime))
    return path


def test_nothing_to_resume():
    for value in (None, "", "null"):
        assert resume.resolve_resume(value, "/nonexistent/run") is None


def test_a_checkpoint_or_a_run_directory(tmp_path):
    first, newest = _ckpt(tmp_path, 10), _ckpt(tmp_path, 20)
    assert resume.resolve_resume(first, str(tmp_path / "new")) == first
    assert resume.resolve_resume(str(tmp_path), str(tmp_path / "new")) == newest
    assert resume.resolve_resume(newest, "x", steps=20) == newest  # at train.steps: allowed
    with pytest.raises(ConfigError, match=r"is at step 20, past train.steps=19; set train.steps=20 or more"):
        resume.resolve_resume(newest, "x", steps=19)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume='.*empty': no complete checkpoints/step_\*/"):
        os.makedirs(tmp_path / "empty")
        resume.resolve_resume(str(tmp_path / "empty"), "x")
    with pytest.raises(CheckpointError, match=r"checkpoint.resume='/no/such': no such checkpoint or run directory"):
        resume.resolve_resume("/no/such", "x")


def test_an_incomplete_or_corrupt_checkpoint_is_refused_naming_the_newest_complete_one_before_it(tmp_path):
    older, path = _ckpt(tmp_path, 10), _ckpt(tmp_path, 20)
    os.remove(os.path.join(path, "__0_0.distcp"))
    with pytest.raises(CheckpointError) as info:
        resume.resolve_resume(path, "x")
    msg = str(info.value)
    assert msg.startswith(f"checkpoint.resume={path!r}: checkpoint") and "is missing" in msg
    assert msg.endswith(f"; the newest complete checkpoint before it is {older!r}") and "\n" not in msg
    first = checkpoint.checkpoint_path(str(tmp_path / "b"), 5)
    os.makedirs(first)  # a step directory without its marker: the save never finished
    with pytest.raises(CheckpointError, match=r"is incomplete: no checkpoint.json \(its write did not finish\)$"):
        resume.resolve_resume(first, "x")


def test_auto_takes_the_run_dirs_own_newest_else_the_newest_fitting_run(tmp_path, capsys):
    root = tmp_path / "runs"
    fit = {"model.embed": 32}
    older = _ckpt(root / "a", 30, fit, mtime=1_000)
    newer = _ckpt(root / "b", 10, fit, mtime=2_000)  # newer by write time, although at an earlier step
    _ckpt(root / "c", 50, {"model.embed": 64}, mtime=3_000)  # newest, but for another model
    wants_32 = resume.fits_config(OmegaConf.create({"model": {"embed": 32}}))
    run_dir = str(root / "new")
    assert resume.find_auto_resume(run_dir, str(root), wants_32) == newer
    assert resume.find_auto_resume(run_dir, str(root)).endswith(os.path.join("c", "checkpoints", "step_0000050"))
    os.utime(os.path.join(older, checkpoint.MARKER), (4_000, 4_000))
    assert resume.find_auto_resume(run_dir, str(root), wants_32) == older
    own = _ckpt(root / "new", 5, {"model.embed": 64})
    assert resume.find_auto_resume(run_dir, str(root), wants_32) == own  # its own run dir first, fitting or not
    assert resume.find_auto_resume(str(tmp_path / "x"), str(tmp_path / "empty")) is None
    assert resume.resolve_resume("auto", run_dir, fits=wants_32, announce=True) == own
    assert capsys.readouterr().err == f"checkpoint.resume=auto: resuming from {own}\n"


def test_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = str(tmp_path / "outputs" / "2026-01-01" / "10-00-00")
    assert resume.resolve_resume("auto", run_dir) is None
    assert capsys.readouterr().err == ""  # quiet unless asked
    assert resume.resolve_resume("auto", run_dir, announce=True) is None
    err = capsys.readouterr().err
    assert err == "checkpoint.resume=auto: no complete checkpoint that fits this config under outputs; starting fresh\n"


def test_outputs_root_is_hydras_outputs_or_the_run_dirs_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resume.outputs_root("outputs/2026-01-01/10-00-00") == str(tmp_path / "outputs")
    assert resume.outputs_root(str(tmp_path / "outputs" / "x")) == str(tmp_path / "outputs")
    assert resume.outputs_root(str(tmp_path / "elsewhere" / "run")) == str(tmp_path / "elsewhere")
    assert resume.outputs_root(str(tmp_path / "outputs-old" / "run")) == str(tmp_path / "outputs-old")


def test_fits_config_compares_only_the_keys_both_set():
    fits = resume.fits_config(OmegaConf.create({"model": {"embed": 32}, "seeds": {"rank": 8}}))
    assert fits({"config": {"model.embed": 32}}) and fits({}) and fits({"config": {"data.name": "digits"}})
    assert not fits({"config": {"model.embed": 32, "seeds.rank": 4}})


def test_lock_notes_and_refusals(tmp_path, capfd, monkeypatch):
    """A lock file naming a live process of this host whose lock is released is stale too (a note says so); one of
    another host gets no note; a held lock without a holder line names 'another process'; a run dir that cannot
    be created is one line; a process of another user counts as alive."""
    import fcntl
    import socket

    lock = tmp_path / resume.LOCK
    lock.write_text(f"{os.getpid()} {socket.gethostname()} 2026-01-01T00:00:00\n")
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        pass
    assert f"taking over the stale lock of pid {os.getpid()} (its lock released)" in capfd.readouterr().err
    lock.write_text("1 another-host 2026-01-01T00:00:00\n")
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        pass
    assert capfd.readouterr().err == ""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, and the file is empty
        busy = pytest.raises(resume.RunDirBusy, match=r"is in use by another run \(another process\)")
        with busy, resume.run_dir_lock(str(tmp_path), is_main=True):
            pass
    finally:
        os.close(fd)
    (tmp_path / "file").write_text("")
    unmakeable = pytest.raises(resume.RunDirBusy, match=r"run_dir='.*file/run' cannot be locked \(\w+Error \[")
    with unmakeable, resume.run_dir_lock(str(tmp_path / "file" / "run"), is_main=True):
        pass

    def other_users(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", other_users)
    assert resume._pid_alive(12345)
    monkeypatch.setattr(os, "kill", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    assert not resume._pid_alive(12345)


def test_auto_looks_at_any_depth_and_hints_name_the_newest_older_one(tmp_path):
    deep = _ckpt(tmp_path / "outputs" / "2026-01-01" / "10-00-00", 4)  # Hydra's outputs/<date>/<time>
    assert resume.find_auto_resume(str(tmp_path / "new"), str(tmp_path / "outputs")) == deep
    _ckpt(tmp_path / "r", 10)
    older, path = _ckpt(tmp_path / "r", 20), _ckpt(tmp_path / "r", 30)
    os.remove(os.path.join(path, "__0_0.distcp"))
    with pytest.raises(CheckpointError, match=f"the newest complete checkpoint before it is {older!r}$"):
        resume.resolve_resume(path, "x")
    with pytest.raises(TypeError):
        resume.resolve_resume(older, "x", 40)


@pytest.mark.parametrize(
    "line, who",
    [
        ("123 node-a 2026-01-01T00:00:00", "pid 123 on node-a"),
        ("123 node-a", "pid 123 on node-a"),
        ("123", "another process"),
    ],
)
def test_a_busy_lock_names_its_holder_when_it_can(tmp_path, line, who):
    import fcntl

    (tmp_path / resume.LOCK).write_text(line + "\n")
    fd = os.open(tmp_path / resume.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = pytest.raises(resume.RunDirBusy, match=rf"is in use by another run \({who}\)")
        with busy, resume.run_dir_lock(str(tmp_path), is_main=True):
            pass
    finally:
        os.close(fd)
