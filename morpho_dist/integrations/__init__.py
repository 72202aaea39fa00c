"""Thin integrations over morpho_dist.Morphogenesis: ``lightning`` (a Lightning Callback) and ``hf_trainer`` (a
transformers Trainer and its callback). Each needs its framework (pip extras ``lightning``, ``hf``)."""
