"""prepare_domains: local files -> cached train/validation shards, its errors, validation batches."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from ddk_fast.data import DomainSampler, prepare_domains, validation_batches
from ddk_fast.errors import ConfigError

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


@dataclass
class Dom:  # the fields prepare_domains reads from config.DomainConfig
    name: str
    files: list = field(default_factory=list)
    text_field: str = "text"
    weight: float = 1.0
    format: str = "auto"
    text_unit: str = "file"
    val_files: list = field(default_factory=list)
    test_files: list = field(default_factory=list)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _texts(seed, n, max_words=30):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


@pytest.fixture
def files(tmp_path):
    """Three domains in the three formats: jsonl (text), parquet (field 'content'), txt (one doc per line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(_texts(0, 60))))
    code = tmp_path / "code.parquet"
    pq.write_table(pa.table({"content": _texts(1, 50)}), code)
    books = tmp_path / "books.txt"
    books.write_text("\n".join(_texts(2, 40)) + "\n\n")  # empty lines: empty documents, dropped
    return [
        Dom("web", [str(web)]),
        Dom("code", [str(code)], text_field="content"),
        Dom("books", [str(books)], text_unit="line"),
    ]


def _all_docs(pd):
    return sorted(tuple(s.doc(i).tolist()) for s in (pd.train, pd.val, pd.test) for i in range(s.num_docs))


def test_prepare_tokenises_and_splits(tmp_path, files, tokenizer):
    out = prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=3, seed=1)
    assert [p.name for p in out] == ["web", "code", "books"]
    texts = {"web": _texts(0, 60), "code": _texts(1, 50), "books": _texts(2, 40)}
    for p in out:
        expected = sorted(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[p.name])
        assert _all_docs(p) == expected  # every document exactly once, in train, val or test; no specials
        assert p.val.num_tokens + p.val.num_docs >= 3 * 17  # whole documents covering the validation need
        assert p.test.num_tokens + p.test.num_docs >= 3 * 17  # test_sequences defaults to val_sequences
        assert p.train.num_docs > 0 and not p.reused
        assert p.train.dtype == np.uint16 and p.train.meta["split"] == "train"


def test_val_and_test_are_disjoint_whole_document_sets(tmp_path, files, tokenizer):
    """train / val / test partition the documents (by position in the source), sized by their settings."""
    out = prepare_domains(
        files[:1], tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2, test_sequences=5, seed=3
    )[0]
    docs = {
        split: [tuple(sh.doc(i).tolist()) for i in range(sh.num_docs)]
        for split, sh in (("train", out.train), ("val", out.val), ("test", out.test))
    }
    all_docs = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _texts(0, 60)]
    # the generated documents are distinct, so set identity is document identity
    assert len(set(all_docs)) == len(all_docs)
    sets = {k: set(v) for k, v in docs.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(all_docs)
    assert out.test.num_tokens + out.test.num_docs >= 5 * 17 > out.val.num_tokens + out.val.num_docs
    assert out.test.meta["split"] == "test"
    # the val split depends only on its own size and the seed, not on test_sequences
    other = prepare_domains(
        files[:1], tokenizer, tmp_path / "c2", seq_len=16, val_sequences=2, test_sequences=1, seed=3
    )[0]
    np.testing.assert_array_equal(other.val.tokens, out.val.tokens)


def test_held_out_files_give_val_and_test_and_every_file_document_trains(tmp_path, tokenizer):
    """A domain naming val_files / test_files: train = every document of `files`, val and test = the first
    documents of their own files (file order) covering the split sizes; the files are in the cache key."""
    paths = {}
    for name, seed, n in (("train", 10, 40), ("val", 11, 30), ("test", 12, 30)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(seed, n)))
    dom = Dom("web", [str(paths["train"])], val_files=[str(paths["val"])], test_files=[str(paths["test"])])
    (out,) = prepare_domains(
        [dom], tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2, test_sequences=3
    )

    def docs(shard):
        return [tuple(shard.doc(i).tolist()) for i in range(shard.num_docs)]

    def enc(seed, n):
        return [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _texts(seed, n)]

    assert docs(out.train) == enc(10, 40)  # every training document, none held out
    val, test = docs(out.val), docs(out.test)
    assert val == enc(11, 30)[: len(val)] and test == enc(12, 30)[: len(test)]
    assert (
        out.val.num_tokens + out.val.num_docs >= 2 * 17 and out.test.num_tokens + out.test.num_docs >= 3 * 17
    )
    # a changed held-out file is a new cache entry
    paths["test"].write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(13, 30)))
    (again,) = prepare_domains(
        [dom], tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2, test_sequences=3
    )
    assert not again.reused and docs(again.test) == enc(13, 30)[: again.test.num_docs]
    # too little held-out text, or only one of the two keys: errors that name the key
    too_little = r"\[data.domains\[0\]\] test_files: expected enough text for a test split"
    with pytest.raises(ConfigError, match=too_little):
        prepare_domains([dom], tokenizer, tmp_path / "c3", seq_len=16, val_sequences=2, test_sequences=400)
    half = Dom("web", [str(paths["train"])], val_files=[str(paths["val"])])
    with pytest.raises(ConfigError, match=r"\[data.domains\[0\]\] test_files"):
        prepare_domains([half], tokenizer, tmp_path / "c4", seq_len=16, val_sequences=2)


