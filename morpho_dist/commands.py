"""Lifecycle commands on a SeededLayer by GLOBAL seed index, and the per-step tick.

Every command validates against the transition table (lifecycle.LEGAL_TRANSITIONS) before it writes
anything: an illegal command raises ``IllegalTransition`` naming seed, stage and command, and changes nothing.
A layer holds global seeds ``seed_offset .. seed_offset + num_seeds - 1`` (its shard); ``owns`` says whether a
global index lives on this rank, and the commands refuse seeds they do not own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from morpho_dist.lifecycle import IllegalTransition, Stage

if TYPE_CHECKING:
    from morpho_dist.layer import SeededLayer

COMMANDS = ("germinate", "advance", "cull", "cancel", "rollback", "recycle")

# Where `advance` moves each stage along the main path.
NEXT_STAGE: dict[Stage, Stage] = {
    Stage.GERMINATED: Stage.TRAINING,
    Stage.TRAINING: Stage.GRAFTING,
    Stage.GRAFTING: Stage.STABILIZATION,
    Stage.STABILIZATION: Stage.EVALUATING,
    Stage.EVALUATING: Stage.FINE_TUNING,
    Stage.FINE_TUNING: Stage.FOSSILIZED,
}


def owns(layer: SeededLayer, seed: int) -> bool:
    """Whether global seed index ``seed`` is one of this layer shard's seeds."""
    return layer.seed_offset <= int(seed) < layer.seed_offset + layer.num_seeds


def local_index(layer: SeededLayer, seed: int) -> int:
    """Global seed index -> index into this shard's state tensors (ValueError if not owned here)."""
    if not owns(layer, seed):
        raise ValueError(
            f"seed {seed} is not held by layer {layer.layer_key!r} on this rank "
            f"(it holds global seeds {layer.seed_offset}..{layer.seed_offset + layer.num_seeds - 1})"
        )
    return int(seed) - layer.seed_offset


def seed_stage(layer: SeededLayer, seed: int) -> Stage:
    """Current stage of one global seed (one small host read)."""
    return Stage(int(layer.stage[local_index(layer, seed)]))


def germinate(layer: SeededLayer, seed: int, step: int, blend: str | int | None = None) -> None:
    """DORMANT -> GERMINATED (new generation, fresh deterministic blueprint init)."""
    layer.germinate(local_index(layer, seed), step, blend)


def advance(layer: SeededLayer, seed: int, step: int) -> Stage:
    """Move one seed to the next stage of GERMINATED -> TRAINING -> ... -> FOSSILIZED; returns the new stage."""
    i = local_index(layer, seed)
    src = Stage(int(layer.stage[i]))
    if src not in NEXT_STAGE:
        hint = "use 'germinate'" if src == Stage.DORMANT else "it is not on the main path"
        raise IllegalTransition(f"seed {seed}: command 'advance' refused in stage {src.name} ({hint})")
    dst = NEXT_STAGE[src]
    layer.apply_stage_changes([(i, dst)], step, "advance")
    return dst


def cull(layer: SeededLayer, seed: int, step: int, embargo_steps: int = 0) -> None:
    """-> CULLED; the seed may be recycled to DORMANT from step ``step + embargo_steps`` on."""
    i = local_index(layer, seed)
    until = layer.check_step(int(step) + int(embargo_steps), "step + embargo_steps")  # before any write
    layer.apply_stage_changes([(i, Stage.CULLED)], step, "cull")
    layer.embargo_until[i] = until


def cancel(layer: SeededLayer, seed: int, step: int) -> None:
    """GERMINATED/TRAINING -> CANCELLED."""
    layer.apply_stage_changes([(local_index(layer, seed), Stage.CANCELLED)], step, "cancel")


def rollback(layer: SeededLayer, seed: int, step: int) -> None:
    """-> ROLLED_BACK (terminal), after a NaN/divergence rollback."""
    layer.apply_stage_changes([(local_index(layer, seed), Stage.ROLLED_BACK)], step, "rollback")


def recycle(layer: SeededLayer, seed: int, step: int) -> None:
    """CULLED (embargo passed) or CANCELLED -> DORMANT."""
    layer.apply_stage_changes([(local_index(layer, seed), Stage.DORMANT)], step, "recycle")


def target_of(command: str, src: Stage) -> Stage:
    """The stage a command moves a seed in stage ``src`` to (IllegalTransition if it has none)."""
    if command == "germinate":
        return Stage.GERMINATED
    if command == "advance":
        if src not in NEXT_STAGE:
            raise IllegalTransition(f"command 'advance' refused in stage {src.name}")
        return NEXT_STAGE[src]
    fixed = {"cull": Stage.CULLED, "cancel": Stage.CANCELLED, "rollback": Stage.ROLLED_BACK, "recycle": Stage.DORMANT}
    if command not in fixed:
        raise ValueError(f"unknown lifecycle command {command!r}; allowed: {list(COMMANDS)}")
    return fixed[command]


def run_command(
    layer: SeededLayer,
    seed: int,
    command: str,
    step: int,
    *,
    embargo_steps: int = 0,
    blend: str | int | None = None,
) -> None:
    """Dispatch one named command (see COMMANDS)."""
    if command == "germinate":
        germinate(layer, seed, step, blend)
    elif command == "advance":
        advance(layer, seed, step)
    elif command == "cull":
        cull(layer, seed, step, embargo_steps)
    elif command == "cancel":
        cancel(layer, seed, step)
    elif command == "rollback":
        rollback(layer, seed, step)
    elif command == "recycle":
        recycle(layer, seed, step)
    else:
        raise ValueError(f"unknown lifecycle command {command!r}; allowed: {list(COMMANDS)}")


@torch.no_grad()
def tick_(layers: Iterable[SeededLayer] | Mapping[str, SeededLayer]) -> None:
    """Once per optimizer step: steps_in_stage += 1 for every non-DORMANT seed (device ops only, no sync)."""
    items = layers.values() if isinstance(layers, Mapping) else layers
    for layer in items:
        layer.steps_in_stage.add_(layer.stage != int(Stage.DORMANT))  # bool adds as 0/1: no cast launch
