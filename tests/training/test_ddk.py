"""DDK Eq. 1 and Eq. 2 on hand-computed cases (PAPERS.md worked example) and the mixer's modes."""

from __future__ import annotations

import math

import pytest
import torch

from ddk_fast import domain_discrepancy, smooth_domain_weights
from ddk_fast.ddk import DomainMixer

LN2, LN15 = math.log(2.0), math.log(1.5)


def test_eq1_is_softmax_of_perplexity_ratio():
    # perplexity ratios (2, 1): r = softmax(2, 1) = (e^2, e^1) / (e^2 + e^1)
    r = domain_discrepancy([LN2 + 1.0, 1.0], [1.0, 1.0])
    e2, e1 = math.exp(2), math.exp(1)
    assert r.tolist() == pytest.approx([e2 / (e2 + e1), e1 / (e2 + e1)], abs=1e-12)
    assert r.tolist() == pytest.approx([0.7311, 0.2689], abs=1e-4)


def test_eq2_worked_example():
    r0 = domain_discrepancy([LN2, 0.0], [0.0, 0.0])
    r1 = smooth_domain_weights(r0, [LN2, 0.0], [0.0, 0.0], alpha=0.5)
    assert r1.tolist() == pytest.approx([0.6904, 0.3096], abs=1e-4)
    r2 = smooth_domain_weights(r1, [LN15, 0.0], [0.0, 0.0], alpha=0.5)
    assert r2.tolist() == pytest.approx([0.6431, 0.3569], abs=1e-4)
    # by hand: psi = r1 * exp(ratio); r2 = 0.5 psi / sum psi + 0.25
    psi = [r1[0].item() * math.exp(1.5), r1[1].item() * math.exp(1.0)]
    assert r2[0].item() == pytest.approx(0.5 * psi[0] / sum(psi) + 0.25, abs=1e-12)


def test_ratio_uses_perplexity_not_loss():
    # equal CE differences give equal ratios whatever the absolute loss level
    a = domain_discrepancy([3.0, 1.0], [2.0, 1.0])
    b = domain_discrepancy([7.0, 5.0], [6.0, 5.0])
    assert torch.allclose(a, b)
    assert a[0] > a[1]


def test_alpha_limits_and_floor():
    prev = torch.tensor([0.5, 0.5])
    uniform = smooth_domain_weights(prev, [5.0, 0.0], [0.0, 0.0], alpha=0.0)
    assert uniform.tolist() == pytest.approx([0.5, 0.5])
    w = smooth_domain_weights(torch.ones(3) / 3, [50.0, 0.0, 0.0], [0.0, 0.0, 0.0], alpha=0.5)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    assert w.min().item() >= (1 - 0.5) / 3 - 1e-12  # the uniform floor (1-α)/N


def test_huge_gap_does_not_overflow():
    r = domain_discrepancy([100.0, 0.0], [0.0, 0.0])  # exp(exp(100)) would overflow
    assert torch.isfinite(r).all() and r[0].item() == pytest.approx(1.0)


