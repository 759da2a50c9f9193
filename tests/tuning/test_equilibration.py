"""Burn-in read off the chains' own λ̂ trace, and runs extended until λ̂ stops trending.

The model: L(w) = ½·h·‖w‖², independent of the data, so the gradient is exact and each of the
d coordinates is an AR(1) chain ``w' = (1 − εa/2)·w + √ε·ξ`` with ``a = nβh`` (γ = 0): from
w* = 0 its variance climbs as ``(1 − (1 − εa/2)^{2t}) / (a(1 − εa/4))``, and λ̂ with it, to
the exact estimand ``(d/2)/(1 − εa/4)``. With εa/2 = 0.005 the climb takes ~300 steps to
come within 5 %: a plan of 40 steps reads the transient.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.runner.chains import ChainInputs, RunConfig, run_chains
from slt_jax.runner.divergence import Divergence
from slt_jax.tuning.equilibration import equilibration_time, run_until_equilibrated
from slt_jax.tuning.plateau import laplace_plateau
from slt_jax.estimators.llc import llc_draws
from slt_jax.posterior import LocalPosterior
from slt_jax.samplers import SGLD

D, H, NBETA, STEP = 20, 1.0, 100.0, 1e-4
A = NBETA * H
EXACT = 0.5 * D / (1.0 - STEP * A / 4.0)


def _loss(w, batch):
    return 0.5 * H * jnp.sum(w**2) + 0.0 * jnp.mean(batch)


def _setup(steps_per_draw=1):
    config = RunConfig(_loss, SGLD, 4, steps_per_draw, "control_variate", 4, None)
    inputs = ChainInputs(step_size=jnp.float32(STEP), posterior=LocalPosterior(jnp.zeros(D), jnp.float32(NBETA),
                                                                                jnp.float32(0.0)),
                         divergence=Divergence(jnp.float32(0.0), jnp.float32(1e6)), data=jnp.zeros((8, 1)),
                         eval_data=None)
    return config, inputs


def _llc_of(draws, state):
    per = llc_draws(np.asarray(draws.batch_loss, float), 0.0, NBETA, np.asarray(draws.center_loss, float))
    return per, (np.asarray(state.diverged_at) < 0) & np.all(np.isfinite(per), axis=1)


def test_a_run_continued_in_pieces_is_the_run_made_whole():
    config, inputs = _setup(steps_per_draw=3)
    key = jax.random.key(0)
    run = lambda **kw: run_chains(key, config, inputs, num_chains=5, chunk_size=12, progress=False, **kw)
    whole_state, whole = run(num_burnin=6, num_draws=30)
    state, first = run(num_burnin=6, num_draws=10)
    state, second = run(num_burnin=0, num_draws=20, state=state, start=36)
    joined = np.concatenate([first.batch_loss, second.batch_loss], axis=1)
    np.testing.assert_array_equal(joined, whole.batch_loss)
    np.testing.assert_array_equal(state.kernel_state.position, whole_state.kernel_state.position)
    with pytest.raises(ValueError, match="start=0"):
        run(num_burnin=0, num_draws=2, state=state)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_short_plan_is_extended_until_the_climb_is_over(seed):
    config, inputs = _setup()
    # 64 chains: an extended run ends when two doublings agree within 5 % including their
    # standard error, which 16 chains of this 20-dimensional λ̂ (se ≈ 3 %) cannot show. The cap
    # leaves room: over ten keys the run settled after 1,280–10,240 steps, and a cap of 64×
    # (2,560 steps) stopped one key in three or four short of it.
    run = run_until_equilibrated(jax.random.key(seed), config, inputs, _llc_of, num_chains=64, num_burnin=10,
                                 num_draws=30, max_extension=256, rtol=0.05, z=1.0, progress=False)
    llc, _ = _llc_of(run.draws, run.state)
    means = llc.mean(axis=1)
    se = means.std(ddof=1) / math.sqrt(means.size)
    assert run.equilibrated and run.extensions >= 2 and run.num_steps > 100
    # The kept draws start after the climb (within 5 % by step ~300): λ̂ is the exact estimand
    # within the 5 % the trend test allows plus 3 standard errors of the chains' spread.
    assert run.num_burnin >= 10 and run.draws.batch_loss.shape[1] == run.num_steps - run.num_burnin
    assert abs(llc.mean() - EXACT) < 0.05 * EXACT + 3 * se, (llc.mean(), EXACT, se)


def _stalling_llc_of(draws, state):
    """A scripted λ̂ trace: a climb to 100 by step 100, a stall until step 300, then 130 (plus a
    fixed offset per chain, so the chains' spread is not zero)."""
    steps = np.arange(1, draws.batch_loss.shape[1] + 1, dtype=float)
    level = np.where(steps < 300, np.minimum(steps, 100.0), 130.0)
    per = level + 0.5 * np.linspace(-1.0, 1.0, draws.batch_loss.shape[0])[:, None]
    return per, np.ones(per.shape[0], bool)


def test_an_extended_run_ends_when_doublings_stop_moving_not_at_a_stall():
    config, inputs = _setup()
    run = run_until_equilibrated(jax.random.key(0), config, inputs, _stalling_llc_of, num_chains=4, num_burnin=0,
                                 num_draws=100, max_extension=64, rtol=0.05, z=1.0, progress=False)
    kept = np.arange(run.num_burnin + 1, run.num_steps + 1)
    level = np.where(kept < 300, np.minimum(kept, 100.0), 130.0).mean()  # the scripted trace, kept steps
    # At 200 steps the stall (steps 100–200) passes the trend test, but that doubling moved λ̂
    # from the first round's last quarter (~88) to 100, so the run goes on: at 400 the newest
    # doubling reads 130 against 100; at 800, 130 against 130, and it stops. Stopping at the
    # stall (the trend test alone) would read 100.
    assert run.equilibrated and run.num_steps == 800 and run.extensions == 3
    assert run.draws.batch_loss.shape[1] == kept.size and 0.95 * 130.0 <= level <= 130.0


def test_a_capped_run_says_it_did_not_settle_and_reads_low():
    config, inputs = _setup()
    run = run_until_equilibrated(jax.random.key(0), config, inputs, _llc_of, num_chains=16, num_burnin=0,
                                 num_draws=40, max_extension=1, progress=False)
    llc, _ = _llc_of(run.draws, run.state)
    assert not run.equilibrated and run.extensions == 0 and run.num_steps == 40
    assert llc.mean() < 0.5 * EXACT  # after 40 steps the variance has climbed a third of the way


def test_a_run_whose_chains_all_diverge_is_not_extended():
    config, inputs = _setup()
    inputs = inputs._replace(divergence=Divergence(jnp.float32(0.0), jnp.float32(1e-3)))  # every chain runs away
    run = run_until_equilibrated(jax.random.key(0), config, inputs, _llc_of, num_chains=4, num_burnin=0,
                                 num_draws=40, max_extension=64, progress=False)
    assert np.all(np.asarray(run.state.diverged_at) >= 0)
    assert run.extensions == 0 and run.num_steps == 40 and not run.equilibrated


def test_extension_is_refused_below_one():
    import slt_jax

    with pytest.raises(ValueError, match="max_extension"):
        slt_jax.estimate_llc(_loss, jnp.zeros(D), jnp.zeros((8, 1)), jax.random.key(0), step_size="auto",
                             localization=1.0, nbeta=NBETA, max_extension=0.5, progress=False)
    with pytest.raises(ValueError, match="max_plateau_extension"):
        slt_jax.estimate_llc(_loss, jnp.zeros(D), jnp.zeros((8, 1)), jax.random.key(0), step_size="auto",
                             localization=1.0, nbeta=NBETA, max_plateau_extension=4, progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_equilibration_time_finds_the_end_of_a_transient_and_refuses_a_drift(seed):
    rng = np.random.default_rng(seed)
    times = np.linspace(0.0, 10.0, 2000)
    noise = rng.normal(0.0, 0.5, (8, times.size))  # independent draws: se ≈ 0.5 / √(8·draws)
    relaxing = 10.0 * (1.0 - np.exp(-times / 0.5)) + noise  # settles (to 0.1 %) by t ≈ 3.5
    settle = equilibration_time(relaxing, times, rtol=0.01)
    assert settle is not None and 0.5 <= settle <= 3.5
    drifting = 10.0 + 0.5 * times + noise  # +25 % between the halves of any tail
    assert equilibration_time(drifting, times, rtol=0.01) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_slow_significant_climb_is_a_trend_however_small(seed):
    # 4 chains climbing 4 % over the run (the last quarter's halves differ by ~0.5 %, inside a
    # 5 % tolerance) with little noise: the size test alone passes it; its significance does not.
    rng = np.random.default_rng(seed)
    times = np.linspace(0.0, 1.0, 4000)
    climbing = 100.0 + 4.0 * times + rng.normal(0.0, 0.5, (4, times.size))
    assert equilibration_time(climbing, times, significance=np.inf) is not None
    assert equilibration_time(climbing, times) is None
    # The same noise without the climb settles at the first candidate on most seeds: a burn-in, not
    # a refusal (the t quantile with 3 degrees of freedom keeps false trends rare).
    flat = 100.0 + rng.normal(0.0, 0.5, (4, times.size))
    assert equilibration_time(flat, times) is not None




# A point with a Laplace plateau: 64 stiff coordinates (L = ½·h_s·w², nβh_s = 1e4) and 64 flat
# to fourth order (L = u⁴). With γ = 0 the exact estimand is 64·½/(1 − εnβh_s/4) + 64·¼ (each
# quartic coordinate adds E[nβu⁴] = ¼ exactly); the Laplace value is the stiff part alone, 32.
# The stiff coordinates settle in ~100 steps, the quartic ones need E[u²] ≈ 0.034 = ε × ~8500
# steps of diffusion first: a 1000-step plan reads the plateau, flat enough to pass the trend test.
STIFF, FLAT, H_STIFF, PLATEAU_STEP = 64, 64, 100.0, 4e-6
PLATEAU_EXACT = STIFF * 0.5 / (1.0 - PLATEAU_STEP * NBETA * H_STIFF / 4.0) + FLAT * 0.25


def _plateau_loss(w, batch):
    return 0.5 * H_STIFF * jnp.sum(w[:STIFF] ** 2) + jnp.sum(w[STIFF:] ** 4) + 0.0 * jnp.mean(batch)


def _plateau_run(seed, plateau):
    config = RunConfig(_plateau_loss, SGLD, 4, 1, "control_variate", 4, None)
    inputs = ChainInputs(step_size=jnp.float32(PLATEAU_STEP),
                         posterior=LocalPosterior(jnp.zeros(STIFF + FLAT), jnp.float32(NBETA), jnp.float32(0.0)),
                         divergence=Divergence(jnp.float32(0.0), jnp.float32(1e6)), data=jnp.zeros((8, 1)),
                         eval_data=None)
    return run_until_equilibrated(jax.random.key(seed), config, inputs, _llc_of, num_chains=16, num_burnin=0,
                                  num_draws=1000, max_extension=8, plateau=plateau, max_plateau_extension=256,
                                  progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_on_the_laplace_plateau_is_extended_until_the_chains_leave_it(seed):
    laplace = STIFF * 0.5  # exact: nβh_s/(nβh_s + γ) = 1 with γ = 0
    plain = _plateau_run(seed, None)
    plain_llc, _ = _llc_of(plain.draws, plain.state)
    # Without the plateau test the trend test passes the plateau: λ̂ reads the Laplace value.
    assert plain.equilibrated and not plain.plateau and plain_llc.mean() < 0.8 * PLATEAU_EXACT

    run = _plateau_run(seed, laplace_plateau(laplace, 0.0, STIFF + FLAT))
    llc, _ = _llc_of(run.draws, run.state)
    means = llc.mean(axis=1)
    se = means.std(ddof=1) / math.sqrt(means.size)
    assert run.plateau and not run.still_at_plateau and run.equilibrated and run.num_steps > 8 * 1000
    # Off the plateau λ̂ is the exact estimand within the trend test's 5 % plus 3 standard errors.
    assert abs(llc.mean() - PLATEAU_EXACT) < 0.05 * PLATEAU_EXACT + 3 * se, (llc.mean(), PLATEAU_EXACT, se)


def test_the_plateau_test_reads_the_laplace_value_and_skips_regular_points():
    plateau = laplace_plateau(10.0, 0.1, 100)
    rng = np.random.default_rng(0)
    assert plateau(10.1 + 0.5 * rng.normal(size=(8, 50)))
    assert not plateau(12.0 + 0.5 * rng.normal(size=(8, 50)))  # +20 %, far beyond 3 % + 2 se
    assert laplace_plateau(48.0, 0.0, 100) is None  # 96 % of d/2: nothing unconfined to leave


def test_a_run_still_on_the_plateau_at_its_cap_is_not_called_equilibrated():
    config, inputs = _setup()
    # The AR(1) climb is over by ~300 steps: the trend test passes, the (stub) plateau test never lets go.
    # 64 chains: with 16 the trend test (5 % + 1 se) tripped on four keys of eight, with 64 on none.
    run = run_until_equilibrated(jax.random.key(0), config, inputs, _llc_of, num_chains=64, num_burnin=1000,
                                 num_draws=1000, max_extension=1, plateau=lambda llc: True, max_plateau_extension=4,
                                 progress=False)
    assert run.num_steps == 4 * 2000 and run.extensions == 2
    assert run.plateau and run.still_at_plateau and not run.equilibrated and not run.trending


def test_auto_estimates_record_the_laplace_value_unless_asked_not_to():
    import slt_jax

    data, key = jnp.zeros((8, 1)), jax.random.key(0)
    kw = dict(localization=1.0, nbeta=NBETA, num_chains=4, batch_size=4, progress=False)
    calibration = slt_jax.calibrate(_loss, jnp.zeros(D), data, key, num_steps=1500, mala=False, **kw)
    on = slt_jax.estimate_llc(_loss, jnp.zeros(D), data, key, step_size=calibration, **kw)
    laplace = on.settings["equilibration"]["laplace"]
    # A regular quadratic: every direction stiff, the Laplace value is the exact ε → 0 estimand.
    assert laplace["num_stiff"] == D and laplace["method"] == "dense"
    assert laplace["llc"] == pytest.approx(0.5 * D * A / (A + 1.0), rel=1e-5)
    assert not on.settings["equilibration"]["plateau"]  # a regular point has no plateau to leave
    off = slt_jax.estimate_llc(_loss, jnp.zeros(D), data, key, step_size=calibration, max_plateau_extension=None,
                               **kw)
    assert off.settings["equilibration"]["laplace"] is None
    assert off.llc_mean == on.llc_mean  # the check only decides how long to run


def test_the_warning_names_what_did_not_settle_and_the_option_to_raise():
    from types import SimpleNamespace

    from slt_jax.tuning.equilibration import Equilibrated, equilibration_warning

    def run(diverged_at=(-1, -1), **flags):
        fields = dict(equilibrated=False, plateau=False, still_at_plateau=False, trending=False) | flags
        return Equilibrated(SimpleNamespace(diverged_at=np.array(diverged_at)), None, 0, 800, extensions=3, **fields)

    say = lambda r: equilibration_warning(r, laplace={"llc": 12.0}, planned=100, step_size=1e-4, max_extension=8,
                                          max_plateau_extension=64)
    assert say(run(equilibrated=True)) is None
    assert say(run(diverged_at=(5, 7), trending=True)) is None  # the divergence report speaks instead
    trending = say(run(trending=True))
    assert "still trends" in trending and "8× the calibrated 100" in trending and "raise max_extension" in trending
    stuck = say(run(plateau=True, still_at_plateau=True))
    assert "Laplace value 12" in stuck and "64×" in stuck and "raise max_plateau_extension" in stuck
    left = say(run(plateau=True))
    assert "left the Laplace value 12" in left and "did not agree" in left and "raise max_plateau_extension" in left
    unsteady = say(run())
    assert "stopped trending" in unsteady and "did not agree" in unsteady and "raise max_extension" in unsteady


def _localized_plateau_run(seed, settles_after):
    config = RunConfig(_plateau_loss, SGLD, 4, 1, "control_variate", 4, None)
    inputs = ChainInputs(step_size=jnp.float32(PLATEAU_STEP),
                         posterior=LocalPosterior(jnp.zeros(STIFF + FLAT), jnp.float32(NBETA),
                                                  jnp.float32(LOCALIZED)),
                         divergence=Divergence(jnp.float32(0.0), jnp.float32(1e6)), data=jnp.zeros((8, 1)),
                         eval_data=None)
    a = NBETA * H_STIFF + LOCALIZED
    laplace = STIFF * 0.5 * NBETA * H_STIFF / a
    return run_until_equilibrated(jax.random.key(seed), config, inputs, _llc_of, num_chains=16, num_burnin=0,
                                  num_draws=1000, max_extension=8, plateau=laplace_plateau(laplace, 0.0, STIFF + FLAT),
                                  max_plateau_extension=64, plateau_settles_after=settles_after, progress=False)


# With γ = 1000 the localizer confines the quartic coordinates at u² ~ 1/γ, where they add only
# E[nβu⁴] ≈ 3·10⁻⁴ each: the Laplace value is the estimand, and a run that has relaxed for three
# e-folds of 2/(εγ) = 500 steps has nothing left to find.
LOCALIZED = 1000.0


def _localized_exact():
    a = NBETA * H_STIFF + LOCALIZED
    stiff = STIFF * 0.5 * NBETA * H_STIFF / (a * (1.0 - PLATEAU_STEP * a / 4.0))
    u = np.linspace(-1.0, 1.0, 200_001)
    density = np.exp(-NBETA * u**4 - 0.5 * LOCALIZED * u**2)
    return stiff + FLAT * np.sum(NBETA * u**4 * density) / np.sum(density)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_that_has_relaxed_to_the_localizers_scale_on_the_plateau_stops_there(seed):
    settles = math.ceil(3 * 2.0 / (PLATEAU_STEP * LOCALIZED))
    waiting = _localized_plateau_run(seed, None)
    run = _localized_plateau_run(seed, settles)
    assert waiting.still_at_plateau and not waiting.plateau_settled and waiting.num_steps == 64 * 1000
    assert run.plateau and run.still_at_plateau and run.plateau_settled and run.equilibrated
    assert settles <= run.num_steps <= 4 * settles
    llc, _ = _llc_of(run.draws, run.state)
    means = llc.mean(axis=1)
    se = means.std(ddof=1) / math.sqrt(means.size)
    exact = _localized_exact()
    # The trend test's 5 % plus 3 standard errors of the chain means, as above.
    assert abs(llc.mean() - exact) < 0.05 * exact + 3 * se, (llc.mean(), exact, se)
