"""DDK's domain discrepancy factor and its smooth update (Liu et al., NeurIPS 2024, arXiv 2407.16154, §3).

Inputs are per-domain mean next-token cross-entropies (what a user measures); the paper's ℓ is perplexity,
ℓ = exp(CE), so the ratio ℓ_S/ℓ_T = exp(CE_S - CE_T). Everything is computed in log space: the factor is a
softmax of that ratio, and Eq. 2's product r_t · exp(ratio) becomes log r_t + ratio, normalised by logsumexp
(exp(exp(·)) overflows otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["domain_discrepancy", "smooth_domain_weights", "DomainMixer"]


def _as_losses(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().flatten()
    if t.numel() == 0:
        raise ValueError(f"{name}: expected per-domain losses (at least one domain), got an empty tensor")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite per-domain losses, got {t.tolist()}")
    return t


def _ratio(student_losses, teacher_losses) -> torch.Tensor:
    s = _as_losses("student_losses", student_losses)
    t = _as_losses("teacher_losses", teacher_losses)
    if s.shape != t.shape:
        raise ValueError(
            f"student_losses and teacher_losses: expected the same number of domains, "
            f"got {s.numel()} and {t.numel()}"
        )
    return torch.exp(s - t)  # perplexity ratio ℓ_S / ℓ_T


def domain_discrepancy(student_losses, teacher_losses) -> torch.Tensor:
    """DDK Eq. 1: r[i] = softmax_i(ℓ_S[i] / ℓ_T[i]) with ℓ = exp(per-domain mean CE).

    Args:
        student_losses, teacher_losses: [N] per-domain mean cross-entropy (nats), tensors or sequences.
    Returns:
        [N] float64 tensor of domain weights summing to 1.
    """
    return torch.softmax(_ratio(student_losses, teacher_losses), dim=0)


def smooth_domain_weights(previous, student_losses, teacher_losses, alpha: float = 0.5) -> torch.Tensor:
    """DDK Eq. 2 (factor smooth updating): ψ = r_t · exp(ℓ_S/ℓ_T);  r_{t+1} = α ψ/Σψ + (1-α)/N.

    Args:
        previous: [N] current weights r_t (positive, summing to 1).
        student_losses, teacher_losses: [N] per-domain mean cross-entropy.
        alpha: smoothing coefficient in [0, 1] (0.5 in the paper); (1-α)/N is a uniform floor.
    Returns:
        [N] float64 tensor of new weights summing to 1.
    """
    ratio = _ratio(student_losses, teacher_losses)
    prev = torch.as_tensor(previous, dtype=torch.float64).detach().flatten()
    if prev.shape != ratio.shape:
        raise ValueError(f"previous: expected {ratio.numel()} domain weights, got {prev.numel()}")
    if not (torch.isfinite(prev).all() and (prev >= 0).all() and prev.sum() > 0):
        raise ValueError(f"previous: expected non-negative weights with a positive sum, got {prev.tolist()}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    log_psi = torch.log(prev / prev.sum()) + ratio
    psi = torch.exp(log_psi - torch.logsumexp(log_psi, dim=0))
    return alpha * psi + (1.0 - alpha) / ratio.numel()


@dataclass
class DomainMixer:
    """The trainer's domain-weight policy: DDK (with or without smoothing), uniform or static.

    ``update(student_losses, teacher_losses)`` is called at step 0 and every K steps with fresh validation
    losses; it returns the weights for the next K steps and records them in ``history``.
    """

    num_domains: int
    mode: str = "ddk"
    alpha: float = 0.5
    smoothing: bool = True
    static_weights: list[float] | None = None
    weights: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def initial(self) -> list[float]:
        if self.mode == "static":
            w = torch.tensor(self.static_weights, dtype=torch.float64)
            return (w / w.sum()).tolist()
        return [1.0 / self.num_domains] * self.num_domains

    def update(self, step: int, student_losses, teacher_losses) -> list[float]:
        if self.mode != "ddk":
            new = self.initial()
        elif not self.weights or not self.smoothing:
            new = domain_discrepancy(student_losses, teacher_losses).tolist()  # r_0 (Eq. 1)
        else:
            new = smooth_domain_weights(self.weights, student_losses, teacher_losses, self.alpha).tolist()
        self.weights = new
        self.history.append(
            {
                "step": step,
                "weights": list(new),
                "student_loss": [float(x) for x in student_losses],
                "teacher_loss": [float(x) for x in teacher_losses],
            }
        )
        return new

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.weights = list(state["weights"])
        self.history = list(state["history"])
