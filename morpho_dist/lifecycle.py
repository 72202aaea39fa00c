"""Seed lifecycle: stage ids, the legal transition table, per-seed state as structure-of-arrays tensors.

Stage ids are stable (tests outside the project use them) and are the integers the kernels read.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch


class Stage(enum.IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    GRAFTING = 3
    STABILIZATION = 4
    EVALUATING = 5
    FINE_TUNING = 6
    FOSSILIZED = 7
    CULLED = 8
    CANCELLED = 9
    ROLLED_BACK = 10


NUM_STAGES = len(Stage)

# The op passes x through untouched for these stages.
IDLE_STAGES = frozenset({Stage.DORMANT, Stage.GERMINATED, Stage.CULLED, Stage.CANCELLED, Stage.ROLLED_BACK})
# The op blends the blueprint output into y for these stages.
BLENDED_STAGES = frozenset({Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING, Stage.FINE_TUNING, Stage.FOSSILIZED})
# Blueprint parameters receive gradients in these stages (TRAINING through the incubator or reconstruction).
TRAINABLE_STAGES = frozenset({Stage.TRAINING, Stage.GRAFTING, Stage.FINE_TUNING})
# Seeds that occupy the active-seed budget.
ACTIVE_STAGES = frozenset(
    {
        Stage.GERMINATED,
        Stage.TRAINING,
        Stage.GRAFTING,
        Stage.STABILIZATION,
        Stage.EVALUATING,
        Stage.FINE_TUNING,
    }
)
TERMINAL_STAGES = frozenset({Stage.FOSSILIZED, Stage.ROLLED_BACK})

LEGAL_TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.DORMANT: frozenset({Stage.GERMINATED}),
    Stage.GERMINATED: frozenset({Stage.TRAINING, Stage.CANCELLED}),
    Stage.TRAINING: frozenset({Stage.GRAFTING, Stage.CULLED, Stage.CANCELLED, Stage.ROLLED_BACK}),
    Stage.GRAFTING: frozenset({Stage.STABILIZATION, Stage.CULLED, Stage.ROLLED_BACK}),
    Stage.STABILIZATION: frozenset({Stage.EVALUATING, Stage.CULLED, Stage.ROLLED_BACK}),
    Stage.EVALUATING: frozenset({Stage.FINE_TUNING, Stage.CULLED, Stage.ROLLED_BACK}),
    Stage.FINE_TUNING: frozenset({Stage.FOSSILIZED, Stage.CULLED, Stage.ROLLED_BACK}),
    Stage.FOSSILIZED: frozenset(),
    Stage.CULLED: frozenset({Stage.DORMANT}),
    Stage.CANCELLED: frozenset({Stage.DORMANT}),
    Stage.ROLLED_BACK: frozenset(),
}


class IllegalTransition(ValueError):
    """A lifecycle command that the transition table (or an embargo) does not allow."""


def all_idle(stage_ids: Iterable[int]) -> bool:
    """Whether every id is an IDLE_STAGES stage (an id outside Stage counts as not idle)."""
    return all(s in IDLE_STAGES for s in stage_ids)  # IntEnum members hash and compare as their ints


def count_stages(stage_ids: Iterable[int]) -> dict[str, int]:
    """Stage name -> number of seeds in it, every stage listed (zeros included)."""
    counts = {s.name: 0 for s in Stage}
    for s in stage_ids:
        counts[Stage(s).name] += 1
    return counts


def is_legal(src: Stage, dst: Stage) -> bool:
    return Stage(dst) in LEGAL_TRANSITIONS[Stage(src)]


def check_transition(seed: int, src: int, dst: int, command: str) -> None:
    """Raise IllegalTransition naming seed, stage and command unless src -> dst is in the table."""
    src_s, dst_s = Stage(src), Stage(dst)
    if dst_s not in LEGAL_TRANSITIONS[src_s]:
        allowed = sorted(s.name for s in LEGAL_TRANSITIONS[src_s]) or ["none (terminal)"]
        raise IllegalTransition(
            f"seed {seed}: command {command!r} would move stage {src_s.name} -> {dst_s.name}, "
            f"which is not a legal transition; from {src_s.name} the legal targets are {allowed}"
        )


# Field name -> dtype of the structure-of-arrays state. Order is the state_dict order.
STATE_FIELDS: dict[str, torch.dtype] = {
    "stage": torch.int8,
    "blend": torch.int8,
    "alpha": torch.float32,
    "alpha_rate": torch.float32,
    "steps_in_stage": torch.int32,
    "embargo_until": torch.int32,
    "germinated_at": torch.int32,
    "generation": torch.int32,
}


@dataclass
class SeedState:
    """Per-seed state of one layer's (local) seed population, one tensor per field, length N."""

    stage: torch.Tensor
    blend: torch.Tensor
    alpha: torch.Tensor
    alpha_rate: torch.Tensor
    steps_in_stage: torch.Tensor
    embargo_until: torch.Tensor
    germinated_at: torch.Tensor
    generation: torch.Tensor

    @classmethod
    def empty(cls, num_seeds: int, blend_id: int = 0, device: torch.device | str | None = None) -> SeedState:
        fields = {name: torch.zeros(num_seeds, dtype=dt, device=device) for name, dt in STATE_FIELDS.items()}
        fields["blend"].fill_(blend_id)
        fields["germinated_at"].fill_(-1)
        return cls(**fields)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATE_FIELDS}

    @property
    def num_seeds(self) -> int:
        return self.stage.numel()
