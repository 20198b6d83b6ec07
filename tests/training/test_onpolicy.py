"""On-policy distillation in the loop (``[onpolicy]``, ddk_fast/training/onpolicy.py): which rows are
generated, the generated-tokens-only mask, the loss against TRL's ``GKDTrainer.generalized_jsd_loss``,
fraction 0 = the off-policy run, exact resume, the teacher-cache refusal and the on-policy measure. The
2-rank runs are in test_distributed.py."""

from __future__ import annotations

import json
from math import ceil, floor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddk_fast.config import LossConfig, build_config, dump_toml
from ddk_fast.distributed import ParallelContext
from ddk_fast.errors import ConfigError
from ddk_fast.models.generation import SampleSpec, content_keys, sample_continuations
from ddk_fast.models.loading import final_hidden, model_from_config
from ddk_fast.models.objective import DistillObjective, TeacherHead, TeacherSignal
from ddk_fast.train import main
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.onpolicy import OnPolicy, continuation_teacher_ce
from ddk_fast.training.teacher import OnlineTeacher, Teacher
from ddk_fast.training.trainer import Trainer

from ..tiny import llama_config, make_cfg

V = 48  # the loss tests' vocabulary (student and teacher share it)


def _cfg(**onpolicy):
    raw = {
        "model": {
            "teacher_config": llama_config(V),
            "student_config": llama_config(V, 2, 32),
            "tokenizer": "t",
        },
        "data": {
            "domains": [{"name": "a", "files": ["a.jsonl"]}, {"name": "b", "files": ["b.jsonl"]}],
            "seq_len": onpolicy.pop("seq_len", 12),
            "batch_size": onpolicy.pop("batch", 4),
        },
        "train": {"grad_accum": onpolicy.pop("accum", 1)},
        "onpolicy": {"fraction": 1.0, "prompt_tokens": 4, "max_new_tokens": 6, **onpolicy},
    }
    return build_config(raw, check_paths=False)


def _onpolicy(cfg, world=1, rank=0, mode="none") -> OnPolicy:
    ctx = ParallelContext(rank=rank, world_size=world, mode=mode)
    return OnPolicy(cfg, ctx, OnlineTeacher(cfg), pad_token_id=1, names=["a", "b"])


