"""The exact gold standard: NUTS on the full-batch localized posterior, against the SGMCMC samplers.

A deep linear network with widths (4, 3, 4) and a rank-1 teacher at its most singular point
(24 parameters, noise-free data, n = 1000). All samplers target the same posterior —
``nβ = n/log n``, ``γ = 50`` — so NUTS separates sampler bias from estimator bias: λ̂ here is
far below Aoyagi's λ = 6 because of the finite γ, but every correct sampler must find the same
value. γ = 50 keeps the runs short: the flat directions of the fibre feel only γ and relax in
about ``2/(ε·γ)`` steps.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher
from slt_jax.samplers.nuts import _embedding

GAMMA = 50.0
SG_RUN = dict(localization=GAMMA, batch_size=100, num_chains=16, num_burnin=1500, num_draws=3000,
              progress=False)
# Tolerance for "agrees with NUTS": 3 combined standard errors (a sampler without bias fails
# 0.3 % of the time) plus 2 % of λ̂ for the bias every SGMCMC sampler keeps at these steps —
# the Langevin discretisation inflates the posterior variance along the stiffest direction by
# about ε·(nβ·h_max + γ)/4 ≈ 1e-4·(145·1.1 + 50)/4 ≈ 0.5 %, minibatch noise adds less.
# With standard errors ≤ 3 % of λ̂ the test still detects a bias of ~15 % (the too-large step).
BIAS_BUDGET = 0.02


@pytest.fixture(scope="module")
def dln():
    key_teacher, key_data = jax.random.split(jax.random.key(0))
    teacher = dln_teacher(key_teacher, (4, 3, 4), 1)
    data = dln_data(key_data, teacher, 1000)
    return dln_loss, teacher, data  # σ = 1; the same function object lets other files reuse programs


@pytest.fixture(scope="module")
def nuts_result(dln):
    loss_fn, teacher, data = dln
    return slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(11), sampler="nuts", step_size=1e-3,
                                localization=GAMMA, num_chains=8, num_draws=250, num_burnin=150,
                                progress=False)


@pytest.fixture(scope="module", params=[0, 1], ids=lambda seed: f"seed{seed}")
def small_step(request, dln):
    """SGLD at ε = 1e-4 with the MALA check, one run per seed."""
    loss_fn, teacher, data = dln
    return request.param, slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(request.param),
                                               step_size=1e-4, mala=True, **SG_RUN)


def _tolerance(a, b):
    return 3 * math.hypot(a.llc_se, b.llc_se) + BIAS_BUDGET * b.llc_mean


def test_nuts_result_is_a_full_llc_result(nuts_result):
    r = nuts_result
    assert r.settings["sampler"] == "nuts" and r.settings["loss_estimator"] == "full_batch"
    assert r.llc_trace.shape == r.loss_trace.shape == r.distance_trace.shape == (8, 250)
    assert r.nbeta == pytest.approx(1000 / math.log(1000))
    stats = r.sampler_stats
    assert stats["num_divergent"] == 0 and 0.6 < stats["accept_prob"] < 0.99
    assert len(stats["step_size"]) == 8 and stats["mean_leapfrog_steps"] >= 1
    assert r.llc_se <= 0.03 * r.llc_mean
    assert r.diagnostics.rhat < 1.05  # 8 × 250 draws: R-hat's own noise is ~0.01


def _check_agreement(r, nuts_result):
    assert r.diverged_chains == []
    assert r.llc_se <= 0.03 * r.llc_mean and nuts_result.llc_se <= 0.03 * nuts_result.llc_mean
    assert abs(r.llc_mean - nuts_result.llc_mean) < _tolerance(r, nuts_result), (
        r.llc_mean, r.llc_se, nuts_result.llc_mean, nuts_result.llc_se)


def test_sgld_with_a_small_step_agrees_with_nuts(small_step, nuts_result):
    _check_agreement(small_step[1], nuts_result)


@pytest.mark.parametrize("sampler, step_size, seed", [("rmsprop_sgld", 1.5e-5, 2), ("sgnht", 1e-4, 3)])
def test_rmsprop_sgld_and_sgnht_agree_with_nuts(dln, nuts_result, sampler, step_size, seed):
    loss_fn, teacher, data = dln
    r = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(seed), sampler=sampler,
                             step_size=step_size, **SG_RUN)
    assert r.settings["sampler"] == sampler
    _check_agreement(r, nuts_result)


def test_too_large_step_size_disagrees_and_mala_sees_it(dln, nuts_result, small_step):
    loss_fn, teacher, data = dln
    seed, small = small_step
    large = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(seed), step_size=3e-3, mala=True,
                                 **SG_RUN)
    # ε·(nβ·h_max + γ) ≈ 0.6 at ε = 3e-3: the variance along stiff directions is inflated by
    # ~15 %, which pushes λ̂ up — far outside the tolerance the small step passes.
    assert large.llc_mean - nuts_result.llc_mean > _tolerance(large, nuts_result)
    assert small.sampler_stats["mala_acceptance"] > 0.99
    assert large.sampler_stats["mala_acceptance"] < small.sampler_stats["mala_acceptance"] - 0.02


def test_masked_coordinates_embed_into_the_parameter_pytree():
    params = {"a": jnp.arange(3.0), "b": jnp.full((2, 2), 5.0)}
    mask = {"a": jnp.array([1.0, 0.0, 1.0]), "b": jnp.zeros((2, 2))}
    center, to_params = _embedding(params, mask)
    np.testing.assert_array_equal(center, [0.0, 2.0])
    out = to_params(jnp.array([7.0, 9.0]))
    np.testing.assert_array_equal(out["a"], [7.0, 1.0, 9.0])
    np.testing.assert_array_equal(out["b"], params["b"])


def test_nuts_rejects_bad_settings(dln):
    loss_fn, teacher, data = dln
    with pytest.raises(ValueError, match="num_draws"):
        slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), sampler="nuts", step_size=1e-3,
                             localization=GAMMA, num_draws=2, progress=False)
    with pytest.raises(ValueError, match="nbeta"):
        slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), sampler="nuts", step_size=1e-3,
                             localization=GAMMA, nbeta=-1.0, progress=False)


def test_unequilibrated_chains_are_flagged_by_split_rhat(dln, nuts_result):
    """A step 100× too small: over the run the chains relax only part of the way from w*, so
    each trace still drifts — split R-hat sees its halves disagree — and λ̂ comes out low."""
    loss_fn, teacher, data = dln
    # The check after a fixed-step run sees the same drift and warns.
    with pytest.warns(slt_jax.CalibrationWarning, match="still trends"):
        r = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), step_size=1e-6, **SG_RUN)
    assert r.settings["step_check"]["trending"]
    assert r.diagnostics.rhat_flagged and r.diagnostics.rhat > 1.2  # healthy runs here: ≈ 1.04
    assert nuts_result.llc_mean - r.llc_mean > _tolerance(r, nuts_result)
