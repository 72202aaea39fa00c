"""data=text: the split by file, the byte round trip through the token files, and streamed batches."""

import hashlib
import os

import numpy as np
import pytest
import torch

from morpho_dist.corpus import SEPARATOR, TextCorpus, build_corpus, decode, list_sources, split_files, stdlib_text
from morpho_dist.errors import ConfigError


def _fraction(path: str) -> float:  # the documented rule, written out independently
    return int(hashlib.blake2b(path.encode(), digest_size=8).hexdigest(), 16) / 2**64


@pytest.fixture
def tree(tmp_path):
    """A small source tree: 40 .py files of varied text, plus files the corpus must leave out."""
    root = tmp_path / "lib"
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = root / ("pkg" if i % 3 else "") / ("sub" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        words = [f"def f{i}_{j}(x):\n    return x * {j}  # ünïcode\n" for j in range(int(rng.integers(20, 60)))]
        (folder / f"mod{i}.py").write_text("".join(words), encoding="utf-8")
    for skipped in ("site-packages", "test", "__pycache__"):
        (root / skipped).mkdir()
        (root / skipped / "skip.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_listing_leaves_out_tests_and_installed_packages(tree):
    paths = [p for p, _ in list_sources(str(tree))]
    assert len(paths) == 40 and paths == sorted(paths)
    assert not any(p.startswith(("site-packages/", "test/", "__pycache__/")) or p.endswith(".txt") for p in paths)


def test_split_is_by_file_hash_and_independent_of_order(tree):
    files = list_sources(str(tree))
    split = split_files(files, 0.25)
    assert split == split_files(list(reversed(files)), 0.25) == split_files(files[::2] + files[1::2], 0.25)
    expected_val = sorted(p for p, _ in files if _fraction(p) < 0.25)
    assert split["val"] == expected_val and split["train"] == sorted(p for p, _ in files if p not in expected_val)
    # a file's split does not depend on which other files exist
    fewer = split_files(files[:20], 0.25)
    assert set(fewer["val"]) == set(expected_val) & {p for p, _ in files[:20]}


def test_cap_keeps_files_in_hash_order_within_each_share(tree):
    files = list_sources(str(tree))
    cap = sum(s for _, s in files) // 4
    split = split_files(files, 0.25, max_bytes=cap)
    sizes = dict(files)
    train_bytes = sum(sizes[p] for p in split["train"])
    assert 0 < train_bytes <= 0.75 * cap
    first = min((p for p, _ in files if _fraction(p) >= 0.25), key=_fraction)
    assert first in split["train"]  # the first train file in hash order is always kept


def test_bad_val_fraction_is_refused(tree):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_files(list_sources(str(tree)), 1.5)


def test_token_files_round_trip_every_file(tree, tmp_path):
    manifest = build_corpus(str(tree), str(tmp_path / "cache"), 0.25, 0)
    corpus = TextCorpus(manifest, seq_len=16, val_windows=4)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint8
    for split in ("train", "val"):
        tokens = corpus.train if split == "train" else corpus.val
        for i, entry in enumerate(manifest["files"][split]):
            original = (tree / entry["path"]).read_bytes()
            assert corpus.file_bytes(split, i) == original
            assert tokens[entry["offset"] + entry["size"]] == SEPARATOR
            assert decode(tokens[entry["offset"] : entry["offset"] + entry["size"]]) == original.decode("utf-8")
        assert len(tokens) == sum(e["size"] + 1 for e in manifest["files"][split])
    # a second build finds the cache (same files, same paths)
    again = build_corpus(str(tree), str(tmp_path / "cache"), 0.25, 0)
    assert again["train_path"] == manifest["train_path"]
    assert os.path.getmtime(again["train_path"]) == os.path.getmtime(manifest["train_path"])


def test_batches_are_windows_of_the_memory_map_and_equal_across_a_resume(tree, tmp_path):
    corpus = TextCorpus(build_corpus(str(tree), str(tmp_path / "c"), 0.25, 0), seq_len=32, val_windows=5)
    first = corpus.stream(8, seed=3)
    resumed = TextCorpus(corpus.manifest, seq_len=32, val_windows=5).stream(8, seed=3)  # a new process, step 17 on
    for step in (17, 18, 400):
        x, y = first.batch(step)
        x2, y2 = resumed.batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (8, 32) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
        for row, start in zip(x, first.starts(step)):
            assert bytes(row.tolist()) == corpus.train[start : start + 32].tobytes()
    assert not torch.equal(first.batch(1)[0], first.batch(2)[0])
    assert not torch.equal(first.batch(1)[0], corpus.stream(8, seed=4).batch(1)[0])


def test_ranks_split_the_global_batch(tree, tmp_path):
    corpus = TextCorpus(build_corpus(str(tree), str(tmp_path / "c"), 0.25, 0), seq_len=16, val_windows=3)
    whole = corpus.stream(6, seed=1).batch(5)[0]
    parts = [corpus.stream(6, seed=1, rank=r, world_size=3).batch(5)[0] for r in range(3)]
    assert all(torch.equal(parts[r], whole[r::3]) for r in range(3))
    with pytest.raises(ConfigError, match="train.batch_size"):
        corpus.stream(5, seed=1, world_size=2)


def test_validation_windows_are_fixed_and_capped(tree, tmp_path):
    corpus = TextCorpus(build_corpus(str(tree), str(tmp_path / "c"), 0.25, 0), seq_len=16, val_windows=5)
    val = corpus.stream(4, seed=0).val(batch=2)
    assert [len(x) for x, _ in val] == [2, 2, 1]
    assert sum(len(x) for x, _ in corpus.stream(4, seed=9).val(rows=3, batch=2)) == 3
    assert torch.equal(val[0][0], corpus.stream(4, seed=9).val(batch=2)[0][0])  # not keyed by the run seed
    assert bytes(val[0][0][0].tolist()) == corpus.val[:16].tobytes()


def test_the_standard_library_corpus(tmp_path):
    corpus = stdlib_text(seq_len=64, max_bytes=400_000, val_windows=8, cache_dir=str(tmp_path))
    m = corpus.manifest
    assert m["source"] == "python standard library *.py" and m["files"]["train"] and m["files"]["val"]
    assert 300_000 < m["train_bytes"] + m["val_bytes"] <= 400_000 + len(m["files"]["train"]) + len(m["files"]["val"])
    entry = m["files"]["train"][0]
    with open(os.path.join(m["root"], entry["path"]), "rb") as fh:
        assert corpus.file_bytes("train", 0) == fh.read()
    assert corpus.spec.vocab_size == 256 and corpus.spec.kind == "tokens" and corpus.spec.input_shape == (64,)
