"""What the tests that grow a seed to FOSSILIZED in a few dozen steps share: controller settings with short dwell
times, and a token stream with a rule a small language model learns quickly."""

from __future__ import annotations

import torch

# Controller overrides: one decision every 5 steps, and every dwell time short enough for a 60-200 step test.
FAST_CONTROLLER = {
    "interval": 5,
    "min_training_steps": 5,
    "stabilization_steps": 5,
    "fine_tuning_steps": 10,
    "patience_k": 1,
}


def rule_tokens(rows: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, seq] token ids with a rule to learn, x[t+1] = (3 x[t] + 1) mod vocab, each row from a random start
    drawn from ``generator``."""
    tokens = [torch.randint(0, vocab, (rows, 1), generator=generator)]
    for _ in range(seq - 1):
        tokens.append((tokens[-1] * 3 + 1) % vocab)
    return torch.cat(tokens, 1)
