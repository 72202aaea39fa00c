"""A transformers LlamaForCausalLM (small config, random init) across 2 gloo ranks, in a hand-written loop:
plain DDP (the user passes no broadcast_buffers) gives the one-process decisions on the same global batch, and
seed sharding with the model's own tensor-parallel plan (config.base_model_tp_plan) matches one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.dist._harness import _set_env, compose, free_port

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.dist

STEPS, INTERVAL, BATCH, SEQ, VOCAB = 20, 5, 8, 12, 64
SEEDS = ["seeds.targets=[mlp.up_proj]", "seeds.per_layer=2", "seeds.rank=8", "controller.interval=5"]


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def run_llama(mode: str, world: int = 1) -> dict:
    """``mode``: "one" (one process), "ddp" (plain DDP, each rank half the global batch) or "seed" (the model's
    tensor-parallel plan, every rank the whole batch). A plain loop over morpho_dist.Morphogenesis; returns this
    rank's losses, telemetry tables and decisions."""
    from morpho_dist import Morphogenesis
    from morpho_dist.distributed import Mesh, read_env

    cfg = compose([*SEEDS, f"sharding={'seed' if mode == 'seed' else 'data'}"])
    model = _llama()
    mesh = Mesh.from_config(cfg.sharding, read_env(), torch.device("cpu"))
    morph = Morphogenesis(
        model, seeds=cfg.seeds, controller=cfg.controller, schedule=cfg.schedule, kernel={"backend": "reference"},
        mesh=mesh,
    )  # fmt: skip
    forward = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    # foreach: the CUDA default, here on the CPU too (a seed-sharded host gives one param group per tensor kind)
    opt = torch.optim.AdamW(morph.host_parameters(), lr=3e-3, foreach=True)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=gen)
    val = torch.randint(0, VOCAB, (16, SEQ + 1), generator=gen)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = float(_lm_loss(model, val))
        model.train()
        return out

    out = {"losses": [], "tables": [], "tp": morph.shard_plan.tp, "source": morph.shard_plan.source}
    for step in range(1, STEPS + 1):
        batch = data[step - 1]
        if mode == "ddp":  # the same global batch, split over the ranks
            batch = batch.chunk(world)[mesh.rank]
        loss = _lm_loss(forward, batch)
        morph.loss(loss).backward()
        morph.step(opt, evaluate=val_loss)
        opt.zero_grad()
        out["losses"].append(float(loss.detach()))
        if step % INTERVAL == 0:
            out["tables"].append(morph.last_report.table.clone())
    out["events"] = [(e["step"], e["layer"], e["seed"], e["command"], e["to"]) for e in morph.events]
    return out


def _worker(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    _set_env(rank, world, port)
    from morpho_dist.distributed import process_group, read_env

    with process_group(read_env(), torch.device("cpu")):
        torch.save(run_llama(mode, world), os.path.join(out_dir, f"rank{rank}.pt"))


def _on_two_ranks(mode: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return run_llama("one")


def _assert_same_run(one: dict, outs: list[dict], losses: list[list[float]]) -> None:
    assert one["events"], "the controller made no decision"
    for got in losses:
        for step, (a, b) in enumerate(zip(one["losses"], got), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    for out in outs:
        assert out["events"] == one["events"]
        for want, have in zip(one["tables"], out["tables"]):
            err = ((have - want).abs() / _term_scale(want)).amax(dim=(0, 1))
            assert float(err.max()) <= 1e-5, err.tolist()


def _term_scale(table: torch.Tensor) -> torch.Tensor:
    """Per layer and field, the size of the terms a telemetry sum adds up (a float sum's rounding error is
    relative to that, not to a result that cancels): the largest |value| over the seeds, and for the signed sums
    their Cauchy-Schwarz bounds, |sum x| <= sqrt(count * sum x^2) and |benefit| <= sqrt(sum dy^2 * sum delta^2)."""
    from morpho_dist.kernels.layout import F_BENEFIT, F_COUNT, F_DELTA_SQ, F_GRAD_SQ, F_SUM, F_SUMSQ

    bound = table.abs().clone()
    bound[..., F_SUM] = (table[..., F_COUNT] * table[..., F_SUMSQ]).clamp_min(0).sqrt()
    bound[..., F_BENEFIT] = (table[..., F_GRAD_SQ] * table[..., F_DELTA_SQ]).clamp_min(0).sqrt()
    return torch.maximum(bound, table.abs()).amax(dim=1, keepdim=True).clamp_min(1e-30)


def test_plain_ddp_on_llama_gives_the_one_process_decisions(tmp_path, one_process):
    outs = _on_two_ranks("ddp", tmp_path)
    mean = [(a + b) / 2 for a, b in zip(outs[0]["losses"], outs[1]["losses"])]  # equal halves of the batch
    _assert_same_run(one_process, outs, [mean])


def test_seed_sharded_llama_with_its_tp_plan_matches_one_process(tmp_path, one_process):
    outs = _on_two_ranks("seed", tmp_path)
    assert outs[0]["source"] == "LlamaForCausalLM.config.base_model_tp_plan"
    assert outs[0]["tp"]["model.layers.1.mlp.up_proj"] == "colwise"
    assert outs[0]["tp"]["model.layers.0.mlp.down_proj"] == "rowwise"
    assert outs[0]["tp"]["model.layers.0.self_attn.q_proj"] == "colwise"
    _assert_same_run(one_process, outs, [o["losses"] for o in outs])