# ------------------------------------------------------------------------------------------------ which rows
@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0, 0.07])
def test_the_generated_share_is_exact_per_step_and_the_same_on_any_world_size(fraction):
    cfg = _cfg(fraction=fraction, batch=8, accum=3)
    S = 8 * 3
    one = _onpolicy(cfg)
    total = 0
    for step in range(40):
        idx = [i for rows in one.plan(step) for _, i in rows]
        assert floor(fraction * S) <= len(idx) <= ceil(fraction * S)
        total += len(idx)
        for world in (2, 4, 8):
            ranks = [_onpolicy(cfg, world, r, "ddp").plan(step) for r in range(world)]
            union = sorted(i for p in ranks for rows in p for _, i in rows)
            assert union == sorted(idx)  # the same sequences of the global batch, whatever the world size
            for r, p in enumerate(ranks):  # each rank's rows are its own slice of every micro-batch
                for m, rows in enumerate(p):
                    assert all(i == m * 8 + r * (8 // world) + b for b, i in rows)
    assert total == floor(fraction * 40 * S)  # the long-run share is exactly the fraction


# ------------------------------------------------------------------------------------------------ the mask
class _Echo(nn.Module):
    """A stand-in student for ``prepare``: its "generation" of a row is 100 + (key mod 50) + position."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, prompts, labels, sample: SampleSpec, sample_keys):
        self.calls.append(prompts.shape[0])
        return 100 + (sample_keys[:, None] % 50) + torch.arange(sample.max_new_tokens)


def _micro(rows=4, seq_len=12, accum=1):
    out = []
    for m in range(accum):
        ids = np.arange(rows * seq_len, dtype=np.int64).reshape(rows, seq_len) + 1000 * m
        out.append(
            {
                "input_ids": ids.copy(),
                "labels": ids + 1,
                "domain_ids": np.repeat(np.arange(rows) % 2, seq_len).reshape(rows, seq_len),
            }
        )
    return out


def test_prepare_writes_prompt_generation_padding_and_labels_on_generated_tokens_only():
    P, N = 4, 6
    op = _onpolicy(_cfg(fraction=0.5, accum=2, generate_batch_size=3))
    micro, echo = _micro(accum=2), _Echo()
    before = [{k: v.copy() for k, v in b.items()} for b in micro]
    op.prepare(step=5, micro=micro, objective=echo)
    assert echo.calls == [3, 1]  # 4 generated rows of the step in chunks of generate_batch_size
    plan = op.plan(5)
    for m, (batch, orig) in enumerate(zip(micro, before)):
        gen_rows = [b for b, _ in plan[m]]
        assert batch["kd_only_rows"] == tuple(gen_rows) and len(gen_rows) == 2
        for b in range(4):
            ids, lab = batch["input_ids"][b], batch["labels"][b]
            if b not in gen_rows:  # off-policy rows untouched: CE + KD on every token as before
                assert np.array_equal(ids, orig["input_ids"][b]) and np.array_equal(lab, orig["labels"][b])
                continue
            gen = ids[P : P + N]
            assert np.array_equal(ids[:P], orig["input_ids"][b, :P])  # the row's own prompt
            assert np.all(gen >= 100) and np.array_equal(np.diff(gen), np.ones(N - 1))
            assert np.all(ids[P + N :] == 1)  # padding (the pad id), never labelled
            assert np.array_equal(lab[P - 1 : P + N - 1], gen)  # position i predicts token i + 1
            assert np.all(lab[: P - 1] == -100) and np.all(lab[P + N - 1 :] == -100)
    want = np.zeros(2, dtype=np.int64)  # per domain of the generated rows (rows alternate domains a, b)
    for rows in plan:
        for b, _ in rows:
            want[b % 2] += N
    assert op.generated.tolist() == want.tolist() and want.sum() == 4 * N


def test_under_fsdp_every_rank_makes_the_same_number_of_generate_calls():
    """FSDP: each decoding step gathers the sharded layers (a collective), so a rank with fewer generated rows
    makes discarded calls to match the others."""
    cfg = _cfg(fraction=0.3, batch=4, accum=1, generate_batch_size=1)
    calls = []
    for rank in (0, 1):
        op = _onpolicy(cfg, world=2, rank=rank, mode="fsdp")
        counts = [sum(len(r) for r in op.plan(step)) for step in range(6)]
        echo = _Echo()
        for step in range(6):
            op.prepare(step, _micro(rows=2), echo)
        calls.append(len(echo.calls))
        assert sum(op.generated) == sum(counts) * 6  # only the real rows are kept
    assert calls[0] == calls[1]


# ------------------------------------------------------------------------------------------------ the loss
@pytest.fixture(scope="module")
def models():
    teacher = model_from_config(llama_config(V, 3, 48), "model.teacher_config", torch.float32, 1)
    student = model_from_config(llama_config(V, 2, 32), "model.student_config", torch.float32, 2)
    return student, teacher.eval().requires_grad_(False)


def _generated_batch(student, P=5, N=7, L=14, rows=3, seed=0):
    """Rows laid out as ``prepare`` lays them out, from a real generation of the student."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, V, (rows, P), generator=g)
    gen = sample_continuations(student, prompts, torch.arange(rows) + 17, SampleSpec(N))
    ids = torch.cat([prompts, gen, torch.ones(rows, L - P - N, dtype=torch.long)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, P - 1 : P + N - 1] = gen
    return ids, labels, P, N


def _objective(student, **loss):
    return DistillObjective(
        student, LossConfig(**loss), num_domains=2, vocab_size=V, backend="torch", autocast=None
    )


def _signal(teacher, ids):
    return TeacherSignal(hidden=final_hidden(teacher, ids), head=TeacherHead.of(teacher))


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 1.0), (0.3, 2.0), (1.0, 1.0)])
def test_generated_rows_loss_and_gradient_equal_trls_generalized_jsd(models, beta, temperature):
    """The anchor: for one fixed batch of generated sequences, [loss] jsd (TRL's beta), kd_weight 1, no T²
    scaling equals GKDTrainer.generalized_jsd_loss on the logits with TRL's labels (the prompt masked,
    shifted by one), loss and student gradients within 1e-5. ce_weight 1 in [loss]: generated tokens take no
    CE anyway."""
    pytest.importorskip("trl")
    from ddk_fast.integrations.trl import GKDTrainer

    student, teacher = models
    ids, labels, P, N = _generated_batch(student)
    doms = torch.zeros_like(ids).reshape(-1)
    params = [p for p in student.parameters() if p.requires_grad]
    objective = _objective(
        student, divergence="jsd", beta=beta, temperature=temperature, kd_weight=1.0, ce_weight=1.0,
        scale_by_t2=False,
    )  # fmt: skip
    ours = objective(ids, labels, doms, teacher=_signal(teacher, ids), kd_only_rows=(0, 1, 2)).loss
    g_ours = torch.autograd.grad(ours, params)

    trl_labels = ids.clone()  # TRL's generate_on_policy_outputs: the prompt (and here the padding) masked
    trl_labels[:, :P] = -100
    trl_labels[:, P + N :] = -100
    s_logits = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    theirs = GKDTrainer.generalized_jsd_loss(
        s_logits, t_logits, labels=trl_labels[:, 1:], beta=beta, temperature=temperature
    )
    g_theirs = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert objective.last_onpolicy[1].sum() == 3 * N  # the KD-only rows' counted tokens: the generated ones


