"""Expected values written out by hand from DESIGN.md, shared by the tests (never the library's own tables)."""

from __future__ import annotations

# DESIGN.md section 3, "The legal transitions, and no others", by stage name.
LEGAL = {
    "DORMANT": {"GERMINATED"},
    "GERMINATED": {"TRAINING", "CANCELLED"},
    "TRAINING": {"GRAFTING", "CULLED", "CANCELLED", "ROLLED_BACK"},
    "GRAFTING": {"STABILIZATION", "CULLED", "ROLLED_BACK"},
    "STABILIZATION": {"EVALUATING", "CULLED", "ROLLED_BACK"},
    "EVALUATING": {"FINE_TUNING", "CULLED", "ROLLED_BACK"},
    "FINE_TUNING": {"FOSSILIZED", "CULLED", "ROLLED_BACK"},
    "CULLED": {"DORMANT"},
    "CANCELLED": {"DORMANT"},
    "FOSSILIZED": set(),
    "ROLLED_BACK": set(),
}

# DESIGN.md section 2, "Stage -> what the op does": x passes through untouched; the blueprint output is blended
# in; blueprint parameters get gradients (TRAINING: incubator or reconstruction).
IDLE = {"DORMANT", "GERMINATED", "CULLED", "CANCELLED", "ROLLED_BACK"}
BLENDED = {"GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING", "FOSSILIZED"}
TRAINABLE = {"TRAINING", "GRAFTING", "FINE_TUNING"}
# Section 3: the stages no command leaves, and the seeds that count against the budget of active seeds (from
# germination until a seed is fossilized, culled, cancelled or rolled back).
TERMINAL = {"FOSSILIZED", "ROLLED_BACK"}
ACTIVE = {"GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING"}

# The main path: the stage ``advance`` moves a seed to (no entry: advance is refused there).
ADVANCE = {
    "GERMINATED": "TRAINING",
    "TRAINING": "GRAFTING",
    "GRAFTING": "STABILIZATION",
    "STABILIZATION": "EVALUATING",
    "EVALUATING": "FINE_TUNING",
    "FINE_TUNING": "FOSSILIZED",
}

# The stage each other command moves to, whatever the source.
COMMAND_TARGET = {
    "germinate": "GERMINATED",
    "cull": "CULLED",
    "cancel": "CANCELLED",
    "rollback": "ROLLED_BACK",
    "recycle": "DORMANT",
}


def is_legal(src: str, dst: str) -> bool:
    return dst in LEGAL[src]


def command_target(command: str, src: str) -> str | None:
    """The stage ``command`` would move a seed in stage ``src`` to (None: it has none)."""
    return ADVANCE.get(src) if command == "advance" else COMMAND_TARGET[command]