def test_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"student_losses and teacher_losses: expected the same number"):
        domain_discrepancy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"student_losses: expected finite"):
        domain_discrepancy([float("nan"), 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 1\], got 1.5"):
        smooth_domain_weights([0.5, 0.5], [1.0, 1.0], [1.0, 1.0], alpha=1.5)
    with pytest.raises(ValueError, match=r"previous: expected 2 domain weights, got 3"):
        smooth_domain_weights([0.2, 0.3, 0.5], [1.0, 1.0], [1.0, 1.0])


def test_mixer_modes():
    s, t = [LN2, 0.0], [0.0, 0.0]
    ddk = DomainMixer(2, "ddk", alpha=0.5)
    assert ddk.update(0, s, t) == pytest.approx([0.7311, 0.2689], abs=1e-4)  # r_0 from Eq. 1
    assert ddk.update(10, s, t) == pytest.approx([0.6904, 0.3096], abs=1e-4)  # Eq. 2 afterwards
    no_smooth = DomainMixer(2, "ddk", smoothing=False)
    no_smooth.update(0, s, t)
    assert no_smooth.update(10, s, t) == pytest.approx([0.7311, 0.2689], abs=1e-4)
    assert DomainMixer(2, "uniform").update(0, s, t) == [0.5, 0.5]
    assert DomainMixer(2, "static", static_weights=[3.0, 1.0]).update(0, s, t) == [0.75, 0.25]
    state = ddk.state_dict()
    again = DomainMixer(2, "ddk")
    again.load_state_dict(state)
    assert again.update(20, s, t) == ddk.update(20, s, t)


def test_excess_loss_factor_matches_the_paper_for_small_gaps():
    from ddk_fast.ddk import excess_loss_discrepancy

    # exp(g) ≈ 1 + g: for gaps of a few hundredths of a nat, softmax over g and over exp(g) agree to O(g²)
    s, t = [1.03, 1.01, 1.00], [1.0, 1.0, 1.0]
    paper = domain_discrepancy(s, t)
    robust = excess_loss_discrepancy(s, t, alpha=1.0, temperature=1.0)
    assert torch.allclose(paper, robust, atol=2e-4)
    assert (robust.argsort() == paper.argsort()).all()


def test_excess_loss_factor_does_not_collapse_on_large_gaps():
    from ddk_fast.ddk import excess_loss_discrepancy, smooth_excess_loss_weights

    s, t = [6.0, 4.0, 3.0], [2.0, 2.0, 2.0]  # gaps of 4, 2, 1 nats: the paper's ratios are 55, 7.4, 2.7
    paper = domain_discrepancy(s, t)
    assert paper.max().item() > 0.999999  # Eq. 1 is one-hot here
    r0 = excess_loss_discrepancy(s, t, alpha=0.5, temperature=1.0)
    # by hand: 0.5 * softmax(4, 2, 1) + 0.5 / 3
    e = [math.exp(4), math.exp(2), math.exp(1)]
    assert r0.tolist() == pytest.approx([0.5 * x / sum(e) + 0.5 / 3 for x in e], abs=1e-12)
    assert r0.min().item() >= 0.5 / 3 - 1e-12  # the floor holds from r_0 on
    r1 = smooth_excess_loss_weights(r0, s, t, alpha=0.5, temperature=2.0)
    psi = [r0[i].item() * math.exp(g / 2.0) for i, g in enumerate((4, 2, 1))]
    assert r1.tolist() == pytest.approx([0.5 * p / sum(psi) + 0.5 / 3 for p in psi], abs=1e-12)
    flatter = excess_loss_discrepancy(s, t, alpha=1.0, temperature=4.0)
    sharper = excess_loss_discrepancy(s, t, alpha=1.0, temperature=0.5)
    assert flatter.max() < sharper.max()
    with pytest.raises(ValueError, match=r"temperature: expected a number >= 0.01 \(nats\), got 0.0"):
        excess_loss_discrepancy(s, t, temperature=0.0)


def test_weight_cap_redistributes_in_proportion():
    from ddk_fast.ddk import cap_weights

    w = cap_weights(torch.tensor([0.7, 0.2, 0.1]), 0.5)
    assert w.tolist() == pytest.approx([0.5, 0.2 + 0.2 * 2 / 3, 0.1 + 0.2 / 3])
    assert cap_weights(torch.tensor([0.7, 0.2, 0.1]), 1.0).tolist() == pytest.approx([0.7, 0.2, 0.1])
    # two rounds: the second domain hits the cap too
    w = cap_weights(torch.tensor([0.9, 0.09, 0.01], dtype=torch.float64), 0.4)
    assert w.max().item() <= 0.4 + 1e-12 and w.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"max_weight: expected at least 1/N"):
        cap_weights(torch.tensor([0.5, 0.3, 0.2]), 0.3)


