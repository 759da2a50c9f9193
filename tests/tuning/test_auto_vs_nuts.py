"""step_size="auto" against NUTS, for every SGLD-family kernel, on models of different kinds.

NUTS (full batch, no discretisation or minibatch bias) gives the exact finite-n, finite-γ
estimand of the same localized posterior; every kernel's calibrated run must land on it.

Tolerance: 3 combined standard errors (λ̂'s honest se — the chains' spread with the biases it
cannot see added, docs/calibration.md — and NUTS's) plus 3 % of the NUTS value. Three standard
errors alone fail a correct, unbiased sampler 0.3 % of the time; the 3 % is the bias the
calibration is built to accept: the pick's step-size bias, extrapolated linearly in ε from the
agreeing steps, must fit 5 % including one standard error, so its expected size is a few per cent
at most, and RMSProp-SGLD adds the bias of its omitted preconditioner-correction term (1.5 ± 1.5 %
against NUTS at γ = 50, docs/mathematics.md §2.3). Seeds are not chosen.

The default suite runs the deep linear network (all kernels × two seeds, about 2–3 minutes on two
cores); logistic regression — a regular model with a non-Gaussian likelihood — is marked slow.
"""

import math

import jax
import jax.numpy as jnp
import pytest

import slt_jax
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

KERNELS = ("sgld", "sgld_rademacher", "rmsprop_sgld", "sgnht")
BIAS_BUDGET = 0.03


def dln():
    """DLN (4, 3, 4), rank 1, at its most singular (aligned) teacher; n = 1000 noise-free rows, γ = 50
    (the model of tests/samplers/test_nuts.py)."""
    key_teacher, key_data = jax.random.split(jax.random.key(0))
    teacher = dln_teacher(key_teacher, (4, 3, 4), 1)
    return dln_loss, teacher, dln_data(key_data, teacher, 1000), 50.0


def _logistic_loss(w, batch):
    logits = batch["x"] @ w["w"] + w["b"]
    return jnp.mean(jax.nn.softplus(logits) - batch["y"] * logits)


def logistic():
    """Logistic regression, 4 features and a bias, n = 1000, at its maximum-likelihood fit (gradient
    descent from the truth); γ = 10."""
    kx, kw, ky = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (1000, 4))
    truth = {"w": jax.random.normal(kw, (4,)), "b": jnp.asarray(0.3)}
    y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ truth["w"] + truth["b"])).astype(jnp.float32)
    data = {"x": x, "y": y}
    step = lambda _, p: jax.tree.map(lambda w, g: w - 1.0 * g, p, jax.grad(_logistic_loss)(p, data))
    params = jax.jit(lambda p: jax.lax.fori_loop(0, 2000, step, p))(truth)
    return _logistic_loss, params, data, 10.0


MODELS = {"dln": dln, "logistic": pytest.param(logistic, marks=pytest.mark.slow)}


# NUTS's draws per model: on logistic regression 250 draws after 150 warm-up read 1.698 ± 0.033
# against the exact 1.6012 ± 0.0012 (importance sampling from the Laplace approximation), 1000
# after 500 read 1.602 ± 0.013 and 1.595 ± 0.019 (two keys), in 3 s.
NUTS_SCHEDULE = {"dln": (150, 250), "logistic": (500, 1000)}


@pytest.fixture(scope="module", params=list(MODELS.values()), ids=list(MODELS))
def model(request):
    loss_fn, params, data, gamma = request.param()
    num_burnin, num_draws = NUTS_SCHEDULE[request.param.__name__]
    nuts = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(11), sampler="nuts", step_size=1e-3,
                                localization=gamma, num_chains=8, num_draws=num_draws, num_burnin=num_burnin,
                                progress=False)
    return loss_fn, params, data, gamma, nuts


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sampler", KERNELS)
def test_auto_agrees_with_nuts(model, sampler, seed):
    loss_fn, params, data, gamma, nuts = model
    r = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), sampler=sampler, step_size="auto",
                             localization=gamma, batch_size=100, progress=False)
    tolerance = 3 * math.hypot(r.llc_se, nuts.llc_se) + BIAS_BUDGET * nuts.llc_mean
    assert abs(r.llc_mean - nuts.llc_mean) < tolerance, (r.llc_mean, r.llc_se, nuts.llc_mean, nuts.llc_se)
    record = r.settings["calibration"]
    assert record["verified"] and record["step_size"] in record["pair"]
    # The honest standard error is at least the chain spread's, and its interval uses t(chains − 1).
    assert r.llc_se >= r.uncertainty["chains"] and r.uncertainty["dof"] == r.settings["num_chains"] - 1
    lo, hi = r.llc_interval(0.95)
    assert hi - lo == pytest.approx(2 * 2.3646 * r.llc_se, rel=1e-3)  # t₀.₉₇₅ with 7 degrees of freedom
