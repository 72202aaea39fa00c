"""``data=text``: a byte-level corpus of real text that needs no download, streamed from memory-mapped files.

The text is the Python standard library's own source: every ``*.py`` file under ``sysconfig``'s ``stdlib``
directory of the running interpreter, leaving out ``site-packages``/``dist-packages`` (installed packages) and
the ``test``/``tests``/``idle_test`` trees (CPython 3.11 here: 734 files, 12.1 MB). The corpus therefore
depends on the interpreter's version; its manifest records which.

Split, by file and independent of file-system order: a file goes to validation when the first 8 bytes of the
blake2b hash of its path relative to the stdlib root, read as a fraction of 2^64, fall below ``val_fraction``.
``max_bytes`` (0: no cap) keeps a subset of each split: files in hash order until the split's share of the
cap is reached. Each split's files are stored in path order, separated by one NUL byte (the source files have
none), as uint8 tokens in ``<cache_dir>/stdlib-<digest>.{train,val}.u8`` with ``.json`` beside them (every
file's split, offset and size); the digest covers the interpreter, the file list with sizes, and the split
settings, so a changed library builds a new cache. Files are written under a temporary name and renamed, so
concurrent runs may build the same cache.

Batches: the global batch of step s is ``batch_size`` windows of ``seq_len + 1`` bytes at offsets drawn by a
generator keyed by (seed, step) alone: a run resumed at step k sees exactly the batches of an uninterrupted
run, and rank r of W takes windows r::W. Only the bytes of a batch are read from the memory map and sent to the
device; nothing assumes the corpus fits there. Validation: ``val_windows`` fixed windows spread evenly over the
validation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from morpho_dist.data import DataSpec, static_spec
from morpho_dist.errors import ConfigError

FORMAT = 1
SEPARATOR = 0
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def default_cache_dir() -> str:
    return os.environ.get("MORPHO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "morpho_dist")


def _hash_fraction(relpath: str) -> float:
    digest = hashlib.blake2b(relpath.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def list_sources(root: str) -> list[tuple[str, int]]:
    """(path relative to ``root`` with '/' separators, size in bytes) of every corpus file, sorted by path."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), os.path.getsize(path)))
    return sorted(out)