def test_mixer_excess_loss_cap_and_collapse_flag():
    s, t = [6.0, 2.0], [2.0, 2.0]
    paper = DomainMixer(2, "ddk", factor="paper")
    paper.update(0, s, t)
    assert paper.collapsed
    robust = DomainMixer(2, "ddk", factor="excess_loss", factor_temperature=1.0, max_weight=0.7)
    w = robust.update(0, s, t)
    # the weights are capped, but the factor before the floor and the cap put 0.98 on one domain
    assert max(w) == pytest.approx(0.7) and robust.collapsed
    assert max(robust.history[-1]["factor"]) == pytest.approx(
        torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item()
    )


def test_collapse_warning_can_fire_at_the_default_alpha():
    """At α = 0.5 with five domains no final weight can exceed 0.6 (the floor), so the collapse check reads
    the factor before the floor: one domain ahead by 2 nats at τ = 0.5 gives it a factor share > 0.9."""
    s, t = [4.0, 2.0, 2.0, 2.0, 2.0], [2.0] * 5
    mixer = DomainMixer(5, "ddk", factor="excess_loss", factor_temperature=0.5, alpha=0.5)
    w = mixer.update(0, s, t)
    assert max(w) < 0.6 and mixer.collapsed and mixer.history[-1]["factor"][0] > 0.9
    calm = DomainMixer(5, "ddk", factor="excess_loss", factor_temperature=0.5, alpha=0.5)
    calm.update(0, [2.2, 2.0, 2.1, 2.0, 2.0], t)
    assert not calm.collapsed


def test_min_weight_lets_a_pushed_down_domain_recover():
    """α = 1 (no uniform floor): without min_weight a domain pushed down for a few intervals ends ~1e-100 and
    cannot come back when its gap becomes the largest; with the default floor (1e-3) it can."""
    from ddk_fast.ddk import DEFAULT_MIN_WEIGHT, floor_weights

    t = [1.0, 1.0, 1.0]

    def run(min_weight):
        m = DomainMixer(
            3, "ddk", factor="excess_loss", factor_temperature=0.1, alpha=1.0, min_weight=min_weight
        )
        for step in range(6):  # domain 0 far behind: domains 1 and 2 pushed down
            m.update(step, [6.0, 1.0, 1.0], t)
        low = m.weights[1]
        m.update(6, [1.0, 3.0, 1.0], t)  # now domain 1 has the largest gap
        return low, m.weights[1]

    low, after = run(0.0)
    assert low < 1e-100 and after < 0.5
    low, after = run(DEFAULT_MIN_WEIGHT)
    assert low >= DEFAULT_MIN_WEIGHT - 1e-15 and after > 0.9
    w = floor_weights(torch.tensor([1.0, 0.0, 0.0]), 0.01)
    assert w.tolist() == pytest.approx([0.98, 0.01, 0.01]) and w.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_weight: expected less than 1/N"):
        floor_weights(torch.tensor([0.5, 0.5]), 0.5)


def test_paper_factor_ignores_min_weight():
    s, t = [6.0, 2.0, 2.5], [2.0, 2.0, 2.0]
    m = DomainMixer(3, "ddk", factor="paper", min_weight=0.05)
    r0 = m.update(0, s, t)
    assert r0 == pytest.approx(domain_discrepancy(s, t).tolist()) and min(r0) < 0.05
    r1 = m.update(1, s, t)
    assert r1 == pytest.approx(smooth_domain_weights(r0, s, t, 0.5).tolist())


# ------------------------------------------------------------------------------------- the minimax factor
def test_minimax_shares_equalise_the_predicted_gaps():
    from ddk_fast.ddk import minimax_shares

    g = torch.tensor([1.0, 0.8, 0.2], dtype=torch.float64)
    rho = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    w = minimax_shares(g, rho)
    assert w.sum().item() == pytest.approx(1.0)
    after = g - rho * w
    fed = w > 1e-9
    # every fed domain ends at the same level, no unfed one above it: the minimax of g - ρw on the simplex
    assert torch.allclose(after[fed], after[fed][0].expand(int(fed.sum())), atol=1e-9)
    assert (after[~fed] <= after[fed][0] + 1e-9).all()
    assert w[2] == 0  # the easy domain is below the level
    # brute force over a grid of the simplex: nothing beats it
    best = min(
        max((g - rho * torch.tensor([a, b, 1 - a - b], dtype=torch.float64)).tolist())
        for a in torch.linspace(0, 1, 101).tolist()
        for b in torch.linspace(0, 1, 101).tolist()
        if a + b <= 1
    )
    assert after.max().item() <= best + 1e-9


