"""Fuzz worker (run in a subprocess by test_sampler_fuzz.py, so a crash is an exit code, not a dead suite).

Feeds random and mutated sampler state dicts to ``DomainSampler.load_state_dict`` on every available
backend, and random raw arrays to the C++ core's ``set_state`` / ``set_weights`` directly (bypassing the
Python validation). Every call must either work (then batches keep coming) or raise ValueError /
IndexError. Prints one JSON line of counts; exits 1 on any other exception.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np

from ddk_fast.backend import sampler_ext_import_error
from ddk_fast.data import DomainSampler, TokenShard

ALLOWED = (ValueError, IndexError)
WEIRD = [
    None, True, -1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63), 1.5, float("nan"),
    float("inf"), -float("inf"), 1e308, "3", b"x", [], [1], {}, np.int64(-5), np.float64("nan"),
]  # fmt: skip


def shards(root: Path) -> list[TokenShard]:
    rng = np.random.default_rng(0)
    out = []
    for d, (n_docs, max_len, vocab) in enumerate([(9, 20, 300), (3, 50, 70_000), (1, 2, 50)]):
        docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(n_docs)]
        out.append(TokenShard.write(root / f"d{d}", docs, vocab_size=vocab))
    return out


def mutate(state: dict, rng: np.random.Generator) -> dict:
    s = copy.deepcopy(state)
    for _ in range(int(rng.integers(1, 4))):
        key = list(s)[int(rng.integers(len(s)))] if s else "version"
        kind = int(rng.integers(8))
        if kind == 0:
            s.pop(key, None)
        elif kind == 1:
            s[key] = WEIRD[int(rng.integers(len(WEIRD)))]
        elif kind == 2 and isinstance(s.get(key), list) and s[key]:
            v = list(s[key])
            v[int(rng.integers(len(v)))] = WEIRD[int(rng.integers(len(WEIRD)))]
            s[key] = v
        elif kind == 3 and isinstance(s.get(key), list):
            s[key] = s[key] + [0] if rng.random() < 0.5 else s[key][:-1]
        elif kind == 4:  # plausible but out of range counters
            s["seq_index"] = [int(x) for x in rng.integers(-(2**62), 2**62, size=3)]
        elif kind == 5:  # unnormalised or degenerate weights
            s["weights"] = [float(x) for x in rng.choice([0.0, 1e-320, 0.5, 3.0, 1e308, -1.0], size=3)]
        elif kind == 6:
            s["window_counts"] = [int(x) for x in rng.integers(0, 2**63 - 1, size=3, dtype=np.int64)]
        else:
            s[key] = np.asarray(s.get(key, 0))  # arrays instead of lists, sometimes 0-d
    return s


def fuzz_sampler(sampler: DomainSampler, rng: np.random.Generator, n: int) -> dict:
    good = sampler.state_dict()
    counts = {"accepted": 0, "rejected": 0}
    for i in range(n):
        state = good if i % 25 == 0 else mutate(good, rng)
        try:
            sampler.load_state_dict(state)
        except ALLOWED:
            counts["rejected"] += 1
            continue
        counts["accepted"] += 1
        for _ in range(2):
            try:
                sampler.next_batch()
            except ALLOWED:
                break
        sampler.load_state_dict(good)
    return counts


def fuzz_core(core, rng: np.random.Generator, n: int) -> dict:
    counts = {"accepted": 0, "rejected": 0}
    out = [np.empty((4, 16), dtype=np.int64) for _ in range(3)]
    edges = np.array([0, 1, -1, 2**31, 2**62, 2**63 - 1, -(2**63)], dtype=np.int64)
    for _ in range(n):
        arrays = []
        for _ in range(3):
            if rng.random() < 0.5:  # in range, sometimes near the bound
                a = rng.integers(0, 2 ** int(rng.integers(1, 58)), size=3, dtype=np.int64)
            else:
                a = rng.integers(-(2**63), 2**63 - 1, size=3, dtype=np.int64, endpoint=True)
                mask = rng.random(3) < 0.5
                a[mask] = rng.choice(edges, size=int(mask.sum()))
            arrays.append(a)
        if rng.random() < 0.5:
            w = rng.random(3) + 1e-3
        else:
            w = rng.choice([0.0, 1.0, -1.0, np.nan, np.inf, 1e308, 5e-324], size=3)
        try:
            core.set_weights(w)
            core.set_state(*arrays)
            core.next_batch(*out)
            counts["accepted"] += 1
        except ALLOWED:
            counts["rejected"] += 1
    return counts


def main(root: str, n: int) -> int:
    rng = np.random.default_rng(1234)
    sh = shards(Path(root))
    backends = ["numpy"] + (["cpp"] if sampler_ext_import_error() is None else [])
    report = {}
    for backend in backends:
        s = DomainSampler(sh, [1, 2, 3], seq_len=16, batch_size=4, sep_token_id=0, seed=3, backend=backend)
        for _ in range(3):
            s.next_batch()
        report[backend] = fuzz_sampler(s, rng, n)
        if backend == "cpp":
            report["cpp_core"] = fuzz_core(s._core, rng, n)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
