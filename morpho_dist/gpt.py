"""``model=gpt``: a decoder-only transformer language model.

Token and learned position embeddings, ``depth`` pre-norm blocks (LayerNorm -> causal self-attention through
``F.scaled_dot_product_attention`` -> residual; LayerNorm -> MLP -> residual), a final LayerNorm and a head tied
to the token embedding. The MLP is ``fc2(gelu(fc1(x)))`` (``mlp="gelu"``) or ``down(silu(gate(x)) * up(x))``
(``mlp="swiglu"``) with ``mlp_width`` hidden units. Seeds watch the MLP hidden layer: ``blocks.<i>.mlp.fc1``
(gelu) or ``blocks.<i>.mlp.up`` (swiglu). Linear layers carry no bias except the MLP's; weights are drawn
N(0, 0.02), the residual output projections N(0, 0.02 / sqrt(2 depth)) (GPT-2's scaling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from morpho_dist.errors import ConfigError

MLP_KINDS = ("gelu", "swiglu")


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GeluMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, mlp: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = GeluMLP(width, mlp_width) if mlp == "gelu" else SwiGLUMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Input ``[B, T]`` token ids (T <= seq_len); output ``[B, T, vocab_size]`` logits."""

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 128,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_width: int = 128,
        mlp: str = "gelu",
    ) -> None:
        super().__init__()
        for key, value in (("width", width), ("depth", depth), ("heads", heads), ("mlp_width", mlp_width)):
            if value < 1:
                raise ConfigError(f"model.{key}={value} must be >= 1")
        if width % heads:
            raise ConfigError(f"model.heads={heads} must divide model.width={width}")
        if mlp not in MLP_KINDS:
            raise ConfigError(f"model.mlp={mlp!r} is not allowed; allowed values: {list(MLP_KINDS)}")
        self.seq_len, self.mlp_kind = int(seq_len), mlp
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(GPTBlock(width, heads, mlp_width, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self._init_weights(depth)

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm gains stay 1, biases 0
            residual = name.endswith(("attn.proj.weight", "mlp.fc2.weight", "mlp.down.weight"))
            p.normal_(0.0, 0.02 / math.sqrt(2 * depth) if residual else 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.seq_len}")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
