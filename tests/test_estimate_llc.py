"""estimate_llc: determinism, chain independence, divergence handling, input errors, and the
regular-model estimand ½·Σ nβh/(nβh + γ) (docs/mathematics.md §5.5, §6)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.runner.chains import plan_chunks
from slt_jax.models.adapters import gaussian_nll


def quadratic(h):
    """L(w) = ½·Σ h_i w_i² (data-independent), minimum at 0."""
    h = jnp.asarray(h)

    def loss_fn(w, batch):
        return 0.5 * jnp.sum(h * w**2) + 0.0 * jnp.mean(batch)

    return loss_fn


def linear_regression(key, n, d, sigma=1.0):
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    y = x @ jax.random.normal(kw, (d,)) + sigma * jax.random.normal(ke, (n,))
    nll = gaussian_nll(sigma)

    def loss_fn(w, batch):
        return jnp.mean(nll((batch["x"] @ w)[:, None], batch["y"][:, None]))

    w_hat = jnp.linalg.lstsq(x, y)[0]  # the empirical minimiser ŵ
    hessian = np.asarray(x.T @ x) / n / sigma**2
    return loss_fn, {"x": x, "y": y}, w_hat, np.linalg.eigvalsh(hessian)


FAST = dict(num_draws=200, num_burnin=100, progress=False)


def test_same_key_same_result_and_chain_traces_do_not_depend_on_num_chains():
    loss_fn = quadratic([1.0, 2.0])
    data = jnp.zeros((1000, 1))
    w = jnp.zeros(2)
    kw = dict(step_size=1e-4, localization=1.0, **FAST)
    a = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(3), num_chains=3, **kw)
    b = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(3), num_chains=3, **kw)
    c = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(3), num_chains=5, **kw)
    d = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(4), num_chains=3, **kw)
    np.testing.assert_array_equal(a.llc_trace, b.llc_trace)
    np.testing.assert_allclose(a.llc_trace, c.llc_trace[:3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.llc_trace, d.llc_trace)
    # The chunking of the scan (progress granularity) does not change the chains either.
    e = slt_jax.estimate_llc(loss_fn, w, data, jax.random.key(3), num_chains=3, chunk_size=37, **kw)
    np.testing.assert_allclose(a.llc_trace, e.llc_trace, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regular_model_at_empirical_minimum_matches_finite_n_estimand(seed):
    n, d, gamma = 5000, 3, 300.0
    loss_fn, data, w_hat, h = linear_regression(jax.random.key(100 + seed), n, d)
    nbeta = n / math.log(n)
    exact = 0.5 * np.sum(nbeta * h / (nbeta * h + gamma))
    # ε·(nβh + γ) ≈ 0.045: Langevin discretisation inflates the variance by ≈ ε(nβh+γ)/4 ≈ 1.1 %
    # and the minibatch gradient noise by ≈ ε·nβ²·h/(4B) ≈ 0.9 %; mixing takes ~50 steps.
    r = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(seed), step_size=5e-5,
                             localization=gamma, batch_size=500, num_chains=8, num_draws=4000,
                             num_burnin=1000, progress=False)
    assert abs(exact - d / 2) > 0.3  # the finite-γ term matters: this tests it, not d/2
    # Tolerance: 4 standard errors (from the chain spread) plus a 3 % budget for the biases above.
    assert abs(r.llc_mean - exact) < 4 * r.llc_se + 0.03 * exact, (r.llc_mean, r.llc_se, exact)
    assert r.llc_se < 0.05 * exact


def test_control_variate_has_the_plain_mean_and_a_smaller_error():
    loss_fn, data, w_hat, _ = linear_regression(jax.random.key(7), 4000, 3)
    r = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(0), step_size=2e-5,
                             localization=100.0, batch_size=64, num_draws=1000, num_burnin=300,
                             progress=False)
    assert r.settings["loss_estimator"] == "control_variate"
    both = math.hypot(r.llc_se, r.plain["llc_se"])
    assert abs(r.llc_mean - r.plain["llc_mean"]) < 4 * both
    assert r.llc_se < r.plain["llc_se"]


def test_nan_chains_are_reported_and_excluded():
    # A cliff at w = 1: chains that wander past it get a NaN loss; the others are healthy.
    def loss_fn(w, batch):
        return 0.5 * jnp.sum(w**2) + jnp.where(w[0] > 1.0, jnp.nan, 0.0) + 0.0 * jnp.mean(batch)

    data = jnp.zeros((100, 1))
    # check_step=False: the cliff keeps only the chains that stayed below it, whose λ̂ trends
    # down as the run goes on — the check after the run would rightly warn; this test is about
    # how diverged chains are excluded.
    with pytest.warns(slt_jax.DivergenceWarning, match="diverged"):
        r = slt_jax.estimate_llc(loss_fn, jnp.zeros(1), data, jax.random.key(0), step_size=0.05,
                                 localization=0.0, nbeta=1.0, num_chains=32, check_step=False, **FAST)
    bad = r.diverged_chains
    assert 0 < len(bad) < 32
    good = np.setdiff1d(np.arange(32), bad)
    assert np.isfinite(r.llc_mean)
    assert r.llc_mean == pytest.approx(np.mean(r.llc_per_chain[good]))
    assert all(t >= 0 for t in r.diverged_at)


def test_finite_runaway_is_detected_and_can_raise():
    # ε·nβ·h = 6 > 4: the update multiplies w by −2 each step, finite for 20 steps.
    loss_fn = quadratic([1.0])
    kw = dict(step_size=6.0 / 1000.0, localization=0.0, nbeta=1000.0, num_draws=20, num_burnin=0,
              progress=False)
    with pytest.warns(slt_jax.DivergenceWarning, match="All 4 chains diverged"):
        r = slt_jax.estimate_llc(loss_fn, jnp.zeros(1), jnp.zeros((10, 1)), jax.random.key(0),
                                 num_chains=4, **kw)
    assert np.all(np.isfinite(r.llc_trace))  # finite, and still caught
    assert r.diverged_chains == [0, 1, 2, 3] and math.isnan(r.llc_mean)
    with pytest.raises(slt_jax.DivergenceError, match="Lower step_size"):
        slt_jax.estimate_llc(loss_fn, jnp.zeros(1), jnp.zeros((10, 1)), jax.random.key(0),
                             num_chains=4, on_divergence="raise", **kw)


def test_healthy_run_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = slt_jax.estimate_llc(quadratic([1.0]), jnp.zeros(1), jnp.zeros((1000, 1)),
                                 jax.random.key(0), step_size=1e-4, localization=1.0, **FAST)
    assert r.diverged_chains == []


def test_result_records_settings_and_serialises(tmp_path):
    import json

    r = slt_jax.estimate_llc(quadratic([1.0, 1.0]), jnp.zeros(2), jnp.zeros((500, 1)),
                             jax.random.key(0), step_size=1e-4, localization=2.0, num_chains=2, **FAST)
    assert r.nbeta == pytest.approx(500 / math.log(500))
    assert r.settings["nbeta"] == pytest.approx(r.nbeta) and r.settings["batch_size"] == 256
    assert r.loss_trace.shape == r.llc_trace.shape == (2, 200)
    d = json.loads(r.to_json(tmp_path / "r.json"))
    assert d["settings"]["localization"] == 2.0 and "loss_trace" not in d
    assert json.loads((tmp_path / "r.json").read_text())["llc_mean"] == pytest.approx(r.llc_mean)
    assert "λ̂" in str(r)


def test_one_compiled_program_serves_many_points():
    traces = []

    def loss_fn(w, batch):
        traces.append(1)  # runs only while JAX traces
        return 0.5 * jnp.sum(w**2) + 0.0 * jnp.mean(batch)

    data = jnp.zeros((100, 1))
    kw = dict(step_size=1e-3, localization=1.0, num_chains=2, **FAST)
    slt_jax.estimate_llc(loss_fn, jnp.zeros(2), data, jax.random.key(0), **kw)
    before = len(traces)
    slt_jax.estimate_llc(loss_fn, jnp.ones(2), data, jax.random.key(1), **kw)
    slt_jax.estimate_llc(loss_fn, jnp.ones(2), data, jax.random.key(1), **{**kw, "step_size": 2e-3})
    assert len(traces) == before


def test_runs_of_other_lengths_reuse_the_compiled_chunk():
    # A given chunk_size is used as it is; the default is 512 steps, or the run's own power of
    # two where that is smaller, so runs of 512 steps or more share one program.
    assert plan_chunks(9011, 500) == (19, 500) and plan_chunks(9011) == (18, 512)
    assert plan_chunks(3000) == (6, 512) and plan_chunks(15010) == (30, 512)
    assert plan_chunks(300) == (1, 512) and plan_chunks(40) == (1, 64) and plan_chunks(0) == (0, 0)
    traces = []

    def loss_fn(w, batch):
        traces.append(1)  # runs only while JAX traces
        return 0.5 * jnp.sum(w**2) + 0.0 * jnp.mean(batch)

    data, kw = jnp.zeros((100, 1)), dict(step_size=1e-3, localization=1.0, num_chains=2, progress=False)
    run = lambda burnin, draws, **extra: slt_jax.estimate_llc(loss_fn, jnp.zeros(2), data, jax.random.key(0),
                                                               num_burnin=burnin, num_draws=draws, **extra, **kw)
    run(100, 200, chunk_size=64)
    first = len(traces)
    run(150, 333, chunk_size=64)
    assert len(traces) == first
    run(100, 200)  # 300 steps: one chunk of 512, a new program
    second = len(traces)
    assert second > first
    run(1000, 2000)  # 3000 and 6000 steps: the same chunks of 512
    run(3000, 3000)
    assert len(traces) == second


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=-1.0), "step_size"),
        (dict(nbeta=0.0), "nbeta"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=101), "batch_size=101 is larger than the dataset"),
        (dict(localization=-1.0), "localization"),
        (dict(num_chains=0), "num_chains"),
        (dict(loss_estimator="exact"), "loss_estimator"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    settings = dict(step_size=1e-3, localization=1.0, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        slt_jax.estimate_llc(quadratic([1.0]), jnp.zeros(1), jnp.zeros((100, 1)), jax.random.key(0),
                             **settings)


def test_bad_data_params_and_loss_name_the_culprit():
    kw = dict(step_size=1e-3, localization=1.0, progress=False)
    loss_fn = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    w = jnp.zeros(2)
    good = {"x": jnp.zeros((10, 2)), "y": jnp.zeros(10)}
    with pytest.raises(ValueError, match=r"data\['y'\] has 9 rows but data\['x'\] has 10"):
        slt_jax.estimate_llc(loss_fn, w, {"x": good["x"], "y": jnp.zeros(9)}, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match=r"params\['a'\] has dtype int32"):
        slt_jax.estimate_llc(loss_fn, {"a": jnp.zeros(2, jnp.int32)}, good, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="must return a scalar.*shape \\(10,\\)"):
        slt_jax.estimate_llc(lambda w, b: (b["x"] @ w - b["y"]) ** 2, w, good, jax.random.key(0),
                             batch_size=10, **kw)
    with pytest.raises(ValueError, match="loss_fn\\(params, batch\\) failed"):
        slt_jax.estimate_llc(loss_fn, jnp.zeros(3), good, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
        slt_jax.estimate_llc(loss_fn, w, good, 0, **kw)
