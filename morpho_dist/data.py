"""Datasets (digits, synthetic, cifar10) held in memory, and deterministic data-parallel batches.

Batches are a pure function of (seed, step, rank, world size): the global batch of step s is the slice
[s*B, (s+1)*B) of an endless stream of per-epoch permutations drawn from (seed, epoch), and rank r takes rows
r::W of it. A run resumed at step k therefore sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from morpho_dist.errors import ConfigError

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Dataset:
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)), self.num_classes)


def input_spec(data_cfg: Any) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a dataset, without loading it."""
    if data_cfg.name == "digits":
        return (1, 8, 8), 10
    if data_cfg.name == "synthetic":
        return (int(data_cfg.features),), int(data_cfg.classes)
    if data_cfg.name == "cifar10":
        return (3, 32, 32), 10
    raise ConfigError(f"data.name={data_cfg.name!r} is not known; allowed values: ['digits', 'synthetic', 'cifar10']")


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, val) index split from the run seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _standardize(x_tr: np.ndarray, x_va: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mu = x_tr.mean(axis=axis, keepdims=True)
    sd = x_tr.std(axis=axis, keepdims=True)
    sd = np.where(sd < 1e-6, 1.0, sd)  # constant pixels (digits' borders) stay 0
    return (x_tr - mu) / sd, (x_va - mu) / sd


def _tensors(x_tr, y_tr, x_va, y_va, classes: int) -> Dataset:
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    i = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(f(x_tr), i(y_tr), f(x_va), i(y_va), classes)


def load_digits_data(cfg: Any, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, va = _split(len(x), float(cfg.val_fraction), seed)
    x_tr, x_va = _standardize(x[tr], x[va], axis=(0,))
    return _tensors(x_tr, y[tr], x_va, y[va], 10)


def load_synthetic_data(cfg: Any, seed: int) -> Dataset:
    """Gaussian inputs labelled by a fixed random 2-layer teacher (argmax of noisy logits)."""
    n, d, k = int(cfg.samples), int(cfg.features), int(cfg.classes)
    if n < 2 or d < 1 or k < 2:
        raise ConfigError(f"data: synthetic needs samples >= 2, features >= 1, classes >= 2; got {n}, {d}, {k}")
    rng = np.random.default_rng(seed + 7919)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = rng.standard_normal((d, 4 * k)) / np.sqrt(d)
    w2 = rng.standard_normal((4 * k, k)) / np.sqrt(4 * k)
    logits = np.maximum(x @ w1, 0.0) @ w2 + float(cfg.noise) * rng.standard_normal((n, k))
    y = logits.argmax(1)
    tr, va = _split(n, float(cfg.val_fraction), seed)
    return _tensors(x[tr], y[tr], x[va], y[va], k)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def load_cifar10_data(cfg: Any, seed: int) -> Dataset:
    root = os.path.expanduser(str(cfg.root))
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(
            f"data.root={root!r}: CIFAR-10 python batches not found (missing {missing}); put the extracted "
            "cifar-10-batches-py there (data_batch_1..5, test_batch) or set data.root; nothing is downloaded"
        )
    parts = [_unpickle(os.path.join(root, name)) for name in CIFAR_TRAIN]
    x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    if float(cfg.val_fraction) > 0:
        tr, va = _split(len(x), float(cfg.val_fraction), seed)
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    else:
        test = _unpickle(os.path.join(root, CIFAR_TEST))
        x_tr, y_tr = x, y
        x_va = np.asarray(test["data"]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        y_va = np.asarray(test["labels"], dtype=np.int64)
    x_tr, x_va = _standardize(x_tr, x_va, axis=(0, 2, 3))
    return _tensors(x_tr, y_tr, x_va, y_va, 10)


LOADERS = {"digits": load_digits_data, "synthetic": load_synthetic_data, "cifar10": load_cifar10_data}


def load_dataset(data_cfg: Any, seed: int) -> Dataset:
    if data_cfg.name not in LOADERS:
        raise ConfigError(f"data.name={data_cfg.name!r} is not known; allowed values: {list(LOADERS)}")
    return LOADERS[data_cfg.name](data_cfg, seed)


class ShardedBatches:
    """Data-parallel batches, deterministic from (seed, step): rank r of W gets rows r::W of the global batch."""

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by the world size {world_size}")
        if batch_size > n:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {n} training samples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's row indices for ``step`` (batches never straddle an epoch boundary)."""
        per_epoch = self.n // self.batch_size
        epoch, pos = divmod(step, per_epoch)
        rows = self._permutation(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return rows[self.rank :: self.world_size]


def val_subset(data: Dataset, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` validation rows (all when 0): the same batch on every rank."""
    if rows <= 0 or rows >= len(data.y_val):
        return data.x_val, data.y_val
    return data.x_val[:rows], data.y_val[:rows]
