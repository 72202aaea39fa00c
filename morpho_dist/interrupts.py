"""Ctrl-C and SIGTERM: every rank stops after the same step, saves a last checkpoint, and leaves quietly.

The CLI installs one ``StopSignal`` per process; the training loop asks ``stop_after(step)`` at every step
boundary. In one process a signal stops the run at the next boundary. Under torchrun every rank must stop after
the same step (the final checkpoint is collective), and ranks see their signals at slightly different steps, so
the first rank to see one proposes a stop step a little ahead (``STOP_MARGIN``) in the process group's store;
every rank reads that key at each boundary (a store lookup, not a collective), so a rank that was not signalled
stops too. ranks run in lockstep through their per-step collectives, never more than one step apart, so
each reaches the proposed step no later than the others.

A second signal within ``REPEAT_WINDOW_S`` of the first is ignored (torchrun forwards the terminal's Ctrl-C to
workers that already received it); one later than that ends the process at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

STOP_KEY = "morpho_dist/stop_after_step"
STOP_MARGIN = 2  # steps between the first rank seeing a signal and the agreed stop
REPEAT_WINDOW_S = 2.0
EXIT_SIGNAL_BASE = 128  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Interrupted(Exception):
    """The run stopped on a signal after ``step``; ``checkpoint`` is the last complete one (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        super().__init__(f"{signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL_BASE + self.signum


class StopSignal:
    """SIGINT / SIGTERM -> a stop at a step boundary every rank agrees on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._agreed: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > REPEAT_WINDOW_S:
            print(f"\n{signal.Signals(signum).name} again: stopping now, without a final checkpoint", file=sys.stderr)
            sys.stderr.flush()
            os._exit(EXIT_SIGNAL_BASE + signum)

    def stop_after(self, step: int) -> bool:
        """Whether the run stops now, after ``step`` completed steps (identical on every rank)."""
        store = _default_store()
        if store is None:
            return self.signum is not None
        if self._agreed is None:
            if self.signum is not None:
                store.compare_set(STOP_KEY, "", str(step + STOP_MARGIN))  # the first proposal wins
            if store.check([STOP_KEY]):
                self._agreed = int(store.get(STOP_KEY))
                if self.signum is None:  # stopped by a peer's signal: report it as SIGTERM's kind of stop
                    self.signum = int(signal.SIGTERM)
        return self._agreed is not None and step >= self._agreed


def _default_store() -> Any:
    """The default process group's key-value store, or None in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()
