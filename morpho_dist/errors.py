"""Errors that end a run with a one-line message, and the exit codes the command line gives them.

The ground floor of the package (no morpho_dist imports), so that config, data and models can all raise
``ConfigError`` without importing each other.
"""

from __future__ import annotations

EXIT_CONFIG = 2  # a bad config key or value, a missing file
EXIT_FAULT = 3  # desynchronised ranks, a divergence that cannot be rolled back, a bad or unsaveable checkpoint


class ConfigError(ValueError):
    """A bad config value; the message is one line and names the key."""
