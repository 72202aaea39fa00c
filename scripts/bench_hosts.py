"""The hosts scripts/bench_step.py times: a stack of transformer MLP blocks, and a `transformers` Llama.

Each builder returns a ``Host``: the model (params in the bench dtype), the names of its blocks (what compile mode
compiles one by one), the seed targets and a ``loss(model, batch)`` over a fixed batch made by ``batch(device)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP block ``x + down(gelu(up(norm(x))))``; ``residual=False``: ``down(gelu(up(x)))``."""

    def __init__(self, hidden: int, mult: int = 4, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(hidden) if residual else nn.Identity()
        self.up = nn.Linear(hidden, mult * hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(mult * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(self.act(self.up(self.norm(x))))
        return x + out if self.residual else out


@dataclass
class Host:
    model: nn.Module
    blocks: list[nn.Module]  # compile mode compiles each of these (torchtitan's per-block compile)
    targets: list[str]  # seed targets (wrap)
    batch: Callable[[torch.device], tuple[torch.Tensor, ...]]
    loss: Callable[..., torch.Tensor]  # loss(model, *batch)
    params: int  # parameter count of the bare host
    describe: str


def _stack(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Host:
    with torch.device(device):
        blocks = [MLPBlock(args.hidden, residual=args.host == "transformer") for _ in range(args.layers)]
        model = nn.Sequential(*blocks).to(dtype)

    def batch(dev: torch.device) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(args.tokens, args.hidden, generator=gen).to(dev, dtype)
        target = torch.randn(args.tokens, args.hidden, generator=gen).to(dev)
        return x, target

    def loss(m: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(m(x).float(), target)

    return Host(
        model, list(model), args.targets or ["down"], batch, loss, sum(p.numel() for p in model.parameters()),
        f"{args.host} x{args.layers}, hidden {args.hidden}, {args.tokens} tokens",
    )  # fmt: skip


def _llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Host:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.heads or max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.tokens % args.seq:
        raise ValueError(f"--tokens {args.tokens} must be a multiple of --seq {args.seq} for the llama host")

    def batch(dev: torch.device) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(args.vocab, (args.tokens // args.seq, args.seq), generator=gen).to(dev)
        return (ids,)

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    params = sum(p.numel() for p in model.parameters())
    return Host(
        model, list(model.model.layers), args.targets or ["up_proj", "down_proj"], batch, loss, params,
        f"transformers LlamaForCausalLM x{args.layers}, hidden {args.hidden}, intermediate "
        f"{config.intermediate_size}, {heads} heads, vocab {args.vocab}, {args.tokens} tokens "
        f"({args.tokens // args.seq} x {args.seq}), {params / 1e6:.0f}M params",
    )  # fmt: skip


def build_host(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Host:
    torch.manual_seed(0)  # every variant starts from the same host weights
    return _llama(args, device, dtype) if args.host == "llama" else _stack(args, device, dtype)
