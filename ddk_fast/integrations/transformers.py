"""The fused KD loss for Hugging Face models and ``transformers.Trainer``.

``distill_loss(student, teacher, batch, ...)`` runs both models' decoders (final hidden states, after the last
norm) and the fused loss on their ``lm_head`` weights, so no ``[tokens x vocab]`` logits are made. It
shifts the labels (position i predicts token i + 1), ignores padding (``attention_mask == 0``) and
``labels == -100``, and reads each model's logit transform from its config:

    final_logit_softcapping   Gemma-2 / Gemma-3: logits = cap * tanh(logits / cap)
    logit_scale               Cohere:            logits = logit_scale * logits
    logits_scaling            Granite:           logits = logits / logits_scaling

Llama, Qwen2, Mistral and the like have none. Tied embeddings need nothing (the head weight *is* the
embedding, which gets the gradient); a head bias is passed on; PEFT-wrapped and 4-bit students work (the head
is not quantised). A model whose head or decoder cannot be found fails with the attribute's name.

``DistillationTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is ``distill_loss`` with the
trainer's ``num_items_in_batch``, so gradient accumulation gives the gradient of the whole batch. It checks
at construction that teacher and student can be distilled (vocabularies, tokenizers: a ValueError naming both
sizes) and logs the CE and KD parts of the loss beside ``loss`` (per domain too, with ``domain_names`` and
batches that carry ``domain_ids``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import Trainer

from ..losses import KDOutput, fused_linear_kd_loss
from ..models.loading import _where, head_spec
from ..ops.params import make_params

__all__ = ["KDArgs", "distill_loss", "head_spec", "DistillationTrainer"]


@dataclass(frozen=True)
class KDArgs:
    """Loss hyper-parameters of :class:`DistillationTrainer` (validated when built; fields as
    :func:`ddk_fast.fused_linear_kd_loss`)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    scale_by_t2: bool = True
    skew_lambda: float = 0.1
    backend: str = "auto"
    validate: bool | str = True
    chunk_size: int | None = None

    def __post_init__(self):
        make_params(self.divergence, self.beta, self.temperature, self.kd_weight, self.ce_weight,
                    self.scale_by_t2, skew_lambda=self.skew_lambda)  # fmt: skip


