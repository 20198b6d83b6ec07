"""python -m ddk_fast.eval and python -m ddk_fast.export (issue 19, items 7 and 8) in-process on one tiny
QLoRA run: the eval CLI scores with the trainer's scorer (the report's test CE), export writes portable
adapters or one merged model (QLoRA dequantised) whose logits are the trained student's."""

from __future__ import annotations

import json

import pytest
import torch

from ddk_fast.config import dump_toml
from ddk_fast.eval import main as eval_main
from ddk_fast.export import main as export_main
from ddk_fast.train import run

from .tiny import make_cfg


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-export")
    cfg = make_cfg(assets, root / "run", train__max_steps=2, checkpoint__every=10)
    assert run(cfg) == 0
    (root / "run.toml").write_text(dump_toml(cfg))
    return root


def test_eval_scores_a_final_student_as_the_report_does(finished, capsys):
    out = finished / "eval.json"
    adapter = finished / "run" / "final"
    assert (
        eval_main(["--config", str(finished / "run.toml"), "--adapter", str(adapter), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert scores["model"] == str(finished / "run" / "student_init")  # the base read from final/
    report = (finished / "run" / "report.md").read_text()
    for name, ce, teacher, gap in zip(scores["domains"], scores["ce"], scores["teacher_ce"], scores["gap"]):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {teacher:.3f} | {ce:.3f} | {gap:.3f} |" in row  # teacher test, student test, test gap
        assert f"| {name} |" in printed
    assert scores["perplexity"][0] == pytest.approx(2.718281828 ** scores["ce"][0])
    val = finished / "val.json"
    assert eval_main(["--config", str(finished / "run.toml"), "--adapter", str(adapter), "--split", "val",
                      "--no-teacher", "--out", str(val)]) == 0  # fmt: skip
    v = json.loads(val.read_text())
    assert v["split"] == "val" and v["teacher_ce"] == [] and v["ce"] != scores["ce"]


def test_eval_and_export_refuse_bad_inputs_with_exit_2(finished, capsys):
    assert eval_main(["--config", str(finished / "run.toml"), "--adapter", str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adapter: expected a peft adapter folder") and "Traceback" not in err
    assert eval_main(["--config", str(finished / "run.toml"), "--model", "org/not-cached"]) == 2
    assert "Hub id in the Hugging Face cache" in capsys.readouterr().err
    assert export_main(["--run", str(finished), "--out", str(finished / "x")]) == 2
    assert "a finished run" in capsys.readouterr().err


def test_export_adapters_and_merged(finished, capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapters, merged = finished / "adapters", finished / "merged"
    assert export_main(["--run", str(finished / "run"), "--out", str(adapters)]) == 0
    conf = json.loads((adapters / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(finished / "run" / "student_init")
    assert export_main(["--run", str(finished / "run"), "--merge", "--out", str(merged)]) == 0
    diff = float(capsys.readouterr().out.split("student: ")[1].split()[0])
    assert diff < 1e-4
    assert not (merged / "adapter_config.json").exists()
    conf = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in conf  # dequantised: a plain model
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    ids = torch.arange(16)[None]
    trained = AutoPeftModelForCausalLM.from_pretrained(str(adapters)).eval()  # full-precision base + adapters
    with torch.no_grad():
        a, b = plain(ids).logits, trained(ids).logits
    # the merged model is the NF4 base + adapters, not the full-precision base + adapters: close, not equal
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.5
