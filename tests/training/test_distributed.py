"""torchrun on CPU (gloo): DDP and FSDP2 give the single-process run's losses, DDK weights and batches, and
checkpoints resume under another world size.

Three launches share one set of tiny assets (tests/tiny.py): a plain process (the 1-rank references and a
1-rank checkpoint), ``torchrun --nproc_per_node 2`` (DDP, resumes of the 1-rank checkpoint, FSDP2 with full
and LoRA students) and a plain process again (resumes of the 2-rank checkpoints). Every process uses one
thread, so equal shapes give equal bits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from ddk_fast.config import build_config, dump_toml
from ddk_fast.data import DomainSampler, TokenShard
from ddk_fast.distributed import check_batch_divides
from ddk_fast.errors import ConfigError
from ddk_fast.training.checkpoint import read_manifest, verify_checkpoint

from ..tiny import VOCAB, domain_texts, llama_config, make_tokenizer, write_domains

REPO = Path(__file__).resolve().parents[2]
STEPS, CUT, K = 20, 10, 5  # the 20 steps; interrupted after 10; DDK interval


def _cfg(assets: Path, run_dir: Path, mode="qlora", parallel="auto", steps=STEPS, every=CUT, **train):
    return {
        "model": {
            "teacher_config": llama_config(VOCAB + 16),
            "student_from_teacher_layers": [0, 3],
            "tokenizer": str(assets / "tok"),
            "student_mode": mode,
            "lora_r": 4,
            "lora_dropout": 0.0,
        },
        "data": {
            "domains": [{"name": n, "files": [str(assets / "data" / f"{n}.jsonl")]} for n in domain_texts()],
            "seq_len": 32,
            "batch_size": 4,
            "val_sequences": 4,
            "cache_dir": str(assets / "cache"),
            "prefetch": 2,
        },
        "ddk": {"interval": K, "eval_batch_size": 2},
        "train": {
            "max_steps": steps,
            "lr": 5e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "parallel": parallel,
            "grad_accum": 2,
            **train,
        },
        "checkpoint": {"every": every, "keep_last": 2},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
    }


def _launch(tmp: Path, name: str, runs: list[dict], nproc: int) -> None:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs}))
    rc, out, err = _spawn(name, ["-m", "tests.training.distributed_worker", str(spec)], nproc)
    if rc != 0:
        raise AssertionError(f"{name} failed ({rc}):\n{out[-3000:]}\n{err[-6000:]}")


def _spawn(name: str, args: list[str], nproc: int, timeout: float = 240) -> tuple[int, str, str]:
    """``python ARGS`` (nproc 1) or ``torchrun --nproc_per_node NPROC ARGS``: (exit code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += ["--standalone", *args]  # standalone: a free port
    # a session of its own: on a timeout the whole tree (torchrun and its workers) is killed
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{name} timed out:\n{out[-3000:]}\n{err[-6000:]}") from None
    return proc.returncode, out, err


# A rank that exited while the sampler's prefetch thread was still inside the C++ core aborted
# ("terminate called without an active exception", SIGABRT; about one launch in ten here) until the
# sampler stopped its producer threads at exit (ddk_fast/data/sampler.py). Should it come back, a launch
# that dies that way is retried with a warning in the test summary, so the equality checks below still
# run; any other failure fails the test at once.
ABORT = "terminate called without an active exception"
RETRIES = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    for attempt in range(RETRIES + 1):
        try:
            return _build_runs(tmp_path_factory.mktemp("dist"))
        except AssertionError as exc:
            if ABORT not in str(exc) or attempt == RETRIES:
                raise
            warnings.warn(f"torchrun launch aborted ({ABORT!r}); rebuilding the runs", stacklevel=1)


def _spawn_retrying(name: str, args: list[str], nproc: int, **kw) -> tuple[int, str, str]:
    for attempt in range(RETRIES + 1):
        rc, out, err = _spawn(name, args, nproc, **kw)
        if rc == 0 or ABORT not in err or attempt == RETRIES:
            return rc, out, err
        warnings.warn(f"{name}: torchrun launch aborted ({ABORT!r}); launching again", stacklevel=1)


def _build_runs(tmp: Path) -> Path:
    assets = tmp / "assets"
    make_tokenizer(assets / "tok", [t for docs in domain_texts().values() for t in docs])
    write_domains(assets / "data")
    r = lambda name: str(tmp / name)  # noqa: E731
    c = lambda name, **kw: _cfg(assets, tmp / name, **kw)  # noqa: E731
    cache = _teacher_cache(c("cache_writer"), tmp / "teacher_cache")
    cached = lambda name: _with_cache(c(name, steps=4, every=2), cache)  # noqa: E731
    prompts = _prompts_file(c("prompt_search"), tmp / "prompts.json")
    prompted = lambda name, **kw: _with_prompts(c(name, steps=4, every=2, **kw), prompts)  # noqa: E731
    _launch(
        tmp,
        "single",
        [
            {"cfg": c("one"), "out": r("one")},
            {"cfg": c("full_one", mode="full", steps=4, every=2), "out": r("full_one")},
            {"cfg": c("lora_one", mode="lora", steps=4, every=2), "out": r("lora_one")},
            {"cfg": cached("cached_one"), "out": r("cached_one")},
            {"cfg": _hidden(c("hidden_one", mode="lora", steps=4, every=2)), "out": r("hidden_one")},
            {"cfg": c("plain_short", steps=4, every=2), "out": r("plain_short")},
            {"cfg": prompted("prompts_one"), "out": r("prompts_one")},
            {"cfg": _curriculum(c("curriculum_one", steps=6, every=6)), "out": r("curriculum_one")},
            {"cfg": _onpolicy(c("onpolicy_one", mode="lora", steps=4, every=2)), "out": r("onpolicy_one")},
        ],
        1,
    )
    _cut(tmp / "one", tmp / "one_to_two")
    qlora_sharded = c("fsdp_qlora", parallel="fsdp", steps=2, every=2)
    qlora_sharded["model"]["shard_teacher"] = True
    _launch(
        tmp,
        "torchrun",
        [
            {"cfg": c("two"), "out": r("two")},
            {"cfg": c("one_to_two"), "resume": True, "out": r("one_to_two")},
            {
                "cfg": c("fsdp_full", mode="full", parallel="fsdp", steps=4, every=2),
                "stop_at": 3,
                "out": r("fsdp_full"),
            },  # fmt: skip
            {"cfg": c("fsdp_lora", mode="lora", parallel="fsdp", steps=4, every=2), "out": r("fsdp_lora")},
            {"cfg": qlora_sharded, "out": r("fsdp_qlora")},
            {"cfg": cached("cached_two"), "out": r("cached_two")},
            {"cfg": _hidden(c("hidden_ddp", mode="lora", steps=4, every=2)), "out": r("hidden_ddp")},
            {
                "cfg": _hidden(c("hidden_fsdp", mode="lora", parallel="fsdp", steps=4, every=2)),
                "out": r("hidden_fsdp"),
            },
            {"cfg": prompted("prompts_ddp"), "out": r("prompts_ddp")},
            {"cfg": _curriculum(c("curriculum_ddp", steps=6, every=6)), "out": r("curriculum_ddp")},
            {
                "cfg": _shard_teacher(prompted("prompts_sharded", parallel="fsdp")),
                "out": r("prompts_sharded"),
            },
            {"cfg": _onpolicy(c("onpolicy_ddp", mode="lora", steps=4, every=2)), "out": r("onpolicy_ddp")},
            {
                "cfg": _onpolicy(c("onpolicy_fsdp", mode="lora", parallel="fsdp", steps=4, every=2)),
                "out": r("onpolicy_fsdp"),
            },
        ],
        2,
    )
    _cut(tmp / "two", tmp / "two_to_one")
    shutil.copytree(tmp / "fsdp_full", tmp / "fsdp_to_one")
    _cut(tmp / "fsdp_lora", tmp / "fsdp_lora_to_one", at=2)
    _cut(tmp / "onpolicy_ddp", tmp / "onpolicy_to_one", at=2)
    _launch(
        tmp,
        "single_resume",
        [
            {"cfg": c("two_to_one"), "resume": True, "out": r("two_to_one")},
            {"cfg": c("fsdp_to_one", mode="full", steps=4, every=2), "resume": True, "out": r("fsdp_to_one")},
            {
                "cfg": c("fsdp_lora_to_one", mode="lora", steps=4, every=2),
                "resume": True,
                "out": r("fsdp_lora_to_one"),
            },
            {
                "cfg": _onpolicy(c("onpolicy_to_one", mode="lora", steps=4, every=2)),
                "resume": True,
                "out": r("onpolicy_to_one"),
            },
        ],
        1,
    )
    return tmp


def _teacher_cache(raw: dict, out: Path) -> str:
    """The teacher's top-8 cache of the runs' data, written by this process."""
    from ddk_fast.config import build_config
    from ddk_fast.teacher_cache.writer import CacheOptions, build_cache

    build_cache(build_config(raw), out, CacheOptions(top_k=8))
    return str(out)


def _hidden(raw: dict) -> dict:
    """[hidden] on, with a student half as wide as the teacher (learned projections)."""
    model = {k: v for k, v in raw["model"].items() if k != "student_from_teacher_layers"}
    model["student_config"] = llama_config(VOCAB + 16, layers=2, hidden=32)
    return {**raw, "model": model, "hidden": {"weight": 1.0}}


def _curriculum(raw: dict) -> dict:
    """[curriculum]: two ranked stages of 3 steps (the first without the hardest domains)."""
    return {**raw, "curriculum": {"num_stages": 2, "order": "teacher_ce"}}


def _onpolicy(raw: dict) -> dict:
    """[onpolicy]: half of each step's sequences continued by the student (8-token prompts, 16 new tokens)."""
    onpolicy = {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 16}
    return {**raw, "onpolicy": onpolicy, "loss": {"divergence": "jsd"}}


def _prompts_file(raw: dict, out: Path) -> str:
    """A prompts.json for the runs' teacher (the CLI, then a prefix of another length forced per domain)."""
    from ddk_fast.prompts.__main__ import main as prompts_main

    raw = {**raw, "teacher_prompt": {"budget": 1, "dev_sequences": 2, "max_fewshot": 0}}
    cfg_path = out.with_suffix(".toml")
    cfg_path.write_text(dump_toml(build_config(raw)))
    assert prompts_main(["--config", str(cfg_path), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for i, entry in enumerate(data["domains"].values()):
        entry["prefix_ids"] = list(range(5, 5 + 3 + 4 * i))
    out.write_text(json.dumps(data))
    return str(out)


def _with_prompts(raw: dict, path: str) -> dict:
    return {**raw, "teacher_prompt": {"use": path}}


def _shard_teacher(raw: dict) -> dict:
    return {**raw, "model": {**raw["model"], "shard_teacher": True}}


def _with_cache(raw: dict, cache: str) -> dict:
    return {**raw, "model": {**raw["model"], "teacher_cache": cache}}


def _cut(src: Path, dst: Path, at: int = CUT) -> None:
    """A copy of a finished run without its checkpoints after step ``at``: an interruption after that step
    (resume takes the newest checkpoint that verifies, not what ``latest`` names)."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").glob("step_*"):
        if int(path.name.removeprefix("step_")) > at:
            shutil.rmtree(path)
    (dst / "checkpoints" / "latest").write_text(f"step_{at:08d}\n")


def _rows(run: Path) -> dict[int, dict]:
    return {
        (row := json.loads(line))["step"]: row for line in (run / "metrics.jsonl").read_text().splitlines()
    }


def _result(run: Path, rank: int = 0) -> dict:
    return json.loads(Path(f"{run}.rank{rank}.json").read_text())


def _same_steps(ref: dict, other: dict, steps, rel=1e-5) -> None:
    for s in steps:
        a, b = ref[s], other[s]
        assert a["batch_fingerprint"] == b["batch_fingerprint"], s  # the same global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), s
        assert b["domain_tokens"] == a["domain_tokens"], s


def test_two_ranks_match_one_rank(runs):
    one, two = _rows(runs / "one"), _rows(runs / "two")
    assert sorted(two) == list(range(1, STEPS + 1))
    _same_steps(one, two, range(1, STEPS + 1))
    h1 = _result(runs / "one")["weight_history"]
    h2 = [_result(runs / "two", r)["weight_history"] for r in (0, 1)]
    assert h2[0] == h2[1]  # bit-identical weights on every rank
    assert [h["step"] for h in h2[0]] == [h["step"] for h in h1] == list(range(0, STEPS, K))
    assert h2[0][0]["weights"] == h1[0]["weights"]  # r_0: the same validation sums to the last bit
    for a, b in zip(h1[1:], h2[0][1:]):  # later: students differ by float rounding of the gradient sum only
        np.testing.assert_allclose(b["weights"], a["weights"], rtol=1e-6)
    assert _result(runs / "two")["tokens_per_domain"] == _result(runs / "one")["tokens_per_domain"]
    assert (runs / "two" / "final" / "adapter_config.json").exists()


def test_two_ranks_train_from_a_teacher_cache_as_one_rank(runs):
    # each rank's sampler hook replays the global walk to find its rows' (domain, sequence index)
    one, two = _rows(runs / "cached_one"), _rows(runs / "cached_two")
    _same_steps(one, two, (1, 2, 3, 4))
    assert all(row["kd"] > 0 for row in two.values())
    h1, h2 = (_result(runs / name)["weight_history"] for name in ("cached_one", "cached_two"))
    assert h2[0]["weights"] == h1[0]["weights"]  # r_0 from the cache's teacher CE


def test_one_rank_checkpoint_resumes_on_two_ranks(runs):
    one, resumed = _rows(runs / "one"), _rows(runs / "one_to_two")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _same_steps(one, resumed, range(CUT + 1, STEPS + 1))


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    one, resumed = _rows(runs / "one"), _rows(runs / "two_to_one")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    _same_steps(one, resumed, range(CUT + 1, STEPS + 1))
    assert _result(runs / "two_to_one")["tokens_per_domain"] == _result(runs / "one")["tokens_per_domain"]


def test_fsdp_full_student_matches_and_its_sharded_checkpoint_resumes_in_one_process(runs):
    ref, fsdp = _rows(runs / "full_one"), _rows(runs / "fsdp_full")
    _same_steps(ref, fsdp, (1, 2, 3))
    ckpt = runs / "fsdp_full" / "checkpoints" / "step_00000002"
    assert (ckpt / "dcp").is_dir() and not (ckpt / "trainable.safetensors").exists()  # DCP, sharded
    assert verify_checkpoint(ckpt) is None  # its manifest lists every rank's shard and .metadata
    assert "dcp/.metadata" in read_manifest(ckpt)["files"]
    resumed = _rows(runs / "fsdp_to_one")
    _same_steps(ref, resumed, (3, 4))
    assert (runs / "fsdp_to_one" / "final" / "model.safetensors").exists()


def test_fsdp_lora_student_matches_and_exports_adapters(runs):
    _same_steps(_rows(runs / "lora_one"), _rows(runs / "fsdp_lora"), (1, 2, 3, 4))
    final = runs / "fsdp_lora" / "final"
    assert (final / "adapter_config.json").exists()
    from safetensors.torch import load_file

    one = load_file(str(runs / "lora_one" / "final" / "adapter_model.safetensors"))
    fsdp = load_file(str(final / "adapter_model.safetensors"))
    assert one.keys() == fsdp.keys() and len(one) > 0  # the gathered, unsharded adapters
    for k in one:
        np.testing.assert_allclose(fsdp[k].numpy(), one[k].numpy(), rtol=1e-4, atol=1e-6)


def test_fsdp_lora_sharded_checkpoint_resumes_in_one_process(runs):
    """A DCP checkpoint holds the adapters only; loading it must not ask for the frozen base weights."""
    ref, resumed = _rows(runs / "lora_one"), _rows(runs / "fsdp_lora_to_one")
    assert sorted(resumed) == [1, 2, 3, 4]
    _same_steps(ref, resumed, (3, 4))


def test_fsdp_qlora_student_with_a_sharded_teacher_matches(runs):
    one, fsdp = _rows(runs / "one"), _rows(runs / "fsdp_qlora")
    _same_steps(one, fsdp, (1,))  # step 1: the same learning rate (warm-up) as the longer reference
    assert (runs / "fsdp_qlora" / "final" / "adapter_config.json").exists()


def test_hidden_state_loss_under_ddp_and_fsdp_matches_one_rank(runs):
    one = _rows(runs / "hidden_one")
    for name in ("hidden_ddp", "hidden_fsdp"):
        other = _rows(runs / name)
        _same_steps(one, other, (1, 2, 3, 4))
        for s in (1, 2, 3, 4):
            assert other[s]["hidden"] == pytest.approx(one[s]["hidden"], rel=1e-5), (name, s)
    assert one[4]["hidden"] < one[1]["hidden"]


def test_teacher_prompts_under_ddp_and_a_sharded_teacher_match_one_rank(runs):
    """[teacher_prompt]: the prefixed teacher gives the one-rank losses and teacher val CE under DDP and with
    an FSDP-sharded teacher (the prefix keys/values are computed before sharding)."""
    one = _rows(runs / "prompts_one")
    t_one = [x for h in _result(runs / "prompts_one")["weight_history"] for x in h["teacher_loss"]]
    t_plain = [x for h in _result(runs / "plain_short")["weight_history"] for x in h["teacher_loss"]]
    assert len(t_one) == len(t_plain) > 0 and all(
        abs(a - b) > 1e-6 for a, b in zip(t_one, t_plain)
    )  # the prefixes change the teacher
    for name in ("prompts_ddp", "prompts_sharded"):
        other = _rows(runs / name)
        _same_steps(one, other, (1, 2, 3, 4))
        for s in (1, 2, 3, 4):
            assert other[s]["kd"] == pytest.approx(one[s]["kd"], rel=1e-5), (name, s)
        t_other = [x for h in _result(runs / name)["weight_history"] for x in h["teacher_loss"]]
        assert t_other == pytest.approx(t_one, rel=1e-6), name


def test_ranks_take_disjoint_slices_of_the_world_invariant_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    shards = [
        TokenShard.write(
            tmp_path / f"d{d}", [rng.integers(0, 500, size=n) for n in rng.integers(5, 60, 30)], 500
        )
        for d in range(3)
    ]
    B = 12
    kw = dict(seq_len=16, sep_token_id=501, seed=1, backend="numpy")
    ref = DomainSampler(shards, [0.5, 0.3, 0.2], batch_size=B, **kw)
    for world in (2, 3, 4):
        ranks = [
            DomainSampler(shards, [0.5, 0.3, 0.2], batch_size=B // world, rank=r, world_size=world, **kw)
            for r in range(world)
        ]
        for _ in range(3):
            want = ref.next_batch()["input_ids"] if world == 2 else None
            parts = [s.next_batch()["input_ids"] for s in ranks]
            rows = [tuple(x) for p in parts for x in p]
            assert len(set(rows)) == len(rows)  # disjoint
            if want is not None:
                np.testing.assert_array_equal(np.concatenate(parts), want)  # union (in order) = 1-rank batch
        # resume under another world size: the state is global
        state = ranks[0].state_dict()
        other = DomainSampler(shards, [0.5, 0.3, 0.2], batch_size=B, **kw)
        other.load_state_dict(state)
        nxt = np.concatenate([s.next_batch()["input_ids"] for s in ranks])
        np.testing.assert_array_equal(other.next_batch()["input_ids"], nxt)


def test_a_world_size_that_does_not_divide_the_batch_is_a_config_error(monkeypatch, tmp_path, capsys):
    assert check_batch_divides(8, 4) == 2
    with pytest.raises(
        ConfigError, match=r"\[data\] batch_size: expected a multiple of the world size 3.*got 8"
    ):
        check_batch_divides(8, 3)
    from ddk_fast.train import main

    make_tokenizer(tmp_path / "tok", [t for docs in domain_texts().values() for t in docs])
    write_domains(tmp_path / "data")
    cfg = tmp_path / "run.toml"
    cfg.write_text(dump_toml(build_config(_cfg(tmp_path, tmp_path / "run"))))
    monkeypatch.setenv("RANK", "0")  # what torchrun --nproc_per_node 3 sets; refused before any process group
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[data] batch_size: expected a multiple of the world size 3" in err and "got 4" in err


def test_train_cli_under_torchrun_preflight_on_rank_0_and_resume(runs):
    """``torchrun -m ddk_fast.train``: rank 0 alone runs the pre-flight and locks the folder; its error
    stops every rank with exit 2 (no rank waits for it); --resume loads the checkpoint rank 0 chose."""
    assets = runs / "assets"
    run_dir = runs / "cli"
    _cut(runs / "one", run_dir)
    config = runs / "cli.toml"
    config.write_text(dump_toml(build_config(_cfg(assets, run_dir, steps=CUT + 2))))
    args = ["-m", "ddk_fast.train", "--config", str(config)]
    rc, out, err = _spawn_retrying(
        "cli-fresh", args, 2, timeout=120
    )  # a fresh run into a checkpointed folder
    assert rc != 0 and "error: " in err and "[rank 1] error: " in err, err[-3000:]
    assert err.count(" already holds 1 checkpoint(s)") == 2, err[-3000:]  # one line from each rank
    rc, out, err = _spawn_retrying("cli-resume", [*args, "--resume"], 2)
    assert rc == 0, err[-6000:]
    rows = _rows(run_dir)
    assert sorted(rows) == list(range(1, CUT + 3))  # rows 11.. of the cut run dropped, then written again
    one = _rows(runs / "one")
    assert rows[CUT + 1]["batch_fingerprint"] == one[CUT + 1]["batch_fingerprint"]  # resumed at step CUT
    assert (run_dir / "report.md").exists() and (run_dir / "final" / "adapter_config.json").exists()


def test_an_error_on_rank_0_is_rebuilt_with_its_type_and_message_for_the_other_ranks():
    from ddk_fast.distributed import ParallelContext, _rebuild
    from ddk_fast.errors import CheckpointWriteError, RunError

    e = _rebuild(ConfigError, "[data] batch_size: expected a multiple of 3, got 4")
    assert isinstance(e, ConfigError) and str(e) == "[data] batch_size: expected a multiple of 3, got 4"
    e = _rebuild(CheckpointWriteError, "disk full while writing checkpoint step_00000002")
    assert isinstance(e, RunError) and isinstance(e, OSError) and str(e).startswith("disk full")
    assert ParallelContext().main_only(lambda: 5) == 5  # one process: just the call


def test_curriculum_under_ddp_matches_one_rank(runs):
    """[curriculum]: every rank derives the same stage and weights (from the step and the all-reduced
    validation sums): the stage switches, zero weights and global batches are the one-rank run's."""
    one, two = _rows(runs / "curriculum_one"), _rows(runs / "curriculum_ddp")
    _same_steps(one, two, range(1, 7))
    assert (
        [one[s]["stage"] for s in range(1, 7)] == [two[s]["stage"] for s in range(1, 7)] == [1] * 3 + [2] * 3
    )
    h1 = _result(runs / "curriculum_one")["weight_history"]
    h2 = [_result(runs / "curriculum_ddp", r)["weight_history"] for r in (0, 1)]
    assert h2[0] == h2[1]  # bit-identical on every rank
    assert [h["step"] for h in h1] == [h["step"] for h in h2[0]] == [0, 3, 5]  # stage start, then K
    inactive = [i for i, w in enumerate(h1[0]["weights"]) if w == 0.0]
    assert inactive and [i for i, w in enumerate(h2[0][0]["weights"]) if w == 0.0] == inactive
    assert all(one[s]["domain_tokens"][i] == 0 for s in (1, 2, 3) for i in inactive)
    for a, b in zip(h1, h2[0]):
        np.testing.assert_allclose(b["weights"], a["weights"], rtol=1e-6)


def test_onpolicy_under_ddp_and_fsdp_matches_one_rank_and_resumes_on_one_rank(runs):
    """[onpolicy]: each rank generates its own rows of the world-invariant global batch (under FSDP through
    the sharded student, the same number of generate calls on every rank); the generated tokens are keyed by
    (seed, step, sequence), so the batches (whose fingerprints include the generated tokens), the losses and
    the generated-token KD are the one-rank run's; a 2-rank checkpoint resumes on one rank."""
    one = _rows(runs / "onpolicy_one")
    for name in ("onpolicy_ddp", "onpolicy_fsdp"):
        other = _rows(runs / name)
        _same_steps(one, other, (1, 2, 3, 4))
        for s in (1, 2, 3, 4):
            assert other[s]["domain_onpolicy_tokens"] == one[s]["domain_onpolicy_tokens"], (name, s)
            assert sum(other[s]["domain_onpolicy_tokens"]) == 2 * 2 * 16  # half of 2 x 4 sequences, 16 tokens
            assert other[s]["onpolicy_kd"] == pytest.approx(one[s]["onpolicy_kd"], rel=1e-5), (name, s)
    resumed = _rows(runs / "onpolicy_to_one")
    assert sorted(resumed) == [1, 2, 3, 4]
    _same_steps(one, resumed, (3, 4))