def test_cache_reuse_and_invalidation(tmp_path, files, tokenizer, caplog):
    kw = dict(seq_len=16, val_sequences=3, seed=1)
    first = prepare_domains(files, tokenizer, tmp_path / "cache", **kw)
    with caplog.at_level(logging.INFO, logger="ddk_fast.data.corpus"):
        second = prepare_domains(files, tokenizer, tmp_path / "cache", **kw)
    assert all(p.reused for p in second)
    assert "reusing cached shards" in caplog.text
    assert [p.cache_dir for p in first] == [p.cache_dir for p in second]
    # same size, different bytes: must not be reused
    web = files[0].files[0]
    data = open(web).read()
    open(web, "w").write(
        data.replace("alpha", "gamma", 1) if "alpha" in data else data.replace("beta", "delta", 1)
    )
    third = prepare_domains(files, tokenizer, tmp_path / "cache", **kw)
    assert not third[0].reused and third[0].cache_dir != first[0].cache_dir
    assert third[1].reused and third[2].reused
    other_seed = prepare_domains(
        files[1:2], tokenizer, tmp_path / "cache", seq_len=16, val_sequences=3, seed=2
    )
    assert not other_seed[0].reused


def test_validation_split_is_seeded(tmp_path, files, tokenizer):
    a = prepare_domains(files[:1], tokenizer, tmp_path / "a", seq_len=16, val_sequences=3, seed=1)[0]
    b = prepare_domains(files[:1], tokenizer, tmp_path / "b", seq_len=16, val_sequences=3, seed=1)[0]
    c = prepare_domains(files[:1], tokenizer, tmp_path / "c", seq_len=16, val_sequences=3, seed=7)[0]
    np.testing.assert_array_equal(a.val.tokens, b.val.tokens)
    assert not np.array_equal(a.val.offsets, c.val.offsets) or not np.array_equal(a.val.tokens, c.val.tokens)


def test_validation_batches_fixed(tmp_path, files, tokenizer):
    pd = prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=3)[2]
    eos = tokenizer.eos_token_id
    v1 = validation_batches(pd.val, 16, 3, eos, domain_id=2)
    v2 = validation_batches(pd.val, 16, 3, eos, domain_id=2)
    for k in v1:
        assert v1[k].shape == (3, 16) and v1[k].dtype == np.int64
        np.testing.assert_array_equal(v1[k], v2[k])
    assert (v1["domain_ids"] == 2).all()
    np.testing.assert_array_equal(v1["labels"][:, :-1], v1["input_ids"][:, 1:])
    np.testing.assert_array_equal(v1["labels"][:-1, -1], v1["input_ids"][1:, 0])  # same packing as training
    stream = []
    for i in range(pd.val.num_docs):
        stream += pd.val.doc(i).tolist() + [eos]
    np.testing.assert_array_equal(v1["input_ids"][0], stream[:16])


def test_sampler_runs_on_prepared_shards(tmp_path, files, tokenizer):
    out = prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)
    s = DomainSampler(
        [p.train for p in out], [1, 1, 1], seq_len=16, batch_size=6, sep_token_id=tokenizer.eos_token_id
    )
    b = s.next_batch()
    assert b["input_ids"].max() < len(tokenizer)
    np.testing.assert_array_equal(np.sort(b["domain_ids"][:, 0]), [0, 0, 1, 1, 2, 2])


def test_missing_file(tmp_path, files, tokenizer):
    files[1].files = [str(tmp_path / "nope.jsonl")]
    with pytest.raises(
        ConfigError, match=r"\[data.domains\[1\]\] files: expected an existing file.*nope.jsonl"
    ):
        prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)


def test_unknown_extension(tmp_path, files, tokenizer):
    files[0].files = [str(tmp_path / "data.csv")]
    with pytest.raises(ConfigError, match=r"\[data.domains\[0\]\] files: expected a file ending in one of"):
        prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)


def test_bad_text_field(tmp_path, files, tokenizer):
    files[1].text_field = "body"
    with pytest.raises(
        ConfigError, match=r"\[data.domains\[1\]\] text_field: expected a field of the data.*content"
    ):
        prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)


def test_empty_domain(tmp_path, files, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "   "}) + "\n")
    files[2] = Dom("empty", [str(empty)])
    with pytest.raises(ConfigError, match=r"\[data.domains\[2\]\] files: .*no text"):
        prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)


def test_too_little_for_validation(tmp_path, files, tokenizer):
    with pytest.raises(
        ConfigError, match=r"\[data.domains\[0\]\] files: .*needs more than 102000 tokens, found \d+"
    ):
        prepare_domains(files, tokenizer, tmp_path / "cache", seq_len=50, val_sequences=1000)
    assert not any(p.name.startswith("web-") for p in (tmp_path / "cache").iterdir())  # nothing half-built


def test_concurrent_builder_of_the_same_shards(tmp_path, files, tokenizer, monkeypatch):
    """Another process (rank) renaming identical shards into place first: ours is discarded, theirs used."""
    import os
    import shutil

    import ddk_fast.data.corpus as corpus

    real_rename = os.rename

    def racing_rename(src, dst):
        if os.path.basename(src).startswith(os.path.basename(dst) + ".tmp-"):  # our domain directory
            shutil.copytree(src, dst)  # the other process wins the race
        return real_rename(src, dst)  # -> OSError: directory not empty

    monkeypatch.setattr(corpus.os, "rename", racing_rename)
    out = prepare_domains(files[:1], tokenizer, tmp_path / "cache", seq_len=16, val_sequences=2)
    assert out[0].train.num_docs > 0 and out[0].val.num_docs > 0
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
