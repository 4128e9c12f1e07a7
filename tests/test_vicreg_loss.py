"""VICRegLoss (core/losses/vicreg.py) against an independent float64 re-implementation of the paper's
formula, known values, gradients, input validation, bf16 autocast and the no-process-group gather."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.losses import VICRegLoss


def reference_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict[str, float]:
    """Straightforward float64 loops over dimensions: invariance (MSE), variance hinge on the unbiased
    std, sum of squared off-diagonal (unbiased) covariances / D; the two branches averaged / summed."""
    a = z1.detach().double().numpy()
    b = z2.detach().double().numpy()
    n, d = a.shape
    invariance = float(((a - b) ** 2).sum() / (n * d))

    def variance(x):
        total = 0.0
        for j in range(d):
            col = x[:, j]
            var = ((col - col.sum() / n) ** 2).sum() / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + eps))
        return total / d

    def covariance(x):
        means = [x[:, j].sum() / n for j in range(d)]
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = ((x[:, i] - means[i]) * (x[:, j] - means[j])).sum() / (n - 1)
                    total += c * c
        return total / d

    return {"invariance": invariance, "variance": variance(a) / 2 + variance(b) / 2,
            "covariance": covariance(a) + covariance(b)}


def reference_loss(z1, z2, sim=25.0, std=25.0, cov=1.0, eps=1e-4) -> float:
    t = reference_terms(z1, z2, eps)
    return sim * t["invariance"] + std * t["variance"] + cov * t["covariance"]


def random_pair(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated pair, per-dimension scales in [0.3, 2] so that the variance hinge is active in some
    dimensions only, plus correlated dimensions so that the covariance term is not trivially small."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.empty(d).uniform_(0.3, 2.0, generator=g)
    scale[0] = 0.1  # at least one dimension below std 1 whatever the mixing
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    z1 = (torch.randn(n, d, generator=g) @ mix) * scale + torch.randn(d, generator=g)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g)
    return z1, z2


@pytest.mark.parametrize("n,d", [(16, 8), (5, 24), (64, 3)])
@pytest.mark.parametrize("coeffs", [dict(), dict(sim_coeff=1.0, std_coeff=10.0, cov_coeff=0.5, eps=1e-3)])
def test_matches_independent_reference(n, d, coeffs):
    z1, z2 = random_pair(n, d, seed=n * 100 + d)
    crit = VICRegLoss(**coeffs)
    loss = crit(z1, z2)
    eps = coeffs.get("eps", 1e-4)
    expected = reference_loss(z1, z2, coeffs.get("sim_coeff", 25.0), coeffs.get("std_coeff", 25.0),
                              coeffs.get("cov_coeff", 1.0), eps)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    terms = reference_terms(z1, z2, eps)
    assert set(crit.last_terms) == {"invariance", "variance", "covariance"}
    for k, v in terms.items():
        assert not crit.last_terms[k].requires_grad
        assert float(crit.last_terms[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # the random inputs really exercise every term (hinge partly active, correlated dimensions)
    assert terms["invariance"] > 0.1 and terms["variance"] > 1e-3 and terms["covariance"] > 1e-2


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_known_values_orthogonal_design_and_identical_inputs():
    # columns 1..4 of an 8x8 Hadamard matrix: zero mean, mutually orthogonal; x2 -> unbiased var 32/7 > 1
    z = 2.0 * hadamard(8)[:, 1:5]
    crit = VICRegLoss()
    loss = crit(z, z.clone())
    assert crit.last_terms["invariance"].item() == 0.0
    assert crit.last_terms["variance"].item() == 0.0
    assert crit.last_terms["covariance"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_collapsed_input_gives_full_variance_penalty():
    row = torch.randn(1, 6)
    z = row.expand(10, 6).clone()
    crit = VICRegLoss(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)
    loss = crit(z, z.clone())
    expected_var = 1.0 - math.sqrt(1e-4)  # 0.99 for each branch, averaged
    assert crit.last_terms["variance"].item() == pytest.approx(expected_var, rel=1e-6)
    assert crit.last_terms["covariance"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(25.0 * expected_var, rel=1e-6)


def test_invariance_term_is_mse_and_weighted_by_sim_coeff():
    z1 = torch.zeros(4, 3)
    z2 = torch.full((4, 3), 2.0)
    only_inv = VICRegLoss(sim_coeff=3.0, std_coeff=0.0, cov_coeff=0.0)
    assert only_inv(z1, z2).item() == pytest.approx(3.0 * 4.0)


def test_gradients_flow_to_both_inputs_and_are_finite():
    z1, z2 = random_pair(12, 6, seed=0)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    VICRegLoss()(z1, z2).backward()
    for g in (z1.grad, z2.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # collapsed inputs (the worst case for sqrt) still give finite gradients thanks to eps
    z = torch.ones(5, 4, requires_grad=True)
    VICRegLoss()(z, z * 1.0).backward()
    assert torch.isfinite(z.grad).all()


def test_gradient_matches_central_differences():
    z1, z2 = random_pair(6, 4, seed=3)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    crit = VICRegLoss()
    crit(z1, z2).backward()
    h = 1e-2
    for z, grad in ((z1, z1.grad), (z2, z2.grad)):
        for i, j in ((0, 0), (2, 1), (5, 3), (3, 2)):
            zp, zm = z.detach().clone(), z.detach().clone()
            zp[i, j] += h
            zm[i, j] -= h
            other = z2.detach() if z is z1 else z1.detach()
            lp = crit(zp, other) if z is z1 else crit(other, zp)
            lm = crit(zm, other) if z is z1 else crit(other, zm)
            fd = (lp.item() - lm.item()) / (2 * h)
            assert grad[i, j].item() == pytest.approx(fd, rel=2e-2, abs=2e-2), (i, j)


@pytest.mark.parametrize("shapes", [((8, 4), (8, 5)), ((8, 4), (7, 4)), ((8,), (8,)), ((2, 3, 4), (2, 3, 4)),
                                    ((1, 4), (1, 4)), ((8, 0), (8, 0))])
def test_bad_shapes_raise_value_error_naming_shapes(shapes):
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(ValueError) as exc:
        VICRegLoss()(a, b)
    msg = str(exc.value)
    assert "\n" not in msg and str(tuple(shapes[0])) in msg and str(tuple(shapes[1])) in msg


@pytest.mark.parametrize("arg", ["sim_coeff", "std_coeff", "cov_coeff", "eps"])
def test_negative_coefficient_raises_naming_argument(arg):
    with pytest.raises(ValueError, match=arg):
        VICRegLoss(**{arg: -1.0})


def test_bf16_autocast_result_is_float32_and_close_to_fp32():
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 32)
    x1, x2 = torch.randn(24, 16), torch.randn(24, 16)
    crit = VICRegLoss()
    ref = crit(proj(x1), proj(x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = proj(x1), proj(x2)
        assert z1.dtype == torch.bfloat16
        loss = crit(z1, z2)
    assert loss.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in crit.last_terms.values())
    assert loss.item() == pytest.approx(ref.item(), rel=3e-2)
    # inside the loss nothing is rounded to bf16: same value as the fp32 loss of the same bf16 inputs
    assert loss.item() == pytest.approx(crit(z1.float(), z2.float()).item(), rel=1e-6)
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_gather_without_process_group_is_local():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    z1, z2 = random_pair(10, 5, seed=7)
    a = VICRegLoss(gather=True)
    b = VICRegLoss(gather=False)
    assert a(z1, z2).item() == b(z1, z2).item()
    for k in a.last_terms:
        assert a.last_terms[k].item() == b.last_terms[k].item()


def test_exported_under_stable_name_and_old_exports_kept():
    import core.losses as losses

    assert losses.VICRegLoss is VICRegLoss and "VICRegLoss" in losses.__all__
    assert callable(losses.BarlowTwinsLoss) and callable(losses.cross_correlation)
    assert "gather=True" in repr(VICRegLoss())
    assert np.isfinite(VICRegLoss()(*random_pair(4, 2, seed=1)).item())
