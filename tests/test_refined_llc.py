"""Weight- and data-refined LLC (Wang et al., arXiv:2410.02984) on a deep linear network.

Widths (2, 3, 3, 2), a rank-1 teacher at its most singular point, noise-free data. With every
layer but W_s frozen, f = A·W_s·B·x is linear in W_s, so the restricted loss is exactly
quadratic and the restricted posterior Gaussian: λ̂ must equal ½·Σ nβh/(nβh + γ) over the
eigenvalues h of the restricted Hessian (docs/mathematics.md §5.6), ≈ rank(A)·rank(B)/2 for γ ≪ nβh.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.groundtruth import regular_llc
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

WIDTHS, RANK, N, GAMMA = (2, 3, 3, 2), 1, 1000, 1.0
NBETA = N / math.log(N)
# Full-batch measurements every 5 steps: the restricted posterior is exact, so only the
# sampler's bias enters — ε·nβ·h_max ≈ 1e-4·145·2.5 ≈ 0.04, a ≈ 1 % variance inflation.
RUN = dict(step_size=1e-4, localization=GAMMA, batch_size=100, num_chains=16, num_burnin=1000,
           num_draws=400, steps_per_draw=5, loss_estimator="full_batch", chunk_size=200, progress=False)
# Checks of identities between runs need few draws; one chunk of RUN's size reuses its program.
# 40 draws from w*, no burn-in: the runs compare masks draw for draw, still climbing (the check
# after the run would rightly say so; check_step=False).
SHORT = dict(RUN, num_burnin=0, num_draws=40, check_step=False)
BIAS = 0.02
loss_fn = functools.partial(dln_loss, sigma=1.0)


@pytest.fixture(scope="module")
def dln():
    key_teacher, key_data = jax.random.split(jax.random.key(3))
    teacher = dln_teacher(key_teacher, WIDTHS, RANK)
    return teacher, dln_data(key_data, teacher, N)


def layer_mask(teacher, s):
    return [jnp.full(w.shape, i == s) for i, w in enumerate(teacher)]


def _product(mats, size):
    out = np.eye(size)
    for m in mats:
        out = np.asarray(m, np.float64) @ out
    return out


def restricted_truth(teacher, x, s):
    """(exact finite-γ estimand, rank(A)·rank(B)/2) for the layer-s-only posterior."""
    a = _product(teacher[s + 1:], teacher[s].shape[0])  # layers after s
    b = _product(teacher[:s], teacher[0].shape[1])  # layers before s
    x = np.asarray(x, np.float64)
    # L = ½·mean‖A·ΔW·B·x‖²: Hessian = (AᵀA) ⊗ (B·Σx·Bᵀ) in row-major vec(ΔW).
    hessian = np.kron(a.T @ a, b @ (x.T @ x / len(x)) @ b.T)
    ranks = np.linalg.matrix_rank(a, tol=1e-6) * np.linalg.matrix_rank(b, tol=1e-6)
    return regular_llc(np.linalg.eigvalsh(hessian), NBETA, GAMMA), ranks / 2


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_masking_all_but_one_layer_gives_rank_a_times_rank_b_over_two(dln, layer):
    teacher, data = dln
    exact, ranks = restricted_truth(teacher, data["x"], layer)
    assert exact == pytest.approx(ranks, rel=0.03)  # γ ≪ nβh: the finite-γ value is the rank formula
    r = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(layer), param_mask=layer_mask(teacher, layer),
                             **RUN)
    assert r.settings["num_sampled"] == teacher[layer].size
    assert abs(r.llc_mean - exact) < 3 * r.llc_se + BIAS * exact, (r.llc_mean, r.llc_se, exact, ranks)
    assert r.llc_se < 0.1 * exact


def test_a_regex_selects_the_same_layer_as_a_boolean_mask(dln):
    teacher, data = dln
    a = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), param_mask="1", **SHORT)
    b = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), param_mask=layer_mask(teacher, 1), **SHORT)
    np.testing.assert_array_equal(a.llc_trace, b.llc_trace)
    assert a.settings["param_mask"] == "1" and a.settings["num_sampled"] == 9


def test_the_full_mask_reproduces_the_unrestricted_llc(dln):
    teacher, data = dln
    full = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(7),
                                param_mask=[jnp.ones(w.shape, bool) for w in teacher], **SHORT)
    free = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(7), **SHORT)
    assert full.settings["num_sampled"] == free.settings["num_sampled"] == 21
    # Same key, and a mask of ones multiplies every update by exactly 1: the same chains.
    np.testing.assert_allclose(full.llc_trace, free.llc_trace, rtol=1e-4, atol=1e-4)
    assert full.llc_mean == pytest.approx(free.llc_mean, rel=1e-4)


def test_eval_data_changes_the_measured_loss_and_nothing_else(dln):
    """Inputs and targets doubled: L'(w) − L'(w*) = 4·(L(w) − L(w*)) for every w (the loss is
    quadratic in x), so on the same chains the data-refined λ̂ is exactly four times the other."""
    teacher, data = dln
    mask = layer_mask(teacher, 1)
    doubled = {"x": 2 * data["x"], "y": 2 * data["y"]}
    plain = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(5), param_mask=mask, **SHORT)
    refined = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(5), param_mask=mask,
                                   eval_data=doubled, **SHORT)
    np.testing.assert_allclose(refined.llc_trace, 4 * plain.llc_trace, rtol=1e-3, atol=1e-3)
    assert refined.llc_mean == pytest.approx(4 * plain.llc_mean, rel=1e-3)
    assert refined.nbeta == plain.nbeta and refined.n == plain.n == N  # gradients still from `data`
    assert refined.settings["eval_data"] and refined.settings["n_eval"] == N
    np.testing.assert_array_equal(refined.distance_trace, plain.distance_trace)  # the same chains


def test_every_layer_in_one_program_matches_its_exact_restricted_estimand(dln):
    # The three restrictions as chain groups of one program: each group's λ̂ against the exact
    # finite-γ estimand of its layer, within 3 se + the step bias (as the per-layer test above).
    teacher, data = dln
    components = {f"layer {s}": layer_mask(teacher, s) for s in range(3)}
    results = slt_jax.estimate_refined_llcs(loss_fn, teacher, data, jax.random.key(11), components=components, **RUN)
    assert list(results) == list(components)
    for s, (name, r) in enumerate(results.items()):
        exact, _ = restricted_truth(teacher, data["x"], s)
        assert r.settings["num_sampled"] == teacher[s].size and r.llc_trace.shape == (RUN["num_chains"], 400)
        assert abs(r.llc_mean - exact) < 3 * r.llc_se + BIAS * exact, (name, r.llc_mean, r.llc_se, exact)


def test_the_first_component_runs_the_chains_of_its_own_estimate(dln):
    teacher, data = dln
    components = {"middle": "1", "first": layer_mask(teacher, 0)}
    results = slt_jax.estimate_refined_llcs(loss_fn, teacher, data, jax.random.key(0), components=components, **SHORT)
    alone = slt_jax.estimate_llc(loss_fn, teacher, data, jax.random.key(0), param_mask="1", **SHORT)
    # The same keys; a vmap over 32 chains may fuse differently from one over 16: rounding only.
    np.testing.assert_allclose(results["middle"].llc_trace, alone.llc_trace, rtol=1e-3, atol=1e-4)
    assert results["middle"].settings["param_mask"] == "1"
    with pytest.raises(ValueError, match="covers no parameter"):
        slt_jax.estimate_refined_llcs(loss_fn, teacher, data, jax.random.key(0),
                                      components={"none": [jnp.zeros(w.shape, bool) for w in teacher]}, **SHORT)
