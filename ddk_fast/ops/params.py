"""The KD loss's public types and input checks, shared by every op (torch reference, Triton) and the API.

- :class:`KDParams`: the frozen, validated hyper-parameters. The custom ops take it as two flat lists
  (:meth:`KDParams.op_ints`, :meth:`KDParams.op_floats`) instead of a dozen positional scalars.
- :class:`KDOutput`: what every loss entry point returns.
- ``check_*``: shape / dtype / device checks (no host sync) and :func:`check_token_values`, the value check of
  labels and domain ids behind the API's ``validate=`` switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
)


class KDOutput(NamedTuple):
    """Result of every KD-loss entry point (reference, naive and Triton).

    Attributes:
        loss: scalar, differentiable: ``(ce_weight*sum CE + kd_weight*(T^2 if scale_by_t2)*sum D) / divisor``;
            the divisor is the number of counted tokens (``reduction="mean"``), ``num_items_in_batch`` when
            given, or 1 (``reduction="sum"``). float32 (float64 for float64 inputs on the torch path).
        ce: scalar, detached: mean CE over counted tokens (0 without labels), whatever the reduction.
        kd: scalar, detached: mean divergence D over counted tokens (no T^2, no kd_weight).
        domain_ce_sum: ``[num_domains]``, detached: sum of CE over counted tokens of each domain.
        domain_kd_sum: ``[num_domains]``, detached: sum of D (no T^2, no kd_weight) per domain.
        domain_tokens: ``[num_domains]``: number of counted tokens per domain.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    domain_ce_sum: torch.Tensor
    domain_kd_sum: torch.Tensor
    domain_tokens: torch.Tensor


@dataclass(frozen=True)
class KDParams:
    """Validated hyper-parameters (frozen and hashable: torch.compile guards on it as a constant).

    Build it with :func:`make_params`, which validates every field; the ops never re-validate."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew_lambda: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    scale_by_t2: bool = True
    ignore_index: int = -100
    num_domains: int = 0
    student_logit_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_logit_scale: float = 1.0
    teacher_softcap: float = 0.0

    @property
    def kd_scale(self) -> float:
        """Multiplier of the summed D in the loss (CE's is ``ce_weight``)."""
        return self.kd_weight * (self.temperature**2 if self.scale_by_t2 else 1.0)

    def op_ints(self) -> list[int]:
        """``[divergence code, ignore_index, num_domains, scale_by_t2]``: the op schema's int half."""
        return [
            DIVERGENCES.index(self.divergence),
            self.ignore_index,
            self.num_domains,
            int(self.scale_by_t2),
        ]

    def op_floats(self) -> list[float]:
        """``[beta, skew_lambda, temperature, kd_weight, ce_weight, s_scale, s_cap, t_scale, t_cap]``."""
        return [
            self.beta,
            self.skew_lambda,
            self.temperature,
            self.kd_weight,
            self.ce_weight,
            self.student_logit_scale,
            self.student_softcap,
            self.teacher_logit_scale,
            self.teacher_softcap,
        ]

    @classmethod
    def from_op(cls, ints, floats) -> KDParams:
        """Inverse of (:meth:`op_ints`, :meth:`op_floats`): inside a custom op."""
        div, ignore_index, num_domains, t2 = ints
        beta, lam, temp, kdw, cew, ss, sc, ts, tc = floats
        return cls(DIVERGENCES[div], beta, lam, temp, kdw, cew, bool(t2), ignore_index, num_domains,
                   ss, sc, ts, tc)  # fmt: skip


def _number(name: str, value, lo: float | None = None, lo_open: bool = False, hi: float | None = None):
    # a comparison, not math.isfinite: under torch.compile(dynamic=True) Dynamo makes float arguments
    # symbolic and cannot trace math.isfinite on them
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -math.inf < value < math.inf:
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name}: expected a number {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: expected a number <= {hi}, got {value!r}")
    return float(value)


def make_params(
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    num_domains: int = 0,
    skew_lambda: float = 0.1,
    student_logit_scale: float = 1.0,
    student_softcap: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float = 0.0,
) -> KDParams:
    """Validate the hyper-parameters (ValueError naming the argument) and normalise ``jsd`` at beta 0 / 1."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    beta = _number("beta", beta, 0.0, hi=1.0)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"  # TRL convention: the beta -> 0 limit
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    skew_lambda = _number("skew_lambda", skew_lambda, 0.0)
    if skew_lambda >= 1.0:
        raise ValueError(f"skew_lambda: expected a number in [0, 1), got {skew_lambda!r}")
    if isinstance(scale_by_t2, bool) is False:
        raise ValueError(f"scale_by_t2: expected a bool, got {scale_by_t2!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 0:
        raise ValueError(f"num_domains: expected an int >= 0, got {num_domains!r}")
    return KDParams(
        divergence=divergence,
        beta=beta,
        skew_lambda=skew_lambda,
        temperature=_number("temperature", temperature, 0.0, lo_open=True),
        kd_weight=_number("kd_weight", kd_weight, 0.0),
        ce_weight=_number("ce_weight", ce_weight, 0.0),
        scale_by_t2=scale_by_t2,
        ignore_index=ignore_index,
        num_domains=num_domains,
        student_logit_scale=_number("student_logit_scale", student_logit_scale, 0.0, lo_open=True),
        student_softcap=_number("student_softcap", student_softcap, 0.0),
        teacher_logit_scale=_number("teacher_logit_scale", teacher_logit_scale, 0.0, lo_open=True),
        teacher_softcap=_number("teacher_softcap", teacher_softcap, 0.0),
    )


def _check_matrix(name: str, t, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (student_hidden's), got {t.device}")


def check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    """ValueError naming the argument when the four matrices do not fit together."""
    for name, t in (
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
    ):
        _check_matrix(name, t, student_hidden.device)
    n, hs = student_hidden.shape
    if student_weight.shape[1] != hs:
        raise ValueError(
            f"student_weight: expected shape [V_s, {hs}] (H_s of student_hidden), "
            f"got {list(student_weight.shape)}"
        )
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden: expected {n} rows (one per student token), "
            f"got shape {list(teacher_hidden.shape)}"
        )
    ht = teacher_hidden.shape[1]
    if teacher_weight.shape[1] != ht:
        raise ValueError(
            f"teacher_weight: expected shape [V_t, {ht}] (H_t of teacher_hidden), "
            f"got {list(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: expected V_t >= V_s = {student_weight.shape[0]} "
            "(teacher rows >= V_s are padding), "
            f"got V_t = {teacher_weight.shape[0]}"
        )


def check_bias(name: str, bias, weight) -> None:
    """A head bias must be a ``[V]`` float tensor matching its weight's rows and device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point torch.Tensor or None, got {bias!r:.80}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{name}: expected shape [{weight.shape[0]}] (the weight's rows), got {list(bias.shape)}"
        )
    if bias.device != weight.device:
        raise ValueError(f"{name}: expected a tensor on {weight.device}, got {bias.device}")


