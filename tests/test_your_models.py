"""examples/your_models.toml (README "Your own models and data") run as a user runs it, on tiny random
stand-ins laid out the same way: both models are Hub ids served from a Hugging Face cache in a temporary
HF_HOME (``hub/models--Qwen--Qwen2.5-7B-Instruct/{blobs,snapshots/<commit>,refs/main}``) with
HF_HUB_OFFLINE=1, three domains (chat, prompt/completion, paragraphs of text) found by globs. Then the
README's commands (in this process, with the same cache): resume with a longer schedule, evaluate, export
merged, and load the merged model in a fresh process with neither peft nor ddk_fast importable. Sizes are
overridden with --set (seq_len, batch, steps); nothing else.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny import hub_cache, make_chat_tokenizer, qwen2_config, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "your_models.toml"
TEACHER, STUDENT = "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"
SMALL = [
    "--set", "data.seq_len=128", "--set", "data.batch_size=4", "--set", "data.val_sequences=2",
    "--set", "ddk.interval=2", "--set", "ddk.eval_batch_size=4", "--set", "train.max_steps=4",
    "--set", "train.warmup_steps=1", "--set", "train.grad_accum=1", "--set", "checkpoint.every=2",
    "--set", "output.progress=false",
]  # fmt: skip
WORDS = "order refund shipping invoice account password device screen battery cable update".split()


def _say(rng, lo=3, hi=12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_data(root: Path) -> list[str]:
    rng = random.Random(0)
    texts = []
    for part in range(2):
        support = root / "data" / "support" / f"part-{part}.jsonl"
        support.parent.mkdir(parents=True, exist_ok=True)
        with support.open("w") as f:
            for _ in range(60):
                msgs = [{"role": "system", "content": "You are the support desk."}]
                for _ in range(rng.randint(1, 2)):
                    msgs += [
                        {"role": "user", "content": _say(rng) + "?"},
                        {"role": "assistant", "content": _say(rng)},
                    ]
                f.write(json.dumps({"messages": msgs}) + "\n")
                texts += [m["content"] for m in msgs]
        inst = root / "data" / "instructions" / f"part-{part}.jsonl"
        inst.parent.mkdir(parents=True, exist_ok=True)
        with inst.open("w") as f:
            for _ in range(80):
                rec = {"prompt": "Explain " + _say(rng, 2, 5) + ".\n", "completion": _say(rng, 5, 15)}
                f.write(json.dumps(rec) + "\n")
                texts += [rec["prompt"], rec["completion"]]
    docs = root / "data" / "docs" / "manual.txt"
    docs.parent.mkdir(parents=True, exist_ok=True)
    paragraphs = [_say(rng, 20, 60) for _ in range(80)]
    docs.write_text("\n\n".join(paragraphs) + "\n")
    return texts + paragraphs + ["system user assistant"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with data/, and an HF_HOME whose Hub cache holds both stand-ins."""
    root = tmp_path_factory.mktemp("your-models")
    texts = write_data(root)
    tok = make_chat_tokenizer(root / "build" / "tok", texts, vocab_size=400)
    v = len(tok)
    # as the real pair: the teacher's head padded beyond the student's, the student's tied
    save_tiny_model(
        root / "build" / "teacher", qwen2_config(v + 32, layers=3), tokenizer_dir=root / "build" / "tok"
    )
    save_tiny_model(root / "build" / "student", qwen2_config(v + 16, layers=2, tie=True), seed=1,
                    tokenizer_dir=root / "build" / "tok")  # fmt: skip
    home = root / "hf"
    hub_cache(home, TEACHER, root / "build" / "teacher", commit="a" * 40)
    hub_cache(home, STUDENT, root / "build" / "student", commit="b" * 40)
    return root, home


def _env(home: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(root: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=root, env=_env(home), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def trained(project):
    root, home = project
    _run(root, home, "-m", "ddk_fast.train", "--config", str(EXAMPLE), *SMALL)
    return root / "runs" / "qwen-0.5b-from-7b"


def test_the_example_trains_from_the_hub_cache(trained):
    final = trained / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == STUDENT  # the Hub id: loads from any machine with the Hub
    info = json.loads((final / "ddk_fast_final.json").read_text())
    assert info["base_model"] == STUDENT and info["student_mode"] == "qlora"
    report = (trained / "report.md").read_text()
    for name in ("support", "instructions", "docs"):
        assert f"| {name} |" in report
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (trained / "tensorboard").is_dir()  # report_to = ["tensorboard"]


def test_resume_eval_and_export_as_the_readme_says(project, trained, tmp_path, monkeypatch, capsys):
    """In this process (the same Hub cache, as HF_HOME gives it), then the merged model in a fresh one."""
    from huggingface_hub import constants

    from ddk_fast.eval import main as eval_main
    from ddk_fast.export import main as export_main
    from ddk_fast.train import main as train_main

    root, home = project
    monkeypatch.chdir(root)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    # resume with a longer schedule (max_steps may change on --resume)
    assert train_main(["--config", str(EXAMPLE), *SMALL, "--set", "train.max_steps=6", "--resume"]) == 0
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "in effect from step 4" in (trained / "config.toml").read_text()
    # evaluate the run's final student: the report's test CE, per domain
    out = tmp_path / "eval.json"
    assert (
        eval_main(["--config", str(EXAMPLE), *SMALL, "--adapter", str(trained / "final"), "--out", str(out)])
        == 0
    )
    assert "| **all (token-weighted)** |" in capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert scores["model"] == STUDENT and scores["domains"] == ["support", "instructions", "docs"]
    report = (trained / "report.md").read_text()
    for name, ce, gap in zip(scores["domains"], scores["ce"], scores["gap"]):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {ce:.3f} | {gap:.3f} |" in row, (row, ce, gap)  # the same scorer as the trainer
    # export merged (QLoRA dequantised) and load it with neither peft nor ddk_fast
    merged = tmp_path / "merged"
    assert export_main(["--run", str(trained), "--merge", "--out", str(merged)]) == 0
    diff = float(capsys.readouterr().out.split("student: ")[1].split()[0])
    assert diff < 1e-4
    probe = (
        "import sys\n"
        "sys.modules['peft'] = None; sys.modules['ddk_fast'] = None  # neither may be imported\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
        "print(type(m).__name__, m(torch.arange(8)[None]).logits.isfinite().all().item())\n"
    )
    env = {k: v for k, v in _env(home).items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Qwen2ForCausalLM", "True"]
