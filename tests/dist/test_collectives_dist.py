"""Collectives per controller interval: the two telemetry all-reduces and the decision checksum, nothing
else; between intervals only those of tensor parallelism. Counted at the dispatcher (a TorchDispatchMode
sees every c10d op that dist.* issues and every functional collective DTensor issues; DDP's own bucket
all-reduces go straight to the process group and are not counted: they are the data parallelism itself)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.dist._harness import compose, free_port

pytestmark = pytest.mark.dist

STEPS, INTERVAL = 20, 5
WORLD = {"seed": 2, "data": 2, "hybrid": 4}  # hybrid: dp=2 x seed=2
C10D_ALLREDUCE = "c10d.allreduce_"  # dist.all_reduce: the telemetry's two and the checksum's one
NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")
NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD[mode]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from morpho_dist import engine, train

    class Comm(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()  # e.g. "c10d::allreduce_", "_c10d_functional::all_reduce"
            namespace, op = name.split("::")[0], name.split("::")[-1]
            if namespace in NAMESPACES and op not in NOT_COLLECTIVES:
                self.counts[name.replace("::", ".")] += 1
            return func(*args, **(kwargs or {}))

    comm = Comm()
    marks: list[tuple[str, int, dict]] = []

    def counts() -> dict:
        return dict(comm.counts)

    real_tick, real_interval = engine.tick_, engine.Morphogenesis._interval

    def tick(layers):  # end of every step's training part
        marks.append(("step", 0, counts()))
        return real_tick(layers)

    def interval(self, step, *args, **kwargs):
        before = counts()
        out = real_interval(self, step, *args, **kwargs)
        marks.append(("interval", step, {k: v - before.get(k, 0) for k, v in counts().items()}))
        return out

    engine.tick_, engine.Morphogenesis._interval = tick, interval
    overrides = [f"sharding={mode}", f"train.steps={STEPS}", f"controller.interval={INTERVAL}", "train.log_every=0"]
    overrides.append("checkpoint.save_final=false")
    cfg = compose(overrides)
    with comm:
        train.run(cfg)
    torch.save(marks, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("mode", ["seed", "data", "hybrid"])
def test_collectives_per_interval_and_per_step(tmp_path, mode):
    mp.spawn(_worker, args=(free_port(), mode, str(tmp_path)), nprocs=WORLD[mode], join=True)
    for rank in range(WORLD[mode]):
        marks = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        intervals = [m for m in marks if m[0] == "interval"]
        assert [m[1] for m in intervals] == list(range(INTERVAL, STEPS + 1, INTERVAL))
        for _, step, delta in intervals:
            assert delta.get(C10D_ALLREDUCE, 0) == 3, (step, delta)  # sum + max telemetry, decision checksum
            others = {k: v for k, v in delta.items() if v and k != C10D_ALLREDUCE and "all_reduce" not in k}
            assert not others, (step, others)  # (functional all_reduces: TP forwards of counterfactual evals)
        # between intervals: per step, the same tensor-parallel collectives and no c10d call at all
        steps = [m[2] for m in marks if m[0] == "step"]
        # each step's delta, measured tick to tick, minus what the interval in between did
        per_step = []
        interval_at = {m[1]: m[2] for m in intervals}
        for i in range(1, len(steps)):
            delta = {k: v - steps[i - 1].get(k, 0) for k, v in steps[i].items()}
            extra = interval_at.get(i, {})  # step i's interval ran between tick i and tick i + 1
            per_step.append({k: v - extra.get(k, 0) for k, v in delta.items() if v - extra.get(k, 0)})
        # DDP rebuilds its gradient buckets once, after its first iteration (a broadcast of the new order)
        steady = per_step[1:]
        assert all(d == steady[0] for d in steady), per_step
        if mode == "seed":  # tensor parallelism: the row-parallel layer's output (the column-parallel embed
            # takes the data itself, so its input gradient, and that all-reduce, is never needed)
            assert steady[0] == {"_c10d_functional.all_reduce": 1}, steady[0]
        elif mode == "data":  # data parallelism: DDP's one gradient bucket of this small model
            assert steady[0] == {C10D_ALLREDUCE: 1}, steady[0]
        else:  # hybrid: the tensor-parallel all-reduce over `seed`, plus whatever DDP over `dp` issues itself
            assert steady[0].get("_c10d_functional.all_reduce") == 1, steady[0]
            assert set(steady[0]) <= {"_c10d_functional.all_reduce", C10D_ALLREDUCE}, steady[0]
