"""Optimizers: a torch optimizer for the host, and a per-seed optimizer for the blueprint banks.

A bank is one tensor per layer holding every seed's parameters, but seeds live separate lives: a seed must not
move while it is frozen (STABILIZATION, EVALUATING, FOSSILIZED) or idle, and a freshly germinated seed starts
with fresh optimizer state. ``SeedOptimizer`` keeps Adam (or SGD momentum) state per bank with one step
counter per seed, updates only the seeds in TRAINING / GRAFTING / FINE_TUNING (a mask read from the stage
buffer on the device: no host sync) and ``reset_seed`` clears one seed's slice on every lifecycle move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from morpho_dist.layer import SeededLayer
from morpho_dist.lifecycle import TRAINABLE_STAGES

TRAINABLE_IDS = sorted(int(s) for s in TRAINABLE_STAGES)


class SeedOptimizer:
    """Adam (bias correction per seed) or SGD with momentum over the banks of ``layers``; no weight decay."""

    def __init__(
        self,
        layers: Mapping[str, SeededLayer],
        *,
        name: str,
        lr: float,
        betas=(0.9, 0.999),
        momentum: float = 0.9,
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        self.layers, self.name, self.lr, self.eps = dict(layers), name, float(lr), eps
        # fused: one kernel launch per layer (kernels.seed_optim) instead of ~30 ops; None: on CUDA banks
        self.fused = fused
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.momentum = float(momentum)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._ids: dict[str, torch.Tensor] = {}
        for key, layer in self.layers.items():
            n = layer.num_seeds
            dev = layer.stage.device
            self._ids[key] = torch.tensor(TRAINABLE_IDS, device=dev)
            st = {"t": torch.zeros(n, dtype=torch.float32, device=dev)}
            for pname in ("p0", "p1"):
                p = getattr(layer.bank, pname)
                st[f"m_{pname}"] = torch.zeros_like(p)
                if name != "sgd":
                    st[f"v_{pname}"] = torch.zeros_like(p)
            self.state[key] = st

    def params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.bank.p0, layer.bank.p1)]

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    @torch.no_grad()
    def step(self, ok: torch.Tensor | None = None) -> None:
        """One update of the trainable seeds; ``ok`` (a 0-d bool on the device): when False nothing moves."""
        for key, layer in self.layers.items():
            if layer.known_idle():  # idle stages only: no seed is trainable, the update would change nothing
                continue
            st = self.state[key]
            if self._fusable(layer, ok):
                self._fused_step(layer, st, ok)
                continue
            mask = torch.isin(layer.stage.long(), self._ids[key])
            if ok is not None:
                mask = mask & ok
            st["t"].add_(mask.float())
            t = st["t"].clamp_min(1.0)
            for pname in ("p0", "p1"):
                p = getattr(layer.bank, pname)
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.dim() - 1)
                m_ = mask.view(shape)
                g = p.grad
                m = st[f"m_{pname}"]
                if self.name == "sgd":
                    m.copy_(torch.where(m_, self.momentum * m + g, m))
                    update = m
                else:
                    v = st[f"v_{pname}"]
                    m.copy_(torch.where(m_, self.beta1 * m + (1 - self.beta1) * g, m))
                    v.copy_(torch.where(m_, self.beta2 * v + (1 - self.beta2) * g * g, v))
                    bc1 = (1 - self.beta1**t).view(shape)
                    bc2 = (1 - self.beta2**t).view(shape)
                    update = (m / bc1) / ((v / bc2).sqrt() + self.eps)
                p.sub_(torch.where(m_, self.lr * update, torch.zeros((), device=p.device)))

    def _fusable(self, layer: SeededLayer, ok: torch.Tensor | None) -> bool:
        banks = (layer.bank.p0, layer.bank.p1)
        if not (self.fused or (self.fused is None and banks[0].is_cuda)):
            return False
        plain = all(
            type(p.data) is torch.Tensor and p.grad is not None and type(p.grad) is torch.Tensor for p in banks
        )  # not DTensors
        return (
            plain
            and all(t.dtype == torch.float32 and t.is_contiguous() for p in banks for t in (p, p.grad))
            and (ok is None or (ok.numel() == 1 and ok.device == banks[0].device))
        )

    def _fused_step(self, layer: SeededLayer, st: dict[str, torch.Tensor], ok: torch.Tensor | None) -> None:
        from morpho_dist.kernels.seed_optim import seed_step_

        banks = tuple(
            (p, p.grad, st[f"m_{name}"], st.get(f"v_{name}"))
            for name, p in (("p0", layer.bank.p0), ("p1", layer.bank.p1))
        )
        seed_step_(
            layer.stage, ok, st["t"], banks, sgd=self.name == "sgd", lr=self.lr, beta1=self.beta1, beta2=self.beta2,
            eps=self.eps, momentum=self.momentum,
        )  # fmt: skip

    @torch.no_grad()
    def reset_seed(self, layer_key: str, index: int) -> None:
        """Forget the optimizer state of one local seed (its next trainable step starts afresh)."""
        for value in self.state[layer_key].values():
            value[index].zero_()

    def state_dict(self) -> dict:
        return {k: {n: t.detach().cpu().clone() for n, t in st.items()} for k, st in self.state.items()}

    def load_state_dict(self, state: Mapping) -> None:
        for key, st in state.items():
            for name, t in st.items():
                self.state[key][name].copy_(t)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` committed only where ``ok``: parameters and state are snapshotted and restored with
    ``torch.where`` on the device (state created by this step is reset to zeros, which is what a fresh state
    means to Adam and SGD). Costs two copies of the parameters and state per step; no host sync."""
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors.append(p)
            tensors.extend(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    saved = {id(t): _local(t).clone() for t in tensors}
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for t in [p, *(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))]:
                now = _local(t)
                before = saved.get(id(t))
                if before is None:
                    before = torch.zeros_like(now)
                now.copy_(torch.where(ok.to(now.device), now, before))


