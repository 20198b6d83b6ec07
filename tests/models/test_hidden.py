"""Hidden-state distillation (``[hidden]``): the layer map, projections, the masked losses against a
hand-computed reference, hooks that capture only the mapped layers, a tiny run, exact resume of the
projections, weight 0 = unchanged losses, and the config errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddk_fast.config import HiddenConfig
from ddk_fast.errors import ConfigError
from ddk_fast.models.hidden import HiddenStateLoss, capture_layers, layer_map, uniform_layer_map
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.trainer import Trainer

from ..tiny import VOCAB, llama_config, make_cfg


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- layer map
def test_uniform_layer_map():
    assert uniform_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert uniform_layer_map(2, 5) == [(0, 2), (1, 4)]  # 2.5 rounds up
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_explicit_layer_map_and_range_errors():
    cfg = HiddenConfig(weight=1.0, layers="pairs", pairs=[[0, 2], [1, 0]])
    assert layer_map(cfg, 2, 4) == [(0, 2), (1, 0)]
    with pytest.raises(
        ConfigError, match=r"\[hidden\] pairs\[1\]: expected .*teacher layer < 4.*got \[1, 4\]"
    ):
        layer_map(HiddenConfig(weight=1.0, layers="pairs", pairs=[[0, 1], [1, 4]]), 2, 4)
    with pytest.raises(ConfigError, match=r"\[hidden\] pairs\[0\]: expected a student layer < 2"):
        layer_map(HiddenConfig(weight=1.0, layers="pairs", pairs=[[2, 1]]), 2, 4)


# ----------------------------------------------------------------------------------------------- loss
def test_projection_shapes():
    pairs = [(0, 1), (1, 3)]
    lin = HiddenStateLoss(HiddenConfig(weight=1.0), pairs, 32, 64)
    assert [tuple(p.weight.shape) for p in lin.projections] == [(64, 32), (64, 32)]
    same = HiddenStateLoss(HiddenConfig(weight=1.0), pairs, 64, 64)
    assert all(isinstance(p, nn.Identity) for p in same.projections) and not list(same.parameters())
    none = HiddenStateLoss(HiddenConfig(weight=1.0, projection="none"), pairs, 64, 64)
    assert not list(none.parameters())
    with pytest.raises(
        ConfigError, match=r"\[hidden\] projection: expected .*width 32 != teacher width 64.*got 'none'"
    ):
        HiddenStateLoss(HiddenConfig(weight=1.0, projection="none"), pairs, 32, 64)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_masked_loss_equals_hand_computed_reference(kind):
    torch.manual_seed(0)
    B, L, Hs, Ht = 2, 5, 3, 4
    loss = HiddenStateLoss(HiddenConfig(weight=1.0, loss=kind), [(0, 1), (1, 0)], Hs, Ht).double()
    s = {0: torch.randn(B, L, Hs, dtype=torch.float64), 1: torch.randn(B, L, Hs, dtype=torch.float64)}
    t = [torch.randn(B, L, Ht, dtype=torch.float64), torch.randn(B, L, Ht, dtype=torch.float64)]
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, -100, 4, 5, 6]])
    domains = torch.tensor([[0] * L, [1] * L])
    value, dom_sums = loss(s, t, labels, domains, num_domains=2)

    # by hand: loop over the counted tokens, average over tokens and then pairs
    per_pair, per_dom = [], [0.0, 0.0]
    for k, (j, _) in enumerate(loss.pairs):
        W, b = loss.projections[k].weight, loss.projections[k].bias
        acc = 0.0
        for bi in range(B):
            for li in range(L):
                if labels[bi, li] == -100:
                    continue
                x = W @ s[j][bi, li] + b
                y = t[k][bi, li]
                if kind == "mse":
                    v = float(((x - y) ** 2).sum() / Ht)
                else:
                    v = 1 - float(x @ y / (x.norm() * y.norm()))
                acc += v
                per_dom[bi] += v / len(loss.pairs)
        per_pair.append(acc / int((labels != -100).sum()))
    assert float(value) == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-12)
    assert dom_sums.tolist() == pytest.approx(per_dom, rel=1e-12)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_all_ignored_batch_gives_zero():
    loss = HiddenStateLoss(HiddenConfig(weight=1.0), [(0, 0)], 4, 4)
    value, _ = loss({0: torch.randn(1, 3, 4)}, [torch.randn(1, 3, 4)], torch.full((1, 3), -100))
    assert float(value) == 0.0


def test_hooks_capture_only_mapped_layers_and_are_removed():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama_config(VOCAB, layers=4)))
    ids = torch.randint(0, VOCAB, (2, 7))
    with capture_layers(model, [1, 3]) as caught:
        ref = model(ids, output_hidden_states=True).hidden_states
    assert sorted(caught) == [1, 3]
    assert torch.equal(caught[1], ref[2])  # hidden_states[0] is the embedding output
    caught.clear()  # the hooks are gone after the context: another forward captures nothing
    model(ids)
    assert caught == {}


def test_gradient_checkpointing_gives_the_same_gradients():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama_config(VOCAB, layers=2)))
    ids = torch.randint(0, VOCAB, (2, 7))
    target = torch.randn(2, 7, 64)

    def grads():
        model.zero_grad()
        with capture_layers(model, [0]) as caught:
            model.get_decoder()(input_ids=ids, use_cache=False)
        (caught[0] - target).pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpted = grads()
    assert len(plain) == len(ckpted) > 0
    for a, b in zip(plain, ckpted):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("hidden", "match"),
    [
        ({"weight": -1}, r"\[hidden\] weight: expected a number >= 0, got -1"),
        ({"loss": "l1"}, r"\[hidden\] loss: expected one of 'mse', 'cosine', got 'l1'"),
        ({"layers": "every"}, r"\[hidden\] layers: expected .*got 'every'"),
        ({"layers": "pairs"}, r"\[hidden\] pairs: expected at least one"),
        ({"pairs": [[0, 1]]}, r"\[hidden\] pairs: expected empty with layers = \"uniform\""),
        (
            {"layers": "pairs", "pairs": [[0, 1, 2]]},
            r"\[hidden\] pairs: expected distinct \[student, teacher\] pairs",
        ),
        ({"layers": "pairs", "pairs": [[0, -1]]}, r"\[hidden\] pairs: expected .*>= 0, got \[\[0, -1\]\]"),
        ({"projection": "mlp"}, r"\[hidden\] projection: expected .*got 'mlp'"),
        ({"widht": 1}, r"\[hidden\] widht: expected no such key"),
    ],
)
def test_config_errors(assets, tmp_path, hidden, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        make_cfg(assets, tmp_path / "x", **{f"hidden__{k}": v for k, v in hidden.items()})


def test_out_of_range_pair_and_width_mismatch_fail_at_setup(assets, tmp_path):  # noqa: F811
    cfg = make_cfg(assets, tmp_path / "a", hidden__weight=1.0, hidden__layers="pairs", hidden__pairs=[[2, 0]])
    with pytest.raises(ConfigError, match=r"\[hidden\] pairs\[0\]: expected a student layer < 2"):
        Trainer(cfg).setup()
    cfg = make_cfg(assets, tmp_path / "b", **_narrow_student(), hidden__weight=1.0, hidden__projection="none")
    with pytest.raises(ConfigError, match=r"\[hidden\] projection: expected \"linear\".*got 'none'"):
        Trainer(cfg).setup()


# ----------------------------------------------------------------------------------------------- training
def _narrow_student() -> dict:
    """A student half as wide as the teacher (so the projections are learned Linear(32, 64))."""
    return {
        "model__student_from_teacher_layers": [],
        "model__student_config": llama_config(VOCAB + 16, layers=2, hidden=32),
        "model__student_mode": "lora",
    }


def test_weight_zero_changes_nothing(assets, tmp_path):  # noqa: F811
    base = Trainer(make_cfg(assets, tmp_path / "base", train__max_steps=3))
    base.setup()
    base.fit()
    off = Trainer(make_cfg(assets, tmp_path / "off", train__max_steps=3, hidden__weight=0.0))
    off.setup()
    assert off.models.objective.hidden is None
    assert len(off.models.trainable()) == len(base.models.trainable())
    off.fit()
    a, b = _rows(tmp_path / "base"), _rows(tmp_path / "off")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert "hidden" not in b[0]


def test_hidden_loss_decreases_and_projection_resumes_exactly(assets, tmp_path):  # noqa: F811
    over = dict(_narrow_student(), hidden__weight=1.0, train__max_steps=6, train__lr=1e-2)
    full = Trainer(make_cfg(assets, tmp_path / "full", **over))
    full.setup()
    hidden = full.models.objective.hidden
    assert hidden.pairs == [(0, 1), (1, 3)] and len(list(hidden.parameters())) == 4
    trainable_ids = {id(p) for p in full.models.trainable()}
    assert all(id(p) in trainable_ids for p in hidden.parameters())  # trained with the adapters
    full.fit()
    rows = _rows(tmp_path / "full")
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    assert len(rows[0]["domain_hidden"]) == 3 and all(v > 0 for v in rows[0]["domain_hidden"])
    ref = {k: v.clone() for k, v in hidden.state_dict().items()}
    # the projections are not part of the Hugging Face export
    final = tmp_path / "full" / "final"
    from safetensors.torch import load_file

    exported = load_file(str(final / "adapter_model.safetensors"))
    assert not any("projections" in k for k in exported)

    cut = Trainer(make_cfg(assets, tmp_path / "cut", **over))
    cut.setup()
    cut.fit(stop_at=4)
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_00000003"
    saved = torch.load(
        ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints") / "state.pt", weights_only=False
    )["hidden_projections"]
    resumed = Trainer(make_cfg(assets, tmp_path / "cut", **over))
    resumed.setup()
    resumed.resume()
    for k, v in resumed.models.objective.hidden.state_dict().items():
        assert torch.equal(v, saved[k]), k  # bit-exact restore
    resumed.fit()
    b = _rows(tmp_path / "cut")
    for x, y in zip(rows[3:], b[3:]):
        assert x["hidden"] == pytest.approx(y["hidden"], rel=1e-6, abs=1e-7)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
    for k, v in resumed.models.objective.hidden.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-7)


def test_export_projections_opt_in_and_report(assets, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from ddk_fast.training.report import write_report

    over = dict(_narrow_student(), hidden__weight=1.0, train__max_steps=2, hidden__export_projections=True)
    tr = Trainer(make_cfg(assets, tmp_path / "run", **over))
    tr.setup()
    result = tr.fit()
    final = tmp_path / "run" / "final"
    saved = load_file(str(final / "hidden_projections.safetensors"))
    live = tr.models.objective.hidden.state_dict()
    assert set(saved) == set(live) == {f"projections.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for k, v in live.items():
        assert torch.equal(saved[k], v.cpu()), k
    meta = json.loads((final / "hidden_projections.json").read_text())
    assert meta["pairs"] == [[0, 1], [1, 3]] and meta["student_width"] == 32 and meta["teacher_width"] == 64
    report = write_report(result, tr.names).read_text()
    assert "Hidden-state loss" in report
    row = next(line for line in report.splitlines() if line.startswith("| all |"))
    first, last = (float(x) for x in row.strip("| ").split(" | ")[1:])
    rows = _rows(tmp_path / "run")
    assert first == pytest.approx(rows[0]["hidden"], abs=1e-4) and last == pytest.approx(
        rows[-1]["hidden"], abs=1e-4
    )


@pytest.mark.parametrize(
    ("mode", "checkpointing", "loss"),
    [("qlora", True, "cosine"), ("full", False, "mse"), ("lora", True, "mse")],
)
def test_hidden_runs_with_every_student_mode(assets, tmp_path, mode, checkpointing, loss):  # noqa: F811
    cfg = make_cfg(
        assets,
        tmp_path / mode,
        model__student_mode=mode,
        model__gradient_checkpointing=checkpointing,
        hidden__weight=1.0,
        hidden__loss=loss,
        train__max_steps=2,
    )
    t = Trainer(cfg)
    t.setup()
    # student_from_teacher_layers [0, 3]: same widths, identity projections, uniform map 2 -> 4 layers
    assert t.models.objective.hidden.pairs == [(0, 1), (1, 3)]
    assert not list(t.models.objective.hidden.parameters())
    t.fit()
    rows = _rows(tmp_path / mode)
    assert all(r["hidden"] > 0 and r["loss"] > r["ce"] for r in rows)
