"""Chat and prompt/completion data (issue 19, item 2), globs and text_unit (item 3): formats, loss masks,
whole-example packing, the long-example policy, the samplers (C++ = numpy, with masks) and the validation
sets counting the same tokens as the loss."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from ddk_fast.data import DomainSampler, TokenShard, prepare_domains, validation_batches
from ddk_fast.data.corpus import ExampleSettings
from ddk_fast.data.examples import BlockPacker, ExampleEncoder
from ddk_fast.data.records import FileFaults
from ddk_fast.errors import ConfigError

from ..tiny import CHATML, make_chat_tokenizer

WORDS = "alpha beta gamma delta omega sigma kappa tau phi psi".split()


@dataclass
class Dom:
    name: str
    files: list = field(default_factory=list)
    text_field: str = "text"
    weight: float = 1.0
    format: str = "auto"
    text_unit: str = "file"


def _sentence(rng, lo=2, hi=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversations(n, seed=0, turns=(1, 3)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(*turns)):
            msgs.append({"role": "user", "content": "Q " + _sentence(rng)})
            msgs.append({"role": "assistant", "content": "A " + _sentence(rng)})
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-tok")
    rng = random.Random(1)
    texts = [_sentence(rng, 5, 30) for _ in range(300)] + ["system user assistant Q A be brief"]
    return make_chat_tokenizer(root / "tok", texts)


def _raw(tok_dir, files, **data) -> dict:
    inline = {"model_type": "llama"}
    model = {"teacher_config": inline, "student_config": inline, "tokenizer": str(tok_dir)}
    return {"model": model, "data": {"domains": [{"name": "c", "files": files}], **data}}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_mask_is_the_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Q alpha beta"},
        {"role": "assistant", "content": "A gamma delta"},
        {"role": "user", "content": "Q omega"},
        {"role": "assistant", "content": "A sigma"},
    ]
    (ids, mask), = ExampleEncoder(tok, None, "completion", 0, "chat").encode("chat", [msgs])  # fmt: skip
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    # each assistant turn with the template's end of turn; nothing of the system / user turns
    assert trained == "A gamma delta<|im_end|>\nA sigma<|im_end|>\n"
    (_, all_mask), = ExampleEncoder(tok, None, "all", 0, "chat").encode("chat", [msgs])  # fmt: skip
    assert all(all_mask)


def test_prompt_completion_mask(tok):
    enc = ExampleEncoder(tok, None, "completion", 0, "pc")
    (ids, mask), = enc.encode("prompt_completion", [("Q alpha beta ", "A gamma")])  # fmt: skip
    assert (
        ids[-1] == tok.eos_token_id and mask[-1] == 1
    )  # the completion ends with EOS: the model learns to stop
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A gamma<|im_end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == "Q alpha beta "
    # a conversational prompt / completion: the completion's turns are trained, the prompt's are not
    prompt = [{"role": "user", "content": "Q tau"}]
    completion = [{"role": "assistant", "content": "A phi"}]
    (ids, mask), = enc.encode("prompt_completion", [(prompt, completion)])  # fmt: skip
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A phi<|im_end|>\n"


def test_packing_keeps_every_example_whole(tok):
    enc = ExampleEncoder(tok, None, "completion", 0, "chat")
    examples = enc.encode("chat", conversations(40, seed=3))
    blocks = []
    packer = BlockPacker(47, tok.pad_token_id, "truncate", lambda ids, m: blocks.append((ids, m)))
    faults = FileFaults("x")
    kept = [ex for ex in examples if packer.add(*ex, faults)]
    packer.flush()
    assert faults.dropped_long == len(examples) - len(kept)
    assert all(len(ids) == 47 for ids, _ in blocks)
    # the blocks, padding removed, are the kept (possibly truncated) examples in order, none split
    it = iter(kept)
    for ids, mask in blocks:
        ids, mask = list(ids), list(mask)
        while ids and ids[-1] == tok.pad_token_id and mask[-1] == 0:
            ids.pop()
            mask.pop()
        pos = 0
        while pos < len(ids):
            ex_ids, _ = next(it)
            ex_ids = ex_ids[:47]
            assert ids[pos : pos + len(ex_ids)] == ex_ids
            pos += len(ex_ids)
        assert mask[0] == 0  # the first label of a block is never counted
    assert next(it, None) is None
    assert packer.padding == 47 * len(blocks) - sum(min(len(ids), 47) for ids, _ in kept) > 0


def test_long_examples_truncated_or_dropped_and_counted(tmp_path, tok):
    convs = conversations(30, seed=5, turns=(1, 2)) + conversations(4, seed=6, turns=(12, 14))
    examples = ExampleEncoder(tok, None, "completion", 0, "chat").encode("chat", convs)
    long = [m for ids, m in examples if len(ids) > 127]
    assert len(long) >= 4
    salvageable = sum(any(m[:127]) for m in long)  # truncation keeps a trained token
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    for policy in ("truncate", "drop"):
        (p,) = prepare_domains(
            [Dom("chat", [str(f)])], tok, tmp_path / f"cache-{policy}", seq_len=128, val_sequences=1,
            test_sequences=1, examples=ExampleSettings(None, "completion", policy),
        )  # fmt: skip
        (faults,) = p.faults
        want = (salvageable, len(long) - salvageable) if policy == "truncate" else (0, len(long))
        assert (faults.truncated, faults.dropped_long) == want
        assert p.train.meta["packed_seq_len"] == 128 and p.train.mask is not None
        assert set(np.diff(p.train.offsets).tolist()) == {127}  # one block of whole examples per sequence
        again = json.loads((p.cache_dir / "faults.json").read_text())[0]
        assert (again["truncated"], again["dropped_long"]) == want  # cached with the shards


def test_mixed_formats_in_a_file_name_file_and_line(tmp_path, tok):
    recs = [
        {"messages": conversations(1)[0]},
        {"messages": conversations(1, 1)[0]},
        {"prompt": "a", "completion": "b"},
    ]
    f = _jsonl(tmp_path / "mixed.jsonl", recs)
    with pytest.raises(
        ConfigError, match=r"mixed\.jsonl:3 is prompt_completion, the file's first record .*:1\) is chat"
    ):
        prepare_domains([Dom("m", [str(f)])], tok, tmp_path / "c", seq_len=32, val_sequences=1)


def test_domain_files_of_two_formats_are_refused(tmp_path, tok):
    a = _jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in conversations(20)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": _sentence(random.Random(i))} for i in range(20)])
    with pytest.raises(
        ConfigError, match=r"files of one format per domain .*a\.jsonl is chat.*b\.jsonl is text"
    ):
        prepare_domains([Dom("m", [str(a), str(b)])], tok, tmp_path / "c", seq_len=32, val_sequences=1)


def test_chat_without_a_template_exits_2_and_a_template_file_fixes_it(tmp_path):
    from ddk_fast.config import build_config

    rng = random.Random(0)
    plain = make_chat_tokenizer(
        tmp_path / "plain", [_sentence(rng, 5, 30) for _ in range(200)], template=None
    )
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(30)])
    with pytest.raises(
        ConfigError, match=r"\[data\] chat_template: expected a chat-template file .*has no chat_template"
    ):
        prepare_domains([Dom("c", [str(f)])], plain, tmp_path / "c1", seq_len=64, val_sequences=1)
    (p,) = prepare_domains(
        [Dom("c", [str(f)])], plain, tmp_path / "c2", seq_len=64, val_sequences=1,
        examples=ExampleSettings(CHATML),
    )  # fmt: skip
    assert p.train.num_docs > 0
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    with pytest.raises(ConfigError, match=r"\[data\] chat_template: expected an existing file"):
        build_config(_raw(tmp_path / "plain", [str(f)], chat_template="nope.jinja"))


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_sampler_labels_follow_the_mask(tmp_path, tok, backend):
    from ddk_fast.backend import sampler_ext_import_error

    if backend == "cpp" and sampler_ext_import_error() is not None:
        pytest.skip(str(sampler_ext_import_error()))
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(80, seed=2)])
    t = tmp_path / "text.jsonl"
    _jsonl(t, [{"text": _sentence(random.Random(i), 5, 40)} for i in range(80)])
    chat, text = prepare_domains(
        [Dom("chat", [str(f)]), Dom("text", [str(t)])], tok, tmp_path / "c", seq_len=32, val_sequences=2
    )
    s = DomainSampler(
        [chat.train, text.train], [0.5, 0.5], seq_len=32, batch_size=4, sep_token_id=tok.eos_token_id, seed=3,
        backend=backend,
    )  # fmt: skip
    for _ in range(6):
        b = s.next_batch()
        for row in range(4):
            ids, labels, d = b["input_ids"][row], b["labels"][row], int(b["domain_ids"][row, 0])
            if d == 1:  # text: every label counts
                assert (labels != -100).all()
                continue
            # chat: sequence k is block k: its tokens and mask from the shard, the separator last
            k = _block_of(chat.train, ids[:-1])
            block_ids, block_mask = chat.train.doc(k), chat.train.doc_mask(k)
            assert ids[-1] == tok.eos_token_id
            want = np.where(block_mask[1:] == 1, block_ids[1:].astype(np.int64), -100)
            np.testing.assert_array_equal(labels[:-2], want)
            assert (
                labels[-2] == -100 and labels[-1] == -100
            )  # the separator, and the next block's first token


def _block_of(shard: TokenShard, ids) -> int:
    for k in range(shard.num_docs):
        if np.array_equal(shard.doc(k), ids):
            return k
    raise AssertionError("a sequence that is not one block")


def test_cpp_and_numpy_samplers_agree_with_masks(tmp_path, tok):
    from ddk_fast.backend import sampler_ext_import_error

    if sampler_ext_import_error() is not None:
        pytest.skip(str(sampler_ext_import_error()))
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(60, seed=4)])
    g = _jsonl(
        tmp_path / "pc.jsonl",
        [{"prompt": "Q " + _sentence(random.Random(i)), "completion": "A x"} for i in range(60)],
    )
    t = _jsonl(tmp_path / "text.jsonl", [{"text": _sentence(random.Random(i), 5, 40)} for i in range(60)])
    doms = prepare_domains([Dom("c", [str(f)]), Dom("p", [str(g)]), Dom("t", [str(t)])], tok, tmp_path / "c",
                           seq_len=32, val_sequences=2)  # fmt: skip
    for budget in (None, 1):  # mapped, and pread for the tokens (the mask is read through its mapping)
        kw = dict(seq_len=32, batch_size=3, sep_token_id=tok.eos_token_id, seed=7, page_budget_bytes=budget)
        a = DomainSampler([d.train for d in doms], [1, 2, 3], backend="numpy", **kw)
        b = DomainSampler([d.train for d in doms], [1, 2, 3], backend="cpp", **kw)
        for i in range(25):
            if i == 10:
                a.set_weights([3, 1, 1])
                b.set_weights([3, 1, 1])
            x, y = a.next_batch(), b.next_batch()
            for key in ("input_ids", "labels", "domain_ids"):
                np.testing.assert_array_equal(x[key], y[key])
        assert (x["labels"] == -100).any()


def test_validation_sets_count_the_loss_tokens(tmp_path, tok):
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(60, seed=8)])
    (p,) = prepare_domains([Dom("c", [str(f)])], tok, tmp_path / "c", seq_len=32, val_sequences=3)
    vs = validation_batches(p.val, 32, 3, tok.eos_token_id, 0)
    for k in range(3):
        want = np.where(p.val.doc_mask(k)[1:] == 1, p.val.doc(k)[1:].astype(np.int64), -100)
        np.testing.assert_array_equal(vs["labels"][k, :-2], want)
        assert (vs["labels"][k, -2:] == -100).all()
    counted = int((vs["labels"] != -100).sum())
    assert 0 < counted == sum(int(p.val.doc_mask(k)[1:].sum()) for k in range(3))


def test_globs_expand_sorted_and_a_glob_matching_nothing_is_an_error(tmp_path, tok):
    d = tmp_path / "data" / "code"
    d.mkdir(parents=True)
    rng = random.Random(0)
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (d / name).write_text("".join(json.dumps({"text": _sentence(rng, 5, 20)}) + "\n" for _ in range(30)))
    (p,) = prepare_domains(
        [Dom("code", [str(d / "*.jsonl")])], tok, tmp_path / "c", seq_len=16, val_sequences=1
    )
    assert [f.path for f in p.faults] == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    with pytest.raises(
        ConfigError, match=r"\[data.domains\[0\]\] files: expected a glob that matches at least one file"
    ):
        prepare_domains(
            [Dom("code", [str(d / "*.parquet")])], tok, tmp_path / "c", seq_len=16, val_sequences=1
        )
    from ddk_fast.config import build_config

    with pytest.raises(ConfigError, match=r"\[data.domains\[0\]\] files\[0\]: expected a glob that matches"):
        build_config(_raw(tmp_path, [str(d / "*.parquet")]))


def test_txt_text_unit(tmp_path, tok):
    changelog = "v1.2\n- fix alpha\n- fix beta\n\nv1.1\n- add gamma\n\n\nv1.0\n- first\n"
    f = tmp_path / "CHANGELOG.txt"
    f.write_text("\n".join([changelog] * 20))
    docs = {}
    for unit in ("file", "paragraph", "line"):
        (p,) = prepare_domains([Dom("c", [str(f)], text_unit=unit)], tok, tmp_path / unit, seq_len=8,
                               val_sequences=0, test_sequences=0)  # fmt: skip
        docs[unit] = p.train.num_docs + p.val.num_docs + p.test.num_docs
    assert docs == {"file": 1, "paragraph": 60, "line": 140}
