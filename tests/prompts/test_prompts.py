"""Teacher prompt search (``[teacher_prompt]``, ``ddk_fast.prompts``): the search loop, keyword swaps and
few-shot selection on hand-made inputs, the prefix cache against recomputing the prefix (hidden states,
logits, captured layers, several steps), training with a prompts.json (teacher val CE = the prefixed CE,
an empty prefix = the plain loss), identity checks, config errors and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk_fast.config import build_config, dump_toml
from ddk_fast.data import prepare_config_domains, validation_batches
from ddk_fast.errors import ConfigError, RunError
from ddk_fast.models.evaluation import hidden_ce_sum
from ddk_fast.models.hidden import capture_layers
from ddk_fast.models.loading import final_hidden, head_weight, load_teacher, load_tokenizer
from ddk_fast.prompts import TeacherPrompts, prefix_kv
from ddk_fast.prompts.__main__ import main as prompts_main
from ddk_fast.prompts.search import (
    Candidate,
    dev_ce,
    nearest_farthest,
    rank_by_similarity,
    search,
    search_domain,
)
from ddk_fast.training.trainer import Trainer

from ..tiny import make_cfg


# ----------------------------------------------------------------------------------------------- pieces
def test_keyword_swap_picks_true_nearest_and_farthest():
    emb = torch.tensor(
        [[1.0, 0.0], [0.8, 0.3], [-1.0, 0.05], [0.0, 1.0], [0.99, 0.01], [10.0, 0.5]]
    )  # 5 is [0.998, 0.05] after normalising: nearest to 0 by cosine though farther in L2
    allowed = torch.tensor([True, True, True, True, False, True])  # 4 (the closest) is a special token
    assert nearest_farthest(emb, 0, allowed) == (5, 2)
    allowed[5] = False
    assert nearest_farthest(emb, 0, allowed) == (1, 2)
    assert nearest_farthest(emb, 3, allowed) == (1, 0)  # cos to 3: 1 -> 0.35, 2 -> 0.05, 0 -> 0


def test_keyword_swap_farthest_is_argmin_cosine():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 8, generator=g)
    allowed = torch.ones(50, dtype=torch.bool)
    allowed[7] = False
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    cos = e @ e[3]
    cos[3] = float("nan")
    order = [i for i in torch.argsort(cos.nan_to_num(-9), descending=True).tolist() if i not in (3, 7)]
    near, far = nearest_farthest(emb, 3, allowed)
    assert near == order[0]
    assert far == min((i for i in range(50) if i not in (3, 7)), key=lambda i: float(cos[i]))


def test_fewshot_selection_picks_most_similar_docs():
    target = torch.tensor([1.0, 1.0, 0.0])
    docs = torch.tensor(
        [[0.0, 0.0, 1.0], [1.0, 1.1, 0.0], [5.0, 0.0, 0.0], [2.0, 2.0, 0.5], [-1.0, -1.0, 0.0]]
    )  # cos 0.999, 0.985
    assert rank_by_similarity(docs, target) == [1, 3, 2, 0, 4]


def _fake_perturb(c: Candidate) -> list[Candidate]:
    return [
        Candidate("swap_near", c.template + (9,), (), c.ids + (9,)),
        Candidate("fewshot", (), (1,), (1,) + c.ids),
    ]


def test_search_keeps_no_prefix_when_nothing_helps():
    calls = []

    def evaluate(ids):
        calls.append(ids)
        return 2.0 + 0.01 * len(ids)  # every prefix hurts

    explore = [Candidate("explore", (5, 6), (), (5, 6)), Candidate("explore", (7,), (), (7,))]
    r = search(evaluate, explore, _fake_perturb, budget=6)
    assert r.best.kind == "none" and r.best.ids == () and r.best_ce == r.no_prefix_ce == 2.0
    assert r.evaluations == 6 and len(calls) == 7  # the baseline is not counted
    assert len(set(calls)) == len(calls)  # no candidate evaluated twice


def test_search_iterates_on_the_best():
    def evaluate(ids):
        if ids == (7, 9):  # a perturbation of the second template helps most
            return 1.0
        return {(): 2.0, (5, 6): 1.9, (7,): 1.8}.get(ids, 3.0)

    explore = [Candidate("explore", (5, 6), (), (5, 6)), Candidate("explore", (7,), (), (7,))]
    r = search(evaluate, explore, _fake_perturb, budget=3)
    assert r.best.ids == (7, 9) and r.best.kind == "swap_near" and r.best_ce == 1.0
    assert [h["candidate"].ids for h in r.history] == [(), (5, 6), (7,), (7, 9)]
    again = search(evaluate, explore, _fake_perturb, budget=3)
    assert [h["ce"] for h in again.history] == [h["ce"] for h in r.history]  # deterministic


# ----------------------------------------------------------------------------------------------- tiny teacher
@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory):  # noqa: F811
    cfg = make_cfg(assets, tmp_path_factory.mktemp("run"))
    tok = load_tokenizer(cfg.model)
    domains = prepare_config_domains(cfg.data, tok)
    teacher = load_teacher(cfg.model, torch.device("cpu"), torch.float32, cfg.train.seed)
    return cfg, tok, domains, teacher


def test_prefix_cache_equals_recomputing_the_prefix(tiny):
    cfg, tok, domains, teacher = tiny
    prefixes = {
        0: tok.encode("The following is arith:\n"),
        1: tok.encode("alpha beta gamma delta omega sigma"),
    }
    assert len(prefixes[0]) != len(prefixes[1])
    prompts = TeacherPrompts(teacher, prefixes)
    stored = {d: [(k.clone(), v.clone()) for k, v in kv] for d, kv in prompts.kv.items()}
    g = torch.Generator().manual_seed(0)
    W = head_weight(teacher)
    for step, rows in enumerate([[0, 1, 2, 0], [2, 2, 2, 2], [1, 1, 1, 1], [0, 2, 1, 1]]):  # mixed, none, one
        ids = torch.randint(0, 300, (4, 24), generator=g)
        with capture_layers(teacher, [1, 3]) as caught:
            h = prompts.hidden(ids, rows)
        layers = {i: caught[i].clone() for i in (1, 3)}
        ref = prompts.recomputed_hidden(ids, rows)
        assert h.shape == ref.shape == (4, 24, 64)
        assert (h - ref).abs().max() <= 1e-5, step
        assert ((h @ W.T) - (ref @ W.T)).abs().max() <= 1e-5, step  # logits
        for r, d in enumerate(rows):  # [hidden]: the captured layers are the plain positions only
            pre = torch.as_tensor(prefixes.get(d, []), dtype=torch.long)
            with capture_layers(teacher, [1, 3]) as full:
                final_hidden(teacher, torch.cat([pre, ids[r]]).unsqueeze(0))
            for i in (1, 3):
                assert (layers[i][r] - full[i][0, len(pre) :]).abs().max() <= 1e-5, (step, r, i)
    for d, kv in prompts.kv.items():  # the stored keys/values are not touched by the forwards
        for (k, v), (k0, v0) in zip(kv, stored[d]):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_empty_prefix_is_the_plain_teacher(tiny):
    cfg, tok, domains, teacher = tiny
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    plain = final_hidden(teacher, ids)
    assert torch.equal(TeacherPrompts(teacher, {0: [], 1: []}).hidden(ids, [0, 1, 2]), plain)


def test_search_on_tiny_teacher(tiny):
    cfg, tok, domains, teacher = tiny
    p = cfg.teacher_prompt
    p.budget, p.dev_sequences, p.max_fewshot, p.max_prefix_tokens = 5, 2, 2, 40
    dom = domains[1]
    result, info = search_domain(teacher, tok, dom.name, 1, dom.train, p, cfg.data.seq_len, 4)
    assert result.best_ce <= result.no_prefix_ce
    assert result.best_ce == min(h["ce"] for h in result.history)
    assert result.evaluations == 5 and len(result.history) == 6
    kinds = {h["candidate"].kind for h in result.history}
    assert {"none", "explore"} <= kinds and kinds & {"fewshot", "swap_near", "swap_far"}
    # the dev slice: the last train documents, disjoint from the few-shot pool
    dev_docs = info["dev_slice"]["doc_indices"]
    assert dev_docs == list(range(dom.train.num_docs - len(dev_docs), dom.train.num_docs))
    assert not set(dev_docs) & set(info["fewshot_pool"])
    # the recorded CE of a prefixed candidate = the teacher run on prefix + text from scratch
    best_prefixed = min((h for h in result.history if h["candidate"].ids), key=lambda h: h["ce"])
    pre = torch.as_tensor(best_prefixed["candidate"].ids)
    from ddk_fast.prompts.search import dev_slice

    ids, labels, _ = dev_slice(dom.train, cfg.data.seq_len, 2, tok.eos_token_id)
    total, n = 0.0, 0
    for r in range(len(ids)):
        full = torch.cat([pre, torch.as_tensor(ids[r])]).unsqueeze(0)
        h = final_hidden(teacher, full)[:, len(pre) :]
        s, k = hidden_ce_sum(
            h, head_weight(teacher), torch.as_tensor(labels[r : r + 1]), head_weight(teacher).shape[0]
        )
        total, n = total + float(s), n + int(k)
    assert abs(total / n - best_prefixed["ce"]) <= 1e-5
    # few-shot docs: ranked by the cosine of mean hidden states (independent recomputation of the top one)
    from ddk_fast.prompts.search import mean_hidden

    target = mean_hidden(teacher, ids)
    sims = {
        d: float(
            torch.cosine_similarity(mean_hidden(teacher, [dom.train.doc(d)[:40].tolist()]), target, dim=0)
        )
        for d in info["fewshot_pool"]
    }
    assert info["fewshot_pool"][0] == max(sims, key=sims.get)


def test_no_prefix_wins_on_tiny_teacher_when_every_candidate_hurts(tiny, monkeypatch):
    cfg, tok, domains, teacher = tiny
    import ddk_fast.prompts.search as S

    real = S.dev_ce
    monkeypatch.setattr(
        S, "dev_ce", lambda t, i, lab, p, v, b: real(t, i, lab, p, v, b) + (1.0 if p else 0.0)
    )
    p = cfg.teacher_prompt
    p.budget, p.dev_sequences, p.max_fewshot = 3, 2, 1
    result, _ = S.search_domain(teacher, tok, domains[0].name, 0, domains[0].train, p, cfg.data.seq_len, 4)
    assert result.best.ids == () and result.best_ce == result.no_prefix_ce


# --------------------------------------------------------------------------------------- CLI + training
def _toml(cfg, path):
    path.write_text(dump_toml(cfg))
    return path


@pytest.fixture(scope="module")
def searched(assets, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("search")
    cfg = make_cfg(
        assets,
        root / "run",
        teacher_prompt__budget=2,
        teacher_prompt__dev_sequences=2,
        teacher_prompt__max_fewshot=1,
        teacher_prompt__max_prefix_tokens=24,
    )
    cfg.output.progress = True
    cfg_path = _toml(cfg, root / "run.toml")
    out = root / "prompts.json"
    assert prompts_main(["--config", str(cfg_path), "--out", str(out)]) == 0
    return root, cfg_path, out


def test_cli_writes_prompts_json_and_table(searched, capsys):
    root, cfg_path, out = searched
    data = json.loads(out.read_text())
    assert data["format"] == "ddk_fast.prompts/1"
    assert set(data["domains"]) == {"arith", "words", "code"}
    for e in data["domains"].values():
        assert e["dev_ce"] <= e["no_prefix_ce"] and e["evaluations"] == 2 and len(e["history"]) == 3
        assert e["history"][0]["kind"] == "none" and e["dev_slice"]["split"] == "train"
    assert data["tokenizer"]["vocab_size"] > 0 and len(data["teacher"]["config_sha256"]) == 64
    assert "| arith |" in out.with_suffix(".md").read_text()


def test_cli_bad_config_exits_2(searched, capsys):
    root, cfg_path, out = searched
    assert prompts_main(["--config", str(cfg_path), "--set", "teacher_prompt.budget=0"]) == 2
    assert "[teacher_prompt] budget" in capsys.readouterr().err


def _with_prefixes(searched, tmp_path, tok_text="The following is text:\n"):
    """The CLI's prompts.json with a forced prefix for every domain (so training runs the prefixed path)."""
    root, cfg_path, out = searched
    data = json.loads(out.read_text())
    tok = load_tokenizer(build_config(_raw(cfg_path)).model)
    for i, e in enumerate(data["domains"].values()):
        e["prefix_ids"] = tok.encode(tok_text)[: 3 + 2 * i]  # different lengths per domain
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    return path, data