def check_logits(student_logits, teacher_logits) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [N, V], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits: expected a tensor on {student_logits.device}, "
            f"got one on {teacher_logits.device}"
        )
    n, v = student_logits.shape
    if teacher_logits.shape[0] != n or teacher_logits.shape[1] < v:
        raise ValueError(
            f"teacher_logits: expected shape [{n}, V_t >= {v}] "
            f"(student_logits is {list(student_logits.shape)}), "
            f"got {list(teacher_logits.shape)}"
        )


def check_tokens(n: int, labels, domain_ids, num_domains: int, device: torch.device) -> None:
    """Shape/dtype checks of flat ``[N]`` labels and domain ids (values: :func:`check_token_values`)."""
    for name, t in (("labels", labels), ("domain_ids", domain_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name}: expected shape [{n}] (one per token), got {list(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected an int64 tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if domain_ids is not None and num_domains <= 0:
        raise ValueError(f"num_domains: expected an int > 0 when domain_ids is given, got {num_domains!r}")


def check_token_values(
    labels, domain_ids, vocab: int, num_domains: int, ignore_index: int, sync: bool = True
) -> None:
    """Labels in ``[0, vocab)`` or ``== ignore_index``; domain ids in ``[0, num_domains)``.

    Out-of-range labels would otherwise be clamped silently and out-of-range domain ids give a bare
    IndexError (or a wild write in a kernel). One fused reduction over both tensors gives the number of bad
    entries of each (a 2-element tensor). With ``sync`` (CPU tensors, and CUDA tensors by default) it is read
    back (one host sync per call on CUDA, none on CPU) and a ValueError names the tensor, the first bad value
    and the bound. Without ``sync``, and always under ``torch.compile`` (no graph break), the check is a
    ``torch._assert_async``: on CUDA a device-side assert that costs no host sync but cannot name the value.
    """
    parts = []
    if labels is not None:
        parts.append((((labels < 0) & (labels != ignore_index)) | (labels >= vocab)).sum().reshape(1))
    if domain_ids is not None:
        parts.append(((domain_ids < 0) | (domain_ids >= num_domains)).sum().reshape(1))
    if not parts:
        return
    bad = torch.cat(parts)
    if not sync or torch.compiler.is_compiling():
        torch._assert_async(
            bad.sum() == 0,
            f"ddk_fast: labels outside [0, {vocab}) other than ignore_index={ignore_index}, or domain_ids "
            f"outside [0, {num_domains})",
        )
        return
    counts = bad.tolist()  # the one host sync (none on CPU)
    if labels is not None and counts[0]:
        first = labels[((labels < 0) & (labels != ignore_index)) | (labels >= vocab)][0].item()
        raise ValueError(
            f"labels: expected values in [0, {vocab}) (the student vocabulary) "
            f"or ignore_index={ignore_index}, "
            f"got {first} ({counts[0]} bad labels)"
        )
    if domain_ids is not None and counts[-1]:
        first = domain_ids[(domain_ids < 0) | (domain_ids >= num_domains)][0].item()
        raise ValueError(
            f"domain_ids: expected values in [0, {num_domains}) (num_domains), got {first} "
            f"({counts[-1]} bad domain ids)"
        )
