"""DomainSampler semantics, on both backends (cpp runs when the extension is built; see test_sampler_cpp.py).

Checked: packing against a stream built by hand, exact mixture before and after a weight change,
determinism by seed, rank sharding without overlap, exact resume (also across epochs and after a weight
change, also through json), prefetching, errors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ddk_fast.backend import sampler_ext_import_error
from ddk_fast.data import DomainSampler, TokenShard
from ddk_fast.data.packing import epoch_permutation

SEP = 999


def _cpp_param():
    err = sampler_ext_import_error()
    if err is not None and os.environ.get("DDK_FAST_REQUIRE_EXT") != "1":
        return pytest.param("cpp", marks=pytest.mark.skip(reason=err))
    return "cpp"  # built, or required: then a missing build fails the test


@pytest.fixture(params=["numpy", _cpp_param()])
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("DDK_FAST_SAMPLER_BACKEND", raising=False)  # the tests name their backend


def make_shards(tmp_path, sizes=((40, 30), (25, 60), (3, 5)), vocab=900, seed=0):
    """One shard per (n_docs, max_len); the last default domain is shorter than one sequence."""
    rng = np.random.default_rng(seed)
    shards = []
    for d, (n_docs, max_len) in enumerate(sizes):
        docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(n_docs)]
        shards.append(TokenShard.write(tmp_path / f"d{d}", docs, vocab_size=vocab))
    return shards


def make(shards, backend, weights=(0.5, 0.3, 0.2), **kw):
    args = dict(seq_len=32, batch_size=4, sep_token_id=SEP, seed=3, backend=backend)
    args.update(kw)
    return DomainSampler(shards, weights, **args)


def expected_stream(shard, seed, domain, n_tokens):
    """The domain's stream built by hand: epochs of shuffled documents, each followed by SEP."""
    out, epoch = [], 0
    while len(out) < n_tokens:
        for doc in epoch_permutation(seed, domain, epoch, shard.num_docs):
            out.extend(shard.doc(int(doc)).tolist())
            out.append(SEP)
        epoch += 1
    return np.array(out[:n_tokens])


def test_backend_and_shapes(tmp_path, backend):
    s = make(make_shards(tmp_path), backend)
    assert s.backend.name == backend and s.backend.reason
    b = s.next_batch()
    assert set(b) == {"input_ids", "labels", "domain_ids"}
    for v in b.values():
        assert v.dtype == np.int64 and v.shape == (4, 32)
    assert (b["domain_ids"] == b["domain_ids"][:, :1]).all()  # one domain per row
    assert s.num_domains == 3
    np.testing.assert_allclose(s.weights, [0.5, 0.3, 0.2])


@pytest.mark.parametrize("domain", [0, 2])  # domain 2 is shorter than one sequence: wraps within it
def test_packing_matches_hand_built_stream(tmp_path, backend, domain):
    shards = make_shards(tmp_path)
    w = [0.0, 0.0, 0.0]
    w[domain] = 1.0
    L = 32
    s = make(shards, backend, weights=w, seq_len=L, batch_size=3)
    rows = [s.next_batch() for _ in range(5)]
    inputs = np.concatenate([r["input_ids"] for r in rows])
    labels = np.concatenate([r["labels"] for r in rows])
    assert (np.concatenate([r["domain_ids"] for r in rows]) == domain).all()
    stream = expected_stream(shards[domain], 3, domain, inputs.shape[0] * L + 1)
    for k in range(inputs.shape[0]):  # sequence k = stream[k*L : k*L + L + 1]
        np.testing.assert_array_equal(inputs[k], stream[k * L : k * L + L])
        np.testing.assert_array_equal(labels[k], stream[k * L + 1 : k * L + L + 1])
    assert not (labels == -100).any()  # continuous packing never pads
    np.testing.assert_array_equal(s.tokens_per_domain, np.eye(3, dtype=np.int64)[domain] * 15 * L)


def _assert_exact_mixture(domain_seq, weights):
    """Largest deficit: every prefix count is within one sequence of n * w."""
    w = np.asarray(weights) / np.sum(weights)
    counts = np.zeros(len(w))
    for n, d in enumerate(domain_seq, start=1):
        counts[d] += 1
        assert np.all(np.abs(counts - n * w) <= 1.0 + 1e-9), (n, counts, n * w)
    return counts