def test_a_mixed_batch_is_ce_plus_kd_on_data_rows_and_kd_only_on_generated_rows(models):
    """Rows 0, 2 data (CE + kd_weight T² KD), rows 1, 3 generated (kd_weight T² KD only), divided by every
    counted token of the batch: the global mean the trainer's normalisation expects."""
    pytest.importorskip("trl")
    from ddk_fast.integrations.trl import GKDTrainer

    student, teacher = models
    ids, labels, P, N = _generated_batch(student, rows=4)
    data = torch.randint(3, V, (4, ids.shape[1] + 1), generator=torch.Generator().manual_seed(3))
    for r in (0, 2):
        ids[r], labels[r] = data[r, :-1], data[r, 1:]
    doms = torch.tensor([0, 1, 1, 0])[:, None].expand_as(ids).reshape(-1)
    kw, T, beta = 0.4, 2.0, 0.5
    objective = _objective(student, divergence="jsd", beta=beta, temperature=T, kd_weight=kw, ce_weight=0.7)
    out = objective(ids, labels, doms, teacher=_signal(teacher, ids), kd_only_rows=(1, 3))

    s_logits = student(input_ids=ids).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    jsd = lambda rows: GKDTrainer.generalized_jsd_loss(  # noqa: E731
        s_logits[rows], t_logits[rows], labels=labels[rows], beta=beta, temperature=T, reduction="sum"
    )
    ce = F.cross_entropy(s_logits[[0, 2]].reshape(-1, V), labels[[0, 2]].reshape(-1), reduction="sum")
    count = (labels != -100).sum()
    want = (0.7 * ce + kw * T**2 * (jsd([0, 2]) + jsd([1, 3]))) / count
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    # per-domain sums: the data rows' in the output, the generated rows' in last_onpolicy
    assert out.domain_tokens.tolist() == [ids.shape[1], ids.shape[1]]
    assert objective.last_onpolicy[1].tolist() == [N, N]
    g = torch.autograd.grad(out.loss, [p for p in student.parameters() if p.requires_grad])
    g_want = torch.autograd.grad(want, [p for p in student.parameters() if p.requires_grad])
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the loop
def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _op(assets, run_dir, fraction=0.5, **over):
    return make_cfg(
        assets, run_dir, onpolicy__fraction=fraction, onpolicy__prompt_tokens=8, onpolicy__max_new_tokens=16,
        loss__divergence="jsd", model__student_mode="lora", **over,
    )  # fmt: skip


def _spy(forward, seen: list):
    def call(*a, **k):
        seen.append(k)
        return forward(*a, **k)

    return call


def test_fraction_zero_is_the_off_policy_run(assets, tmp_path, monkeypatch):
    """fraction 0: no generation, the objective called as without the section, no new metrics or checkpoint
    keys, and the run equals one whose config has no [onpolicy] section at all (the README's bit-identity
    against the code before the section is measured in the issue report)."""
    import ddk_fast.models.objective as objective_mod

    def refuse(*a, **k):
        raise AssertionError("generate called with fraction 0")

    monkeypatch.setattr(objective_mod, "sample_continuations", refuse)
    runs = {}
    for name, over in (("zero", {"onpolicy__fraction": 0.0}), ("plain", {})):
        cfg = make_cfg(assets, tmp_path / name, model__student_mode="lora", train__max_steps=3, **over)
        t = Trainer(cfg)
        t.setup()
        seen = []
        monkeypatch.setattr(t.models.model, "forward", _spy(t.models.model.forward, seen))
        t.fit()
        assert all("kd_only_rows" not in k for k in seen) and seen
        runs[name] = (_rows(tmp_path / name), t)
    zero, plain = runs["zero"][0], runs["plain"][0]
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    assert [strip(r) for r in zero] == [strip(r) for r in plain]
    assert not any(k.startswith(("gen_", "onpolicy", "domain_onpolicy")) for r in zero for k in r)
    state = ckpt.load_checkpoint(
        ckpt.latest_checkpoint(tmp_path / "zero" / "checkpoints"), runs["zero"][1].student
    )
    assert "onpolicy" not in state


