"""The check after a fixed-step run: the kernel's stability rule where the chains ended, its
health, and a λ̂ trace still trending when the run ends (slt_jax.tuning.checks).

The model is the (4, 3, 4) rank-1 DLN of tests/samplers/test_nuts.py (n = 1000, γ = 50, nβ =
n/log n ≈ 145), where the Hessian scale at the teacher is h ≈ 1.1: SGLD's rule
ε ≤ 1/(nβh + γ) ≈ 4.8e-3, its linear stability limit 4× that.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest

import slt_jax
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

RUN = dict(localization=50.0, batch_size=100, num_chains=4, progress=False)


@pytest.fixture(scope="module")
def dln():
    key_teacher, key_data = jax.random.split(jax.random.key(0))
    teacher = dln_teacher(key_teacher, (4, 3, 4), 1)
    return teacher, dln_data(key_data, teacher, 1000)


def _quiet(teacher, data, seed, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the healthy run
        return slt_jax.estimate_llc(dln_loss, teacher, data, jax.random.key(seed), **RUN, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_safe_fixed_step_passes_the_check_quietly(dln, seed):
    teacher, data = dln
    r = _quiet(teacher, data, seed, step_size=1e-4, num_burnin=2000, num_draws=2000)
    check = r.settings["step_check"]
    assert check["stable"] and check["step_size"] == 1e-4 < check["stable_step"]
    assert not check["trending"] and check["health"] is None and check["seconds"] > 0
    assert check["chains_measured"] == 4


@pytest.mark.parametrize("sampler, step_size", [("sgld", 1e-2), ("sgld_rademacher", 1e-2), ("sgnht", 7e-3),
                                                ("rmsprop_sgld", 1.5e-3)])
def test_a_step_above_the_kernels_stable_step_warns_and_names_a_smaller_one(dln, sampler, step_size):
    # ε·(nβh + γ) ≈ 2 for SGLD: twice the rule, half the linear limit (stable, biased). SGNHT's
    # thermostat diverges sooner: at 1e-2 it lost 2 of 48 chains (3 seeds × 16), at 7e-3 and 8e-3
    # none of 96, where its check names 2.4e-3–4.0e-3. RMSProp-SGLD multiplies its step by
    # G ≤ 1/eps = 10: 1.5e-3 is about 3× its rule.
    teacher, data = dln
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = slt_jax.estimate_llc(dln_loss, teacher, data, jax.random.key(0), step_size=step_size, sampler=sampler,
                                 num_burnin=200, num_draws=200, **RUN)
    check = r.settings["step_check"]
    assert not r.diverged_chains
    assert check["stable"] is False and check["stable_step"] < step_size / 1.5
    messages = [str(w.message) for w in caught if issubclass(w.category, slt_jax.CalibrationWarning)]
    assert any("exceeds" in m and f"step_size={check['stable_step']:.2g}" in m for m in messages), messages


def test_the_check_can_be_switched_off(dln):
    teacher, data = dln
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", slt_jax.DivergenceWarning)
        warnings.simplefilter("error", slt_jax.CalibrationWarning)
        r = slt_jax.estimate_llc(dln_loss, teacher, data, jax.random.key(0), step_size=2e-2, num_burnin=0,
                                 num_draws=50, check_step=False, **RUN)
    assert r.settings["step_check"] is None and r.settings["check_step"] is False


def _regression(seed):
    """Linear regression at its least-squares fit, n = 5000, d = 20: with γ = 300 every direction
    has a = nβh + γ ≈ 900 ± 40 % and relaxes within ~2/(ε·a) steps — 50 steps at ε = 5e-5,
    5000 at 5e-7. Twenty directions make each chain's λ̂ a sum of twenty terms, so a shared
    climb stands out from the chains' own wandering (with d = 3 it did not, at 8 chains)."""
    from slt_jax.models.adapters import gaussian_nll

    kx, kw, ke = jax.random.split(jax.random.key(100 + seed), 3)
    x = jax.random.normal(kx, (5000, 20))
    y = x @ jax.random.normal(kw, (20,)) + jax.random.normal(ke, (5000,))
    nll = gaussian_nll(1.0)
    loss_fn = lambda w, b: jnp.mean(nll((b["x"] @ w)[:, None], b["y"][:, None]))
    return loss_fn, jnp.linalg.lstsq(x, y)[0], {"x": x, "y": y}


REGRESSION = dict(localization=300.0, batch_size=500, num_chains=8, progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_small_step_run_too_briefly_warns_that_it_still_trends_and_a_healthy_one_does_not(seed):
    # 5e-7 is 100× below the healthy step: 1,300 steps cover a quarter of the relaxation time,
    # and λ̂ is still climbing through the draws. At 5e-5 the same run is long settled.
    loss_fn, w_hat, data = _regression(seed)
    with pytest.warns(slt_jax.CalibrationWarning, match="still trends"):
        short = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(seed), step_size=5e-7, num_burnin=300,
                                     num_draws=1000, **REGRESSION)
    check = short.settings["step_check"]
    assert check["trending"] and check["trend"] > 3 * check["trend_se"] and check["stable"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy = slt_jax.estimate_llc(loss_fn, w_hat, data, jax.random.key(seed), step_size=5e-5, num_burnin=300,
                                       num_draws=1000, **REGRESSION)
    assert not healthy.settings["step_check"]["trending"] and healthy.settings["step_check"]["stable"]