class Optimizers:
    """Host optimizer + seed optimizer behind one step / zero_grad / state_dict."""

    def __init__(self, host: torch.optim.Optimizer | None, seeds: SeedOptimizer | None) -> None:
        self.host, self.seeds = host, seeds

    def zero_grad(self) -> None:
        if self.host is not None:
            self.host.zero_grad(set_to_none=True)
        if self.seeds is not None:
            self.seeds.zero_grad()

    def step(self, ok: torch.Tensor | None = None) -> None:
        """``ok``: a 0-d bool tensor on the device; when it is False the step changes no parameter and no
        optimizer state (decided on the device: no host synchronisation)."""
        if self.host is not None:
            if ok is None:
                self.host.step()
            else:
                guarded_step(self.host, ok)
        if self.seeds is not None:
            self.seeds.step(ok)

    def reset_seed(self, layer_key: str, index: int) -> None:
        if self.seeds is not None:
            self.seeds.reset_seed(layer_key, index)

    def state_dict(self) -> dict:
        return {
            "host": self.host.state_dict() if self.host is not None else None,
            "seeds": self.seeds.state_dict() if self.seeds is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if self.host is not None and state.get("host") is not None:
            self.host.load_state_dict(state["host"])
        if self.seeds is not None and state.get("seeds") is not None:
            self.seeds.load_state_dict(state["seeds"])


def host_parameters(model: nn.Module, layers: Mapping[str, SeededLayer]) -> list[nn.Parameter]:
    bank = {id(p) for layer in layers.values() for p in layer.bank.parameters()}
    return [p for p in model.parameters() if id(p) not in bank and p.requires_grad]


def make_optimizers(
    optim_cfg: Any,
    lr: float,
    model: nn.Module,
    layers: Mapping[str, SeededLayer],
    params: list[nn.Parameter] | None = None,
) -> Optimizers:
    """Host optimizer over ``params`` (default: the model's non-bank parameters) + the seed optimizer over the
    layers' banks (this rank's seeds only when seeds are sharded: a layer holds only its shard)."""
    params = host_parameters(model, layers) if params is None else list(params)
    seeds = make_seed_optimizer(optim_cfg, layers, lr * float(optim_cfg.seed_lr_scale)) if layers else None
    return Optimizers(make_host_optimizer(optim_cfg, lr, params), seeds)


def _kind(p: torch.Tensor) -> tuple:
    """What torch's multi-tensor and fused optimizer kernels need to be equal across one list: plain tensors
    together; DTensors together per device mesh (placements may differ: the ops are pointwise)."""
    if isinstance(p, DTensor):
        return ("dtensor", id(p.device_mesh))
    return ("tensor",)


def host_param_groups(params: Iterable[torch.Tensor], **options: Any) -> list[dict]:
    """``params`` as optimizer param groups, one per tensor kind (``_kind``), each with ``options``. A
    tensor-parallel host holds DTensor parameters beside plain ones; in one group, the foreach path (torch's
    default on CUDA) and the fused path stop at the first step ("got mixed torch.Tensor and DTensor")."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(_kind(p), []).append(p)
    return [{"params": ps, **options} for ps in groups.values()]


def make_host_optimizer(optim_cfg: Any, lr: float, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``optim`` group's torch optimizer over ``params`` (the host's: no blueprint banks), one param group
    per tensor kind (``host_param_groups``); ``optim.foreach`` / ``optim.fused`` are torch's options. ``params``
    may also be param groups (dicts), as Morphogenesis.host_parameters() gives for a tensor-parallel host."""
    params = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    name = str(optim_cfg.name)
    wd = float(optim_cfg.weight_decay)
    foreach = getattr(optim_cfg, "foreach", None)
    fused = bool(getattr(optim_cfg, "fused", False))
    groups = host_param_groups(params)
    if name == "sgd":
        if fused:
            raise ValueError("optim.fused=true works with optim.name in ['adamw', 'adam']")
        return torch.optim.SGD(groups, lr=lr, momentum=float(optim_cfg.momentum), weight_decay=wd, foreach=foreach)
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        # capturable on CUDA: the step counters live on the device, so a guarded step never syncs
        cuda = any(p.is_cuda for p in params)
        kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": foreach}
        return cls(groups, lr=lr, betas=tuple(optim_cfg.betas), weight_decay=wd, capturable=cuda, **kwargs)
    raise ValueError(f"optim.name={name!r} is not known; allowed values: ['adamw', 'adam', 'sgd']")


def make_seed_optimizer(optim_cfg: Any, layers: Mapping[str, SeededLayer], lr: float) -> SeedOptimizer:
    """The per-seed optimizer of the ``optim`` group's kind (adamw/adam: Adam, sgd: momentum) over the banks."""
    name = str(optim_cfg.name)
    return SeedOptimizer(layers, name=name, lr=lr, betas=tuple(optim_cfg.betas), momentum=float(optim_cfg.momentum))
