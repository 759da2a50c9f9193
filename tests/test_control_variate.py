"""The control-variate loss estimator (the default) against the plain minibatch one, on two models.

Both read the same draws: the control variate records ``nβ·(L_B(w_t) − L_B(w*))``, the plain one
``nβ·(L_B(w_t) − L_n(w*))``. Their difference, ``nβ·(L_n(w*) − L_B(w*))`` averaged over draws with
independent batches, has mean zero and a standard error known from the data alone:
``nβ·std_i(ℓ_i(w*))/√(B·chains·draws)``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.models.adapters import gaussian_nll
from slt_jax.models.dln import dln_data, dln_forward, dln_loss, dln_teacher

_nll = gaussian_nll(1.0)


def regression_loss(w, batch):
    return jnp.mean(_nll((batch["x"] @ w)[:, None], batch["y"][:, None]))


def regression():
    """Linear regression at its least-squares fit: small batches and well-mixing chains
    (ε·(nβ·h + γ) ≈ 0.04), so the batch noise the control variate removes dominates."""
    kx, kw, ke = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (2000, 3))
    y = x @ jax.random.normal(kw, (3,)) + jax.random.normal(ke, (2000,))
    per_sample = lambda w, d: np.asarray(_nll((d["x"] @ w)[:, None], d["y"][:, None]))
    run = dict(step_size=1e-4, localization=100.0, batch_size=16, num_chains=8, num_burnin=300, num_draws=1000)
    return regression_loss, per_sample, jnp.linalg.lstsq(x, y)[0], {"x": x, "y": y}, run


def noisy_dln():
    """The (4, 3, 4) rank-1 network of test_nuts.py with noisy labels (σ = 1) at its teacher,
    with the same settings (so the full suite reuses that compiled program)."""
    key_teacher, key_data = jax.random.split(jax.random.key(8))
    teacher = dln_teacher(key_teacher, (4, 3, 4), 1)
    per_sample = lambda p, d: np.asarray(_nll(dln_forward(p, d["x"]), d["y"]))
    run = dict(step_size=1e-4, localization=50.0, batch_size=100, num_chains=16, num_burnin=1500, num_draws=3000)
    return dln_loss, per_sample, teacher, dln_data(key_data, teacher, 1000, noise=1.0), run


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model", [regression, noisy_dln], ids=["regression", "dln"])
def test_control_variate_keeps_the_mean_and_cuts_the_error(model, seed):
    loss_fn, per_sample, params, data, run = model()
    r = slt_jax.estimate_llc(loss_fn, params, data, jax.random.key(seed), progress=False, **run)
    assert r.settings["loss_estimator"] == "control_variate"
    assert set(r.plain) == {"llc_mean", "llc_se"}  # the plain estimate is reported beside it
    draws = run["batch_size"] * run["num_chains"] * run["num_draws"]
    se_difference = r.nbeta * np.std(per_sample(params, data)) / math.sqrt(draws)
    assert abs(r.llc_mean - r.plain["llc_mean"]) < 4 * se_difference, (r.llc_mean, r.plain, se_difference)
    assert r.llc_se < r.plain["llc_se"], (r.llc_se, r.plain["llc_se"])


def _records(problem, seed=0):
    """One short SGLD run's per-draw records on ``problem`` (table or forward pass)."""
    from slt_jax.runner import chains
    from slt_jax.samplers import SGLD
    from slt_jax.settings import RunSettings

    run = RunSettings(num_chains=4, num_draws=100, num_burnin=0, batch_size=50)
    return chains.sample(problem, SGLD, run, jax.random.key(seed), step_size=1e-4, progress=False).draws


@pytest.mark.parametrize("eval_rows", [None, 300], ids=["train", "eval_data"])
def test_the_table_records_what_the_forward_pass_records(eval_rows):
    # L_B(w*) read from the per-sample table must be the forward pass's value on the same rows,
    # draw for draw, to float32 rounding (the table's shift to the exact L_n(w*) is ~1e-7).
    import dataclasses

    from slt_jax.problem import make_problem
    from slt_jax.settings import RunSettings

    loss_fn, _, params, data, _ = noisy_dln()
    eval_data = None if eval_rows is None else jax.tree.map(lambda x: x[-eval_rows:] * 1.5, data)
    problem = make_problem(loss_fn, params, data, localization=50.0, eval_data=eval_data,
                           run=RunSettings(batch_size=50))
    assert problem.control_variate["method"] == "table" and abs(problem.control_variate["shift"]) < 1e-5
    table, forward = _records(problem), _records(dataclasses.replace(problem, center_losses=None))
    np.testing.assert_array_equal(table.batch_loss, forward.batch_loss)  # the same chains
    scale = float(np.max(np.abs(forward.center_loss)))
    np.testing.assert_allclose(table.center_loss, forward.center_loss, rtol=0, atol=4e-6 * scale)
    assert np.std(forward.center_loss) > 1e3 * 4e-6 * scale  # the batches differ: the test can fail


def test_a_loss_that_is_not_a_mean_of_rows_falls_back_to_the_forward_pass():
    # Normalised by the batch's own spread, the loss of one row is not a term of the batch's
    # mean: the table would not track L_B(w*), so each draw evaluates it by a forward pass.
    def batch_normalised(w, batch):
        r = batch["y"] - batch["x"] @ w
        return jnp.mean(r**2) / (jnp.var(batch["y"]) + 1.0)

    _, _, w, data, _ = regression()
    r = slt_jax.estimate_llc(batch_normalised, w, data, jax.random.key(0), step_size=1e-4, localization=100.0,
                             batch_size=16, num_chains=2, num_burnin=0, num_draws=50, progress=False,
                             check_step=False)
    note = r.settings["control_variate"]
    assert note["method"] == "forward_pass" and "not a mean of per-row terms" in note["reason"]
    assert r.plain is not None and np.all(np.isfinite(r.llc_trace))
