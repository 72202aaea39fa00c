"""Host models. Their module names are what ``seeds.targets`` point at (defaults: ``model.seed_targets``).

Every ``model`` option is a ``_target_`` built by ``build_model`` (rules in morpho_dist.targets); the data's
``input_shape``, ``in_features``, ``num_classes``, ``vocab_size`` and ``seq_len`` reach the constructors that
name them. Built in:

- ``mlp``: optional linear embedding ``embed`` (the default seeded point), then ReLU layers ``fc1, fc2, ...``,
  then ``head``. The default is deliberately narrow (64 -> 32 -> 4 -> 10): capacity is short.
- ``cnn``: ``convs.0, convs.1, ...`` (3x3 conv, ReLU, 2x2 max-pool), then ``fc`` and ``head``.
- ``transformer``: a small pre-norm encoder over tokens (image rows, or ``token_dim`` slices of a flat input);
  seeds on ``blocks.<i>.mlp.fc1``.
- ``gpt``: a decoder-only language model (morpho_dist.gpt); seeds on the MLP hidden layer ``blocks.<i>.mlp.fc1``.
- ``hf_llama``: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (nested ``_target_``s in
  conf/model/hf_llama.yaml); seeds on ``mlp.up_proj``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morpho_dist.data import DataSpec
from morpho_dist.errors import ConfigError
from morpho_dist.gpt import GPT  # noqa: F401  (built-in targets are reachable as morpho_dist.models.*)

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, embed: int = 32, hidden: list[int] = (4,), act: str = "relu"
    ) -> None:
        super().__init__()
        if act not in ACTS:
            raise ConfigError(f"model.act={act!r} is not known; allowed values: {list(ACTS)}")
        width = in_features
        self.embed = nn.Linear(width, embed) if embed > 0 else None
        width = embed if embed > 0 else width
        self.depth = len(hidden)
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, h))
            width = h
        self.act = ACTS[act]()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if self.embed is not None:
            h = self.embed(h)
        for i in range(1, self.depth + 1):
            h = self.act(getattr(self, f"fc{i}")(h))
        return self.head(h)


class CNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (32, 32), hidden: int = 32
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model=cnn needs image inputs [C, H, W]; this data has shape {list(input_shape)}")
        c, h, w = input_shape
        convs = []
        for ch in channels:
            convs.append(nn.Conv2d(c, ch, kernel_size=3, padding=1))
            c = ch
        self.convs = nn.ModuleList(convs)
        self.pool_to = 2 if min(h, w) >= 2 else 1
        self.fc = nn.Linear(c * self.pool_to**2, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
            if min(x.shape[-2:]) >= 4:
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, self.pool_to).flatten(1)
        return self.head(F.relu(self.fc(x)))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 2,
        mlp_hidden: int = 64,
        token_dim: int = 8,
    ) -> None:
        super().__init__()
        if len(input_shape) == 3:  # image: one token per row
            c, h, w = input_shape
            self.tokens, self.token_dim = h, c * w
        else:
            flat = math.prod(input_shape)
            if flat % token_dim:
                raise ConfigError(f"model.token_dim={token_dim} must divide the input size {flat}")
            self.tokens, self.token_dim = flat // token_dim, int(token_dim)
        if d_model % heads:
            raise ConfigError(f"model.heads={heads} must divide model.d_model={d_model}")
        self.embed = nn.Linear(self.token_dim, d_model)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # [B, C, H, W] -> [B, H, C*W]
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:
            x = x.reshape(x.shape[0], self.tokens, self.token_dim)
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def build_model(model_cfg: Any, spec: DataSpec) -> nn.Module:
    """The host of a ``model`` config node (its ``_target_``) for data of ``spec`` (parameters drawn from torch's
    RNG, on the current default device)."""
    from morpho_dist.targets import instantiate_target

    model = instantiate_target(model_cfg, "model", spec.model_arguments())
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={model_cfg._target_!r} built a {type(model).__name__}, not an nn.Module")
    return model


def seed_tp_plan(model: nn.Module, targets: list[str]) -> dict[str, str]:
    """Seeded target -> the host Linear right after it, for ``sharding=seed|hybrid``: the target becomes
    column-parallel and its successor row-parallel, so a rank's activation is exactly its seeds' features.
    ``mlp``: embed -> fc1 -> ... -> head; ``transformer``: blocks.<i>.mlp.fc1 -> blocks.<i>.mlp.fc2."""
    if isinstance(model, CNN):
        raise ConfigError(
            "model=cnn supports sharding=data only (seed and hybrid sharding need Linear host layers around each "
            "seeded point: use model=mlp or model=transformer, or sharding=data)"
        )
    if isinstance(model, MLP):
        chain = (["embed"] if model.embed is not None else []) + [f"fc{i}" for i in range(1, model.depth + 1)]
        chain.append("head")
        follow = dict(zip(chain, chain[1:]))
    elif isinstance(model, (Transformer, GPT)) and getattr(model, "mlp_kind", "gelu") == "gelu":
        follow = {f"blocks.{i}.mlp.fc1": f"blocks.{i}.mlp.fc2" for i in range(len(model.blocks))}
    else:
        raise ConfigError(f"{type(model).__name__} has no seed-sharding plan; use sharding=data")
    plan = {}
    for name in targets:
        if name not in follow:
            raise ConfigError(
                f"seeds.targets: {name!r} cannot be seed-sharded (no host Linear consumes it alone); shardable "
                f"targets of this model: {sorted(follow)}"
            )
        plan[name] = follow[name]
    clash = set(plan) & set(plan.values())
    if clash:
        raise ConfigError(
            f"seeds.targets: {sorted(clash)} would be both row- and column-parallel (adjacent seeded layers "
            "cannot be seed-sharded); seed every other layer or use sharding=data"
        )
    return plan


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
