"""What chat / prompt-completion data costs (issue 19): the loss mask in the sampler, the padding of packing
whole examples, and rendering + masking at preparation.

* ``test_sampler_mask_cost``: ``DomainSampler.next_batch`` on the same tokens with and without a loss mask
  (8 domains of packed blocks, seq_len 2048, batch 32), C++ and numpy backends, interleaved rounds in one
  process (medians of per-call times; ``bench.harness.event_times_ms``). The mask costs one extra byte read
  per token and a select per label.
* ``test_packing_padding``: the padding that never splitting an example costs, for log-normal example lengths
  (sigma 1) of a few means at seq_len 1024 / 2048 / 4096, packed in order by ``data/examples.BlockPacker``.
* ``test_prepare_chat_cost``: examples per second of ``ExampleEncoder`` (chat template rendering, one prefix
  render per assistant turn, tokenisation with offsets) against plain tokenisation of the same conversations
  rendered once (what a text domain of the same data would cost), on the test suite's tiny BPE tokenizer.

Rows: ``bench/results/masks.jsonl`` (only from a timed run). Run::

    OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_masks.py --benchmark-only -q -s
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import pytest

from bench.harness import event_times_ms, record, time_fn
from ddk_fast.backend import sampler_ext_import_error
from ddk_fast.data import DomainSampler, ShardWriter, TokenShard
from ddk_fast.data.examples import BlockPacker, ExampleEncoder
from ddk_fast.data.records import FileFaults

SEQ_LEN, BATCH, DOMAINS, VOCAB = 2048, 32, 8, 50_000


def _timed(config) -> bool:
    return not config.getoption("benchmark_disable")


def _shards(root, seq_len, blocks, masked: bool):
    out = []
    for d in range(DOMAINS):
        rng = np.random.default_rng(d)  # the same tokens with or without a mask
        with ShardWriter(root / f"{'m' if masked else 'n'}{d}", VOCAB, {"packed_seq_len": seq_len}) as w:
            lens = np.full(blocks, seq_len - 1, dtype=np.int64)
            toks = rng.integers(0, VOCAB, size=int(lens.sum()), dtype=np.uint16)
            mask = (
                (np.random.default_rng(99 + d).random(toks.size) < 0.4).astype(np.uint8) if masked else None
            )
            w.add_block(toks, lens, mask)
        out.append(TokenShard.open(root / f"{'m' if masked else 'n'}{d}"))
    return out


def test_sampler_mask_cost(benchmark, tmp_path, pytestconfig):
    timed = _timed(pytestconfig)
    L, B, blocks = (SEQ_LEN, BATCH, 400) if timed else (64, 4, 20)
    shards = {m: _shards(tmp_path, L, blocks, m) for m in (False, True)}
    backends = ["numpy"] + ([] if sampler_ext_import_error() else ["cpp"])
    fns = {}
    for backend in backends:
        for masked in (False, True):
            s = DomainSampler(shards[masked], np.ones(DOMAINS), seq_len=L, batch_size=B, sep_token_id=0,
                              backend=backend)  # fmt: skip
            fns[(backend, masked)] = s.next_batch
    # the same tokens either way; only the labels differ
    a, b = fns[(backends[0], False)](), fns[(backends[0], True)]()
    assert np.array_equal(a["input_ids"], b["input_ids"]) and (b["labels"] == -100).any()
    t = time_fn(benchmark, fns[(backends[-1], True)], rounds=1 if not timed else 50)
    if not timed:
        return
    times = {k: [] for k in fns}
    for _ in range(15):  # interleaved: every provider sees the same machine load
        for k, fn in fns.items():
            times[k] += event_times_ms(fn, "cpu", reps=4 if k[0] == "cpp" else 2)
    for backend in backends:
        plain, masked = statistics.median(times[(backend, False)]), statistics.median(times[(backend, True)])
        row = {"bench": "sampler_mask", "backend": backend, "seq_len": L, "batch": B, "domains": DOMAINS,
               "median_ms_no_mask": plain, "median_ms_mask": masked, "ratio": masked / plain,
               "tokens_per_s_mask": B * L / (masked * 1e-3), "harness_median_ms": t["median_ms"]}  # fmt: skip
        record("masks", row, force=True)
        print(
            f"sampler {backend}: {plain:.3f} ms without a mask, {masked:.3f} ms with: x{masked / plain:.3f}"
        )


@pytest.mark.parametrize("seq_len", [1024, 2048, 4096])
def test_packing_padding(benchmark, pytestconfig, seq_len):
    rng = np.random.default_rng(1)
    n = 20_000 if _timed(pytestconfig) else 500
    for mean in (150, 400, 1000):
        mu = np.log(mean) - 0.5
        lengths = np.maximum(8, rng.lognormal(mu, 1.0, size=n).astype(np.int64))
        packer = BlockPacker(seq_len - 1, 0, "truncate", lambda ids, m: None)
        faults = FileFaults("synthetic")

        t0 = time.perf_counter()
        for k in lengths:
            packer.add([1] * int(k), [1] * int(k), faults)
        packer.flush()
        seconds = time.perf_counter() - t0
        padding = packer.padding / (packer.blocks * packer.block_len)
        assert 0 <= padding < 1
        if _timed(pytestconfig):
            record("masks", {"bench": "packing_padding", "seq_len": seq_len, "mean_example_len": mean,
                             "examples": n, "padding_fraction": padding, "truncated": faults.truncated,
                             "seconds": seconds}, force=True)  # fmt: skip
            print(f"seq_len {seq_len}, mean example {mean}: {100 * padding:.1f} % padding, "
                  f"{faults.truncated} of {n} truncated")  # fmt: skip
    benchmark.pedantic(lambda: None, rounds=1)


def test_prepare_chat_cost(benchmark, tmp_path, pytestconfig):
    from tests.data.test_chat import conversations
    from tests.tiny import make_chat_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta omega sigma kappa tau phi psi".split()
    tok = make_chat_tokenizer(
        tmp_path / "tok", [" ".join(rng.choice(words) for _ in range(20)) for _ in range(300)]
    )
    convs = conversations(2000 if _timed(pytestconfig) else 50, seed=0, turns=(1, 4))
    enc = ExampleEncoder(tok, None, "completion", 0, "chat")
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    t_chat = time_fn(benchmark, lambda: enc.encode("chat", convs), rounds=5 if _timed(pytestconfig) else 1)
    if not _timed(pytestconfig):
        return
    chat, text = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        enc.encode("chat", convs)
        chat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok(rendered, add_special_tokens=False, return_attention_mask=False)
        text.append(time.perf_counter() - t0)
    c, x = statistics.median(chat), statistics.median(text)
    record("masks", {"bench": "prepare_chat", "examples": len(convs), "chat_examples_per_s": len(convs) / c,
                     "text_examples_per_s": len(convs) / x, "ratio": c / x,
                     "harness_median_ms": t_chat["median_ms"]}, force=True)  # fmt: skip
    print(f"prepare: chat {len(convs) / c:,.0f} examples/s, plain text {len(convs) / x:,.0f}: x{c / x:.1f}")
