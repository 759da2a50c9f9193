"""observe (slt_jax.observe): posterior means, variances and covariances of user observables
and per-sample losses, against linear regression's closed forms, with traces on disk.

SGLD's stationary law there has the posterior's mean and the covariance S of
``groundtruth.linear_regression_posterior`` (the Lyapunov solution with the minibatch term), so
E[w] = μ, Var[w_i] = S_ii and E[½r_i²] = ½(m_i² + x_iᵀSx_i). Tolerance: 4 jackknife standard
errors over 32 chains (Student t, 31 degrees of freedom; P(|t| > 4) = 3.6e-4, about 0.01
exceedances expected over the 26 values checked per seed); none is allowed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.groundtruth import linear_regression_posterior

N, D, BATCH, EPS = 64, 3, 16, 0.01
RUN = dict(step_size=EPS, localization=1.0, num_chains=32, num_burnin=500, num_draws=800, batch_size=BATCH,
           chunk_size=512, progress=False)


def squared_error(w, batch):
    return 0.5 * jnp.mean(jnp.square(batch["y"] - batch["x"] @ w))


@pytest.mark.parametrize("seed", [0, 1])
def test_means_and_variances_match_sgld_stationary_law(seed, tmp_path):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(N)
    w_star = np.linalg.lstsq(x, y, rcond=None)[0] + 0.1  # off the minimum: the mean moves
    rows = {"x": x[:5], "y": y[:5]}
    result = slt_jax.observe(squared_error, jnp.asarray(w_star, jnp.float32), {"x": x, "y": y}, jax.random.key(seed),
                             observables={"w": lambda w: w, "rows": slt_jax.SampleLosses(rows)},
                             pairs=[("w", "rows")], trace_dir=tmp_path / "traces", **RUN)
    mean, cov = linear_regression_posterior(x, y, center=w_star, nbeta=N / np.log(N), localization=1.0,
                                            step_size=EPS, batch_size=BATCH)
    residual = rows["y"] - rows["x"] @ mean
    checks = [
        ((result.mean["w"] - mean) / result.mean_se["w"]),
        ((result.variance["w"] - np.diag(cov)) / result.variance_se["w"]),
        ((result.mean["rows"] - 0.5 * (residual**2 + np.einsum("ni,ij,nj->n", rows["x"], cov, rows["x"])))
         / result.mean_se["rows"]),
    ]
    z = np.concatenate(checks)
    print(f"max |z| = {np.abs(z).max():.2f} over {z.size}")
    assert np.all(np.abs(z) < 4)
    # Cov(w, ½r²) = −Σ x m for a Gaussian law (Stein), checked the same way.
    truth = -cov @ (rows["x"] * residual[:, None]).T
    assert np.all(np.abs((result.covariance["w|rows"] - truth) / result.covariance_se["w|rows"]) < 4)
    # Traces on disk, relative to w*, reproduce the moments' means.
    traces = np.load(result.traces["rows"])
    assert traces.shape == (RUN["num_chains"], RUN["num_draws"], 5)
    np.testing.assert_allclose(traces.mean(axis=(0, 1)) + result.at_center["rows"], result.mean["rows"], rtol=1e-4)
    assert result.llc.llc_mean == pytest.approx(np.mean(result.llc.llc_per_chain))


def test_observing_every_kth_draw_thins_the_moments_not_the_chains():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D))
    data = {"x": x, "y": x @ np.ones(D)}
    w = jnp.asarray(np.ones(D), jnp.float32)
    every = slt_jax.observe(squared_error, w, data, jax.random.key(0), observables={"w": lambda w: w},
                            observe_every=4, **(RUN | {"num_chains": 4}))
    assert every.settings["observe_every"] == 4
    full = slt_jax.observe(squared_error, w, data, jax.random.key(0), observables={"w": lambda w: w},
                           **(RUN | {"num_chains": 4}))
    np.testing.assert_array_equal(every.llc.llc_trace, full.llc.llc_trace)
    assert every.mean_se["w"].shape == (D,) and np.all(np.isfinite(every.mean_se["w"]))
    with pytest.raises(ValueError, match="trace_dir keeps every draw's values"):
        slt_jax.observe(squared_error, w, data, jax.random.key(0), observables={"w": lambda w: w},
                        observe_every=2, trace_dir="unused", **RUN)