def test_mixture_before_and_after_weight_change(tmp_path, backend):
    s = make(make_shards(tmp_path), backend, weights=(5, 3, 2), batch_size=10)
    first = np.concatenate([s.next_batch()["domain_ids"][:, 0] for _ in range(30)])
    np.testing.assert_array_equal(_assert_exact_mixture(first, (5, 3, 2)), [150, 90, 60])
    s.set_weights([0.1, 0.0, 0.9])
    second = np.concatenate([s.next_batch()["domain_ids"][:, 0] for _ in range(30)])
    np.testing.assert_array_equal(_assert_exact_mixture(second, (0.1, 0.0, 0.9)), [30, 0, 270])
    np.testing.assert_array_equal(s.sequences_per_domain, [180, 90, 330])


def test_determinism_by_seed(tmp_path, backend):
    shards = make_shards(tmp_path)
    a, b, c = (make(shards, backend, seed=seed) for seed in (5, 5, 6))
    ba, bb, bc = ([x.next_batch()["input_ids"] for _ in range(6)] for x in (a, b, c))
    np.testing.assert_array_equal(ba, bb)
    assert not np.array_equal(ba, bc)


def test_rank_sharding_no_overlap(tmp_path, backend):
    """Rank r's batch is rows [r*B, (r+1)*B) of the single-process batch of size W*B."""
    shards = make_shards(tmp_path)
    W, B = 3, 4
    ranks = [make(shards, backend, batch_size=B, rank=r, world_size=W) for r in range(W)]
    whole = make(shards, backend, batch_size=W * B)
    for step in range(6):
        if step == 3:
            for x in (*ranks, whole):
                x.set_weights([0.2, 0.2, 0.6])
        ref = whole.next_batch()
        got = [r.next_batch() for r in ranks]
        for key in ref:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), ref[key])
    # the single process never repeats a (domain, sequence index), so ranks cannot overlap; all ranks
    # share the global state
    assert (
        len(
            {
                json.dumps(
                    {k: v for k, v in r.state_dict().items() if k not in ("rank", "sequences_per_domain")}
                )
                for r in ranks
            }
        )
        == 1
    )
    np.testing.assert_array_equal(sum(r.sequences_per_domain for r in ranks), whole.sequences_per_domain)


