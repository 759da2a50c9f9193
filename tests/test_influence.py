"""The Bayesian influence function (slt_jax.bayesian_influence) against closed forms.

Linear regression with loss ½(y − xᵀw)²: SGLD's stationary law is Gaussian-like with the
posterior's mean and a covariance S that solves the AR(1)/Lyapunov recursion with the minibatch
term (docs/mathematics.md §3.3, §8.4; ``groundtruth.linear_regression_posterior``); the BIF is
then −(½·s_ij² + m_i·m_j·s_ij) with s_ij = x_iᵀSx_j, m the residual means. The comparison is with
the closed form at SGLD's own S, not the exact posterior's (nβH + γI)⁻¹, which differs by
ε·a/4 ≈ 6 % here and is far outside the Monte Carlo error.

Tolerances come from the estimator's own standard error: the delete-one-chain jackknife over
C = 64 chains, so z = (BIF − truth)/se is close to Student t with 63 degrees of freedom, and
P(|t_63| > 4) = 1.7e-4: over the 256 entries of a seed 0.04 exceedances are expected under the
null; the tests allow one per seed (entries share chains, so exceedances cluster, but two in
one seed would have probability ≲ 1e-3 even then).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy import stats

import slt_jax
from slt_jax.groundtruth import linear_regression_posterior, squared_residual_covariance

N, D, QUERIES = 32, 3, 8
LINEAR = dict(step_size=0.02, localization=1.0, num_chains=64, num_burnin=300, num_draws=1000, batch_size=N,
              chunk_size=256, progress=False)
Z = 4.0


def squared_error(w, batch):
    return 0.5 * jnp.mean(jnp.square(batch["y"] - batch["x"] @ w))


def regression(seed, n=N, queries=QUERIES):
    rng = np.random.default_rng(seed)
    x, xq = rng.standard_normal((n, D)), rng.standard_normal((queries, D))
    truth = np.array([1.0, -2.0, 0.5])
    y, yq = x @ truth + rng.standard_normal(n), xq @ truth + rng.standard_normal(queries)
    return {"x": x, "y": y}, {"x": xq, "y": yq}, np.linalg.lstsq(x, y, rcond=None)[0]


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def linear(request):
    data, query, w_star = regression(request.param)
    result = slt_jax.bayesian_influence(squared_error, jnp.asarray(w_star, jnp.float32), data,
                                        jax.random.key(request.param), query_data=query, **LINEAR)
    nbeta = N / np.log(N)
    law = linear_regression_posterior(data["x"], data["y"], center=w_star, nbeta=nbeta, localization=1.0,
                                      step_size=LINEAR["step_size"], batch_size=N)
    exact = linear_regression_posterior(data["x"], data["y"], center=w_star, nbeta=nbeta, localization=1.0)
    return data, query, w_star, result, law, exact, request.param


def test_bif_matches_the_closed_form_at_sgld_stationary_covariance(linear):
    data, query, _, result, law, exact, _ = linear
    truth = -squared_residual_covariance(data["x"], data["y"], query["x"], query["y"], law)
    z = (result.covariance - truth) / result.se
    expected = z.size * 2 * stats.t.sf(Z, df=LINEAR["num_chains"] - 1)
    print(f"max |z| = {np.abs(z).max():.2f}, {int(np.sum(np.abs(z) > Z))} beyond {Z} (expected {expected:.2f}); "
          f"mean z = {z.mean():+.2f}, sd z = {z.std():.2f}")
    assert result.covariance.shape == (N, QUERIES) and np.all(result.se > 0)
    assert np.sum(np.abs(z) > Z) <= 1
    # The same draws against the exact posterior: the finite-ε bias shows (a check that the
    # test can tell the two apart, not an assertion about the library).
    off = -squared_residual_covariance(data["x"], data["y"], query["x"], query["y"], exact)
    print(f"against the exact posterior: {int(np.sum(np.abs((result.covariance - off) / result.se) > Z))} beyond {Z}")


def test_correlation_matches_the_closed_form(linear):
    data, query, _, result, law, _, _ = linear
    cov = squared_residual_covariance(data["x"], data["y"], query["x"], query["y"], law)
    var_train = np.diag(squared_residual_covariance(data["x"], data["y"], data["x"], data["y"], law))
    var_query = np.diag(squared_residual_covariance(query["x"], query["y"], query["x"], query["y"], law))
    truth = -cov / np.sqrt(np.outer(var_train, var_query))
    z = (result.correlation - truth) / result.correlation_se
    print(f"correlation: max |z| = {np.abs(z).max():.2f}")
    assert np.sum(np.abs(z) > Z) <= 1
    # The mean over entries is the mean of the matrix, with its own (smaller) standard error.
    assert result.mean_influence == pytest.approx(result.covariance.mean(), rel=1e-6)
    assert abs(result.mean_influence + cov.mean()) < Z * result.mean_influence_se


def test_blocks_of_rows_rerun_the_same_chains(linear):
    data, query, w_star, whole, _, _, seed = linear
    if seed:
        pytest.skip("one seed shows it")
    blocked = slt_jax.bayesian_influence(squared_error, jnp.asarray(w_star, jnp.float32), data,
                                         jax.random.key(seed), query_data=query,
                                         train_rows=np.arange(N)[::-1], block_rows=12, **LINEAR)
    assert blocked.settings["runs"] == 3 and blocked.settings["block_rows"] == 12
    np.testing.assert_allclose(blocked.covariance[::-1], whole.covariance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(blocked.se[::-1], whole.se, rtol=1e-4, atol=1e-7)
    assert blocked.llc.llc_mean == pytest.approx(whole.llc.llc_mean, rel=1e-6)


def logistic(seed, n=1000, queries=8):
    rng = np.random.default_rng(seed)
    teacher = np.array([1.5, -1.0, 0.5])
    x, xq = rng.standard_normal((n, D)), rng.standard_normal((queries, D))
    label = lambda z: np.where(rng.random(len(z)) < 1 / (1 + np.exp(-z @ teacher)), 1.0, -1.0)
    y, yq = label(x), label(xq)
    w = np.zeros(D)
    for _ in range(30):  # Newton's method to the maximum-likelihood point, in float64
        p = 1 / (1 + np.exp(y * (x @ w)))
        w -= np.linalg.solve((x.T * p * (1 - p)) @ x / n, -(x * (y * p)[:, None]).mean(0))
    return {"x": x, "y": y}, {"x": xq, "y": yq}, w


def logistic_loss(w, batch):
    return jnp.mean(jax.nn.softplus(-batch["y"] * (batch["x"] @ w)))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_regular_limit_is_the_classical_influence_function(seed):
    # Logistic regression at nβ = 10⁴: the posterior is close to Gaussian with covariance S, and
    # Cov(ℓ_i, φ_j) → ∇ℓ_iᵀ S ∇φ_j. S is SGLD's own stationary covariance at w*: the Lyapunov
    # solution with the minibatch term (ε²/4)·nβ²·C/B (docs/mathematics.md §3.3), which here is
    # 20–40 % above (nβH + γI)⁻¹ — batch 200 at nβ = 10⁴. The next order, ½·tr(H_i S H_j S) with
    # H_i the per-sample Hessians, is added to the tolerance (it is ~10⁻³ of the leading term).
    data, query, w = logistic(seed)
    nbeta, gamma, eps, batch, rows = 1e4, 1.0, 2e-5, 200, np.arange(16)
    x, y = data["x"], data["y"]
    p = 1 / (1 + np.exp(y * (x @ w)))
    hessian = (x.T * p * (1 - p)) @ x / len(y)
    grad = -x * (y * p)[:, None]
    pq = 1 / (1 + np.exp(query["y"] * (query["x"] @ w)))
    grad_q = -query["x"] * (query["y"] * pq)[:, None]
    precision = nbeta * hessian + gamma * np.eye(D)
    a = np.eye(D) - 0.5 * eps * precision
    noise = eps * np.eye(D) + eps**2 / 4 * nbeta**2 * np.cov(grad.T, bias=True) / batch
    s = scipy.linalg.solve_discrete_lyapunov(a, noise)
    classical = -grad[rows] @ s @ grad_q.T
    h_train = (p * (1 - p))[rows, None, None] * np.einsum("ni,nj->nij", x[rows], x[rows])
    h_query = (pq * (1 - pq))[:, None, None] * np.einsum("ni,nj->nij", query["x"], query["x"])
    second = 0.5 * np.einsum("aij,jk,bkl,li->ab", h_train, s, h_query, s)
    result = slt_jax.bayesian_influence(logistic_loss, jnp.asarray(w, jnp.float32), data, jax.random.key(seed),
                                        query_data=query, train_rows=rows, step_size=eps, localization=gamma,
                                        nbeta=nbeta, num_chains=32, num_burnin=1000, num_draws=2000,
                                        batch_size=batch, chunk_size=512, progress=False)
    excess = np.abs(result.covariance - classical) - np.abs(second)
    z = excess / result.se
    print(f"max |z| = {np.abs((result.covariance - classical) / result.se).max():.2f}; second order / leading "
          f"= {np.abs(second).max() / np.abs(classical).max():.1e}")
    # C = 32 chains: P(|t_31| > 4) = 3.6e-4, 0.05 expected exceedances over 128 entries.
    assert np.sum(z > Z) <= 1
    assert np.abs(second).max() < 0.01 * np.abs(classical).max()


@pytest.mark.parametrize("change, match", [
    (dict(query_data={"x": np.zeros((4, D + 1)), "y": np.zeros(4)}), r"query_data: rows of shape .* do not fit"),
    (dict(query_data={"x": np.zeros((4, D))}), r"query_data: rows of shape .* do not fit"),
    (dict(train_rows=[0, N]), rf"train_rows holds \[{N}\] outside the data's rows \[0, {N}\)"),
    (dict(train_rows=[3, 1, 3]), r"train_rows repeats rows \[3\]"),
    (dict(train_rows=[0.5]), r"train_rows must be a non-empty 1-D sequence of integer"),
    (dict(block_rows=0), r"block_rows must be a positive integer, got 0"),
])
def test_bad_inputs_name_the_argument_before_sampling(change, match):
    data, query, w = regression(0)
    kwargs = dict(query_data=query, **LINEAR) | change
    with pytest.raises(ValueError, match=match):
        slt_jax.bayesian_influence(squared_error, jnp.asarray(w, jnp.float32), data, jax.random.key(0), **kwargs)