def _raw(cfg_path):
    import tomllib

    return tomllib.loads(cfg_path.read_text())


def test_training_with_prompts_uses_prefixed_teacher(assets, searched, tmp_path):  # noqa: F811
    path, data = _with_prefixes(searched, tmp_path)
    cfg = make_cfg(
        assets, tmp_path / "run", teacher_prompt__use=str(path), train__max_steps=2, ddk__interval=2
    )
    t = Trainer(cfg)
    t.setup()
    assert t.teacher.prompts is not None and len(t.teacher.prompts.kv) == 3
    res = t.fit()
    assert res.step == 2 and all(np.isfinite(res.teacher_losses))
    # the teacher's val CE is the prefixed CE (recomputed from scratch)
    teacher = t.teacher.model
    sep = t.tokenizer.eos_token_id
    for i, name in enumerate(t.names):
        pre = torch.as_tensor(data["domains"][name]["prefix_ids"])
        vs = validation_batches(t.schedule.domains[i].val, cfg.data.seq_len, cfg.data.val_sequences, sep, i)
        total, n = 0.0, 0
        for r in range(len(vs["input_ids"])):
            full = torch.cat([pre, torch.as_tensor(vs["input_ids"][r])]).unsqueeze(0)
            h = final_hidden(teacher, full)[:, len(pre) :]
            s, k = hidden_ce_sum(
                h, head_weight(teacher), torch.as_tensor(vs["labels"][r : r + 1]), t.models.vocab_size
            )
            total, n = total + float(s), n + int(k)
        assert abs(total / n - res.teacher_losses[i]) <= 1e-5, name
        plain = dev_ce(teacher, vs["input_ids"], vs["labels"], [], t.models.vocab_size, 4)
        assert abs(plain - res.teacher_losses[i]) > 1e-6  # the prefix changed it
    # an empty prefix: the same teacher inputs and KD loss as no prompts at all
    batch = t.sampler.next_batch()
    ids = torch.as_tensor(batch["input_ids"])
    with_prefix = t.teacher.signal(ids, batch).hidden
    t.teacher.prompts = TeacherPrompts(teacher, {})
    torch.manual_seed(0)  # the same LoRA dropout masks
    empty = t._loss(batch)
    empty_h = t.teacher.signal(ids, batch).hidden
    t.teacher.prompts = None
    torch.manual_seed(0)
    plain = t._loss(batch)
    assert torch.equal(empty_h, t.teacher.signal(ids, batch).hidden)
    assert torch.equal(empty.loss, plain.loss) and not torch.equal(with_prefix, empty_h)
    from ddk_fast.training.report import write_report

    report = write_report(res, t.names, prompts=t.prompts).read_text()
    assert "## Teacher prompts" in report and "| arith | `" in report
    # a checkpoint resumes only with the prefixes it was trained with
    same = Trainer(make_cfg(assets, tmp_path / "run", teacher_prompt__use=str(path), train__max_steps=2))
    same.setup()
    assert same.resume() and same.step == 2
    plain_run = Trainer(make_cfg(assets, tmp_path / "run", train__max_steps=2))
    plain_run.setup()
    with pytest.raises(RunError, match=r"cannot be resumed.*other \[teacher_prompt\] prefixes"):
        plain_run.resume()