def split_files(files: list[tuple[str, int]], val_fraction: float, max_bytes: int = 0) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]} relative paths, each in path order (the module doc's rule)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    keyed = sorted(files, key=lambda f: (_hash_fraction(f[0]), f[0]))
    caps = {"train": (1 - val_fraction) * max_bytes, "val": val_fraction * max_bytes}
    out: dict[str, list[str]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    for path, size in keyed:
        split = "val" if _hash_fraction(path) < val_fraction else "train"
        if max_bytes and used[split] + size > caps[split] and out[split]:
            continue
        out[split].append(path)
        used[split] += size
    return {k: sorted(v) for k, v in out.items()}


def _write_atomic(path: str, chunks: list[bytes]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
    os.replace(tmp, path)


def build_corpus(root: str, cache_dir: str, val_fraction: float, max_bytes: int) -> dict:
    """Build (or find in ``cache_dir``) the token files; returns the manifest (with the files' paths)."""
    files = list_sources(root)
    if not files:
        raise ConfigError(f"data=text: no .py files under the standard library directory {root!r}")
    key = json.dumps([FORMAT, sys.version, root, files, val_fraction, max_bytes]).encode()
    digest = hashlib.blake2b(key, digest_size=10).hexdigest()
    base = os.path.join(os.path.expanduser(cache_dir), f"stdlib-{digest}")
    manifest_path = base + ".json"
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        if all(os.path.exists(manifest[f"{split}_path"]) for split in ("train", "val")):
            return manifest
    os.makedirs(os.path.dirname(base), exist_ok=True)
    sizes = dict(files)
    manifest = {
        "format": FORMAT,
        "source": "python standard library *.py",
        "python": sys.version.split()[0],
        "root": root,
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "separator": SEPARATOR,
        "files": {},
    }
    for split, paths in split_files(files, val_fraction, max_bytes).items():
        chunks, offset, entries = [], 0, []
        for rel in paths:
            with open(os.path.join(root, rel), "rb") as fh:
                data = fh.read()
            chunks += [data, bytes([SEPARATOR])]
            entries.append({"path": rel, "offset": offset, "size": len(data)})
            offset += len(data) + 1
            if len(data) != sizes[rel]:
                raise RuntimeError(f"{rel} changed size while the corpus was built")
        _write_atomic(f"{base}.{split}.u8", chunks)
        manifest["files"][split] = entries
        manifest[f"{split}_path"] = f"{base}.{split}.u8"
        manifest[f"{split}_bytes"] = offset
    _write_atomic(manifest_path, [json.dumps(manifest, indent=1).encode()])
    return manifest


@dataclass(frozen=True)
class StreamPlan:
    batch_size: int  # global windows per step
    seed: int
    rank: int = 0
    world_size: int = 1


class TokenStream:
    """Batches of (inputs [b, T], next tokens [b, T]) int64 on ``device`` from a uint8 memory map."""

    def __init__(self, corpus: TextCorpus, plan: StreamPlan, device: torch.device | str = "cpu") -> None:
        if plan.batch_size % plan.world_size:
            raise ConfigError(
                f"train.batch_size={plan.batch_size} must be divisible by the world size {plan.world_size}"
            )
        self.corpus, self.plan, self.device = corpus, plan, torch.device(device)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def starts(self, step: int) -> np.ndarray:
        """The global batch's window offsets of ``step`` (a pure function of (seed, step))."""
        T, n = self.corpus.seq_len, len(self.corpus.train)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.plan.seed), int(step), 0x7E47])))
        return rng.integers(0, n - T, size=self.plan.batch_size)  # window [s, s + T] lies inside the split

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.corpus.seq_len + 1)
        win = torch.from_numpy(np.ascontiguousarray(tokens[idx])).to(self.device, non_blocking=True).long()
        return win[:, :-1], win[:, 1:]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.corpus.train, self.starts(step)[self.plan.rank :: self.plan.world_size])

    def val(self, rows: int = 0, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``rows`` validation windows (all when 0), in batches of ``batch``: the same on every rank."""
        if self._val is None:
            starts = self.corpus.val_starts()
            self._val = [self._windows(self.corpus.val, starts[i : i + batch]) for i in range(0, len(starts), batch)]
        if rows <= 0:
            return self._val
        out, left = [], rows
        for x, y in self._val:
            if left <= 0:
                break
            out.append((x[:left], y[:left]))
            left -= len(x)
        return out


class TextCorpus:
    """The token files of one corpus build, memory-mapped read-only."""

    def __init__(self, manifest: dict, seq_len: int, val_windows: int) -> None:
        if seq_len < 1 or val_windows < 1:
            raise ConfigError(f"data.seq_len={seq_len} and data.val_windows={val_windows} must be >= 1")
        self.manifest, self.seq_len, self.val_windows = manifest, int(seq_len), int(val_windows)
        self.train = np.memmap(manifest["train_path"], dtype=np.uint8, mode="r")
        self.val = np.memmap(manifest["val_path"], dtype=np.uint8, mode="r")
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) <= self.seq_len:
                raise ConfigError(
                    f"data.seq_len={seq_len}: the {split} split has only {len(tokens)} bytes (raise data.max_bytes "
                    "or data.val_fraction)"
                )

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="tokens", input_shape=(self.seq_len,), vocab_size=256, seq_len=self.seq_len)

    def val_starts(self) -> np.ndarray:
        last = len(self.val) - self.seq_len - 1
        return np.unique(np.linspace(0, last, self.val_windows).round().astype(np.int64))

    def file_bytes(self, split: str, index: int) -> bytes:
        """The bytes of the ``index``-th file of ``split`` as stored in the token file."""
        entry = self.manifest["files"][split][index]
        tokens = self.train if split == "train" else self.val
        return tokens[entry["offset"] : entry["offset"] + entry["size"]].tobytes()

    def to(self, device) -> TextCorpus:
        return self  # batches move to the device one at a time

    def stream(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, device="cpu") -> TokenStream:
        return TokenStream(self, StreamPlan(batch_size, seed, rank, world_size), device)


def decode(tokens) -> str:
    """Byte tokens back to text (invalid UTF-8 replaced)."""
    if torch.is_tensor(tokens):
        tokens = tokens.detach().cpu().numpy()
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


@static_spec(lambda cfg: DataSpec("tokens", (int(cfg.seq_len),), vocab_size=256, seq_len=int(cfg.seq_len)))
def stdlib_text(
    seq_len: int = 128,
    val_fraction: float = 0.05,
    max_bytes: int = 0,
    val_windows: int = 64,
    cache_dir: str | None = None,
) -> TextCorpus:
    """The ``data=text`` corpus (built once per cache dir, then memory-mapped)."""
    manifest = build_corpus(stdlib_root(), cache_dir or default_cache_dir(), float(val_fraction), int(max_bytes))
    return TextCorpus(manifest, seq_len, val_windows)