def _final_hidden(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm), without the head's ``[B, T, V]`` logits.

    A model wrapped by DDP / FSDP (it has ``.module``) is called through the wrapper, so its gradient hooks
    run: ``output_hidden_states`` with ``logits_to_keep=1`` (one position's logits, unused). Otherwise the
    decoder is called directly."""
    if hasattr(model, "module") and isinstance(model.module, nn.Module):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False)  # fmt: skip
        return out.hidden_states[-1]
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        raise ValueError(
            f"{_where(model)}: could not find the decoder: `get_decoder()` is missing or returned None "
            "(distill_loss runs the decoder to get the final hidden states)"
        )
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{_where(model)}: the decoder's output has no `last_hidden_state`")
    return hidden


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    scale_by_t2: bool = True,
    skew_lambda: float = 0.1,
    backend: str = "auto",
    validate: bool | str = True,
    chunk_size: int | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
) -> KDOutput:
    """Distillation loss of a causal-LM batch, from both models' final hidden states (no ``[N, V]`` logits).

    Args:
        student: a causal LM (``transformers`` model, PEFT-wrapped, 4-bit, or DDP-wrapped); gets gradients.
        teacher: a causal LM with the same tokenizer (``V_t >= V_s``); run under ``no_grad``.
        batch: a mapping with ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` (0 = padding)
            and ``labels`` ``[B, T]`` aligned with ``input_ids`` as Hugging Face collators make them
            (``-100`` = ignore; default: ``input_ids``). Labels are shifted here.
        num_items_in_batch: divisor of the summed loss (``transformers.Trainer`` passes the number of
            counted tokens over all gradient-accumulation micro-batches); None: mean over this batch.
        domain_ids, num_domains: each token's (``[B, T]``) or each row's (``[B]``) domain in
            ``[0, num_domains)``, for the per-domain sums of the output (no effect on the loss).
        Other arguments as :func:`ddk_fast.fused_linear_kd_loss`.

    Returns:
        :class:`ddk_fast.KDOutput` (``loss`` differentiable w.r.t. the student's parameters).
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    labels = input_ids.clone() if labels is None else labels.clone()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    s_head = head_spec(_unwrap(student))
    t_head = head_spec(_unwrap(teacher))
    s_hidden = _final_hidden(student, input_ids, mask)
    with torch.no_grad():
        t_hidden = _final_hidden(teacher, input_ids.to(t_head["weight"].device),
                                 None if mask is None else mask.to(t_head["weight"].device))  # fmt: skip
    dev = s_hidden.device
    if domain_ids is not None:
        domain_ids = domain_ids.to(dev)
        if domain_ids.dim() == 1:  # one domain per row
            domain_ids = domain_ids[:, None].expand(input_ids.shape).contiguous()
    return fused_linear_kd_loss(
        s_hidden, s_head["weight"], t_hidden.to(dev), t_head["weight"].to(dev), labels.to(dev),
        domain_ids=domain_ids, num_domains=num_domains,
        divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
        scale_by_t2=scale_by_t2, backend=backend, skew_lambda=skew_lambda,
        student_logit_scale=s_head["logit_scale"], student_softcap=s_head["softcap"],
        teacher_logit_scale=t_head["logit_scale"], teacher_softcap=t_head["softcap"],
        student_bias=s_head["bias"],
        teacher_bias=None if t_head["bias"] is None else t_head["bias"].to(dev),
        num_items_in_batch=num_items_in_batch, shift_labels=True, validate=validate, chunk_size=chunk_size,
    )  # fmt: skip


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def check_pair(student: nn.Module, teacher: nn.Module, tokenizer=None, teacher_tokenizer=None) -> None:
    """ValueError naming both sizes when the pair cannot be distilled token for token: a teacher head with
    fewer rows than the student's (rows past the student's are padding, as Qwen2.5's), a tokenizer with
    more tokens than the student's head, or teacher and student tokenizers with other vocabularies."""
    v_s = head_spec(_unwrap(student))["weight"].shape[0]
    v_t = head_spec(_unwrap(teacher))["weight"].shape[0]
    if v_t < v_s:
        raise ValueError(
            f"teacher vocabulary of {v_t} rows < the student's {v_s} rows: teacher and student must share a "
            "tokenizer (a teacher head may only be larger, by padding rows)"
        )
    if tokenizer is not None and len(tokenizer) > v_s:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the student's vocabulary of {v_s} rows"
        )
    if tokenizer is not None and teacher_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"teacher tokenizer ({len(teacher_tokenizer)} tokens) and student tokenizer "
                f"({len(tokenizer)} tokens) have different vocabularies: same-vocabulary KD needs one "
                "tokenizer"
            )


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that distils ``teacher_model`` into ``model`` with the fused KD loss.

    ``DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
    train_dataset=..., kd_args=KDArgs(divergence=..., temperature=...), **other Trainer arguments)``.

    The teacher is frozen (``requires_grad_(False)``), in eval mode, moved to the student's device and
    (unless quantised) dtype, and kept outside the trained model: it is in no optimizer group, no DDP
    wrapper and no checkpoint. ``compute_loss`` divides by the trainer's ``num_items_in_batch``, so
    ``gradient_accumulation_steps > 1`` (and ``average_tokens_across_devices`` under DDP) give the gradient
    of the whole batch. The last micro-batch's output is in ``self.last_kd_output``.

    At construction, :func:`check_pair` (vocabularies; the ``processing_class`` tokenizer against the
    student, and against ``teacher_tokenizer`` when given) raises a ValueError naming both sizes. Logged
    beside ``loss``: ``ce`` and ``kd`` (mean CE and mean divergence D per counted token since the last log,
    before weights and T^2), and with ``domain_names`` and batches carrying ``domain_ids`` (``[B]`` or
    ``[B, T]``, kept by the trainer's column filter) ``ce/<domain>``, ``kd/<domain>`` and
    ``tokens/<domain>``.
    """

    def __init__(self, model=None, teacher_model: nn.Module | None = None, args=None, *rest,
                 kd_args: KDArgs | None = None, teacher_tokenizer=None, domain_names=None,
                 **kwargs):  # fmt: skip
        if not isinstance(teacher_model, nn.Module):
            raise ValueError(
                f"teacher_model: expected a torch.nn.Module (a causal LM), got {teacher_model!r:.80}"
            )
        if kd_args is not None and not isinstance(kd_args, KDArgs):
            raise ValueError(f"kd_args: expected a KDArgs or None, got {type(kd_args).__name__}")
        tokenizer = kwargs.get("processing_class")
        if isinstance(model, nn.Module):  # fail now, not inside train()
            tok = tokenizer if hasattr(tokenizer, "get_vocab") else None
            check_pair(model, teacher_model, tok, teacher_tokenizer)
        super().__init__(model, args, *rest, **kwargs)
        self.kd_args = kd_args or KDArgs()
        head_spec(_unwrap(teacher_model))  # fail now, not at the first step
        self.domain_names = list(domain_names) if domain_names else []
        self._parts = torch.zeros(3, 1 + len(self.domain_names), dtype=torch.float64)  # CE, KD, tokens
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        if not _is_quantized(teacher_model) and not getattr(teacher_model, "hf_device_map", None):
            ref = next(p for p in self.model.parameters() if p.is_floating_point())
            dtype = ref.dtype if not _is_quantized(self.model) else None
            teacher_model.to(device=self.args.device, dtype=dtype)
        self.teacher_model = teacher_model
        # compute_loss normalises by num_items_in_batch itself: tell the base class to count the items (over
        # labels[..., 1:], the shifted labels) and not to divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.last_kd_output: KDOutput | None = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.domain_names and "domain_ids" not in self._signature_columns:
            self._signature_columns.append("domain_ids")  # kept for the per-domain sums

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher_model.eval()
        domain_ids = inputs.get("domain_ids") if self.domain_names else None
        n_dom = len(self.domain_names) if domain_ids is not None else 0
        out = distill_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                           domain_ids=domain_ids, num_domains=n_dom, **asdict(self.kd_args))  # fmt: skip
        self.last_kd_output = out
        if model.training:  # the parts of the loss, summed until the next log (one device -> host copy)
            self._add_parts(out, inputs)
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: num_items_in_batch is the global count, DDP averages the gradients
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _add_parts(self, out: KDOutput, inputs) -> None:
        labels = inputs.get("labels")
        labels = inputs["input_ids"] if labels is None else labels
        counted = labels[..., 1:] != -100
        mask = inputs.get("attention_mask")
        if mask is not None:
            counted = counted & (mask[..., 1:] != 0)
        n = counted.sum().double()
        total = torch.stack([out.ce.double() * n, out.kd.double() * n, n]).cpu()
        self._parts[:, 0] += total
        if self.domain_names and out.domain_tokens.numel() == len(self.domain_names):
            dom = torch.stack([out.domain_ce_sum, out.domain_kd_sum, out.domain_tokens]).double().cpu()
            self._parts[:, 1:] += dom

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds ``ce``, ``kd`` (and per-domain ``ce/<d>``, ``kd/<d>``, ``tokens/<d>``) to a training log."""
        if "loss" in logs and self._parts[2, 0] > 0:
            p = self._parts
            logs["ce"] = float(p[0, 0] / p[2, 0])
            logs["kd"] = float(p[1, 0] / p[2, 0])
            for i, name in enumerate(self.domain_names, 1):
                if p[2, i] > 0:
                    logs[f"ce/{name}"] = float(p[0, i] / p[2, i])
                    logs[f"kd/{name}"] = float(p[1, i] / p[2, i])
                logs[f"tokens/{name}"] = int(p[2, i])
            self._parts.zero_()
        super().log(logs, *args, **kwargs)
