"""Failure behaviour across processes (gloo): a killed rank under torchrun restarts from the last checkpoint and
ends like an uninterrupted run; a desynchronised rank stops every rank with an error naming the step and the
seed; a collective a rank never joins times out instead of hanging."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.dist._harness import FAST, compose, free_port, run_launcher, torchrun_cmd

pytestmark = pytest.mark.dist

RUN = [
    *(o for o in FAST if not o.startswith("logger=")),
    "logger=jsonl",
    "train.steps=40",
    "train.log_every=10",
    "checkpoint.every=10",
]
RUNTIME = {"runtime_s", "run_dir", "train_time_s", "samples_per_s", "mfu"}  # wall-clock measurements


def _torchrun(tmp_path, *args: str, env_extra: dict | None = None, max_restarts: int = 0):
    cmd = [*torchrun_cmd(2), f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "-m", "morpho_dist.train"]
    return run_launcher([*cmd, *RUN, *args], tmp_path, timeout=180, **(env_extra or {}))


def test_killed_rank_restarts_from_the_last_checkpoint(tmp_path):
    straight = _torchrun(tmp_path, f"hydra.run.dir={tmp_path}/straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # rank 1 dies at step 25 (after the step-20 checkpoint); torchrun restarts both workers, which find the
    # first attempt's run dir (no hydra.run.dir given) and resume from its latest checkpoint
    faulty = _torchrun(
        tmp_path,
        env_extra={"MORPHO_FAULT_KILL_AT_STEP": "25", "MORPHO_FAULT_RANK": "1"},
        max_restarts=1,
    )
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    run_dir = re.search(r"run_dir=(\S+)", faulty.stdout).group(1)
    assert os.path.exists(os.path.join(run_dir, ".fault_injected")), "the fault never fired"
    assert len(re.findall(r"run_dir=", faulty.stdout)) == 1  # one attempt finished: the restarted one
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads(Path(run_dir, "summary.json").read_text())
    assert set(a) == set(b)
    for key in set(a) - RUNTIME:
        assert a[key] == b[key], key
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000020", "step_0000030", "step_0000040"]


def _desync_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from morpho_dist import reliability
    from morpho_dist.train import run

    def tamper(step, ctx):  # rank 1 alone changes a replicated seed's state
        if step == 7 and rank == 1:
            ctx["layers"]["embed"].generation[1] += 5

    reliability.HOOKS["before_step"] = tamper
    cfg = compose([*RUN, "logger=none", "reliability.collective_timeout_s=30", f"run_dir={out_dir}/run"])
    t0 = time.time()
    try:
        run(cfg)
        message = "no error"
    except reliability.DesyncError as err:
        message = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(f"{time.time() - t0:.1f}\n{message}")


def test_desynchronised_rank_stops_every_rank_naming_step_and_seed(tmp_path):
    mp.spawn(_desync_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        elapsed, message = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert message.startswith("step 10: ranks are desynchronised"), message
        assert "first differing seed: layer 'embed' seed 1 (state differ" in message, message
        assert float(elapsed) < 60


def _timeout_worker(rank: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from morpho_dist.distributed import DistEnv, init_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(DistEnv(rank=rank, world_size=2), torch.device("cpu"), timeout_s=3)
    if rank == 1:  # never joins the collective; stays alive longer than the timeout
        time.sleep(12)
        os._exit(0)
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1))
        message = "completed"
    except Exception as err:  # gloo: "Timed out waiting ..."
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, "rank0.txt"), "w") as fh:
        fh.write(f"{time.time() - t0:.1f}\n{message}")
    os._exit(0)


def test_collective_timeout_bounds_a_lost_rank(tmp_path):
    mp.spawn(_timeout_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    elapsed, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert message != "completed" and float(elapsed) < 10, message