def test_minimax_progress_is_the_pooled_slope_of_gap_falls_on_weights():
    from ddk_fast.ddk import _progress

    w1, w2 = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    g0 = torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)
    g1 = g0 - (0.4 + 0.5 * torch.tensor(w1, dtype=torch.float64))  # transfer 0.4, ρ 0.5
    g2 = g1 - (0.1 + 0.5 * torch.tensor(w2, dtype=torch.float64))  # transfer 0.1, ρ 0.5
    hist = [
        {"weights": w1, "student_loss": (g0 + 1).tolist(), "teacher_loss": [1.0] * 3},
        {"weights": w2, "student_loss": (g1 + 1).tolist(), "teacher_loss": [1.0] * 3},
    ]
    assert _progress(hist, g2).tolist() == pytest.approx([0.5] * 3)
    equal = [{**h, "weights": [1 / 3] * 3} for h in hist]  # the weights never differed: ρ unidentifiable
    assert _progress(equal, g2) is None


def test_minimax_factor_feeds_the_domains_above_the_level():
    m = DomainMixer(3, "ddk", alpha=1.0, factor="minimax", factor_temperature=0.5, min_weight=0.0)
    m.update(0, [3.0, 2.5, 1.2], [1.0, 1.0, 1.0])  # r_0: the excess-loss softmax, unequal weights
    w0 = torch.tensor(m.weights, dtype=torch.float64)
    g1 = torch.tensor([1.8, 1.3, 0.0], dtype=torch.float64) - 1.0 * w0  # all fell 0.2 + ρ w, ρ = 1
    w1 = m.update(10, (g1 + 1).tolist(), [1.0, 1.0, 1.0])
    assert w1 == pytest.approx(m.factor_share) and sum(w1) == pytest.approx(1.0)
    assert w1[2] == 0.0 and w1[0] > w1[1] > 0  # far behind: most; below the level: nothing
    # the fed domains end level: g - ρw equal (ρ = 1)
    assert float(g1[0] - w1[0]) == pytest.approx(float(g1[1] - w1[1]))


def test_minimax_factor_without_progress_takes_an_excess_loss_step_and_keeps_floors():
    m = DomainMixer(3, "ddk", alpha=0.8, factor="minimax", factor_temperature=0.5)
    e = DomainMixer(3, "ddk", alpha=0.8, factor="excess_loss", factor_temperature=0.5)
    for mixer in (m, e):
        mixer.update(0, [2.0, 1.5, 1.2], [1.0, 1.0, 1.0])
        mixer.update(10, [2.1, 1.6, 1.3], [1.0, 1.0, 1.0])  # every gap rose: nothing to extrapolate
    assert m.weights == pytest.approx(e.weights)
    m.update(20, [1.0, 1.5, 1.2], [1.0, 1.0, 1.0])  # domain 0 closed fast: the level leaves it out
    assert min(m.weights) >= (1 - 0.8) / 3 * (1 - 3e-3)  # the (1 - α)/N floor survives
    assert m.weights[0] == pytest.approx(min(m.weights))
    assert sum(m.weights) == pytest.approx(1.0)


def test_minimax_factor_under_a_curriculum_reads_the_active_domains_history():
    from ddk_fast.training.curriculum import subset_weights

    m = DomainMixer(3, "ddk", alpha=1.0, factor="minimax", factor_temperature=0.5, min_weight=0.0)
    m.record(0, [0.7, 0.3, 0.0], [3.0, 3.0, 9.0], [1.0, 1.0, 1.0])
    w = subset_weights(m, [0, 1], [2.0, 2.6, 9.0], [1.0, 1.0, 1.0], restart=False)  # ρ = 0.6 / 0.4
    assert w[2] == 0.0 and w[1] > w[0] and sum(w) == pytest.approx(1.0)
