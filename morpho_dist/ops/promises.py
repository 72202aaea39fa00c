"""Idle records the op can consult when it runs, for calls whose ``all_idle`` was fixed when they were traced.

SeededLayer records, for its stage tensor at a version, that every seed was idle (morpho_dist.layer). An eager
call passes that as ``all_idle``. Under torch.compile the call is traced once and replayed: a promise traced in
would be stale after a seed goes live (or force a recompile at every lifecycle change), so the traced call
promises nothing, and the op's custom-op body asks here at run time instead: the stage tensor reaching the op is
the layer's own buffer, with its live version counter. Never inside a CUDA-graph capture: a recorded launch
replays whatever the stages become.
"""

from __future__ import annotations

import weakref

import torch

# id(stage) -> (weak reference to the stage tensor, its version when every seed was seen idle)
_RECORDS: dict[int, tuple[weakref.ref, int]] = {}


def record(stage: torch.Tensor, idle: bool) -> None:
    """Remember (idle) or forget (not idle, not known) the idle record of ``stage`` as it is now."""
    key = id(stage)
    if not idle:
        _RECORDS.pop(key, None)
        return
    held = _RECORDS.get(key)
    if held is None or held[0]() is not stage:
        ref = weakref.ref(stage, lambda _ref, key=key: _RECORDS.pop(key, None))
    else:
        ref = held[0]
    _RECORDS[key] = (ref, stage._version)


def holds(stage: torch.Tensor) -> bool:
    """Whether every seed of ``stage`` is known idle now: recorded idle, and no write since (version unchanged);
    False inside a CUDA-graph capture."""
    held = _RECORDS.get(id(stage))
    if held is None or held[0]() is not stage or stage._version != held[1]:
        return False
    return not (stage.is_cuda and torch.cuda.is_current_stream_capturing())
