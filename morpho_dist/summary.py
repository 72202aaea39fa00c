"""The end-of-run summary: every rank's seed shard (one all_gather_object), the global seed states, stage counts."""

from __future__ import annotations

import hashlib

import torch

from morpho_dist.distributed import Mesh, is_initialized
from morpho_dist.lifecycle import ACTIVE_STAGES, BLENDED_STAGES, Stage, count_stages


def seed_state_digest(layers: dict) -> str:
    """A hash of every seed's state and blueprint parameters (not the rank-local telemetry): equal on all ranks
    when the replicated seeds evolved identically."""
    h = hashlib.blake2b(digest_size=12)
    for name, layer in layers.items():
        h.update(name.encode())
        for key, tensor in sorted(layer.state_dict().items()):
            if not key.endswith("telemetry"):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stage_counts(stages: dict[str, list[int]]) -> dict[str, int]:
    return count_stages(s for seq in stages.values() for s in seq)


def gather_ranks(layers: dict, mesh: Mesh, optimizers) -> list[dict]:
    """Every rank's seed shard: global seed ranges, local stages, bytes of blueprint / optimizer state and a
    digest of its seeds' state (one all_gather_object; a list of one entry in a single process)."""
    seeds_opt = optimizers.seeds.state if optimizers.seeds is not None else {}
    host_opt = optimizers.host.state if optimizers.host is not None else {}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))  # noqa: E731
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    info = {
        "rank": mesh.rank,
        "dp_rank": mesh.dp_rank,
        "seed_rank": mesh.seed_rank,
        "seed_ranges": {n: [layer.seed_offset, layer.seed_offset + layer.num_seeds] for n, layer in layers.items()},
        "blueprint_bytes": nbytes(p for layer in layers.values() for p in layer.bank.parameters()),
        "seed_optimizer_bytes": nbytes(t for st in seeds_opt.values() for t in st.values()),
        "host_optimizer_bytes": nbytes(local(t) for st in host_opt.values() for t in st.values()),
        "stages": {n: layer.stage.tolist() for n, layer in layers.items()},
        "seed_state_digest": seed_state_digest(layers),
    }
    if not is_initialized():
        return [info]
    out: list = [None] * mesh.world_size
    torch.distributed.all_gather_object(out, info)
    return out


def global_stages(ranks: list[dict]) -> dict[str, list[int]]:
    """Layer -> stage of every global seed, assembled from the dp-rank-0 shards."""
    out: dict[str, list[int]] = {}
    for info in sorted((r for r in ranks if r["dp_rank"] == 0), key=lambda r: r["seed_rank"]):
        for name, seq in info["stages"].items():
            out.setdefault(name, []).extend(seq)
    return out


def build_summary(ranks: list[dict], layers: dict, *, steps: int, world_size: int) -> dict:
    """The seeds' part of summary.json, independent of the mesh (train.run adds losses and the run's fields)."""
    stages = global_stages(ranks)
    by_shard: dict[int, set] = {}
    for r in ranks:
        by_shard.setdefault(r["seed_rank"], set()).add(r["seed_state_digest"])
    shard_digests = [sorted(by_shard[s])[0] for s in sorted(by_shard)]
    digest = (
        shard_digests[0]
        if len(shard_digests) == 1
        else hashlib.blake2b("|".join(shard_digests).encode(), digest_size=12).hexdigest()
    )
    per_seed = {name: layer.bank.p0[0].numel() + layer.bank.p1[0].numel() for name, layer in layers.items()}
    grown = sum(per_seed[n] * sum(Stage(s) in BLENDED_STAGES for s in seq) for n, seq in stages.items())
    return {
        "stage_counts": stage_counts(stages),
        "seed_states": {name: [Stage(s).name for s in seq] for name, seq in stages.items()},
        "seed_state_digest": digest,
        "seeds_identical_across_ranks": all(len(v) == 1 for v in by_shard.values()),
        "steps": steps,
        "world_size": world_size,
        "ranks": [{k: v for k, v in r.items() if k != "stages"} for r in ranks],
        "grown_params": grown,
        "active_seeds": sum(Stage(s) in ACTIVE_STAGES for seq in stages.values() for s in seq),
    }
