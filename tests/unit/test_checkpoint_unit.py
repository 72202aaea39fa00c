"""morpho_dist.checkpoint without a training run (fast; the mutation script's tests for checkpoint.py): the marker
and what validation refuses, the newest-K pruning, the config a checkpoint must fit, the one-line failure causes,
saves that fail or refuse a non-finite host, loads that refuse what does not fit, and the run-dir lock
(morpho_dist.resume)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from morpho_dist import checkpoint, resume
from morpho_dist.checkpoint import CheckpointError
from tests.fake_checkpoint import fake_checkpoint as _fake_checkpoint

MESH = SimpleNamespace(rank=0, dp=1, dp_rank=0, seed=1, mode="data", device_mesh=None)


FILES = {".metadata": b"meta", "__0_0.distcp": b"0123456789"}


def _write(path: str, name: str, data: bytes, mode: str = "wb") -> None:
    with open(os.path.join(path, name), mode) as fh:
        fh.write(data)


def _marker(path: str) -> dict:
    with open(os.path.join(path, checkpoint.MARKER)) as fh:
        return json.load(fh)


def _set_marker(path: str, marker: dict) -> None:
    _write(path, checkpoint.MARKER, json.dumps(marker).encode())


def test_marker_lists_every_file_with_size_and_checksum(tmp_path):
    path = _fake_checkpoint(tmp_path, 7, FILES, config={"model.embed": 32})
    marker = _marker(path)
    assert marker["step"] == 7 and marker["config"] == {"model.embed": 32}
    assert sorted(marker["files"]) == [".metadata", "__0_0.distcp"]
    assert marker["files"]["__0_0.distcp"][0] == 10 and len(marker["files"]["__0_0.distcp"][1]) == 32
    assert checkpoint.validate(path)["step"] == 7
    assert checkpoint.is_checkpoint(path) and not os.path.exists(path + checkpoint.TMP_SUFFIX)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: os.remove(os.path.join(p, "__0_0.distcp")), "file '__0_0.distcp' is missing"),
        (lambda p: _write(p, "extra.distcp", b"x"), "'extra.distcp' is not listed"),
        (lambda p: _write(p, "__0_0.distcp", b"0123456780"), "does not match its checksum"),
        (lambda p: _write(p, "__0_0.distcp", b"!", "ab"), "(size 11, expected 10)"),
        (lambda p: _write(p, checkpoint.MARKER, b"{"), "unreadable checkpoint.json"),
        (lambda p: os.remove(os.path.join(p, checkpoint.MARKER)), "is incomplete: no checkpoint.json"),
    ],
    ids=["missing", "unlisted", "checksum", "size", "unreadable-marker", "no-marker"],
)
def test_validate_refuses_a_tampered_checkpoint(tmp_path, tamper, message):
    path = _fake_checkpoint(tmp_path, 3, FILES)
    tamper(path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.validate(path)
    assert message in str(info.value) and "step_0000003" in str(info.value) and "\n" not in str(info.value)


def test_validate_refuses_a_marker_of_another_step_or_without_metadata(tmp_path):
    path = _fake_checkpoint(tmp_path, 3, FILES)
    marker = _marker(path)
    _set_marker(path, {**marker, "step": 4})
    with pytest.raises(CheckpointError, match="its marker says step 4"):
        checkpoint.validate(path)
    _set_marker(path, marker)
    assert checkpoint.validate(path)["step"] == 3
    other = _fake_checkpoint(tmp_path / "b", 5, {"__0_0.distcp": b"x"})
    with pytest.raises(CheckpointError, match="does not list .metadata"):
        checkpoint.validate(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.validate(str(tmp_path / "nope"))


def test_keep_prunes_to_the_newest_and_leftovers_go(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step, FILES, keep=0)
    os.makedirs(checkpoint.checkpoint_path(str(tmp_path), 35) + checkpoint.TMP_SUFFIX)  # a save that died
    _fake_checkpoint(tmp_path, 40, FILES, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000030", "step_0000040"]
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [30, 40]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_0000040")
    assert checkpoint.latest_checkpoint(str(tmp_path), max_step=39).endswith("step_0000030")
    assert checkpoint.latest_checkpoint(str(tmp_path), max_step=29) is None
    _fake_checkpoint(tmp_path, 40, {**FILES, "__1_0.distcp": b"new"}, keep=0)  # same step again: replaced whole
    assert "__1_0.distcp" in checkpoint.validate(checkpoint.checkpoint_path(str(tmp_path), 40))["files"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000030", "step_0000040"]


def test_fit_config_and_mismatch_name_the_keys():
    cfg = OmegaConf.create(
        {
            "model": {"name": "mlp", "embed": 32, "hidden": [4]},
            "data": {"name": "digits", "val_fraction": 0.2},
            "seeds": {"enabled": True, "kind": "lowrank", "rank": 32, "per_layer": 2, "targets": ["embed"]},
            "optim": {"name": "adamw", "betas": [0.9, 0.999]},
            "train": {"lr": 0.1},
        }
    )
    fit = checkpoint.fit_config(cfg)
    assert fit["model.embed"] == 32 and fit["model.hidden"] == [4] and fit["seeds.rank"] == 32
    assert fit["data.name"] == "digits" and fit["optim.name"] == "adamw"
    assert "train.lr" not in fit and "data.val_fraction" not in fit and "optim.betas" not in fit
    other = {**fit, "model.embed": 64, "seeds.kind": "diagonal"}
    assert checkpoint.config_mismatch(fit, other) == [
        "model.embed=64 (checkpoint: 32)",
        "seeds.kind='diagonal' (checkpoint: 'lowrank')",
    ]
    assert checkpoint.config_mismatch(fit, fit) == [] and checkpoint.config_mismatch({}, other) == []
    assert checkpoint.config_mismatch({"model.embed": 32}, {"seeds.rank": 8}) == []  # only keys both set


def test_describe_failure_is_one_line():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/step_0000010.tmp/__0_0.distcp")
    assert checkpoint.describe_failure(full) == (
        "OSError [ENOSPC] No space left on device: '/ckpt/step_0000010.tmp/__0_0.distcp'"
    )
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    assert checkpoint.describe_failure(denied) == "PermissionError [EACCES] Permission denied"
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x")
    except OSError as err:
        wrapped = _wrap_exception(err)
    many = CheckpointException("save failed", {1: wrapped, 0: wrapped})
    assert "\n" in str(many)  # DCP's own message: a traceback per rank
    assert checkpoint.describe_failure(many) == "rank 0: OSError [EROFS] Read-only file system: '/ro/x'"
    assert checkpoint.describe_failure(ValueError("a\n  b")) == "ValueError: a b"


def test_nonfinite_host_tensors_names_host_tensors_only():
    sd = {
        "model.w": torch.tensor([1.0, float("inf")]),
        "model.b": torch.tensor([0.0]),
        "optim.host.w.exp_avg": torch.tensor([float("nan")]),
        "train.prev_host.w": torch.tensor([1.0, 2.0]),
        "seeds.embed.bank.p0": torch.tensor([float("nan")]),  # a seed: culled by the guard, not a host fault
        "model.steps": torch.tensor([3]),
    }
    assert checkpoint.nonfinite_host_tensors(sd) == ["model.w", "optim.host.w.exp_avg"]


# ---- save and load of a tiny state (a host parameter, no seeds) ---------------------------------------------------
def _state(value: float = 1.0) -> dict:
    w = torch.nn.Parameter(torch.full((3,), value))
    return {"mesh": MESH, "layers": {}, "host_params": [("w", w)], "optimizers": None, "controller": None}


def test_save_then_load_round_trip_with_a_fitting_config(tmp_path):
    cfg = OmegaConf.create({"model": {"embed": 8}, "seeds": {"rank": 4}})
    path = checkpoint.checkpoint_path(str(tmp_path), 5)
    assert checkpoint.save(path, step=5, extra={"k": 1}, config=cfg, **_state(2.0)) == path
    state = _state(0.0)
    assert checkpoint.load(path, config=cfg, **state) == (5, {"k": 1})
    assert torch.equal(state["host_params"][0][1].detach(), torch.full((3,), 2.0))
    wider = OmegaConf.create({"model": {"embed": 16}, "seeds": {"rank": 4}})
    with pytest.raises(CheckpointError, match=r"does not fit this config: model.embed=16 \(checkpoint: 8\)$"):
        checkpoint.load(path, config=wider, **_state())
    bigger = _state()
    bigger["host_params"] = [("w", torch.nn.Parameter(torch.zeros(4)))]
    with pytest.raises(CheckpointError, match=r"does not fit this model: model.w \(4,\) \(checkpoint: \(3,\)\)"):
        checkpoint.load(path, **bigger)


def test_a_non_finite_host_is_never_saved(tmp_path, capfd):
    path = checkpoint.checkpoint_path(str(tmp_path), 5)
    assert checkpoint.save(path, step=5, **_state(float("nan"))) is None
    assert not os.path.exists(path) and not os.path.exists(path + checkpoint.TMP_SUFFIX)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "not saving checkpoint" in err and "model.w" in err


def test_save_failures_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    good = checkpoint.checkpoint_path(str(tmp_path), 5)
    checkpoint.save(good, step=5, **_state())
    before = checkpoint.validate(good)
    path = checkpoint.checkpoint_path(str(tmp_path), 10)
    real_open = io.open

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(file, mode="r", *args, **kwargs):  # what DCP's writes go through (pathlib -> io.open)
        if isinstance(file, (str, os.PathLike)) and ".tmp" in os.fspath(file) and "w" in mode and "b" in mode:
            return io.BufferedWriter(Full(os.fspath(file), "w"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", full_open)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(path, step=10, **_state())
    msg = str(info.value)
    assert "\n" not in msg and "step_0000010" in msg and "ENOSPC" in msg and "No space left on device" in msg
    monkeypatch.setattr(io, "open", real_open)
    real_mkdir = os.mkdir

    def denied(p, *args, **kwargs):
        if str(p).endswith(checkpoint.TMP_SUFFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_mkdir(p, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(CheckpointError, match=r"step_0000010.*\[EACCES\] Permission denied"):
        checkpoint.save(path, step=10, **_state())
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000005"]
    assert checkpoint.validate(good) == before


def test_load_refuses_a_non_finite_host(tmp_path, monkeypatch):
    path = checkpoint.checkpoint_path(str(tmp_path), 5)
    monkeypatch.setattr(checkpoint, "nonfinite_host_tensors", lambda sd: [])
    checkpoint.save(path, step=5, **_state(float("inf")))
    monkeypatch.undo()
    with pytest.raises(
        CheckpointError, match=r"is not usable: 1 host tensor\(s\) hold non-finite values \(first: model.w\)"
    ):
        checkpoint.load(path, **_state())


# ---- the run-dir lock ----------------------------------------------------------------------------------------------
def test_run_dir_lock_refuses_a_second_holder_and_releases(tmp_path):
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        held = (tmp_path / resume.LOCK).read_text().split()
        assert held[0] == str(os.getpid()) and held[1] == os.uname().nodename
        with pytest.raises(resume.RunDirBusy) as info, resume.run_dir_lock(str(tmp_path), is_main=True):
            pass
        assert f"pid {os.getpid()} on {os.uname().nodename}" in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, ValueError)  # a ConfigError: the CLI's exit 2
        with resume.run_dir_lock(str(tmp_path), is_main=False):  # other ranks never take it
            pass
    assert (tmp_path / resume.LOCK).read_text() == ""
    with resume.run_dir_lock(str(tmp_path), is_main=True):  # free again
        pass


def test_stale_lock_is_taken_over_with_a_note(tmp_path, capfd):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / resume.LOCK).write_text(f"{dead.pid} {os.uname().nodename} 2026-01-01T00:00:00\n")
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        assert (tmp_path / resume.LOCK).read_text().split()[0] == str(os.getpid())
    assert f"taking over the stale lock of pid {dead.pid} (not running)" in capfd.readouterr().err


def test_a_failure_on_a_full_filesystem_names_it(tmp_path, monkeypatch):
    usage = SimpleNamespace(total=100, used=100, free=0)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda d: usage)
    note = checkpoint._space_note(str(tmp_path), "rank 0: RuntimeError: unexpected pos 704 vs 598")
    assert note == "; no space left on the device (0 bytes free)"
    assert checkpoint._space_note(str(tmp_path), "OSError [ENOSPC] No space left on device") == ""
    usage.free = checkpoint.FULL_DISK_BYTES
    assert checkpoint._space_note(str(tmp_path), "RuntimeError: unexpected pos") == ""


def test_run_dir_in_use_only_while_a_process_holds_the_lock(tmp_path):
    assert not resume.run_dir_in_use(str(tmp_path))  # no lock file
    with resume.run_dir_lock(str(tmp_path), is_main=True):
        assert resume.run_dir_in_use(str(tmp_path))
    assert not resume.run_dir_in_use(str(tmp_path))  # released (the emptied file stays)


# ---- a whole training state: seeds, both optimizers, controller, previous host snapshot, rng -----------------------
def _training_state(fill: float, dp: int = 1, dp_rank: int = 0) -> dict:
    """A seeded layer (seed 0 TRAINING) beside a host Linear, AdamW on the host and the seed optimizer, each
    having stepped once when ``fill`` is not 0, a controller with a streak, and a previous host snapshot."""
    from morpho_dist.commands import advance, germinate
    from morpho_dist.controller import Controller
    from morpho_dist.layer import SeededLayer
    from morpho_dist.optim import Optimizers, SeedOptimizer

    torch.manual_seed(int(fill * 10))
    layer = SeededLayer(32, 2, kind="lowrank", rank=4, backend="reference", layer_key="fc")
    host = torch.nn.Linear(4, 4)
    optimizers = Optimizers(
        torch.optim.AdamW(host.parameters(), lr=0.1), SeedOptimizer({"fc": layer}, name="adamw", lr=0.1)
    )
    controller = Controller()
    if fill:
        germinate(layer, 0, 1)
        advance(layer, 0, 2)
        with torch.no_grad():
            layer.telemetry.copy_(torch.arange(layer.telemetry.numel(), dtype=torch.float32).view_as(layer.telemetry))
        for p in [*host.parameters(), layer.bank.p0, layer.bank.p1]:
            p.grad = torch.full_like(p, fill)
        optimizers.step()
        controller.streaks, controller.intervals = {"fc:0": 2}, 5
    mesh = SimpleNamespace(rank=0, dp=dp, dp_rank=dp_rank, seed=1, mode="data", device_mesh=None)
    params = [(f"lin.{n}", p) for n, p in host.named_parameters()]
    prev = [p.detach() + fill for _, p in params]
    return {
        "mesh": mesh,
        "layers": {"fc": layer},
        "host_params": params,
        "optimizers": optimizers,
        "controller": controller,
        "prev_host": prev,
    }


def test_a_whole_training_state_round_trips(tmp_path):
    from morpho_dist.kernels.layout import F_ABSMAX, F_BENEFIT, F_GRAD_SQ

    saved = _training_state(0.5, dp=2)
    path = checkpoint.checkpoint_path(str(tmp_path), 12)
    torch.manual_seed(7)
    checkpoint.save(path, step=12, extra={"epoch": 3}, **saved)
    draws = torch.rand(3)
    fresh = _training_state(0.0, dp=2)  # its host optimizer has no state yet: the load allocates it
    assert checkpoint.load(path, **fresh) == (12, {"epoch": 3})
    assert torch.equal(torch.rand(3), draws)  # the rng continues where the save left it
    a, b = saved["layers"]["fc"], fresh["layers"]["fc"]
    tensors_b = dict([*b.named_parameters(), *b.named_buffers()])
    for name, x in [*a.named_parameters(), *a.named_buffers()]:
        torch.testing.assert_close(tensors_b[name], x, rtol=0, atol=0, msg=name)
    assert b.stages()[0].name == "TRAINING" and not b.known_idle()  # the idle record follows the loaded stages
    for key, t in saved["optimizers"].seeds.state["fc"].items():
        assert torch.equal(fresh["optimizers"].seeds.state["fc"][key], t), key
    host_a, host_b = saved["optimizers"].host, fresh["optimizers"].host
    for (_, p), (_, q) in zip(saved["host_params"], fresh["host_params"]):
        assert torch.equal(q, p)
        assert sorted(host_b.state[q]) == sorted(host_a.state[p])
        for key in host_a.state[p]:
            assert torch.equal(torch.as_tensor(host_b.state[q][key]), torch.as_tensor(host_a.state[p][key])), key
    assert all(torch.equal(x, y) for x, y in zip(fresh["prev_host"], saved["prev_host"]))
    assert fresh["controller"].state_dict() == {"streaks": {"fc:0": 2}, "intervals": 5}
    # another data-parallel replica starts its sums at zero (keeping the max); one process of dp=1 holds the
    # global-batch table: grad_sq / dp^2 and benefit / dp of the two replicas' sum, the other fields as they are
    replica = _training_state(0.0, dp=2, dp_rank=1)
    checkpoint.load(path, **replica)
    tel = replica["layers"]["fc"].telemetry
    assert torch.equal(tel[:, F_ABSMAX], a.telemetry[:, F_ABSMAX])
    assert not tel[:, :F_ABSMAX].any() and not tel[:, F_ABSMAX + 1 :].any()
    single = _training_state(0.0, dp=1)
    checkpoint.load(path, **single)
    expected = a.telemetry.clone()
    expected[:, F_GRAD_SQ] /= 4
    expected[:, F_BENEFIT] /= 2
    torch.testing.assert_close(single["layers"]["fc"].telemetry, expected, rtol=0, atol=0)


def test_checkpoint_edges(tmp_path, monkeypatch):
    """A leftover .tmp of a save that died is not carried into the next checkpoint; keep=1 keeps one; the fit
    config resolves interpolations; a full disk is one of less than 1 MiB free; save and load take keywords only;
    a state without a controller loads one saved with it; a shape refusal names the first three tensors."""
    path = checkpoint.checkpoint_path(str(tmp_path), 5)
    os.makedirs(path + checkpoint.TMP_SUFFIX)
    _write(path + checkpoint.TMP_SUFFIX, "junk", b"from a save that died")
    checkpoint.save(path, step=5, **_state())
    assert "junk" not in os.listdir(path)
    checkpoint.save(checkpoint.checkpoint_path(str(tmp_path), 6), step=6, keep=1, **_state())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000006"]
    cfg = OmegaConf.create({"width": 48, "model": {"embed": "${width}"}})
    assert checkpoint.fit_config(cfg)["model.embed"] == 48
    usage = SimpleNamespace(total=1 << 30, used=0, free=(1 << 20) - 1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda d: usage)
    assert checkpoint._space_note(str(tmp_path), "x") == f"; no space left on the device ({(1 << 20) - 1} bytes free)"
    usage.free = 1 << 20
    assert checkpoint._space_note(str(tmp_path), "x") == ""
    monkeypatch.undo()
    with pytest.raises(TypeError):
        checkpoint.save(path, 5, **_state())
    with pytest.raises(TypeError):
        checkpoint.load(path, MESH, {}, [], None, None)
    whole = _training_state(0.5)
    saved = checkpoint.checkpoint_path(str(tmp_path), 9)
    checkpoint.save(saved, step=9, **whole)
    assert checkpoint.load(saved, **{**_training_state(0.0), "controller": None})[0] == 9
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(i + 1))) for i in range(4)]
    checkpoint.save(saved, step=9, **{**_state(), "host_params": params})
    wider = [(n, torch.nn.Parameter(torch.zeros(p.numel() + 1))) for n, p in params]
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(saved, **{**_state(), "host_params": wider})
    assert str(info.value).endswith(
        "model.p0 (2,) (checkpoint: (1,)); model.p1 (3,) (checkpoint: (2,)); model.p2 (4,) (checkpoint: (3,))"
    )


def test_listing_interrupts_and_causes(tmp_path, monkeypatch):
    """A step directory without its marker is not listed; max_step includes its own step; an interrupted save
    removes its .tmp and re-raises; an exception with an empty failures table is described by its own text."""
    _fake_checkpoint(tmp_path, 10, FILES)
    os.makedirs(checkpoint.checkpoint_path(str(tmp_path), 20))  # its save never wrote the marker
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10]
    assert checkpoint.latest_checkpoint(str(tmp_path), max_step=10).endswith("step_0000010")
    path = checkpoint.checkpoint_path(str(tmp_path), 30)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.dcp, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, step=30, **_state())
    assert not os.path.exists(path + checkpoint.TMP_SUFFIX) and not os.path.exists(path)
    err = RuntimeError("dcp failed")
    err.failures = {}
    assert checkpoint.describe_failure(err) == "RuntimeError: dcp failed"


def _two(value: float) -> dict:
    return {**_state(), "host_params": [(n, torch.nn.Parameter(torch.full((2,), value))) for n in ("a", "b")]}


def test_first_names_and_missing_tensors(tmp_path, monkeypatch):
    """Messages name the first of several (unlisted files, non-finite tensors at save and at load, missing
    tensors: three at most); a failed save removes its .tmp at once; default saves keep every checkpoint, keep=1
    only the newest of three; the marker's format is 2."""
    path = _fake_checkpoint(tmp_path / "u", 3, FILES)
    _write(path, "b.distcp", b"x")
    _write(path, "a.distcp", b"x")
    with pytest.raises(CheckpointError, match="file 'a.distcp' is not listed"):
        checkpoint.validate(path)
    assert _marker(path)["format"] == 2
    with pytest.raises(CheckpointError, match=r"2 host tensor\(s\) hold non-finite values \(first: model.a\)"):
        monkeypatch.setattr(checkpoint, "nonfinite_host_tensors", lambda sd: [])
        nan_path = checkpoint.checkpoint_path(str(tmp_path), 1)
        checkpoint.save(nan_path, step=1, **_two(float("nan")))
        monkeypatch.undo()
        checkpoint.load(nan_path, **_two(0.0))
    monkeypatch.undo()
    capture = io.StringIO()
    monkeypatch.setattr(sys, "stderr", capture)
    assert checkpoint.save(checkpoint.checkpoint_path(str(tmp_path), 2), step=2, **_two(float("nan"))) is None
    assert "(first: model.a)" in capture.getvalue()
    monkeypatch.undo()
    small = checkpoint.checkpoint_path(str(tmp_path), 4)
    checkpoint.save(small, step=4, **_state())
    more = {**_state(), "host_params": [(n, torch.nn.Parameter(torch.ones(3))) for n in ("w", "x", "y", "z", "zz")]}
    with pytest.raises(CheckpointError, match=r"it lacks \['model.x', 'model.y', 'model.z'\]$"):
        checkpoint.load(small, **more)
    checkpoint.load(small, **{**_state(), "prev_host": [torch.zeros(3)]})  # train.* may be absent

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.dcp, "save", full)
    with pytest.raises(CheckpointError, match="ENOSPC"):
        checkpoint.save(checkpoint.checkpoint_path(str(tmp_path), 8), step=8, **_state())
    assert not os.path.exists(checkpoint.checkpoint_path(str(tmp_path), 8) + checkpoint.TMP_SUFFIX)
    monkeypatch.undo()
    run = tmp_path / "k"
    for step in (1, 2, 3):
        checkpoint.save(checkpoint.checkpoint_path(str(run), step), step=step, **_state())
    assert len(os.listdir(run / "checkpoints")) == 3  # keep defaults to 0: all
    checkpoint.save(checkpoint.checkpoint_path(str(run), 4), step=4, keep=1, **_state())
    assert os.listdir(run / "checkpoints") == ["step_0000004"]


