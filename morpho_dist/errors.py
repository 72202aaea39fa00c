"""Errors that end a run with a one-line message, and the exit codes the command line gives them.

The ground floor of the package (no morpho_dist imports), so that config, data and models can all raise
``ConfigError`` without importing each other.
"""

from __future__ import annotations

# One exit code per class of error, the same in one process and under morpho_dist.torchrun (README "Failure
# behaviour"); an interrupt exits 128 + the signal: 130 (SIGINT, Ctrl-C), 143 (SIGTERM).
EXIT_CONFIG = 2  # the config or the launch is wrong: a key, a value, a group option, the device, mesh degrees, data
EXIT_CHECKPOINT = 3  # the checkpoint to resume is missing, incomplete, corrupt or does not fit; a save failed
EXIT_FAULT = 4  # the run failed: desynchronised ranks, a divergence that cannot be rolled back


class ConfigError(ValueError):
    """A bad config value; the message is one line and names the key."""
