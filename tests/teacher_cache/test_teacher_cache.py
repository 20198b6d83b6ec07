"""The teacher cache: rows equal the online teacher's top-k for the sampler's batches, resume keeps finished
shards, a corrupt shard is named and refused, a cache of another tokenizer / seq_len / domain is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk_fast.config import build_config
from ddk_fast.teacher_cache import TeacherCache, TeacherCacheError, batch_sequence_indices
from ddk_fast.teacher_cache.__main__ import main as cache_main
from ddk_fast.teacher_cache.store import as_tensor

from ..tiny import VOCAB, domain_texts, llama_config, make_tokenizer, write_domains

TOP_K = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_assets")
    texts = [t for docs in domain_texts().values() for t in docs]
    make_tokenizer(root / "tok", texts)
    return root, write_domains(root / "data")


def raw_cfg(assets, run_dir, **model):
    root, files = assets
    return {
        "model": {
            "teacher_config": llama_config(VOCAB + 16),
            "student_from_teacher_layers": [0, 3],
            "tokenizer": str(root / "tok"),
            "student_mode": "full",
            **model,
        },
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 32,
            "batch_size": 4,
            "val_sequences": 4,
            "cache_dir": str(root / "shards"),
            "prefetch": 0,
        },
        "ddk": {"interval": 3, "eval_batch_size": 4},
        "train": {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "device": "cpu"},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
    }


def write_toml(path, raw):
    from ddk_fast.config import dump_toml

    path.write_text(dump_toml(build_config(raw)))
    return path


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg_path = write_toml(tmp / "run.toml", raw_cfg(assets, tmp / "run"))
    out = tmp / "cache"
    rc = cache_main(["--config", str(cfg_path), "--top-k", str(TOP_K), "--out", str(out),
                     "--shard-sequences", "5", "--epochs", "1"])  # fmt: skip
    assert rc == 0
    return cfg_path, out


def test_rows_match_the_online_teacher_for_sampler_batches(assets, built):
    from ddk_fast.data import DomainSampler, prepare_domains
    from ddk_fast.models.loading import final_hidden, head_weight, load_teacher, load_tokenizer
    from ddk_fast.ops.topk_reference import teacher_topk

    cfg_path, out = built
    cfg = build_config(raw_cfg(assets, out.parent / "run"))
    cache = TeacherCache(out)
    m = cache.manifest
    assert m["top_k"] == TOP_K and m["seq_len"] == 32 and m["logprob_dtype"] == "bfloat16"
    assert set(m["domains"]) == {"arith", "words", "code"}
    assert all(d["teacher_val_ce"] > 0 for d in m["domains"].values())
    assert len(m["teacher"]["weights_sha256"]) == 64
    tok = load_tokenizer(cfg.model)
    doms = prepare_domains(cfg.data.domains, tok, cfg.data.cache_dir, seq_len=32, val_sequences=4, seed=0)
    names = [d.name for d in doms]
    sampler = DomainSampler([d.train for d in doms], [0.6, 0.3, 0.1], seq_len=32, batch_size=4,
                            sep_token_id=tok.eos_token_id, seed=0, backend="numpy")  # fmt: skip
    teacher = load_teacher(cfg.model, torch.device("cpu"), torch.float32, 0)
    w = head_weight(teacher)[: len(tok)]
    for _ in range(3):
        st = sampler.state_dict()
        d_idx, k_idx = batch_sequence_indices(st["weights"], st["window_counts"], st["seq_index"], 1, 4, 0)
        batch = sampler.next_batch()
        assert (batch["domain_ids"][:, 0] == d_idx).all()
        rows = cache.rows(names, d_idx, k_idx)
        ids, lps, tail = rows["ids"], rows["logprobs"], rows["tail"]
        with torch.no_grad():
            h = final_hidden(teacher, torch.as_tensor(batch["input_ids"])).reshape(-1, w.shape[1])
            ref_ids, ref_lp, ref_tail = teacher_topk(h @ w.T, TOP_K)
        lp = as_tensor(lps, "bfloat16").float().reshape(-1, TOP_K)
        torch.testing.assert_close(lp, ref_lp, atol=0.05, rtol=0.01)  # bf16 storage
        torch.testing.assert_close(torch.from_numpy(tail).reshape(-1), ref_tail, atol=1e-5, rtol=1e-5)
        # ids: equal where the teacher's probabilities are not tied within fp noise
        same = torch.from_numpy(ids).reshape(-1, TOP_K) == ref_ids
        assert same.float().mean() > 0.99


def test_resume_keeps_finished_shards(built, tmp_path):
    cfg_path, out = built
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    shards = m["domains"]["words"]["shards"]
    assert len(shards) >= 2
    victim = shards[1]["prefix"]
    (copy / f"{victim}.json").unlink()  # as if interrupted while writing this shard
    (copy / f"{victim}.ids").write_bytes(b"partial")
    (copy / "manifest.json").unlink()
    kept = copy / f"{shards[0]['prefix']}.ids"
    mtime = kept.stat().st_mtime_ns
    assert cache_main(["--config", str(cfg_path), "--top-k", str(TOP_K), "--out", str(copy),
                       "--shard-sequences", "5", "--epochs", "1"]) == 0  # fmt: skip
    assert kept.stat().st_mtime_ns == mtime  # not recomputed
    m2 = json.loads((copy / "manifest.json").read_text())
    assert m2["domains"]["words"]["shards"] == shards  # recomputed shard has the same checksums
    TeacherCache(copy)


def test_corrupt_shard_is_named_and_refused(built, tmp_path, capsys):
    import shutil

    _, out = built
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    prefix = m["domains"]["code"]["shards"][0]["prefix"]
    p = copy / f"{prefix}.logprobs"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=rf"{prefix}\.logprobs: checksum mismatch"):
        TeacherCache(copy)
    assert cache_main(["--verify", str(copy)]) == 2
    assert f"{prefix}.logprobs" in capsys.readouterr().err


def test_cache_of_another_run_is_refused(assets, built, tmp_path):
    cfg_path, out = built
    cache = TeacherCache(out)
    m = cache.manifest
    good = {
        "tokenizer_sha256": m["tokenizer_sha256"],
        "seq_len": 32,
        "seed": 0,
        "sep_token_id": m["sep_token_id"],
        "domains": {n: d["data_key"] for n, d in m["domains"].items()},
    }
    cache.check_run(good)
    with pytest.raises(TeacherCacheError, match="tokenizer_sha256: cache"):
        cache.check_run({**good, "tokenizer_sha256": "0" * 64})
    with pytest.raises(TeacherCacheError, match="seq_len: cache 32, run 64"):
        cache.check_run({**good, "seq_len": 64})
    with pytest.raises(TeacherCacheError, match="domain 'extra': not in the cache"):
        cache.check_run({**good, "domains": {**good["domains"], "extra": "x"}})
    with pytest.raises(TeacherCacheError, match="domain 'code': data changed"):
        cache.check_run({**good, "domains": {**good["domains"], "code": "x"}})
    # writing into it with another top-k: refused, exit 2
    assert cache_main(["--config", str(cfg_path), "--top-k", "4", "--out", str(out)]) == 2


def test_sequence_indices_follow_the_sampler_across_ranks(assets, built):
    from ddk_fast.data import DomainSampler, TokenShard

    _, out = built
    cfg = build_config(raw_cfg(assets, out.parent / "run"))
    shards = sorted((p for p in (assets[0] / "shards").glob("*/train")), key=str)
    shards = [TokenShard.open(p) for p in shards]
    for rank in range(2):
        s = DomainSampler(shards, [0.5, 0.2, 0.3], seq_len=cfg.data.seq_len, batch_size=3, sep_token_id=0,
                          rank=rank, world_size=2, backend="numpy")  # fmt: skip
        for _ in range(4):
            st = s.state_dict()
            d_idx, k_idx = batch_sequence_indices(
                st["weights"], st["window_counts"], st["seq_index"], 2, 3, rank
            )
            b = s.next_batch()
            assert (b["domain_ids"][:, 0] == d_idx).all()
        assert np.all(k_idx >= 0)


def _cached_cfg(assets, built, run_dir, **over):
    raw = raw_cfg(assets, run_dir, teacher_cache=str(built[1]))
    del raw["model"]["student_from_teacher_layers"]
    raw["model"]["student_config"] = llama_config(VOCAB + 16, layers=2)
    raw["checkpoint"] = {"every": 3, "keep_last": 2}
    raw["data"]["prefetch"] = 2
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_from_cache_never_runs_the_teacher_and_resumes_exactly(assets, built, tmp_path, monkeypatch):
    import ddk_fast.models.loading
    from ddk_fast.training.trainer import Trainer

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(ddk_fast.models.loading, "load_teacher", no_teacher)
    monkeypatch.setattr("ddk_fast.training.teacher.load_teacher", no_teacher)
    t = Trainer(_cached_cfg(assets, built, tmp_path / "full"))
    t.setup()
    result = t.fit()
    assert t.teacher.model is None and result.step == 6
    assert result.teacher_losses == TeacherCache(built[1]).teacher_ce("val", t.names)
    reference = _rows(tmp_path / "full")
    assert all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in reference)
    ref_params = {n: p.detach().clone() for n, p in t.student.named_parameters()}

    t1 = Trainer(_cached_cfg(assets, built, tmp_path / "cut"))
    t1.setup()
    t1.fit(stop_at=4)
    t2 = Trainer(_cached_cfg(assets, built, tmp_path / "cut"))
    t2.setup()
    assert t2.resume() and t2.step == 3
    t2.fit()
    resumed = _rows(tmp_path / "cut")
    for a, b in zip(reference[3:], resumed[3:]):
        assert a["batch_fingerprint"] == b["batch_fingerprint"] and a["weights"] == b["weights"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    for n, p in t2.student.named_parameters():
        assert torch.allclose(p, ref_params[n], rtol=1e-5, atol=1e-7), n


def test_curriculum_from_cache_ranks_by_the_cached_teacher_ce_and_tempers_the_sparse_loss(
    assets, built, tmp_path, monkeypatch
):
    from ddk_fast.models import objective
    from ddk_fast.training.trainer import Trainer

    temps = []
    real = objective.fused_linear_kd_loss_topk

    def spy(*args, **kw):
        temps.append(kw["temperature"])
        return real(*args, **kw)

    monkeypatch.setattr(objective, "fused_linear_kd_loss_topk", spy)
    stages = [{"steps": 3, "temperature": 2.0}, {"steps": 3}]
    t = Trainer(_cached_cfg(assets, built, tmp_path / "cur", curriculum__stages=stages))
    t.setup()
    t.fit()
    teacher = TeacherCache(built[1]).teacher_ce("val", t.names)
    order = sorted(range(3), key=lambda i: (teacher[i], i))
    assert [s.domains for s in t.schedule.curriculum.stages] == [order[:2], order[2:]]
    rows = _rows(tmp_path / "cur")
    assert [r["temperature"] for r in rows] == [2.0] * 3 + [1.0] * 3 and temps == [2.0] * 3 + [1.0] * 3
    assert all(r["domain_tokens"][order[2]] == 0 for r in rows[:3]) and rows[3]["domain_tokens"][order[2]] > 0


def test_training_refuses_a_cache_of_another_seq_len(assets, built, tmp_path, capsys):
    from ddk_fast.config import dump_toml
    from ddk_fast.train import main

    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(_cached_cfg(assets, built, tmp_path / "run")))
    assert main(["--config", str(cfg_path), "--set", "data.seq_len=16"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "seq_len: cache 32, run 16" in err


def test_domains_subset_then_the_rest_merge_into_one_manifest(assets, tmp_path):
    cfg_path = write_toml(tmp_path / "run.toml", raw_cfg(assets, tmp_path / "run"))
    out = tmp_path / "cache"
    args = ["--config", str(cfg_path), "--top-k", "4", "--out", str(out)]
    assert cache_main([*args, "--domains", "words"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert list(first["domains"]) == ["words"]
    assert cache_main([*args, "--domains", "nope"]) == 2
    assert cache_main(args) == 0
    m = TeacherCache(out).manifest
    assert set(m["domains"]) == {"arith", "words", "code"}
    assert m["domains"]["words"] == first["domains"]["words"]


def test_training_refuses_a_cache_built_with_another_tokenizer(assets, built, tmp_path, capsys):
    from ddk_fast.config import dump_toml
    from ddk_fast.train import main

    texts = [t for docs in domain_texts(seed=1).values() for t in docs]
    make_tokenizer(tmp_path / "tok2", texts, vocab_size=300)
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(_cached_cfg(assets, built, tmp_path / "run")))
    assert main(["--config", str(cfg_path), "--set", f"model.tokenizer={tmp_path / 'tok2'}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "tokenizer_sha256: cache" in err