def test_replicas_telemetry_is_reduced_only_with_several_replicas(tmp_path, monkeypatch):
    """With dp replicas on a device mesh a save sums the replicas' telemetry (max for absmax) before scaling it
    to the global batch; with one replica it reduces nothing. Two identical replicas are played by an
    all_reduce that doubles a sum."""
    from morpho_dist.kernels.layout import F_ABSMAX, F_BENEFIT, F_COUNT, F_GRAD_SQ

    calls = []

    def two_replicas(t, op=None, group=None):
        calls.append(op)
        if op == torch.distributed.ReduceOp.SUM:
            t.mul_(2)

    monkeypatch.setattr(checkpoint.dist, "all_reduce", two_replicas)
    for dp, factor in ((2, 2.0), (1, 1.0)):
        state = _training_state(0.5, dp=dp)
        state["mesh"].device_mesh, state["mesh"].group = object(), lambda name: None
        tel = state["layers"]["fc"].telemetry.clone()
        path = checkpoint.checkpoint_path(str(tmp_path / str(dp)), 1)
        checkpoint.save(path, step=1, **state)
        single = _training_state(0.0)
        checkpoint.load(path, **single)
        got = single["layers"]["fc"].telemetry
        assert torch.equal(got[:, F_COUNT], factor * tel[:, F_COUNT])
        assert torch.equal(got[:, F_ABSMAX], tel[:, F_ABSMAX])
        torch.testing.assert_close(got[:, F_GRAD_SQ], factor * tel[:, F_GRAD_SQ] / dp**2, rtol=0, atol=0)
        torch.testing.assert_close(got[:, F_BENEFIT], factor * tel[:, F_BENEFIT] / dp, rtol=0, atol=0)
    assert len(calls) == 2  # the dp=2 save: one SUM and one MAX
