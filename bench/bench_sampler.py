"""DomainSampler throughput and memory: C++ backend vs numpy backend vs ``datasets.interleave_datasets``.

Workloads (the sampler issue): 8 domains of documents with log-normal lengths, mean 200 tokens ("short")
or 20 000 tokens ("long"); seq_len 2048, batch 32; the weights change every 100 batches. Providers, side by
side in one run:

* ``cpp``: :class:`~ddk_fast.data.DomainSampler` with the C++ extension (skipped with the reason if unbuilt);
* ``numpy``: the same sampler on its numpy backend;
* ``hf_datasets``: what a user would write with Hugging Face ``datasets``: the documents as Arrow datasets,
  ``interleave_datasets(probabilities=w, stopping_strategy="all_exhausted")`` (re-built at each weight
  change), iterated in blocks of 256 documents and packed into ``seq_len + 1`` windows with a separator.

Rows (``bench/results/sampler.jsonl`` / ``.csv``, stamped by the harness): per-batch median/IQR, tokens/s
(``batch * seq_len / median``), tokens/s amortised over 200 batches with two weight changes, and peak extra
RSS of one batch (fresh subprocess). ``test_stream_rss``
streams a whole large shard (default 2 GB, ``DDK_BENCH_STREAM_GB``) from a fresh process and records the RSS
growth while doing so.

Sizes: ``pytest bench/bench_sampler.py --benchmark-disable`` (the CI smoke run) or
``DDK_BENCH_SAMPLER_SCALE=small`` shrinks everything to a few MB and skips the subprocess measurements, so
it runs in a few seconds. Real run::

    DDK_BENCH_RESULTS=bench/results .venv/bin/pytest bench/bench_sampler.py --benchmark-only -q -s
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from bench.harness import peak_memory_subprocess, record, time_fn
from ddk_fast.backend import sampler_ext_import_error
from ddk_fast.data import DomainSampler, ShardWriter, TokenShard
from ddk_fast.data.sampler import DEFAULT_PAGE_BUDGET

SEQ_LEN, BATCH, N_DOMAINS, VOCAB, SEP = 2048, 32, 8, 50_000, 0
CHANGE_EVERY = 100
MEAN_LEN = {"short": 200, "long": 20_000}
PROVIDERS = ["cpp", "numpy", "hf_datasets"]
ROUNDS = {"cpp": 300, "numpy": 60, "hf_datasets": 8}


def _small(config) -> bool:
    return os.environ.get("DDK_BENCH_SAMPLER_SCALE") == "small" or bool(config.getoption("benchmark_disable"))


# ------------------------------------------------------------------------------------------------ data


def write_domain(path: Path, n_tokens: int, mean_len: int, seed: int, chunk: int = 1 << 26) -> TokenShard:
    """A shard of ~n_tokens random ids, documents of log-normal length (sigma 1) with the given mean."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_len) - sigma**2 / 2
    with ShardWriter(path, VOCAB, {"synthetic": True, "mean_len": mean_len}) as w:
        written = 0
        while written < n_tokens:
            want = min(chunk, n_tokens - written)
            lens = np.maximum(1, rng.lognormal(mu, sigma, size=want // mean_len * 2 + 16).astype(np.int64))
            lens = lens[: max(1, int(np.searchsorted(np.cumsum(lens), want)))]
            w.add_block(rng.integers(0, VOCAB, size=int(lens.sum()), dtype=np.uint16), lens)
            written += int(lens.sum())
    return TokenShard.open(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, pytestconfig):
    """{workload: [shard path per domain]} (32 M tokens per workload, 160 k in the smoke run)."""
    per_domain = 20_000 if _small(pytestconfig) else 4_000_000
    root = tmp_path_factory.mktemp("sampler_corpora")
    out = {}
    for wl, mean in MEAN_LEN.items():
        mean = min(mean, per_domain // 4)
        out[wl] = [
            str(write_domain(root / wl / f"d{d}", per_domain, mean, seed=d).path) for d in range(N_DOMAINS)
        ]
    return out


# ------------------------------------------------------------------------------------------------ providers


class HFInterleavePacker:
    """The ``datasets`` baseline: interleave_datasets(probabilities) + packing into seq_len + 1 windows."""

    def __init__(self, shards, weights, seq_len, batch_size, sep, max_docs=20_000):
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable

        self.datasets = []
        for d, s in enumerate(shards):
            n = min(s.num_docs, max_docs)
            offs = np.asarray(s.offsets[: n + 1])
            table = pa.table(
                {
                    "input_ids": pa.ListArray.from_arrays(
                        pa.array(offs.astype(np.int64)), pa.array(s.tokens[: offs[-1]])
                    ),
                    "domain": pa.array(np.full(n, d, dtype=np.int64)),
                }
            )
            self.datasets.append(datasets.Dataset(InMemoryTable(table)))
        self.L, self.B, self.sep = seq_len, batch_size, sep
        self.tok = self.dom = np.zeros(0, dtype=np.int64)
        self.pos = 0
        self.generation = 0
        self.set_weights(weights)

    def set_weights(self, weights):
        import datasets

        w = self.weights = np.asarray(weights, dtype=np.float64)
        mixed = datasets.interleave_datasets(
            self.datasets,
            probabilities=(w / w.sum()).tolist(),
            seed=self.generation,
            stopping_strategy="all_exhausted",
        )
        self.generation += 1
        self.rows = mixed.with_format("numpy").iter(batch_size=256)

    def _refill(self):
        """Append the next block of 256 interleaved documents (+ separators) to the token buffer."""
        try:
            block = next(self.rows)
        except StopIteration:  # every domain exhausted: a new epoch
            self.set_weights(self.weights)
            return
        toks, doms = [self.tok[self.pos :]], [self.dom[self.pos :]]
        for ids, d in zip(block["input_ids"], block["domain"]):
            toks += [np.asarray(ids, dtype=np.int64), np.array([self.sep])]
            doms.append(np.full(len(ids) + 1, d, dtype=np.int64))
        self.tok, self.dom, self.pos = np.concatenate(toks), np.concatenate(doms), 0

    def next_batch(self):
        need = self.B * (self.L + 1)
        while self.tok.size - self.pos < need:
            self._refill()
        seq = self.tok[self.pos : self.pos + need].reshape(self.B, self.L + 1)
        dom = self.dom[self.pos : self.pos + need].reshape(self.B, self.L + 1)
        self.pos += need
        return {
            "input_ids": seq[:, :-1].copy(),
            "labels": seq[:, 1:].copy(),
            "domain_ids": dom[:, :-1].copy(),
        }


def _weights(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).random(N_DOMAINS) + 0.05


def make_batch_fn(paths, provider, seq_len=SEQ_LEN, batch_size=BATCH):
    """A callable producing one batch; the weights change every CHANGE_EVERY calls."""
    shards = [TokenShard.open(p) for p in paths]
    if provider == "hf_datasets":
        sampler = HFInterleavePacker(shards, _weights(0), seq_len, batch_size, SEP)
    else:
        sampler = DomainSampler(
            shards, _weights(0), seq_len=seq_len, batch_size=batch_size, sep_token_id=SEP, backend=provider
        )
    calls = [0]

    def fn():
        calls[0] += 1
        if calls[0] % CHANGE_EVERY == 0:
            sampler.set_weights(_weights(calls[0]))
        return sampler.next_batch()

    return fn


def _skip_unavailable(provider):
    if provider == "cpp" and sampler_ext_import_error() is not None:
        pytest.skip(sampler_ext_import_error())
    if provider == "hf_datasets":
        pytest.importorskip("datasets")


@pytest.mark.parametrize("workload", list(MEAN_LEN))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sampler_throughput(benchmark, corpora, pytestconfig, provider, workload):
    _skip_unavailable(provider)
    small = _small(pytestconfig)
    L, B = (128, 4) if small else (SEQ_LEN, BATCH)
    fn = make_batch_fn(corpora[workload], provider, L, B)
    b = fn()
    assert b["input_ids"].shape == (B, L) and b["labels"].dtype == np.int64
    t = time_fn(benchmark, fn, rounds=1 if small else ROUNDS[provider], warmup=2)
    row = {"provider": provider, "workload": workload, "mean_doc_len": MEAN_LEN[workload], "seq_len": L}
    row.update(batch=B, domains=N_DOMAINS, **t)
    if t["median_ms"]:
        row["tokens_per_s"] = B * L / (t["median_ms"] * 1e-3)
        # amortised over 2 * CHANGE_EVERY batches, two weight changes included (the per-batch median above
        # never sees the datasets baseline re-interleaving at a weight change)
        t0 = time.perf_counter()
        for _ in range(2 * CHANGE_EVERY):
            fn()
        row["amortised_tokens_per_s"] = 2 * CHANGE_EVERY * B * L / (time.perf_counter() - t0)
        row["peak_rss_mb_per_batch"] = (
            peak_memory_subprocess(
                "bench.bench_sampler:make_batch_fn", {"paths": corpora[workload], "provider": provider}
            )
            / 2**20
        )
        mtok = row["tokens_per_s"] / 1e6
        amort = row["amortised_tokens_per_s"] / 1e6
        print(f"\n{provider:12s} {workload:5s} {mtok:9.1f} M tokens/s, amortised {amort:.1f}")
    record("sampler", row)


# -------------------------------------------------------------------------------------------- streaming RSS


def make_stream_fn(path: str, backend: str, seq_len: int = SEQ_LEN, batch_size: int = BATCH):
    """A callable that opens ``path`` fresh and streams one epoch's worth of tokens through the sampler."""

    def fn():
        shard = TokenShard.open(path)
        s = DomainSampler(
            [shard], [1.0], seq_len=seq_len, batch_size=batch_size, sep_token_id=SEP, backend=backend
        )
        n_batches = (shard.num_tokens + shard.num_docs) // (seq_len * batch_size) + 1
        for _ in range(n_batches):
            s.next_batch()
        del s, shard
        gc.collect()

    return fn


@pytest.mark.parametrize(
    "backend, mean_len",
    [("cpp", 20_000), ("cpp", 200), ("numpy", 20_000)],
    ids=["cpp-long", "cpp-short", "numpy-long"],
)
def test_stream_rss(benchmark, tmp_path_factory, pytestconfig, backend, mean_len):
    """Peak RSS growth while streaming a whole 2 GB token file (DDK_BENCH_STREAM_GB) in a fresh process."""
    _skip_unavailable(backend)
    small = _small(pytestconfig)
    gb = 0.002 if small else float(os.environ.get("DDK_BENCH_STREAM_GB", "2"))
    root = tmp_path_factory.mktemp("stream")
    t0 = time.perf_counter()
    shard = write_domain(
        root / "big", int(gb * 2**30) // 2, min(mean_len, 500) if small else mean_len, seed=7
    )
    write_s = time.perf_counter() - t0
    try:
        if small:
            benchmark.pedantic(make_stream_fn(str(shard.path), backend, 128, 4), rounds=1, iterations=1)
            return
        t0 = time.perf_counter()
        extra = peak_memory_subprocess(
            "bench.bench_sampler:make_stream_fn", {"path": str(shard.path), "backend": backend}, timeout=1200
        )
        wall = time.perf_counter() - t0
        # throughput of one pass in this process (the subprocess above runs with the harness's malloc
        # settings, which page-fault every output array, and imports torch: its wall time is not a rate)
        stream = make_stream_fn(str(shard.path), backend)
        t0 = time.perf_counter()
        benchmark.pedantic(stream, rounds=1, iterations=1)
        pass_s = time.perf_counter() - t0
        row = {
            "provider": backend,
            "workload": f"stream-{gb:g}GB",
            "mean_doc_len": mean_len,
            "seq_len": SEQ_LEN,
            "batch": BATCH,
            "file_bytes": shard.nbytes,
            "n_docs": shard.num_docs,
            "rss_growth_mb": extra / 2**20,
            "page_budget_mb": DEFAULT_PAGE_BUDGET / 2**20,
            "subprocess_wall_s": wall,
            "pass_s": pass_s,
            "tokens_per_s": (shard.num_tokens + shard.num_docs) / pass_s,
            "write_s": write_s,
        }
        gib = shard.nbytes / 2**30
        print(f"\nstream {backend} mean_len={mean_len}: RSS growth {extra / 2**20:.1f} MB over {gib:.2f} GiB")
        record("sampler_stream", row, force=True)
    finally:
        del shard
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------------- share of a training step


def _demo_like_step(seq_len: int, batch_size: int, vocab: int = 1024):
    """A lower bound on one demo training step (examples/demo.toml shapes): a 4-layer Llama teacher
    forward (hidden 128, the demo teacher's size) plus a 2-layer student forward + backward + SGD step.
    The real step adds the KD loss, NF4 dequantisation and LoRA, so the measured share is an upper bound."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)

    def model(layers):
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)

    teacher, student = model(4).eval(), model(2)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch_size, seq_len))

    def step():
        with torch.no_grad():
            teacher(input_ids=ids)
        loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("provider", ["cpp", "numpy"])
def test_assembly_share_of_demo_step(benchmark, corpora, pytestconfig, provider):
    """Batch assembly time at the demo's shape (seq_len 128, batch 8) as a share of a demo-like step."""
    _skip_unavailable(provider)
    L, B = 128, 8
    fn = make_batch_fn(corpora["short"], provider, L, B)
    small = _small(pytestconfig)
    t = time_fn(benchmark, fn, rounds=1 if small else 500, warmup=5)
    if small:
        return  # the smoke run skips the model (importing transformers alone takes seconds)
    step = _demo_like_step(L, B)
    step()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_ms = float(np.median(times)) * 1e3
    share = t["median_ms"] / step_ms * 100
    batch_us = t["median_ms"] * 1e3
    print(f"\n{provider}: batch {batch_us:.1f} us vs demo-like step {step_ms:.1f} ms = {share:.4f} %")
    record(
        "sampler_step_share",
        {"provider": provider, "seq_len": L, "batch": B, **t, "step_ms": step_ms, "share_pct": share},
    )