def test_an_onpolicy_run_logs_reports_and_resumes_bit_identically(assets, tmp_path):
    from ddk_fast.training.report import write_report

    full = Trainer(_op(assets, tmp_path / "full"))
    full.setup()
    result = full.fit()
    reference = _rows(tmp_path / "full")
    for r in reference:  # half the rows generated: 2 per step, of the domains DDK's sampler drew
        assert sum(r["domain_onpolicy_tokens"]) == 2 * 16 and r["onpolicy_kd"] > 0 and r["kd"] > 0
        assert 0 < r["gen_time_share"] <= 1 and r["gen_tokens_per_s"] > 0
    assert sum(result.onpolicy["generated_per_domain"]) == 6 * 2 * 16
    assert len(result.onpolicy["test_continuation_teacher_ce"]) == 3
    report = write_report(result, full.names).read_text()
    assert "## On-policy distillation" in report and "| arith | " in report

    t1 = Trainer(_op(assets, tmp_path / "cut"))
    t1.setup()
    t1.fit(stop_at=4)  # "crash" after step 4: the checkpoint of step 3 is the latest
    t2 = Trainer(_op(assets, tmp_path / "cut"))
    t2.setup()
    assert t2.resume() and t2.step == 3
    resumed_result = t2.fit()
    resumed = _rows(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    strip = lambda r: {
        k: v for k, v in r.items() if k not in ("tokens_per_s", "gen_tokens_per_s", "gen_time_share")
    }  # noqa: E731
    assert [strip(r) for r in resumed] == [
        strip(r) for r in reference
    ]  # the same generated tokens: bit for bit
    for (n, p), q in zip(t2.student.named_parameters(), full.student.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n
    assert resumed_result.onpolicy["generated_per_domain"] == result.onpolicy["generated_per_domain"]
    assert (
        resumed_result.onpolicy["test_continuation_teacher_ce"]
        == result.onpolicy["test_continuation_teacher_ce"]
    )


def test_a_teacher_cache_is_refused_before_any_model_loads(assets, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"\[onpolicy\] fraction: expected 0 with \[model\] teacher_cache.*cannot score"
    ):
        make_cfg(assets, tmp_path / "r", onpolicy__fraction=0.5, model__teacher_cache=str(tmp_path))
    raw = make_cfg(assets, tmp_path / "r")
    path = tmp_path / "run.toml"
    path.write_text(
        dump_toml(raw).replace('teacher_cache = ""', f'teacher_cache = "{tmp_path / "no_cache"}"')
    )
    assert main(["--config", str(path), "--set", "onpolicy.fraction=0.5"]) == 2
    err = capsys.readouterr().err
    assert "[onpolicy] fraction: expected 0 with [model] teacher_cache" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran

    class CacheLike(Teacher):  # any teacher that cannot score new tokens (Teacher.can_score_new_tokens)
        kind = "a cache"

    cfg = _cfg(fraction=0.5)
    with pytest.raises(ConfigError, match=r"fraction: expected 0 with this teacher \(a cache\)"):
        OnPolicy(cfg, ParallelContext(), CacheLike(cfg), 1, ["a", "b"])


@pytest.mark.parametrize(
    "over,match",
    [
        (
            {"max_new_tokens": 9},
            r"\[onpolicy\] max_new_tokens: expected at most data.seq_len - prompt_tokens = 8",
        ),
        ({"prompt_tokens": 12}, r"\[onpolicy\] prompt_tokens: expected less than data.seq_len \(12\)"),
        ({"top_p": 0.0}, r"\[onpolicy\] top_p: expected a number in \(0, 1\]"),
        ({"fraction": 1.5}, r"\[onpolicy\] fraction: expected a number in \[0, 1\]"),
    ],
)
def test_bad_onpolicy_keys_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**over)
    with pytest.raises(ConfigError, match=r"\[loss\] kd_weight: expected a number > 0 with \[onpolicy\]"):
        build_config({**_cfg().to_dict(), "loss": {"kd_weight": 0.0}}, check_paths=False)


def test_the_onpolicy_measure_is_the_teachers_ce_on_the_students_continuations(assets, tmp_path):
    t = Trainer(_op(assets, tmp_path / "m", fraction=0.0, train__max_steps=1))
    t.setup()
    sets = [{k: v[:3] for k, v in s.items()} for s in t.test_sets]
    got = continuation_teacher_ce(t.models, t.teacher, sets, t.cfg)
    assert got == continuation_teacher_ce(
        t.models, t.teacher, sets, t.cfg
    )  # keyed by the prompts: repeatable
    P, N = 8, 16
    own = continuation_teacher_ce(t.models, t.teacher, sets, t.cfg, writer="teacher")
    for d, s in enumerate(sets):  # by hand: generate, then the teacher's mean CE on the generated tokens
        prompts = torch.as_tensor(s["input_ids"][:, :P])
        for value, writer in ((got[d], t.student), (own[d], t.teacher.model)):
            gen = sample_continuations(writer, prompts, content_keys(prompts, 0), SampleSpec(N))
            seq = torch.cat([prompts, gen], 1)
            with torch.no_grad():
                logits = t.teacher.model(input_ids=seq).logits[:, P - 1 : -1, : t.teacher.vocab_size]
            want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gen.reshape(-1)).item()
            assert value == pytest.approx(want, rel=1e-5)
    assert own != got
