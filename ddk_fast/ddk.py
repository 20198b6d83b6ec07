"""DDK's domain discrepancy factor and its smooth update (Liu et al., NeurIPS 2024, arXiv 2407.16154, §3).

Inputs are per-domain mean next-token cross-entropies (what a user measures); the paper's ℓ is perplexity,
ℓ = exp(CE), so the ratio ℓ_S/ℓ_T = exp(CE_S - CE_T). Everything is computed in log space: the factor is a
softmax of that ratio, and Eq. 2's product r_t · exp(ratio) becomes log r_t + ratio, normalised by logsumexp
(exp(exp(·)) overflows otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "domain_discrepancy",
    "smooth_domain_weights",
    "excess_loss_discrepancy",
    "smooth_excess_loss_weights",
    "DomainMixer",
    "floor_weights",
    "minimax_shares",
    "collapse_advice",
]

# The factor (before the (1 − α)/N floor, the cap and min_weight) giving one domain more than this share is
# reported as a collapse onto that domain. Measured on the factor, not on the final weights: at α = 0.5 the
# floor caps any final weight at α + (1 − α)/N (0.6 with five domains), so a check on the weights never fires.
COLLAPSE_WEIGHT = 0.9
DEFAULT_MIN_WEIGHT = 1e-3  # excess_loss: every domain keeps at least this weight (DoReMi mixes 1e-3 uniform)


def _as_losses(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().flatten()
    if t.numel() == 0:
        raise ValueError(f"{name}: expected per-domain losses (at least one domain), got an empty tensor")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite per-domain losses, got {t.tolist()}")
    return t


def _gaps(student_losses, teacher_losses) -> torch.Tensor:
    s = _as_losses("student_losses", student_losses)
    t = _as_losses("teacher_losses", teacher_losses)
    if s.shape != t.shape:
        raise ValueError(
            f"student_losses and teacher_losses: expected the same number of domains, "
            f"got {s.numel()} and {t.numel()}"
        )
    return s - t  # excess loss in nats; the paper's ratio is exp of it


def _ratio(student_losses, teacher_losses) -> torch.Tensor:
    return torch.exp(_gaps(student_losses, teacher_losses))  # perplexity ratio ℓ_S / ℓ_T


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
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    return _smooth(previous, ratio, alpha)


def _smooth(previous, log_factor: torch.Tensor, alpha: float) -> torch.Tensor:
    """r_{t+1} = α · norm(r_t · exp(log_factor)) + (1 − α)/N, in log space."""
    return alpha * _smooth_factor(previous, log_factor) + (1.0 - alpha) / log_factor.numel()


def _smooth_factor(previous, log_factor: torch.Tensor) -> torch.Tensor:
    """ψ / Σψ with ψ = r_t · exp(log_factor): the factor of a smooth update before the uniform floor."""
    prev = torch.as_tensor(previous, dtype=torch.float64).detach().flatten()
    if prev.shape != log_factor.shape:
        raise ValueError(f"previous: expected {log_factor.numel()} domain weights, got {prev.numel()}")
    if not (torch.isfinite(prev).all() and (prev >= 0).all() and prev.sum() > 0):
        raise ValueError(f"previous: expected non-negative weights with a positive sum, got {prev.tolist()}")
    log_psi = torch.log(prev / prev.sum()) + log_factor
    return torch.exp(log_psi - torch.logsumexp(log_psi, dim=0))


def floor_weights(weights: torch.Tensor, min_weight: float) -> torch.Tensor:
    """``(1 − N·m) · w + m``: every weight at least ``m``, still summing to 1 (a mixture with a uniform of
    total mass N·m, as DoReMi mixes 1e-3). ``m`` must be below 1/N."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    n = w.numel()
    if min_weight <= 0:
        return w
    if min_weight * n >= 1.0:
        raise ValueError(
            f"min_weight: expected less than 1/N = {1.0 / n:.4f} for {n} domains, got {min_weight}"
        )
    return (1.0 - n * min_weight) * w + min_weight


def collapse_advice(factor: str) -> str:
    """What to change when the factor collapsed onto one domain (the log line and the run report)."""
    if factor == "paper":
        return 'With large student-teacher gaps use [ddk] factor = "excess_loss" (or max_weight < 1).'
    return "Use a larger [ddk] factor_temperature, a smaller alpha (more uniform floor) or max_weight < 1."


