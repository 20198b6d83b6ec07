"""The C++ sampler backend: parity with numpy batch for batch, the hash-keyed document order, the build.

Skipped (with the reason) when ``ddk_fast._sampler_ext`` is not built, unless ``DDK_FAST_REQUIRE_EXT=1``
(CI), in which case a missing build fails every test here.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from ddk_fast.backend import SAMPLER_EXT, resolve_sampler_backend, sampler_ext_import_error
from ddk_fast.data import DomainSampler, TokenShard
from ddk_fast.data.packing import epoch_permutation, mix64

_ERR = sampler_ext_import_error()
REQUIRED = os.environ.get("DDK_FAST_REQUIRE_EXT") == "1"
pytestmark = pytest.mark.skipif(_ERR is not None and not REQUIRED, reason=str(_ERR))


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("DDK_FAST_SAMPLER_BACKEND", raising=False)  # the tests name their backend


def test_extension_is_built():
    assert _ERR is None, _ERR
    choice = resolve_sampler_backend("auto")
    assert choice.name == "cpp", choice


def _shards(tmp_path, spec, seed=0):
    """spec: list of (n_docs, max_len, vocab)."""
    rng = np.random.default_rng(seed)
    out = []
    for d, (n_docs, max_len, vocab) in enumerate(spec):
        docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(n_docs)]
        out.append(TokenShard.write(tmp_path / f"d{d}", docs, vocab_size=vocab))
    return out


SPEC = [(50, 40, 1000), (7, 300, 70_000), (2, 3, 1000), (120, 10, 65_535)]  # uint16, uint32, tiny, edge


@pytest.mark.parametrize("budget", [None, 1], ids=["mapped", "pread"])  # 1: every shard over budget
@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("seq_len, batch_size", [(64, 4), (1, 7), (257, 2)])
def test_parity_with_numpy(tmp_path, world_size, seq_len, batch_size, budget):
    shards = _shards(tmp_path, SPEC)
    changes = {5: [0, 1, 0, 0], 9: [1e-3, 0.5, 2.0, 7.0], 14: [1, 1, 1, 1]}
    for rank in range(world_size):
        kw = dict(
            seq_len=seq_len, batch_size=batch_size, sep_token_id=1, seed=11, rank=rank, world_size=world_size
        )
        kw["page_budget_bytes"] = budget
        n = DomainSampler(shards, [4, 3, 2, 1], backend="numpy", **kw)
        c = DomainSampler(shards, [4, 3, 2, 1], backend="cpp", **kw)
        for step in range(20):
            if step in changes:
                n.set_weights(changes[step])
                c.set_weights(changes[step])
            x, y = n.next_batch(), c.next_batch()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"rank {rank} step {step} {k}")
        assert n.state_dict() == c.state_dict()


def test_state_moves_between_backends(tmp_path):
    shards = _shards(tmp_path, SPEC)
    kw = dict(seq_len=33, batch_size=3, sep_token_id=0, seed=2)
    n = DomainSampler(shards, [1, 2, 3, 4], backend="numpy", **kw)
    for _ in range(7):
        n.next_batch()
    c = DomainSampler(shards, [1, 1, 1, 1], backend="cpp", **kw)
    c.load_state_dict(n.state_dict())
    for _ in range(8):
        np.testing.assert_array_equal(n.next_batch()["input_ids"], c.next_batch()["input_ids"])


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_document_order_bit_for_bit(tmp_path, seed):
    ext = importlib.import_module(SAMPLER_EXT)
    for x in (0, 1, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0):
        assert ext.mix64(x) == mix64(x)
        assert ext.unmix64(ext.mix64(x)) == x  # C++ recovers document indices by inverting mix64
    shards = _shards(tmp_path, SPEC)
    s = DomainSampler(shards, [1, 1, 1, 1], seq_len=8, batch_size=1, sep_token_id=0, seed=seed, backend="cpp")
    for d, sh in enumerate(shards):
        for epoch in (0, 1, 1000):
            order = s._core.epoch_order(d, epoch)
            np.testing.assert_array_equal(order, epoch_permutation(seed, d, epoch, sh.num_docs))
            assert sorted(order.tolist()) == list(range(sh.num_docs))


def test_prefetch_overlaps_and_matches(tmp_path):
    shards = _shards(tmp_path, SPEC)
    kw = dict(seq_len=128, batch_size=8, sep_token_id=0, seed=5, backend="cpp")
    a, b = DomainSampler(shards, [1, 2, 3, 4], **kw), DomainSampler(shards, [1, 2, 3, 4], **kw)
    it = b.prefetch(depth=4)
    for _ in range(20):
        np.testing.assert_array_equal(a.next_batch()["labels"], next(it)["labels"])
    assert a.state_dict() == b.state_dict()
    it.close()


def test_core_rejects_bad_buffers():
    ext = importlib.import_module(SAMPLER_EXT)
    toks, offs = np.arange(10, dtype=np.uint16), np.array([0, 4, 10], dtype=np.int64)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        ext.SamplerCore([toks.astype(np.int32)], [offs], 4, 1, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="offsets"):
        ext.SamplerCore([toks], [offs.astype(np.int32)], 4, 1, 0, 0, 0, 1)
    core = ext.SamplerCore([toks], [offs], 4, 2, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="batch_size, seq_len"):
        core.next_batch(*(np.empty((2, 5), dtype=np.int64) for _ in range(3)))
