"""The hidden-state teacher cache: a float32 cache reproduces the online run's per-step losses, a bfloat16 one
stays close; the teacher is never loaded; the head and the kind come from the manifest; a cache cannot score
new tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk_fast.config import dump_toml
from ddk_fast.teacher_cache import open_cache
from ddk_fast.teacher_cache.__main__ import main as cache_main
from ddk_fast.teacher_cache.store import TeacherCacheError
from ddk_fast.train import run
from ddk_fast.training.trainer import Trainer

from ..tiny import make_cfg


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def online(assets, tmp_path_factory):
    """The online reference run (its config is what the caches are written from)."""
    tmp = tmp_path_factory.mktemp("online")
    cfg = make_cfg(assets, tmp / "run", train__max_steps=6)
    assert run(cfg) == 0
    path = tmp / "run.toml"
    path.write_text(dump_toml(cfg))
    return path, _rows(tmp / "run")


def _cache(online, tmp, dtype):
    out = tmp / f"hidden_{dtype}"
    args = ["--config", str(online[0]), "--kind", "hidden", "--dtype", dtype, "--out", str(out)]
    assert cache_main(args) == 0
    return out


def _cached_run(assets, cache, run_dir, monkeypatch):
    import ddk_fast.training.teacher as teacher_mod

    real = teacher_mod.load_teacher
    loads = []

    def counted(*a, **k):  # the teacher is loaded once, only to cut the student from its layers
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(teacher_mod, "load_teacher", counted)
    t = Trainer(make_cfg(assets, run_dir, train__max_steps=6, model__teacher_cache=str(cache)))
    t.setup()
    result = t.fit()
    assert t.teacher.model is None and len(loads) <= 1
    return t, result, _rows(run_dir)


def test_float32_hidden_cache_reproduces_the_online_losses(assets, online, tmp_path, monkeypatch):
    cache = _cache(online, tmp_path, "float32")
    store = open_cache(cache)
    m = store.manifest
    assert store.kind == "hidden" and m["hidden_dtype"] == "float32" and m["hidden_size"] == 64
    assert m["head"]["vocab_rows"] == 320 + 16 and m["head"]["softcap"] == 0.0
    t, result, rows = _cached_run(assets, cache, tmp_path / "run", monkeypatch)
    ref = online[1]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(ref, rows):
        assert a["batch_fingerprint"] == b["batch_fingerprint"] and a["weights"] == b["weights"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-5, abs=1e-7)
    # the teacher's val CE: the writer's (the online teacher's, measured the same way)
    assert result.teacher_losses == store.teacher_ce("val", t.names)


def test_bfloat16_hidden_cache_stays_close(assets, online, tmp_path, monkeypatch):
    cache = _cache(online, tmp_path, "bfloat16")
    assert (cache / "arith").is_dir()
    _, _, rows = _cached_run(assets, cache, tmp_path / "run", monkeypatch)
    rel = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(online[1], rows)]
    kd = [abs(b["kd"] - a["kd"]) / a["kd"] for a, b in zip(online[1], rows)]
    assert max(rel) < 1e-2 and max(kd) < 5e-2, (rel, kd)
    assert max(rel) > 0  # rounded targets: not the online run to the bit


def test_half_the_bytes_in_bfloat16_and_the_head_is_checksummed(online, tmp_path):
    f32, b16 = _cache(online, tmp_path, "float32"), _cache(online, tmp_path, "bfloat16")
    size = lambda root: sum(p.stat().st_size for p in root.glob("*/*.hidden"))  # noqa: E731
    assert size(f32) == 2 * size(b16)
    head = b16 / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="head.safetensors: missing or checksum mismatch"):
        open_cache(b16)


def test_a_cache_cannot_score_new_tokens(assets, online, tmp_path):
    cache = _cache(online, tmp_path, "bfloat16")
    t = Trainer(make_cfg(assets, tmp_path / "run", train__max_steps=6, model__teacher_cache=str(cache)))
    t.setup()
    assert not t.teacher.can_score_new_tokens
    with pytest.raises(TeacherCacheError, match="cannot score new tokens"):
        t.teacher.score(torch.zeros(1, 4, dtype=torch.long))


def test_hidden_rows_are_the_online_teachers_final_hidden_states(assets, online, tmp_path):
    from ddk_fast.teacher_cache import batch_sequence_indices

    cache = _cache(online, tmp_path, "float32")
    t = Trainer(make_cfg(assets, tmp_path / "online", train__max_steps=6))
    t.setup()  # the online teacher, on the same data
    store = open_cache(cache)
    s = t.sampler.state_dict()
    doms, idx = batch_sequence_indices(s["weights"], s["window_counts"], s["seq_index"], 1, 4, 0)
    batch = t.sampler.next_batch()
    rows = store.rows(t.names, doms, idx)["hidden"]
    ids = torch.as_tensor(batch["input_ids"])
    online_h = t.teacher.signal(ids, batch).hidden
    np.testing.assert_allclose(rows, online_h.numpy(), rtol=1e-5, atol=1e-6)


def test_a_hidden_cache_takes_every_divergence_a_topk_cache_refuses_them(assets, online, tmp_path):
    from ddk_fast.errors import ConfigError

    hidden = _cache(online, tmp_path, "bfloat16")
    t = Trainer(make_cfg(assets, tmp_path / "h", train__max_steps=2, model__teacher_cache=str(hidden),
                         loss__divergence="jsd"))  # fmt: skip
    t.setup()
    assert t.fit().step == 2
    topk = tmp_path / "topk"
    assert cache_main(["--config", str(online[0]), "--top-k", "4", "--out", str(topk)]) == 0
    cfg = make_cfg(assets, tmp_path / "k", train__max_steps=2, model__teacher_cache=str(topk),
                   loss__divergence="jsd")  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[loss\] divergence: expected forward_kl or total_variation"):
        Trainer(cfg).setup()
