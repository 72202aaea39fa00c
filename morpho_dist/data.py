"""Data sources of the ``data`` group and their deterministic data-parallel batches.

Every option is a ``_target_`` (``hydra.utils.instantiate``; rules in morpho_dist.targets): the built-in
in-memory datasets ``digits``, ``synthetic``, ``cifar10`` (``Dataset``), the streamed byte-level ``text``
corpus (morpho_dist.corpus), or a user's callable returning either (it gets the run ``seed`` when its
signature names it). A source has a ``spec`` (DataSpec: what a model and a task need to know about it) and
``stream(batch_size, seed=, rank=, world_size=, device=)``, whose ``batch(step)`` gives this rank's
(inputs, targets) and ``val(rows)`` the validation batches (the same on every rank).

In-memory batches are a pure function of (seed, step, rank, world size): the global batch of step s is the
slice [s*B, (s+1)*B) of an endless stream of per-epoch permutations drawn from (seed, epoch), and rank r takes
rows r::W of it. A run resumed at step k therefore sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from morpho_dist.errors import ConfigError

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class DataSpec:
    """What models and tasks need to know about a data source. ``kind``: ``labelled`` (inputs with class
    labels) or ``tokens`` (token windows whose targets are the next tokens)."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int = 0
    vocab_size: int = 0
    seq_len: int = 0
    bytes_per_token: float = 1.0

    def model_arguments(self) -> dict:
        """The values a model's constructor may take from the data (morpho_dist.targets ``provided``)."""
        out: dict[str, Any] = {"input_shape": tuple(self.input_shape), "in_features": math.prod(self.input_shape)}
        if self.num_classes:
            out["num_classes"] = self.num_classes
        if self.vocab_size:
            out.update(vocab_size=self.vocab_size, seq_len=self.seq_len)
        return out


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

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="labelled", input_shape=self.input_shape, num_classes=self.num_classes)

    def to(self, device: torch.device) -> Dataset:
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)), self.num_classes)

    def stream(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, device="cpu") -> InMemoryStream:
        return InMemoryStream(self.to(device), batch_size, seed=seed, rank=rank, world_size=world_size)


def static_spec(fn):
    """Mark a loader with the spec it yields for a config, so validation needs no loading."""

    def mark(loader):
        loader.data_spec = fn
        return loader

    return mark


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


@static_spec(lambda cfg: DataSpec("labelled", (1, 8, 8), 10))
def load_digits_data(val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """sklearn's 8x8 digits (bundled with scikit-learn), standardized on the train split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, va = _split(len(x), float(val_fraction), seed)
    x_tr, x_va = _standardize(x[tr], x[va], axis=(0,))
    return _tensors(x_tr, y[tr], x_va, y[va], 10)


@static_spec(lambda cfg: DataSpec("labelled", (int(cfg.features),), int(cfg.classes)))
def load_synthetic_data(
    samples: int = 4096,
    features: int = 64,
    classes: int = 10,
    noise: float = 0.1,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Gaussian inputs labelled by a fixed random 2-layer teacher (argmax of noisy logits)."""
    n, d, k = int(samples), int(features), int(classes)
    if n < 2 or d < 1 or k < 2:
        raise ConfigError(f"data: synthetic needs samples >= 2, features >= 1, classes >= 2; got {n}, {d}, {k}")
    rng = np.random.default_rng(seed + 7919)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = rng.standard_normal((d, 4 * k)) / np.sqrt(d)
    w2 = rng.standard_normal((4 * k, k)) / np.sqrt(4 * k)
    logits = np.maximum(x @ w1, 0.0) @ w2 + float(noise) * rng.standard_normal((n, k))
    y = logits.argmax(1)
    tr, va = _split(n, float(val_fraction), seed)
    return _tensors(x[tr], y[tr], x[va], y[va], k)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


@static_spec(lambda cfg: DataSpec("labelled", (3, 32, 32), 10))
def load_cifar10_data(root: str = "data/cifar-10-batches-py", val_fraction: float = 0.0, seed: int = 0) -> Dataset:
    """CIFAR-10 python batches under ``root`` (nothing is downloaded); val_fraction 0: the test batch."""
    root = os.path.expanduser(str(root))
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(
            f"data.root={root!r}: CIFAR-10 python batches not found (missing {missing}); put the extracted "
            "cifar-10-batches-py there (data_batch_1..5, test_batch) or set data.root; nothing is downloaded"
        )
    parts = [_unpickle(os.path.join(root, name)) for name in CIFAR_TRAIN]
    x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y = np.concatenate([p["labels"] for p in parts]).astype(np.int64)
    if float(val_fraction) > 0:
        tr, va = _split(len(x), float(val_fraction), seed)
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    else:
        test = _unpickle(os.path.join(root, CIFAR_TEST))
        x_tr, y_tr = x, y
        x_va = np.asarray(test["data"]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        y_va = np.asarray(test["labels"], dtype=np.int64)
    x_tr, x_va = _standardize(x_tr, x_va, axis=(0, 2, 3))
    return _tensors(x_tr, y_tr, x_va, y_va, 10)


def load_dataset(data_cfg: Any, seed: int):
    """The data source of a ``data`` config node (its ``_target_``, given the run ``seed``)."""
    from morpho_dist.targets import instantiate_target

    source = instantiate_target(data_cfg, "data", {"seed": int(seed)})
    if not hasattr(source, "spec") or not hasattr(source, "stream"):
        raise ConfigError(
            f"data._target_={data_cfg._target_!r} built a {type(source).__name__}; a data source needs a `spec` "
            "(morpho_dist.data.DataSpec) and `stream(...)`: return a morpho_dist.data.Dataset, or see TextCorpus"
        )
    return source


def data_spec(data_cfg: Any, seed: int = 0) -> DataSpec:
    """The DataSpec of a ``data`` config node: from the loader's static spec when it has one, else by loading."""
    from morpho_dist.targets import locate_target

    loader = locate_target(data_cfg, "data")
    static = getattr(loader, "data_spec", None)
    if static is not None:
        return static(data_cfg)
    return load_dataset(data_cfg, seed).spec


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


class InMemoryStream:
    """Batches of a Dataset already on its device (``ShardedBatches`` indices)."""

    def __init__(self, data: Dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.sampler = ShardedBatches(len(data.y_train), batch_size, seed=seed, rank=rank, world_size=world_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.indices(step).to(self.data.x_train.device)
        return self.data.x_train[idx], self.data.y_train[idx]

    def val(self, rows: int = 0, batch: int = 4096) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``rows`` validation rows (all when 0) in batches: the same on every rank."""
        x, y = val_subset(self.data, rows)
        return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def val_subset(data: Dataset, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` validation rows (all when 0): the same batch on every rank."""
    if rows <= 0 or rows >= len(data.y_val):
        return data.x_val, data.y_val
    return data.x_val[:rows], data.y_val[:rows]
