"""TokenShard: format, dtype choice, atomic writes, clear errors for missing or corrupt shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddk_fast.data import ShardError, ShardWriter, TokenShard
from ddk_fast.data.shards import token_dtype


def _docs(rng, n, vocab, max_len=40):
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_len))) for _ in range(n)]


@pytest.mark.parametrize(
    "vocab, dtype", [(1000, np.uint16), (65535, np.uint16), (65536, np.uint32), (151_936, np.uint32)]
)
def test_roundtrip_and_dtype(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 17, vocab)
    docs[3] = np.array([vocab - 1, 0, vocab - 1])  # extreme ids survive
    shard = TokenShard.write(tmp_path / "s", docs, vocab_size=vocab, extra_meta={"domain": "web"})
    assert shard.dtype == dtype
    assert shard.num_docs == 17 and len(shard) == 17
    assert shard.num_tokens == sum(len(d) for d in docs)
    assert shard.meta["domain"] == "web"
    again = TokenShard.open(tmp_path / "s")
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(again.doc(i), d)
    np.testing.assert_array_equal(again.doc(-1), docs[-1])
    np.testing.assert_array_equal(again.doc_lengths(), [len(d) for d in docs])
    assert again.tokens.dtype == dtype and not again.tokens.flags.writeable  # read-only map


def test_add_block_matches_add(tmp_path):
    rng = np.random.default_rng(1)
    docs = _docs(rng, 30, 500)
    with ShardWriter(tmp_path / "a", 500) as w:
        for d in docs:
            w.add(d)
    with ShardWriter(tmp_path / "b", 500) as w:
        w.add_block(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        for d in docs[10:20]:
            w.add(d)
        w.add_block(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
    a, b = TokenShard.open(tmp_path / "a"), TokenShard.open(tmp_path / "b")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.offsets, b.offsets)


def test_empty_shard_and_release(tmp_path):
    empty = TokenShard.write(tmp_path / "e", [], vocab_size=10)
    assert empty.num_docs == 0 and empty.num_tokens == 0
    s = TokenShard.write(tmp_path / "s", [[1, 2, 3], [4]], vocab_size=10)
    s.release_pages()  # dropping mapped pages must not change what is read
    np.testing.assert_array_equal(s.doc(0), [1, 2, 3])
    with pytest.raises(IndexError, match="out of range"):
        s.doc(2)


def test_write_is_atomic_and_replaces(tmp_path):
    TokenShard.write(tmp_path / "s", [[1, 2]], vocab_size=10)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s", 10) as w:
            w.add([3, 4, 5])
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dir left, old shard intact
    np.testing.assert_array_equal(TokenShard.open(tmp_path / "s").doc(0), [1, 2])
    TokenShard.write(tmp_path / "s", [[7], [8, 9]], vocab_size=10)
    assert TokenShard.open(tmp_path / "s").num_docs == 2


def test_writer_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        TokenShard.write(tmp_path / "s", [[1, 10]], vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)


@pytest.fixture
def shard_dir(tmp_path):
    TokenShard.write(tmp_path / "s", [[1, 2, 3], [4, 5], [6]], vocab_size=100)
    return tmp_path / "s"


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match=r"nope: no such shard directory"):
        TokenShard.open(tmp_path / "nope")


def test_missing_meta(shard_dir):
    (shard_dir / "meta.json").unlink()
    with pytest.raises(ShardError, match="missing meta.json"):
        TokenShard.open(shard_dir)


def test_bad_meta_json(shard_dir):
    (shard_dir / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        TokenShard.open(shard_dir)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"format": "other"}, "is not a ddk_fast.token_shard file"),
        ({"version": 99}, "version 99"),
        ({"dtype": "float32"}, "dtype must be uint16 or uint32"),
        ({"n_docs": -1}, "n_docs must be an integer >= 0"),
        ({"n_tokens": 7}, r"tokens.bin has 12 bytes but meta.json says 7 items"),
    ],
)
def test_corrupt_meta(shard_dir, patch, match):
    meta = json.loads((shard_dir / "meta.json").read_text())
    meta.update(patch)
    (shard_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=match) as info:
        TokenShard.open(shard_dir)
    assert str(shard_dir) in str(info.value)


def test_truncated_tokens(shard_dir):
    data = (shard_dir / "tokens.bin").read_bytes()
    (shard_dir / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(ShardError, match="truncated"):
        TokenShard.open(shard_dir)


def test_missing_tokens_file(shard_dir):
    (shard_dir / "tokens.bin").unlink()
    with pytest.raises(ShardError, match="missing file tokens.bin"):
        TokenShard.open(shard_dir)


def test_offsets_not_monotone(shard_dir):
    np.array([0, 3, 1, 6], dtype="<i8").tofile(shard_dir / "offsets.bin")
    with pytest.raises(ShardError, match=r"offsets are not monotone: offsets\[1\]=3 > offsets\[2\]=1"):
        TokenShard.open(shard_dir)


def test_offsets_wrong_end(shard_dir):
    np.array([0, 3, 5, 5], dtype="<i8").tofile(shard_dir / "offsets.bin")
    with pytest.raises(ShardError, match="end at n_tokens=6"):
        TokenShard.open(shard_dir)


def test_fileno_reads_the_tokens(tmp_path):
    import os

    s = TokenShard.write(tmp_path / "s", [[1, 2, 3], [70_000]], vocab_size=70_001)
    fd = s.fileno()
    assert s.fileno() == fd  # opened once
    np.testing.assert_array_equal(np.frombuffer(os.pread(fd, 16, 0), dtype="<u4"), [1, 2, 3, 70_000])
