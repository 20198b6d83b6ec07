"""The child side of ``bench/bench_e2e.py``: the models it builds, and each arm's process (its loop, driven
step by step by the coordinator over stdin / stdout, see :class:`Driver`). Read ``bench/bench_e2e.py``'s
docstring for what is measured and how; nothing here is collected by pytest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.harness import reset_peak_rss, status_kib

SHAPES = {
    "real": dict(
        vocab=151936,
        t_layers=4,
        t_hidden=256,
        s_layers=2,
        s_hidden=128,
        batch=4,
        seq=512,
        warmup=2,
        timed=int(os.environ.get("DDK_BENCH_E2E_TIMED", "5")),
        profile=3,
    ),
    "smoke": dict(
        vocab=512,
        t_layers=2,
        t_hidden=64,
        s_layers=1,
        s_hidden=32,
        batch=2,
        seq=8,
        warmup=0,
        timed=1,
        profile=1,
    ),
}
LR, LORA_R, LORA_ALPHA = 1e-4, 16, 32.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROTO = "@@e2e "  # prefix of the protocol lines a child writes (its other output goes to a log file)


# ------------------------------------------------------------------------------------------------ assets


def build_assets(root: Path, shape: dict) -> None:
    """Tokenizer, domains and the two random models (teacher seed 1, student seed 0), saved under ``root``."""
    from tests.tiny import domain_texts, llama_config, make_tokenizer, save_tiny_model, write_domains

    make_tokenizer(root / "tok", [t for docs in domain_texts().values() for t in docs])
    write_domains(root / "data")
    pos = {"max_position_embeddings": 2 * (shape["seq"] + 1)}
    v = shape["vocab"]
    save_tiny_model(
        root / "teacher", {**llama_config(v, shape["t_layers"], shape["t_hidden"]), **pos}, seed=1
    )
    save_tiny_model(
        root / "student", {**llama_config(v, shape["s_layers"], shape["s_hidden"]), **pos}, seed=0
    )


def ddk_raw_config(root: Path, shape: dict) -> dict:
    from tests.tiny import domain_texts

    return {
        "model": {
            "teacher": str(root / "teacher"),
            "student": str(root / "student"),
            "tokenizer": str(root / "tok"),
            "student_mode": "qlora",
            "lora_r": LORA_R,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "lora_target_modules": LORA_TARGETS,
            "dtype": "float32",
        },
        "data": {
            "domains": [{"name": n, "files": [str(root / "data" / f"{n}.jsonl")]} for n in domain_texts()],
            "seq_len": shape["seq"],
            "batch_size": shape["batch"],
            "val_sequences": 1,
            "cache_dir": str(root / "cache"),
        },
        "ddk": {"mixing": "uniform", "interval": 10**6},
        "loss": {"divergence": "forward_kl", "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0},
        "train": {
            "max_steps": 10**6,
            "lr": LR,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "log_every": 1,
            "device": "cpu",
        },
        "checkpoint": {"every": 10**6},
        "output": {"dir": str(root / "run_ddk"), "progress": False, "tensorboard": False},
    }


# ------------------------------------------------------------------------------------------------ child side


class Driver:
    """The child's end of the protocol. The arm's loop calls :meth:`gate` at the start of every step: it
    reports the previous step (its wall time and losses), then blocks until the coordinator's next command
    (``step`` / ``profile``; ``mark`` = report and reset the memory peak; ``stop`` = report it and exit)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints (HF's log dicts, tqdm) go to the log file, not into the protocol
        self.t0: float | None = None
        self.ready = False
        self.last: dict = {}
        self.parts: dict[str, float] = {}
        self.profiling = False

    def send(self, **msg) -> None:
        self.out.write(PROTO + json.dumps(msg) + "\n")

    def add(self, part: str, seconds: float) -> None:
        if self.profiling:
            self.parts[part] = self.parts.get(part, 0.0) + seconds

    def gate(self) -> str:
        now = time.perf_counter()
        if not self.ready:
            self.ready = True
            reset_peak_rss()
            self.send(ready=True, rss_kb=status_kib("VmRSS"))
        elif self.t0 is not None:
            self.send(seconds=now - self.t0, **self.last, parts=self.parts if self.profiling else None)
        while True:
            cmd = sys.stdin.readline().strip()
            if cmd in ("mark", "stop", ""):
                self.send(hwm_kb=status_kib("VmHWM"), rss_kb=status_kib("VmRSS"))
                if cmd != "mark":
                    self.out.flush()
                    os._exit(0)
                reset_peak_rss()
                continue
            self.profiling, self.parts, self.last = cmd == "profile", {}, {}
            self.t0 = time.perf_counter()
            return cmd


def _timed(drv: Driver, part: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            drv.add(part, time.perf_counter() - t0)

    return wrapper


def _load_batches(root: Path) -> dict:
    import numpy as np

    with np.load(root / "batches.npz") as z:
        return {k: z[k] for k in z.files}


def child_ddk_fast(drv: Driver, root: Path, shape: dict, n_batches: int) -> None:
    import numpy as np
    import torch

    from ddk_fast.config import build_config
    from ddk_fast.training.trainer import Trainer

    trainer = Trainer(build_config(ddk_raw_config(root, shape)))
    trainer.setup()
    sampler = trainer.sampler
    state = sampler.state_dict()
    drawn = [sampler.next_batch() for _ in range(n_batches)]
    sampler.load_state_dict(state)  # the loop starts from the same place
    saved = {k: np.stack([b[k] for b in drawn]) for k in ("input_ids", "labels", "domain_ids")}
    np.savez(root / "batches.npz", **saved)
    _install_profile_timers(drv, trainer)
    real_step, consumed = trainer.train_step, [0]

    def checked(batches):
        while True:
            t0 = time.perf_counter()
            b = next(batches)
            drv.add("data (sampler)", time.perf_counter() - t0)
            k = consumed[0]
            if k < n_batches and not all(np.array_equal(b[key], saved[key][k]) for key in saved):
                raise RuntimeError(f"ddk_fast's loop drew batch {k} unlike the one saved for the other arms")
            consumed[0] += 1
            yield b

    def step(batches):
        drv.gate()
        stats = real_step(checked(batches))
        sums = stats.sums.sum(1)  # [3]: CE sum, KD sum, tokens over all domains
        drv.last = {"loss": float(stats.loss), "ce": float(sums[0] / sums[2]), "kd": float(sums[1] / sums[2])}
        return stats

    trainer.train_step = step
    torch.manual_seed(0)
    trainer.fit()
    raise RuntimeError("ddk_fast's loop ended before the coordinator stopped it")


def _install_profile_timers(drv: Driver, trainer) -> None:
    """Timers around each part of the ddk_fast step (they count only in ``profile`` steps). The fused loss's
    backward is split from the student's by a hook on the student's final hidden states (their gradient is
    what the loss's backward produces)."""
    import torch

    obj = trainer.models.objective
    trainer.teacher.signal = _timed(drv, "teacher forward", trainer.teacher.signal)
    obj._hidden = _timed(drv, "student forward", obj._hidden)
    real_kd = obj._kd_loss

    def kd_loss(s_hidden, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_kd(s_hidden, *args, **kwargs)
        drv.add("fused loss forward", time.perf_counter() - t0)
        if drv.profiling and s_hidden.requires_grad:
            s_hidden.register_hook(lambda g: drv.parts.__setitem__("_loss_bwd_done", time.perf_counter()))
        return out

    obj._kd_loss = kd_loss
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        t0 = time.perf_counter()
        real_backward(self, *args, **kwargs)
        t1 = time.perf_counter()
        mid = drv.parts.pop("_loss_bwd_done", None) if drv.profiling else None
        if mid is not None:
            drv.add("fused loss backward", mid - t0)
            drv.add("student backward", t1 - mid)
        else:
            drv.add("backward", t1 - t0)

    torch.Tensor.backward = backward
    torch.nn.utils.clip_grad_norm_ = _timed(drv, "clip grad norm", torch.nn.utils.clip_grad_norm_)
    trainer._all_ranks_finite = _timed(drv, "host sync (finite flag)", trainer._all_ranks_finite)
    opt = trainer.optimizer
    opt.step = _timed(drv, "optimizer step", opt.step)
    opt.zero_grad = _timed(drv, "optimizer step", opt.zero_grad)
    trainer.scheduler.step = _timed(drv, "optimizer step", trainer.scheduler.step)
    trainer._read_stats = _timed(drv, "metrics (host read + write)", trainer._read_stats)


def _hf_models(root: Path):
    """Teacher and QLoRA student as a Hugging Face user loads them (the same as ddk_fast's loading)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ddk_fast.models.loading import disable_bnb_cpu_repack

    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    student = AutoModelForCausalLM.from_pretrained(
        root / "student", dtype=torch.float32, quantization_config=bnb, device_map={"": "cpu"}
    )
    disable_bnb_cpu_repack(student)
    torch.manual_seed(0)  # the adapters' init as ddk_fast's (seed 0 right before attaching them)
    lora = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return teacher, get_peft_model(student, lora)


class _Lookup:
    """The data collator of the Hugging Face arms: the dataset holds batch indices (``k``), one per item
    (``per_device_train_batch_size=1``); the batch is the pre-made tensors of that index."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"k": list(range(len(self.batches)))})

    def __call__(self, rows):
        return self.batches[rows[0]["k"]]


def _common_args(root: Path, arm: str, steps: int) -> dict:
    return dict(
        output_dir=str(root / f"run_{arm}"),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        bf16=False,
        seed=0,
    )


def _gate_callback(drv: Driver):
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            drv.gate()

    return Gate()


def child_hf_trainer(drv: Driver, root: Path, shape: dict, n_batches: int) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from ddk_fast.ops.naive import kd_loss_naive

    class NaiveKDTrainer(Trainer):
        """KD in ``compute_loss``: both models' logits materialised, CE + forward KL over them."""

        def __init__(self, *args, teacher, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            t0 = time.perf_counter()
            with torch.no_grad():
                t_logits = self.teacher(**kw).logits
            t1 = time.perf_counter()
            out = model(**kw)
            t2 = time.perf_counter()
            v = out.logits.shape[-1]
            kd = kd_loss_naive(
                out.logits.reshape(-1, v),
                t_logits.reshape(-1, v),
                inputs["labels"].reshape(-1),
                divergence="forward_kl",
                temperature=1.0,
                kd_weight=1.0,
                ce_weight=1.0,
            )
            drv.add("teacher forward (+ logits)", t1 - t0)
            drv.add("student forward (+ logits)", t2 - t1)
            drv.add("loss forward (materialised)", time.perf_counter() - t2)
            drv.last = {"loss": float(kd.loss), "ce": float(kd.ce), "kd": float(kd.kd)}
            return (kd.loss, out) if return_outputs else kd.loss

    b = _load_batches(root)
    items = [
        {
            "input_ids": torch.from_numpy(b["input_ids"][k]),
            "labels": torch.from_numpy(b["labels"][k]),
            "attention_mask": torch.ones_like(torch.from_numpy(b["input_ids"][k])),
        }
        for k in range(n_batches)
    ]
    lookup = _Lookup(items)
    teacher, student = _hf_models(root)
    trainer = NaiveKDTrainer(
        model=student,
        teacher=teacher,
        args=TrainingArguments(**_common_args(root, "hf", 10**6)),
        train_dataset=lookup.dataset(),
        data_collator=lookup,
        callbacks=[_gate_callback(drv), _install_hf_timers(drv)],
    )
    trainer.train()
    raise RuntimeError("the HF loop ended before the coordinator stopped it")


def child_trl_gkd(drv: Driver, root: Path, shape: dict, n_batches: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    try:  # TRL >= 1.0 keeps GKD under trl.experimental (as ddk_fast.integrations.trl)
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer

    class RecordingGKDTrainer(GKDTrainer):
        """TRL's own loss, unchanged; records its value for the comparison."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            drv.last = {"loss": float(loss[0] if return_outputs else loss)}
            return loss

    b = _load_batches(root)
    items = []
    for k in range(n_batches):  # the 513-token rows (GKD shifts the labels itself); the first label masked
        ids = np.concatenate([b["input_ids"][k], b["labels"][k][:, -1:]], axis=1)
        if not np.array_equal(ids[:, 1:], b["labels"][k]):
            raise RuntimeError("the sampler's labels are not the next tokens of its input_ids")
        labels = torch.from_numpy(ids.copy())
        labels[:, 0] = -100
        items.append(
            {"input_ids": torch.from_numpy(ids), "labels": labels, "attention_mask": torch.ones_like(labels)}
        )
    lookup = _Lookup(items)
    teacher, student = _hf_models(root)
    args = GKDConfig(
        **_common_args(root, "trl", 10**6), lmbda=0.0, beta=0.0, seq_kd=False, gradient_checkpointing=False
    )
    trainer = RecordingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=lookup.dataset(),
        data_collator=lookup,
        processing_class=AutoTokenizer.from_pretrained(root / "tok"),
        callbacks=[_gate_callback(drv), _install_hf_timers(drv)],
    )
    trainer.train()
    raise RuntimeError("the TRL loop ended before the coordinator stopped it")


def child_main(arm: str, root: str, mode: str, n_batches: int) -> None:
    import torch

    drv = Driver()
    threads = int(os.environ.get("DDK_BENCH_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    fn = {"ddk_fast": child_ddk_fast, "hf_trainer": child_hf_trainer, "trl_gkd": child_trl_gkd}[arm]
    fn(drv, Path(root), SHAPES[mode], n_batches)


def _install_hf_timers(drv: Driver):
    """Backward and optimizer timers of the Hugging Face arms (profile steps only): a callback pair around
    ``optimizer.step`` and a wrapper of ``Tensor.backward``."""
    import torch
    from transformers import TrainerCallback

    real_backward = torch.Tensor.backward
    torch.Tensor.backward = _timed(drv, "backward (loss + student)", real_backward)

    class OptimizerTimer(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            drv.add("optimizer step", time.perf_counter() - self.t0)

    return OptimizerTimer()