def _check_alpha_tau(alpha: float, temperature: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    if not (math.isfinite(temperature) and temperature >= 0.01):
        raise ValueError(f"temperature: expected a number >= 0.01 (nats), got {temperature}")


def cap_weights(weights: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Clip every weight to ``max_weight`` and give the excess to the others in proportion (water-filling).

    ``max_weight >= 1`` is no cap; ``max_weight`` must be at least 1/N (else no distribution fits)."""
    w = torch.as_tensor(weights, dtype=torch.float64).clone()
    n = w.numel()
    if max_weight >= 1.0:
        return w
    if max_weight * n < 1.0 - 1e-12:
        raise ValueError(
            f"max_weight: expected at least 1/N = {1.0 / n:.4f} for {n} domains, got {max_weight}"
        )
    for _ in range(n):  # at most n rounds: each fixes at least one more domain at the cap
        over = w > max_weight
        if not over.any():
            break
        excess = float((w[over] - max_weight).sum())
        w[over] = max_weight
        free = ~over & (w < max_weight)
        if free.any():
            w[free] += excess * w[free] / w[free].sum() if w[free].sum() > 0 else excess / int(free.sum())
    return w / w.sum()


def excess_loss_discrepancy(student_losses, teacher_losses, alpha: float = 0.5, temperature: float = 1.0):
    """The robust domain factor (ddk_fast's default), r_0 of the ``excess_loss`` factor:

        r_0[i] = α · softmax_i((CE_S[i] − CE_T[i]) / τ) + (1 − α) / N

    For small gaps g, the paper's exp(g) ≈ 1 + g, so softmax over g (τ = 1) is Eq. 1 up to O(g²); for
    gaps of several nats Eq. 1's softmax over exp(g) turns one-hot, this one does not. The uniform floor
    (1 − α)/N is applied from the first interval on (Eq. 2 only adds it from the second).

    Args:
        student_losses, teacher_losses: [N] per-domain mean cross-entropy (nats).
        alpha: weight of the factor against the uniform floor, in [0, 1].
        temperature: τ in nats (>= 0.01); larger is flatter.
    Returns:
        [N] float64 weights summing to 1.
    """
    _check_alpha_tau(alpha, temperature)
    g = _gaps(student_losses, teacher_losses)
    return alpha * torch.softmax(g / temperature, dim=0) + (1.0 - alpha) / g.numel()


def smooth_excess_loss_weights(
    previous, student_losses, teacher_losses, alpha: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. 2's smooth update with the excess-loss factor: ψ = r_t · exp((CE_S − CE_T)/τ),
    r_{t+1} = α ψ/Σψ + (1 − α)/N (a multiplicative-weights step on the gap, in log space)."""
    _check_alpha_tau(alpha, temperature)
    return _smooth(previous, _gaps(student_losses, teacher_losses) / temperature, alpha)


def minimax_shares(gaps, progress) -> torch.Tensor:
    """The mix that minimises the largest predicted gap after the next interval (``factor = "minimax"``).

    Model: over one interval a domain's gap falls by ``progress[i] · w[i]`` (its fall per unit of weight,
    linear in its share; the factor passes one fitted ρ for every domain). ``min_w max_i (g_i − ρ_i w_i)``
    over the simplex is water-filling: a level c with ``w_i = max(0, (g_i − c) / ρ_i)`` and ``Σ w_i = 1``
    (found by bisection; Σ w is decreasing in c).

    Args:
        gaps: [N] current gaps g (nats).
        progress: [N] ρ > 0, nats of gap closed per unit of weight over one interval.
    Returns:
        [N] float64 shares summing to 1 (0 for domains already below the level).
    """
    g = torch.as_tensor(gaps, dtype=torch.float64).flatten()
    rho = torch.as_tensor(progress, dtype=torch.float64).flatten()
    if g.shape != rho.shape or not (rho > 0).all() or not torch.isfinite(g).all():
        raise ValueError(f"minimax_shares: expected finite gaps and positive progress, got {g}, {rho}")
    lo = float((g - rho).min())  # at c = min(g − ρ): Σ w >= 1 (the domain attaining it alone has w = 1)
    hi = float(g.max())  # at c = max(g): Σ w = 0
    for _ in range(100):
        c = 0.5 * (lo + hi)
        if float(((g - c).clamp(min=0) / rho).sum()) > 1.0:
            lo = c
        else:
            hi = c
    w = (g - lo).clamp(min=0) / rho
    return w / w.sum()


def _progress(history: list[dict], gaps: torch.Tensor) -> torch.Tensor | None:
    """ρ: nats of gap closed per unit of weight over one interval, one number for every domain, fitted on all
    recorded intervals. Each interval's gap falls are regressed on the weights used in it with an intercept
    per interval (``fall_i = b_t + ρ · w_i``: b_t is what every domain gains from any token, transfer; ρ what
    its own share adds); None when the weights never differed between domains or ρ <= 0 (then the caller
    takes an excess-loss step)."""
    seen = [_gaps(h["student_loss"], h["teacher_loss"]) for h in history] + [gaps]
    num = den = 0.0
    for h, g0, g1 in zip(history, seen, seen[1:]):
        w = torch.as_tensor(h["weights"], dtype=torch.float64)
        if g0.shape != g1.shape or w.shape != g1.shape:
            return None
        fall, w = g0 - g1, w - w.mean()
        num += float((w * (fall - fall.mean())).sum())
        den += float((w * w).sum())
    if den <= 1e-12 or not num > 0:
        return None
    return torch.full_like(gaps, num / den)


@dataclass
class DomainMixer:
    """The trainer's domain-weight policy: DDK (with or without smoothing), uniform or static.

    ``update(step, student_losses, teacher_losses)`` is called at step 0 and every K steps with fresh
    validation losses; it returns the weights for the next K steps and records them in ``history``.

    DDK factors: ``"paper"`` is Eq. 1 / Eq. 2 exactly (softmax of perplexity ratios exp(CE_S − CE_T));
    ``"excess_loss"`` uses the gap CE_S − CE_T over a temperature, with the uniform floor from r_0 on, and
    keeps every domain at ``min_weight`` or more (:func:`floor_weights`; the paper factor stays exact, no
    floor), so that at α = 1 no domain is pushed to ~1e-280 and left there. ``"minimax"`` starts as
    ``excess_loss`` (r_0) and then mixes in :func:`minimax_shares`: the shares that minimise the largest gap
    predicted for the next interval, with the gap fall per unit of weight fitted on the run's own updates
    (docs/ddk_factors.md). ``max_weight`` < 1 caps any one domain's weight (any factor). ``collapsed`` is
    True when the last update's factor, before the floor and the cap, gave one domain more than
    ``COLLAPSE_WEIGHT`` (``history[k]["factor"]``).
    """

    num_domains: int
    mode: str = "ddk"
    alpha: float = 0.5
    smoothing: bool = True
    static_weights: list[float] | None = None
    factor: str = "paper"
    factor_temperature: float = 1.0
    max_weight: float = 1.0
    weights: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    min_weight: float = DEFAULT_MIN_WEIGHT
    factor_share: list[float] = field(default_factory=list)  # the last update's factor before any floor

    def initial(self) -> list[float]:
        if self.mode == "static":
            w = torch.tensor(self.static_weights, dtype=torch.float64)
            return (w / w.sum()).tolist()
        return [1.0 / self.num_domains] * self.num_domains

    def _factor(self, student_losses, teacher_losses) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, the factor before the floor): Eq. 1 / Eq. 2 or the excess-loss factor."""
        first = not self.weights or not self.smoothing
        if self.factor == "paper":
            if first:
                r0 = domain_discrepancy(student_losses, teacher_losses)  # r_0 (Eq. 1): no floor
                return r0, r0
            log_factor = _ratio(student_losses, teacher_losses)
        elif self.factor in ("excess_loss", "minimax"):
            _check_alpha_tau(self.alpha, self.factor_temperature)
            gaps = _gaps(student_losses, teacher_losses)
            log_factor = gaps / self.factor_temperature
            if first:
                psi = torch.softmax(log_factor, dim=0)
                return self.alpha * psi + (1.0 - self.alpha) / psi.numel(), psi
            rho = _progress(self.history, gaps) if self.factor == "minimax" else None
            if rho is not None:
                psi = minimax_shares(gaps, rho)
                return self.alpha * psi + (1.0 - self.alpha) / psi.numel(), psi
        else:
            raise ValueError(f"factor: expected 'paper', 'excess_loss' or 'minimax', got {self.factor!r}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha: expected a number in [0, 1], got {self.alpha}")
        psi = _smooth_factor(self.weights, log_factor)
        return self.alpha * psi + (1.0 - self.alpha) / psi.numel(), psi

    def update(self, step: int, student_losses, teacher_losses) -> list[float]:
        if self.mode != "ddk":
            new = self.initial()
            self.factor_share = []
        else:
            w, psi = self._factor(student_losses, teacher_losses)
            if self.factor != "paper":
                w = floor_weights(w, self.min_weight)
            new = cap_weights(w, self.max_weight).tolist()
            self.factor_share = psi.tolist()
        return self.record(step, new, student_losses, teacher_losses)

    def weight_bounds(self) -> list[float]:
        """The largest weight each domain can get from any update, whatever the losses (what a teacher cache
        must cover): uniform 1/N; static its proportion; DDK 1 with the paper factor (Eq. 1's r_0 has no
        floor), else α + (1 − α)/N (every other domain keeps its floor (1 − α)/N); then ``max_weight``."""
        n = self.num_domains
        if self.mode == "uniform":
            return [1.0 / n] * n
        if self.mode == "static":
            return self.initial()
        if self.factor == "paper":
            top = 1.0
        else:
            top = self.alpha + (1.0 - self.alpha) / n
            if self.min_weight > 0:
                top = (1.0 - n * self.min_weight) * top + self.min_weight
        return [min(top, max(self.max_weight, 1.0 / n))] * n

    def record(self, step: int, weights, student_losses, teacher_losses) -> list[float]:
        """Make ``weights`` the current ones and add them to ``history`` (``update`` and the curriculum's
        weights over the active domains, :meth:`~ddk_fast.training.curriculum.Curriculum.weights`, end
        here)."""
        new = list(weights)
        self.weights = new
        entry = {
            "step": step,
            "weights": list(new),
            "student_loss": [float(x) for x in student_losses],
            "teacher_loss": [float(x) for x in teacher_losses],
        }
        if self.factor_share:
            entry["factor"] = [float(x) for x in self.factor_share]
        self.history.append(entry)
        return new

    @property
    def collapsed(self) -> bool:
        """The last update's factor (before the floor and the cap) gave one domain more than
        ``COLLAPSE_WEIGHT``."""
        share = self.factor_share or self.weights
        return bool(share) and len(share) > 1 and max(share) > COLLAPSE_WEIGHT

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.weights = list(state["weights"])
        self.history = list(state["history"])
