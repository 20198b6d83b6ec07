"""Hidden-state distillation (AKD, the ``[hidden]`` section): match decoder layers' outputs.

For every mapped pair (student layer ``j``, teacher layer ``k``) and every counted token (label != -100):

    mse:    mean_h (P_j s_j - t_k)^2          cosine:  1 - <P_j s_j, t_k> / (|P_j s_j| |t_k|)

averaged over the counted tokens and then over the pairs. ``P_j`` is a learned ``Linear(H_s, H_t)`` when
``projection = "linear"`` and the widths differ, the identity otherwise. ``s_j``/``t_k`` are the outputs of
the decoder layers (before the final norm), captured with forward hooks on the mapped layers only
(``output_hidden_states=True`` would keep every layer's output alive). The hooks live only for the duration
of one forward (:func:`capture_layers`), so validation scoring and gradient-checkpointing recomputation in
backward are untouched. The teacher's states are captured under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..config import HiddenConfig
from ..errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layer modules of a transformers causal LM (peft-wrapped or not)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(
            "hidden.weight",
            ">0",
            f"a model whose decoder has a `layers` list ({type(model).__name__} has none)",
        )
    return list(layers)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer ``j`` <-> teacher layer ``round((j + 1) * L_T / L_S) - 1`` (halves round up)."""
    return [(j, int(math.floor((j + 1) * n_teacher / n_student + 0.5)) - 1) for j in range(n_student)]


def layer_map(cfg: HiddenConfig, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """The (student, teacher) pairs of ``cfg``; ConfigError naming the pair when an index is out of range."""
    if cfg.layers == "uniform":
        return uniform_layer_map(n_student, n_teacher)
    for i, (s, t) in enumerate(cfg.pairs):
        if s >= n_student or t >= n_teacher:
            raise ConfigError(
                f"hidden.pairs[{i}]",
                [s, t],
                f"a student layer < {n_student} and a teacher layer < {n_teacher} (the models' layer counts)",
            )
    return [(s, t) for s, t in cfg.pairs]


@contextlib.contextmanager
def capture_layers(model: nn.Module, indices: list[int]):
    """Within the context, ``out[i]`` is the output of decoder layer ``i`` of the latest forward."""
    layers = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}

    def hook_for(i):
        def hook(_module, _args, output):
            out[i] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in sorted(set(indices))]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def hidden_loss_reference(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-token loss ``[N]`` of projected student ``[N, H]`` vs teacher ``[N, H]``; zeros where ``mask`` is
    False. float32 (float64 for float64 inputs)."""
    dt = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dt), teacher.to(dt)
    if loss == "mse":
        per = (s - t).pow(2).mean(-1)
    else:
        per = 1.0 - nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return per * mask.to(dt)


class HiddenStateLoss(nn.Module):
    """The hidden-state loss of mapped layer pairs, with one projection per pair when widths differ.

    Args:
        cfg: the ``[hidden]`` section.
        pairs: (student layer, teacher layer) pairs (:func:`layer_map`).
        student_width / teacher_width: ``H_s`` / ``H_t``.
    """

    def __init__(
        self, cfg: HiddenConfig, pairs: list[tuple[int, int]], student_width: int, teacher_width: int
    ):
        super().__init__()
        if cfg.projection == "none" and student_width != teacher_width:
            raise ConfigError(
                "hidden.projection",
                "none",
                f'"linear" (student width {student_width} != teacher width {teacher_width})',
            )
        self.weight = cfg.weight
        self.loss = cfg.loss
        self.pairs = list(pairs)
        project = cfg.projection == "linear" and student_width != teacher_width
        self.projections = nn.ModuleList(
            [nn.Linear(student_width, teacher_width) if project else nn.Identity() for _ in self.pairs]
        )

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs]

    def forward(
        self,
        student_states: dict[int, torch.Tensor],
        teacher_states: list[torch.Tensor],
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        num_domains: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``student_states[j]`` ``[B, L, H_s]``; ``teacher_states`` in pair order, ``[B, L, H_t]``;
        ``labels`` ``[B, L]``. Returns the mean loss over counted tokens and pairs (scalar, differentiable)
        and its per-domain token sums ``[num_domains]`` (detached, averaged over pairs)."""
        mask = labels.reshape(-1) != -100
        n = mask.sum().clamp(min=1)
        per_token = None
        for proj, (s, _), t in zip(self.projections, self.pairs, teacher_states):
            x = student_states[s].reshape(-1, student_states[s].shape[-1])
            if isinstance(proj, nn.Linear):
                x = proj(x.to(proj.weight.dtype))
            per = hidden_loss_reference(x, t.reshape(-1, t.shape[-1]).detach(), mask, self.loss)
            per_token = per if per_token is None else per_token + per
        per_token = per_token / len(self.pairs)
        domain_sums = torch.zeros(num_domains, dtype=torch.float64, device=per_token.device)
        if domain_ids is not None:
            # ignored tokens add 0: clamping their (possibly padding) domain id keeps the index valid
            dom = domain_ids.reshape(-1).clamp(0, num_domains - 1)
            domain_sums.index_add_(0, dom, per_token.detach().double())
        return per_token.sum() / n, domain_sums


def build_hidden_loss(cfg: HiddenConfig, student: nn.Module, teacher: nn.Module) -> HiddenStateLoss | None:
    """The hidden-state loss for these models, or None when ``[hidden] weight = 0``."""
    if cfg.weight <= 0:
        return None
    n_s, n_t = len(decoder_layers(student)), len(decoder_layers(teacher))
    pairs = layer_map(cfg, n_s, n_t)
    return HiddenStateLoss(cfg, pairs, student.config.hidden_size, teacher.config.hidden_size)
