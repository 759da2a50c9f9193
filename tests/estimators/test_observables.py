"""Covariances, correlations and means of observables from per-chain moments
(slt_jax.estimators.observables), on synthetic arrays: no sampler runs here."""

import numpy as np
import pytest
from scipy import stats

from slt_jax.estimators import observables as est

pytestmark = pytest.mark.unit


def moments_of(a, b):
    """Per-chain moments of traces a (C, N, k_a) and b (C, N, k_b)."""
    return est.ChainMoments(np.full(a.shape[0], a.shape[1], np.float64), a.sum(1), b.sum(1),
                            np.einsum("cni,cnj->cij", a, b), np.square(a).sum(1), np.square(b).sum(1))


def correlated(rng, chains, draws, k_a, k_b, shift=0.0):
    """Gaussian draws of (a, b) with a known joint covariance; returns a, b and Cov(a, b)."""
    k = k_a + k_b
    root = rng.standard_normal((k, k)) / np.sqrt(k)
    z = rng.standard_normal((chains, draws, k)) @ root.T + shift
    joint = root @ root.T
    return z[..., :k_a], z[..., k_a:], joint[:k_a, k_a:], np.diag(joint)


def test_the_jackknife_removes_the_product_of_means_bias_exactly():
    # For chains of equal length, the delete-one-chain jackknife of P/N − (S_a/N)(S_b/N) is
    # mean(p_c) − s̄·t̄ + Ĉov(s, t)/C: the unbiased estimate when chains are independent replicas.
    rng = np.random.default_rng(0)
    a, b, _, _ = correlated(rng, 6, 40, 3, 2, shift=1.5)
    got = est.covariance(moments_of(a, b)).value
    s, t = a.mean(1), b.mean(1)
    p = np.einsum("cni,cnj->cij", a, b).mean(0) / a.shape[1]
    between = np.einsum("ci,cj->ij", s - s.mean(0), t - t.mean(0)) / (len(s) - 1)
    np.testing.assert_allclose(got, p - np.outer(s.mean(0), t.mean(0)) + between / len(s), rtol=1e-10)


def test_mean_se_is_the_chain_spread_and_variance_is_the_diagonal_of_the_covariance():
    rng = np.random.default_rng(1)
    a, _, _, _ = correlated(rng, 5, 30, 4, 1)
    m = moments_of(a, a)
    mean = est.mean(m.count, m.sum_a)
    np.testing.assert_allclose(mean.value, a.reshape(-1, 4).mean(0), rtol=1e-12)
    np.testing.assert_allclose(mean.se, a.mean(1).std(0, ddof=1) / np.sqrt(5), rtol=1e-10)
    var, cov = est.variance(m.count, m.sum_a, m.square_a), est.covariance(m)
    np.testing.assert_allclose(var.value, np.diag(cov.value), rtol=1e-10)
    np.testing.assert_allclose(var.se, np.diag(cov.se), rtol=1e-10)


def test_blocks_of_entries_change_nothing_and_correlations_are_covariances_scaled():
    rng = np.random.default_rng(2)
    a, b, _, _ = correlated(rng, 4, 25, 7, 3)
    m = moments_of(a, b)
    whole, blocked = est.covariance(m), est.covariance(m, block_entries=5)
    np.testing.assert_allclose(blocked.value, whole.value, rtol=1e-12)
    np.testing.assert_allclose(blocked.se, whole.se, rtol=1e-12)
    corr = est.correlation(m, block_entries=5)
    assert np.all(np.abs(corr.value) < 1)
    pooled = np.corrcoef(a.reshape(-1, 7).T, b.reshape(-1, 3).T)[:7, 7:]
    # The jackknife correction moves a correlation by O(1/(C·N)) only.
    np.testing.assert_allclose(corr.value, pooled, atol=0.05)


@pytest.mark.parametrize("seed", [0, 1])
def test_standard_errors_cover_the_true_covariance(seed):
    # 16 chains: the jackknife z is close to Student t with 15 degrees of freedom. Over 400
    # independent replicas of a 2 × 2 covariance (1600 entries, correlated in fours) the share
    # beyond |t| = 2 is P(|t_15| > 2) = 6.4 % under the null; 3.5 %–10 % is about ±4 sd of a
    # count of 400 independent groups.
    rng = np.random.default_rng(seed)
    z = []
    for _ in range(400):
        a, b, truth, _ = correlated(rng, 16, 50, 2, 2)
        c = est.covariance(moments_of(a, b))
        z.append((c.value - truth) / c.se)
    share = np.mean(np.abs(np.array(z)) > 2)
    assert 0.035 < share < 0.10, share
    assert abs(2 * stats.t.sf(2, 15) - 0.064) < 0.001


def test_one_chain_has_no_standard_error_and_short_chains_are_refused():
    rng = np.random.default_rng(3)
    a, b, _, _ = correlated(rng, 1, 20, 2, 2)
    one = est.covariance(moments_of(a, b))
    assert np.all(np.isfinite(one.value)) and np.all(np.isnan(one.se))
    with pytest.raises(ValueError, match="at least 2 draws"):
        est.covariance(moments_of(a[:, :1], b[:, :1]))


def test_principal_components_reconstruct_the_matrix_and_rank_one_explains_all():
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((5, 3))
    pca = est.principal_components(matrix)
    np.testing.assert_allclose(pca.scores @ pca.loadings + pca.center, matrix, atol=1e-12)
    np.testing.assert_allclose(pca.explained.sum(), 1.0)
    assert np.all(np.diff(pca.singular_values) <= 0)
    rank_one = np.outer(rng.standard_normal(6), [1.0, -2.0, 0.5])
    pca = est.principal_components(rank_one, center=False)
    assert pca.explained[0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(pca.loadings[0]), np.abs([1.0, -2.0, 0.5]) / np.sqrt(5.25))
    assert pca.loadings[0][np.argmax(np.abs(pca.loadings[0]))] > 0
    with pytest.raises(ValueError, match="non-finite"):
        est.principal_components([[1.0, np.nan]])