@pytest.mark.parametrize("change_at", [None, 2])
def test_resume_exact(tmp_path, backend, change_at):
    """The next 8 batches after load_state_dict equal an uninterrupted run (the tiny domain crosses
    epochs inside these batches; a weight change before the checkpoint is part of the state)."""
    shards = make_shards(tmp_path)
    ref = make(shards, backend)
    run = make(shards, backend)
    for i in range(5):
        if i == change_at:
            ref.set_weights([0.1, 0.2, 0.7])
            run.set_weights([0.1, 0.2, 0.7])
        ref.next_batch()
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # plain python: survives json
    resumed = make(shards, backend, seed=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == ref.state_dict()
    for _ in range(8):
        x, y = ref.next_batch(), resumed.next_batch()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert ref.state_dict()["seq_index"][2] * 32 > 2 * (
        shards[2].num_tokens + shards[2].num_docs
    )  # epochs crossed


def test_resume_across_epoch_boundary_of_large_domain(tmp_path, backend):
    shards = make_shards(tmp_path, sizes=((10, 20), (8, 10)))
    stream0 = shards[0].num_tokens + shards[0].num_docs
    ref = make(shards, backend, weights=(0.5, 0.5), seq_len=16, batch_size=2)
    states = []
    while ref.state_dict()["seq_index"][0] * 16 < stream0 + 40:  # until just past domain 0's first epoch
        states.append(ref.state_dict())
        ref.next_batch()
    mid = next(st for st in states if st["seq_index"][0] * 16 > stream0 - 20)  # just before the boundary
    resumed = make(shards, backend, weights=(1, 1), seq_len=16, batch_size=2)
    resumed.load_state_dict(mid)
    ref2 = make(shards, backend, weights=(1, 1), seq_len=16, batch_size=2)
    for _ in range(states.index(mid)):
        ref2.next_batch()
    for _ in range(8):
        np.testing.assert_array_equal(ref2.next_batch()["input_ids"], resumed.next_batch()["input_ids"])


def test_load_state_dict_rejects_other_data(tmp_path, backend):
    shards = make_shards(tmp_path)
    state = make(shards, backend).state_dict()
    with pytest.raises(ValueError, match="seq_len is 32 in the checkpoint but 16 here"):
        make(shards, backend, seq_len=16).load_state_dict(state)
    other = make_shards(tmp_path / "o", seed=1)
    with pytest.raises(ValueError, match="stream_lengths"):
        make(other, backend).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        make(shards, backend).load_state_dict({"version": 0})


def test_prefetch_same_batches_and_exact_state(tmp_path, backend):
    shards = make_shards(tmp_path)
    ref = make(shards, backend)
    s = make(shards, backend)
    it = s.prefetch(depth=3)
    for i in range(6):
        if i == 3:  # a weight change while batches are queued ahead: they are discarded
            ref.set_weights([0.3, 0.3, 0.4])
            s.set_weights([0.3, 0.3, 0.4])
            assert s.state_dict() == ref.state_dict()
        x, y = ref.next_batch(), next(it)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert s.state_dict() == ref.state_dict()  # the state of the last batch consumed
    np.testing.assert_array_equal(s.next_batch()["input_ids"], ref.next_batch()["input_ids"])  # consumes
    np.testing.assert_array_equal(s.sequences_per_domain, ref.sequences_per_domain)
    st = s.state_dict()
    it.close()
    assert s.state_dict() == st  # closing rewinds the work done ahead
    np.testing.assert_array_equal(s.next_batch()["labels"], ref.next_batch()["labels"])
    it2 = s.prefetch()
    resumed = make(shards, backend)
    resumed.load_state_dict(ref.state_dict())
    for _ in range(3):
        np.testing.assert_array_equal(next(it2)["input_ids"], resumed.next_batch()["input_ids"])
    it2.close()


def test_page_release_keeps_results(tmp_path, backend):
    shards = make_shards(tmp_path)
    a = make(shards, backend)
    b = make(shards, backend, page_budget_bytes=1)  # drop mapped pages after every batch
    for _ in range(5):
        np.testing.assert_array_equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])


@pytest.mark.parametrize(
    "weights, match",
    [
        ([0, 0, 0], "at least one weight > 0"),
        ([0.5, -0.1, 0.6], "negative weight"),
        ([0.5, float("nan"), 0.5], "finite"),
        ([0.5, 0.5], r"expected 3 numbers \(one per domain\)"),
        (["a", 1, 1], "expected 3 numbers"),
    ],
)
def test_bad_weights(tmp_path, backend, weights, match):
    shards = make_shards(tmp_path)
    with pytest.raises(ValueError, match=match):
        make(shards, backend, weights=weights)
    s = make(shards, backend)
    with pytest.raises(ValueError, match=match):
        s.set_weights(weights)
    np.testing.assert_allclose(s.weights, [0.5, 0.3, 0.2])  # unchanged


def test_domain_without_documents(tmp_path, backend):
    shards = make_shards(tmp_path, sizes=((5, 5),))
    empty = TokenShard.write(tmp_path / "empty", [], vocab_size=900)
    only_empty_docs = TokenShard.write(tmp_path / "blank", [[], []], vocab_size=900)
    with pytest.raises(ValueError, match=r"shards\[1\] .*empty.*no documents"):
        make([shards[0], empty], backend, weights=(1, 1))
    with pytest.raises(ValueError, match="no documents"):
        make([only_empty_docs], backend, weights=(1,))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"seq_len": 0}, "seq_len: expected an integer >= 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, r"rank: expected an integer in \[0, 2\)"),
        ({"sep_token_id": -1}, "sep_token_id"),
        ({"backend": "gpu"}, "sampler backend"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make(make_shards(tmp_path), **{"backend": "numpy", **kw})
