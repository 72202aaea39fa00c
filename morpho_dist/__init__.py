"""morpho_dist: distributed training plugin for morphogenetic networks (seeded layers grown while training)."""

__version__ = "0.1.0"
