"""Failure behaviour in one process: a faulty seed is culled at once and leaves the host untouched, a host
divergence restores the last good checkpoint, checkpoints are atomic, kept K deep and validated on load."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from morpho_dist import checkpoint, reliability
from morpho_dist.blueprints import initial_params
from morpho_dist.cli import CONF_DIR
from morpho_dist.commands import advance, germinate
from morpho_dist.config import register_configs
from morpho_dist.lifecycle import Stage
from morpho_dist.train import run
from tests.dist._harness import read_full

register_configs()
STEPS = 20
# seeds move only when the test moves them: no germination, TRAINING and GRAFTING last forever
STILL = [
    "kernel.backend=reference",
    "kernel.deterministic=true",
    "train.progress=false",
    "train.log_every=0",
    "logger=jsonl",
    "controller.interval=5",
    "controller.max_active=0",
    "controller.min_training_steps=100000",
    "controller.max_training_steps=100000",
    "controller.max_grafting_steps=100000",
]


def _run(run_dir, *overrides: str, record: dict | None = None) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*STILL, f"run_dir={run_dir}", *overrides])
    return run(cfg, record)


@pytest.fixture(autouse=True)
def _no_hooks():
    reliability.HOOKS.clear()
    yield
    reliability.HOOKS.clear()


def _grow(seeds: list[int], stage: Stage, fault: tuple[int, int, str] | None = None):
    """A before_step hook: at step 0 germinate ``seeds`` and move them to ``stage`` (GRAFTING with alpha 0 and
    rate 0: the host sees x exactly); at step fault[0] make seed fault[1] faulty ('nan': NaN in its bank,
    'overflow': a finite bank whose output overflows to inf)."""

    def before_step(step, ctx):
        layer = ctx["layers"]["embed"]
        if step == 0:
            for s in seeds:
                germinate(layer, s, 0)
                while Stage(int(layer.stage[s])) != stage:
                    advance(layer, s, 0)
                layer.alpha_rate[s] = 0.0
        if fault is not None and step == fault[0]:
            with torch.no_grad():
                if fault[2] == "nan":
                    layer.bank.p1[fault[1], 0, 0] = float("nan")
                else:
                    layer.bank.p0[fault[1]].fill_(1e20)
                    layer.bank.p1[fault[1]].fill_(1e20)

    return before_step


@pytest.mark.parametrize(
    "stage, kind", [(Stage.TRAINING, "nan"), (Stage.TRAINING, "overflow"), (Stage.GRAFTING, "nan")]
)
def test_faulty_seed_is_culled_and_nothing_else_moves(tmp_path, stage, kind):
    reliability.HOOKS["before_step"] = _grow([0, 1], stage, fault=(7, 1, kind))
    rec_a: dict = {}
    a = _run(tmp_path / "a", f"train.steps={STEPS}", record=rec_a)
    reliability.HOOKS["before_step"] = _grow([0], stage)  # seed 1 never germinates
    rec_b: dict = {}
    b = _run(tmp_path / "b", f"train.steps={STEPS}", record=rec_b)

    culls = [e for e in rec_a["events"] if e["command"] == "cull"]
    assert [(e["step"], e["seed"], e["from"], e["reason"]) for e in culls] == [
        (10, 1, stage.name, reliability.FAULT_REASON)  # at the first interval after the fault
    ]
    assert culls[0]["signals"]["bank" if kind == "nan" else "output"] == 1.0
    assert a["seed_states"]["embed"] == [stage.name, "CULLED"] and b["seed_states"]["embed"][0] == stage.name
    assert rec_a["losses"] == rec_b["losses"]  # every step's host loss, bit for bit
    full_a = read_full(tmp_path / "a" / "checkpoints" / f"step_{STEPS:07d}")
    full_b = read_full(tmp_path / "b" / "checkpoints" / f"step_{STEPS:07d}")
    for key in full_a:
        if key.startswith(("model.", "optim.host.", "train.")):  # the host: identical
            assert torch.equal(full_a[key], full_b[key]), key
        elif key.startswith(("seeds.", "optim.seeds.")) and not key.endswith("telemetry"):  # the other seed
            assert torch.equal(full_a[key][0], full_b[key][0]), key
    # the faulty seed: its bank slice is the fresh init of its generation, its optimizer state zero
    fresh = initial_params("lowrank", 16, 32, 0, base_seed=0, layer_key="embed", seed_index=1, generation=1)
    assert torch.equal(full_a["seeds.embed.bank.p0"][1], fresh[0])
    assert torch.equal(full_a["seeds.embed.bank.p1"][1], fresh[1])
    for key in [k for k in full_a if k.startswith("optim.seeds.")]:
        assert not full_a[key][1].any(), key
    assert all(torch.isfinite(v).all() for k, v in full_a.items() if torch.is_tensor(v) and v.is_floating_point())


def test_overflow_in_a_blended_seed_skips_the_step_and_culls(tmp_path):
    """A finite bank whose output overflows while blended: that step's loss is non-finite, so nothing moves on
    it (host and seeds), the seed is culled on the device, the run continues and no rollback is needed."""
    reliability.HOOKS["before_step"] = _grow([0, 1], Stage.GRAFTING, fault=(7, 1, "overflow"))
    rec: dict = {}
    s = _run(tmp_path, f"train.steps={STEPS}", "checkpoint.every=5", record=rec)
    losses = dict(rec["losses"])
    assert not torch.isfinite(torch.tensor(losses[8])) and all(
        torch.isfinite(torch.tensor(v)) for k, v in losses.items() if k != 8
    )
    assert s["seed_states"]["embed"] == ["GRAFTING", "CULLED"]
    assert not [e for e in rec["events"] if e["command"] in ("restore", "rollback")]
    full = read_full(tmp_path / "checkpoints" / f"step_{STEPS:07d}")
    assert all(torch.isfinite(v).all() for v in full.values() if torch.is_tensor(v) and v.is_floating_point())


def test_host_divergence_restores_the_last_good_checkpoint(tmp_path):
    reliability.HOOKS["before_step"] = _grow([0], Stage.GRAFTING)
    fired = []

    def blow_up(step, loss):  # once: the loss explodes at step 27 (interval 25..30)
        if step == 27 and not fired:
            fired.append(step)
            return loss * 1e6
        return loss

    reliability.HOOKS["loss"] = blow_up
    rec: dict = {}
    s = _run(tmp_path, "train.steps=40", "checkpoint.every=10", record=rec)
    events = [line for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any('"command": "restore"' in e and "step_0000020" in e for e in events), events
    assert any('"command": "rollback"' in e and '"from": "GRAFTING"' in e for e in events), events
    assert s["seed_states"]["embed"][0] == "ROLLED_BACK" and s["steps"] == 40
    assert torch.isfinite(torch.tensor(s["val_loss"]))
    steps = [st for st, _ in rec["losses"]]
    assert steps == list(range(1, 31)) + list(range(21, 41))  # 21..30 again after the restore
    # the replay draws other batches (a reshuffled order), so it cannot meet the same divergence again
    first, replay = rec["losses"][20:30], rec["losses"][30:40]
    assert [s for s, _ in first] == [s for s, _ in replay] and all(a != b for (_, a), (_, b) in zip(first, replay))


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_healthy_fast_converging_run_is_never_rolled_back(tmp_path):
    """A short real run with the default controller and divergence rule: it converges and never restores."""
    rec: dict = {}
    overrides = ["kernel.backend=reference", "train.progress=false", "train.log_every=0", "logger=jsonl"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"run_dir={tmp_path}", "train.steps=300", "train.lr=0.01"])
        cfg.checkpoint.every = 50
    s = run(cfg, rec)
    assert not [e for e in _events(tmp_path) if e["command"] in ("restore", "rollback")]
    losses = [v for _, v in rec["losses"]]
    assert s["steps"] == 300 and sum(losses[-50:]) / 50 < 0.1 * sum(losses[:10]) / 10


def test_skip_nonfinite_off_blames_the_host_and_walks_back(tmp_path, capfd):
    """skip_nonfinite=false and one NaN loss at step 22: the optimizer applies it (every weight goes NaN), so
    the save at step 25 is refused (a poisoned state is never written), no seed is culled for it, and at the
    interval (step 30) the divergence restores step 20, the newest good checkpoint."""
    reliability.HOOKS["before_step"] = _grow([0, 1], Stage.TRAINING)
    fired = []

    def nan_once(step, loss):
        if step == 21 and not fired:
            fired.append(step)
            return loss * float("nan")
        return loss

    reliability.HOOKS["loss"] = nan_once
    rec: dict = {}
    over = ["train.steps=40", "checkpoint.every=5", "controller.interval=10", "reliability.skip_nonfinite=false"]
    s = _run(tmp_path, *over, record=rec)
    err = capfd.readouterr().err
    assert "not saving checkpoint" in err and "step_0000025" in err and "non-finite" in err
    assert not [e for e in rec["events"] if e["command"] == "cull"], rec["events"]
    restores = [e for e in _events(tmp_path) if e["command"] == "restore"]
    assert (
        len(restores) == 1
        and "step_0000020" in restores[0]["reason"]
        and "skip_nonfinite=false" in (restores[0]["reason"])
    )
    assert s["steps"] == 40 and s["seed_states"]["embed"] == ["TRAINING", "TRAINING"]
    for _, path in checkpoint.list_checkpoints(str(tmp_path)):
        full = read_full(path)
        assert all(torch.isfinite(v).all() for v in full.values() if torch.is_tensor(v) and v.is_floating_point())


def test_rollback_walks_back_past_a_checkpoint_it_cannot_restore(tmp_path):
    """The newest candidate (step 20) is corrupt when the divergence comes: step 15 is restored instead."""
    fired = []

    def blow_up(step, loss):
        if step == 27 and not fired:
            fired.append(step)
            return loss * 1e6
        return loss

    def corrupt_20(step, ctx):
        if step == 23:
            path = tmp_path / "checkpoints" / "step_0000020"
            data = next(f for f in os.listdir(path) if f.endswith(".distcp"))
            with open(path / data, "r+b") as fh:
                fh.seek(4)
                fh.write(b"\xff\xff")

    reliability.HOOKS["loss"] = blow_up
    reliability.HOOKS["before_step"] = corrupt_20
    rec: dict = {}
    s = _run(tmp_path, "train.steps=30", "checkpoint.every=5", "controller.interval=10", record=rec)
    restores = [e for e in _events(tmp_path) if e["command"] == "restore"]
    assert len(restores) == 1 and restores[0]["value"] == 15 and "step_0000015" in restores[0]["reason"]
    assert [st for st, _ in rec["losses"]][30:] == list(range(16, 31)) and s["steps"] == 30


def test_non_finite_checkpoint_is_refused_on_load(tmp_path, monkeypatch):
    """A checkpoint holding a non-finite host tensor (written by a version without the save check) is never
    accepted: loading it is a one-line CheckpointError naming the tensor."""

    def poison(step, ctx):  # the engine's host snapshot (saved as train.prev_host.*): the weights stay finite
        if step == 4:
            ctx["morph"].prev_host[0].view(-1)[0] = float("inf")

    reliability.HOOKS["before_step"] = poison
    monkeypatch.setattr(checkpoint, "nonfinite_host_tensors", lambda sd: [])
    _run(tmp_path / "a", "train.steps=5", "controller.interval=10")
    monkeypatch.undo()
    reliability.HOOKS.clear()
    with pytest.raises(
        checkpoint.CheckpointError, match=r"step_0000005' is not usable: .*non-finite.*train\.prev_host\."
    ):
        _run(tmp_path / "b", "train.steps=10", f"checkpoint.resume={tmp_path / 'a'}")


def test_torn_log_lines_do_not_block_a_resume(tmp_path, capfd):
    """A crash (or a full disk) mid-write leaves a partial last line in the logs; resuming in place drops it
    with a one-line note, and the logs of the resumed run are whole."""
    _run(tmp_path, "train.steps=20", "checkpoint.every=10")
    for name in ("telemetry.jsonl", "events.jsonl", "metrics.jsonl"):
        with open(tmp_path / name, "a") as fh:
            fh.write('{"step": 21, "layer": "emb')
    s = _run(tmp_path, "train.steps=30", "checkpoint.every=10", "checkpoint.resume=auto")
    assert s["steps"] == 30
    err = capfd.readouterr().err
    assert "telemetry.jsonl: dropped 1 torn line(s)" in err
    for name in ("telemetry.jsonl", "events.jsonl", "metrics.jsonl"):
        lines = (tmp_path / name).read_text().splitlines()
        assert all(json.loads(line) for line in lines if line.strip()), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 30 and 25 in steps


def test_divergence_without_a_checkpoint_is_a_clear_error(tmp_path):
    reliability.HOOKS["loss"] = lambda step, loss: loss * float("nan") if step >= 3 else loss
    with pytest.raises(reliability.DivergenceError, match=r"step 5: host loss non-finite.*no checkpoint"):
        _run(tmp_path, "train.steps=10")


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _steps(run_dir) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def test_checkpoints_are_atomic_and_the_last_k_are_kept(tmp_path):
    _run(tmp_path, "train.steps=40", "checkpoint.every=10", "checkpoint.keep=2")
    assert _steps(tmp_path) == ["step_0000030", "step_0000040"]  # no .tmp, the two newest
    meta = checkpoint.validate(str(tmp_path / "checkpoints" / "step_0000040"))
    assert meta["step"] == 40 and ".metadata" in meta["files"]


def test_a_failed_save_leaves_the_good_checkpoints_alone(tmp_path, monkeypatch):
    _run(tmp_path, "train.steps=20", "checkpoint.every=10")
    before = {p: checkpoint.validate(str(tmp_path / "checkpoints" / p)) for p in _steps(tmp_path)}
    real = checkpoint.dcp.save

    def dies_halfway(sd, checkpoint_id):
        real(sd, checkpoint_id=checkpoint_id)
        os.remove(os.path.join(checkpoint_id, ".metadata"))
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_halfway)
    with pytest.raises(checkpoint.CheckpointError, match="step_0000030.*No space left"):
        _run(tmp_path, "train.steps=30", "checkpoint.every=10", "checkpoint.resume=auto")
    assert _steps(tmp_path) == sorted(before)  # nothing half-written, nothing removed
    for p, meta in before.items():
        assert checkpoint.validate(str(tmp_path / "checkpoints" / p)) == meta


def test_corrupt_or_missing_checkpoints_are_clear_errors(tmp_path):
    _run(tmp_path, "train.steps=20", "checkpoint.every=10")
    last = tmp_path / "checkpoints" / "step_0000020"
    data = next(f for f in os.listdir(last) if f.endswith(".distcp"))
    with open(last / data, "r+b") as fh:  # flip a byte
        fh.seek(10)
        b = fh.read(1)
        fh.seek(10)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"step_0000020.*corrupt.*newest complete checkpoint before it.*step_0000010"
    ):
        _run(tmp_path, "train.steps=30", "checkpoint.resume=auto")
    with pytest.raises(checkpoint.CheckpointError, match="step_0000020' is corrupt"):
        checkpoint.validate(str(last))
    assert checkpoint.validate(str(tmp_path / "checkpoints" / "step_0000010"))["step"] == 10  # untouched
    # incomplete (the marker is written last): ignored by auto, an error when named
    shutil.copytree(tmp_path / "checkpoints" / "step_0000010", tmp_path / "checkpoints" / "step_0000015")
    os.remove(tmp_path / "checkpoints" / "step_0000015" / checkpoint.MARKER)
    assert checkpoint.latest_checkpoint(str(tmp_path), max_step=15).endswith("step_0000010")
    with pytest.raises(checkpoint.CheckpointError, match="step_0000015' is incomplete"):
        _run(tmp_path / "c", "train.steps=30", f"checkpoint.resume={tmp_path}/checkpoints/step_0000015")
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        _run(tmp_path / "d", "train.steps=30", f"checkpoint.resume={tmp_path}/nope")


def test_guard_off_still_trains(tmp_path):
    """reliability.skip_nonfinite=false: optimizer steps are not guarded, the interval accounting still works."""
    s = _run(tmp_path, "train.steps=15", "reliability.skip_nonfinite=false")
    assert s["steps"] == 15 and torch.isfinite(torch.tensor(s["val_loss"]))