def test_teacher_cache_writer_refuses_prompts(assets, tmp_path, capsys):  # noqa: F811
    from ddk_fast.teacher_cache.__main__ import main as cache_main

    cfg = make_cfg(assets, tmp_path / "run", teacher_prompt__use=_ok_file(tmp_path))
    cfg_path = _toml(cfg, tmp_path / "run.toml")
    assert cache_main(["--config", str(cfg_path), "--out", str(tmp_path / "cache")]) == 2
    assert "[teacher_prompt] use: expected empty when writing a teacher cache" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["tokenizer"].update(vocab_sha256="0" * 64), "written for this run's tokenizer"),
        (lambda d: d["tokenizer"].update(vocab_size=999), "written for this run's tokenizer"),
        (lambda d: d["teacher"].update(config_sha256="f" * 64), "teacher config_sha256 differs"),
        (lambda d: d["teacher"].update(init_seed=123), "teacher init_seed differs"),
        (lambda d: d["teacher"].update(embedding_probe=[0.5, 2.0]), "input-embedding mean/std"),
        (lambda d: d["teacher"].update(shapes_sha256="a" * 64), "parameter shapes differ"),
    ],
)
def test_prompts_of_another_teacher_or_tokenizer_are_refused(assets, searched, tmp_path, edit, match):  # noqa: F811
    path, data = _with_prefixes(searched, tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    cfg = make_cfg(assets, tmp_path / "run", teacher_prompt__use=str(path))
    t = Trainer(cfg)
    with pytest.raises(ConfigError, match=r"\[teacher_prompt\] use: expected a prompts.json written") as exc:
        t.setup()
    assert match in str(exc.value) and str(path) in str(exc.value)


def test_prompts_of_another_inline_teacher_config_are_refused(assets, searched, tmp_path):  # noqa: F811
    from ..tiny import VOCAB, llama_config

    path, _ = _with_prefixes(searched, tmp_path)
    cfg = make_cfg(
        assets,
        tmp_path / "run",
        teacher_prompt__use=str(path),
        model__teacher_config=llama_config(VOCAB + 16, layers=3),
    )
    with pytest.raises(ConfigError, match="teacher config_sha256 differs"):
        Trainer(cfg).setup()


# ------------------------------------------------------------------------------------------- config errors
def _bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    return str(p)


def _unknown_domain(tmp_path):
    p = tmp_path / "unknown.json"
    p.write_text(json.dumps({"format": "ddk_fast.prompts/1", "domains": {"poetry": {"prefix_ids": [1]}}}))
    return str(p)


def _ok_file(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps({"format": "ddk_fast.prompts/1", "domains": {"arith": {"prefix_ids": [1]}}}))
    return str(p)


@pytest.mark.parametrize(
    "over, key, value",
    [
        ({"teacher_prompt__budget": 0}, "[teacher_prompt] budget", "got 0"),
        ({"teacher_prompt__budget": ""}, "[teacher_prompt] budget", "got ''"),
        ({"teacher_prompt__max_fewshot": 6}, "[teacher_prompt] max_fewshot", "got 6"),
        ({"teacher_prompt__max_fewshot": -1}, "[teacher_prompt] max_fewshot", "got -1"),
        ({"teacher_prompt__dev_sequences": 0}, "[teacher_prompt] dev_sequences", "got 0"),
        ({"teacher_prompt__max_prefix_tokens": 0}, "[teacher_prompt] max_prefix_tokens", "got 0"),
        (
            {"teacher_prompt__templates": ["ok {domain}", " "]},
            "[teacher_prompt] templates",
            "got ['ok {domain}', ' ']",
        ),
        (
            {"teacher_prompt__use": _ok_file, "model__teacher_cache": "somewhere"},
            "[teacher_prompt] use",
            "teacher_cache",
        ),
    ],
)
def test_config_errors(assets, tmp_path, over, key, value):  # noqa: F811
    over = {k: (v(tmp_path) if callable(v) else v) for k, v in over.items()}
    with pytest.raises(ConfigError) as exc:
        make_cfg(assets, tmp_path / "run", **over)
    msg = str(exc.value)
    assert msg.startswith(key) and value in msg, msg


@pytest.mark.parametrize(
    "use, value",
    [
        (lambda tmp_path: "missing.json", "got 'missing.json'"),
        (_bad_json, "bad.json"),
        (_unknown_domain, "unknown domain 'poetry'"),
    ],
)
def test_a_bad_prompts_file_fails_before_any_model_loads(assets, tmp_path, monkeypatch, use, value):
    """The prompts file is read by the teacher (its owner) when the run opens it: before any weight."""
    import ddk_fast.training.teacher as teacher_mod

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the prompts file was checked")

    monkeypatch.setattr(teacher_mod, "load_teacher", no_model)
    cfg = make_cfg(assets, tmp_path / "run", teacher_prompt__use=use(tmp_path))
    with pytest.raises(ConfigError) as exc:
        Trainer(cfg).setup()
    msg = str(exc.value)
    assert msg.startswith("[teacher_prompt] use") and value in msg, msg


def test_prefix_kv_shapes(tiny):
    cfg, tok, domains, teacher = tiny
    kv = prefix_kv(teacher, [1, 2, 3])
    assert len(kv) == 4 and kv[0][0].shape == (1, 4, 3, 16)
