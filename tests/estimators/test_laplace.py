"""The Laplace value: exact on a quadratic loss, rank(Hess)/2 at a singular DLN point — where the
true λ is larger (docs/mathematics.md §3.8; the plateau this value explains is in slt_jax.estimators.laplace)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.groundtruth import dln_learning_coefficient, regular_llc
from slt_jax.estimators.laplace import laplace_llc
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

H = np.array([0.5, 1.0, 2.0, 4.0])


def _quadratic(w, batch):
    return 0.5 * jnp.sum(jnp.asarray(H, jnp.float32) * w**2) + 0.0 * jnp.mean(batch)


def test_a_quadratic_loss_gives_its_exact_estimand():
    result = laplace_llc(_quadratic, jnp.zeros(4), jnp.zeros((10, 1)), localization=3.0, nbeta=2.0, batch_size=3)
    np.testing.assert_allclose(result.eigenvalues, H, rtol=1e-5)
    assert result.llc == pytest.approx(regular_llc(H, 2.0, 3.0), rel=1e-5)
    assert result.num_stiff == 2  # nβh > γ only for h = 2 and 4
    assert result.method == "dense" and result.llc_se == 0.0


def test_a_second_dense_call_with_the_same_loss_compiles_nothing():
    # step_size="auto" computes the Laplace value at every checkpoint: a fresh program per call
    # cost 0.3–0.4 s each on a 24-parameter DLN. An unhashable loss still works (compiled per call).
    kw = dict(localization=3.0, nbeta=2.0, batch_size=5)
    laplace_llc(_quadratic, jnp.zeros(4), jnp.zeros((10, 1)), **kw)
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = laplace_llc(_quadratic, jnp.ones(4), jnp.ones((10, 1)), **kw)
        assert not compiles
        jax.jit(lambda x: x * 3.0)(jnp.arange(5.0))  # the listener does see compiles
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

    class Unhashable:
        __hash__ = None

        def __call__(self, w, batch):
            return _quadratic(w, batch)

    other = laplace_llc(Unhashable(), jnp.ones(4), jnp.ones((10, 1)), **kw)
    assert other.llc == pytest.approx(again.llc) and again.llc == pytest.approx(regular_llc(H, 2.0, 3.0), rel=1e-5)


@pytest.mark.parametrize("widths,rank", [((4, 3, 4), 1), ((5, 3, 4), 2)])
def test_an_aligned_dln_point_reads_rank_over_two_below_aoyagi(widths, rank):
    # At the aligned point the product map's differential spans the tangent space of rank-r
    # matrices, of dimension r·(H_0 + H_L − r): that many stiff directions, each nearly ½.
    teacher = dln_teacher(jax.random.key(0), widths, rank)
    data = dln_data(jax.random.key(1), teacher, 2000)
    result = laplace_llc(dln_loss, teacher, data, localization=1.0, batch_size=1000)
    stiff = rank * (widths[0] + widths[-1] - rank)
    assert result.num_stiff == stiff
    assert stiff / 2 * 0.95 < result.llc <= stiff / 2
    assert stiff / 2 < float(dln_learning_coefficient(widths, rank).lam)  # 3.5 < 6 and 7 < 8


def test_large_models_are_refused_by_name():
    with pytest.raises(ValueError, match="params has 9000 numbers"):
        laplace_llc(_quadratic, jnp.zeros(9000), jnp.zeros((4, 1)), localization=1.0, method="dense")


# --- method="lanczos": stochastic Lanczos quadrature, judged by its own standard error ---------
# |estimate − exact| ≤ 3·se (+ FLOAT32_SLACK): the probe noise is what se measures. The slack
# covers the float32 Hessian-vector products only: on the quadratic below the float32 estimate
# differs from the float64 Hutchinson value of the same probes by < 1e-4 (relative 3e-6).
FLOAT32_SLACK = 1e-3


@functools.cache
def _rotated_quadratic(seed, spectrum, rows):
    """``loss(w, s) = ½ mean_rows Σ_i s_ri (u_iᵀw)²`` with U random orthogonal, and its rows.

    Row r scales the spectrum by a random factor per direction, so the exact Hessian of the
    first m rows is ``U diag(mean of their s) Uᵀ``: it checks the row weighting of the batches.
    The rotation makes the Hessian non-diagonal (a diagonal one has zero Rademacher variance).
    Cached: one loss function for both seeds, so the second call reuses the compiled program.
    """
    spectrum = np.asarray(spectrum)
    rng = np.random.default_rng(seed)
    u = jnp.asarray(np.linalg.qr(rng.standard_normal((spectrum.size, spectrum.size)))[0], jnp.float32)
    scales = spectrum * rng.uniform(0.5, 1.5, (rows, spectrum.size))

    def loss(w, s):
        return 0.5 * jnp.mean(jnp.sum(s * (w @ u)[None, :] ** 2, axis=1))

    return loss, scales


@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_estimates_a_known_spectrum_within_its_standard_error(seed):
    nbeta, gamma = 50.0, 1.0
    # 120 directions: exactly flat, stiff (nβh ≫ γ), near nβh = γ, and soft (nβh ≪ γ).
    spectrum = np.concatenate([np.zeros(20), np.geomspace(10, 1000, 30), np.geomspace(0.2, 5, 40),
                               np.geomspace(1e-3, 0.1, 30)]) * gamma / nbeta
    loss, scales = _rotated_quadratic(7, tuple(spectrum), 40)
    result = laplace_llc(loss, jnp.zeros(spectrum.size), jnp.asarray(scales, jnp.float32), localization=gamma,
                         nbeta=nbeta, batch_size=8, max_rows=35, method="lanczos", key=jax.random.key(seed))
    hessian_eigenvalues = scales[:35].mean(axis=0)  # 4 full batches of 8 and one of 3
    exact = regular_llc(hessian_eigenvalues, nbeta, gamma)
    assert result.method == "lanczos"
    assert result.llc_se > 0
    assert abs(result.llc - exact) <= 3 * result.llc_se + FLOAT32_SLACK
    # The first probe's Ritz values: 64 quadrature nodes inside the spectrum's hull.
    assert result.eigenvalues.shape == (64,)
    assert np.all(np.diff(result.eigenvalues) >= 0)
    assert hessian_eigenvalues.min() - 1e-5 <= result.eigenvalues[0]
    assert result.eigenvalues[-1] <= hessian_eigenvalues.max() * (1 + 1e-5)


def test_lanczos_stops_cleanly_at_an_invariant_subspace():
    # Three distinct eigenvalues (0 among them), rotated by the Hadamard matrix / 8 — orthogonal
    # exactly in float32, so the float32 Hessian has exactly three eigenvalues: every probe's
    # Krylov space is 3-dimensional and the recursion breaks down (β = 0) after 3 of its 64
    # steps. Gauss quadrature on the 3 Ritz values is then exact for each probe; nothing may
    # turn NaN.
    nbeta, gamma = 50.0, 1.0
    spectrum = np.repeat([0.0, 1.0, 100.0], [20, 22, 22]) * gamma / nbeta
    hadamard = np.ones((1, 1))
    for _ in range(6):
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    u = jnp.asarray(hadamard / 8, jnp.float32)

    def loss(w, s):
        return 0.5 * jnp.mean(jnp.sum(s * (w @ u)[None, :] ** 2, axis=1))

    data = jnp.asarray(np.tile(spectrum, (6, 1)), jnp.float32)  # every row the same: Hessian exact
    result = laplace_llc(loss, jnp.zeros(spectrum.size), data, localization=gamma, nbeta=nbeta, method="lanczos")
    np.testing.assert_allclose(result.eigenvalues, [0.0, 1 / nbeta, 100 / nbeta], atol=1e-5)
    assert np.isfinite(result.llc) and result.llc_se > 0
    assert abs(result.llc - regular_llc(spectrum, nbeta, gamma)) <= 3 * result.llc_se + FLOAT32_SLACK


DLN_SETTINGS = dict(localization=1.0, batch_size=600, max_rows=1800)  # 3 full batches (no remainder)


@pytest.fixture(scope="module")
def dln_point():
    """A DLN 8-6-7 at an aligned rank-2 point (90 parameters, 26 stiff) and its dense Laplace value."""
    teacher = dln_teacher(jax.random.key(0), (8, 6, 7), 2)
    data = dln_data(jax.random.key(1), teacher, 2000)
    return teacher, data, laplace_llc(dln_loss, teacher, data, method="dense", **DLN_SETTINGS)


@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_agrees_with_the_dense_hessian_at_a_dln_point(dln_point, seed):
    teacher, data, dense = dln_point
    result = laplace_llc(dln_loss, teacher, data, method="lanczos", key=jax.random.key(seed), **DLN_SETTINGS)
    assert result.method == "lanczos" and result.llc_se > 0
    assert abs(result.llc - dense.llc) <= 3 * result.llc_se + FLOAT32_SLACK
    again = laplace_llc(dln_loss, teacher, data, method="lanczos", key=jax.random.key(seed), **DLN_SETTINGS)
    assert again.llc == result.llc  # a function of the key


def test_half_precision_params_get_a_float32_hessian(dln_point):
    teacher, data, dense = dln_point
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), teacher)
    result = laplace_llc(dln_loss, half, data, method="lanczos", key=jax.random.key(0), **DLN_SETTINGS)
    # bfloat16 rounds w* itself (relative 2⁻⁸), which moves the spectrum by about that much.
    assert abs(result.llc - dense.llc) <= 3 * result.llc_se + 0.02 * dense.llc, (result.llc, dense.llc)
    assert result.eigenvalues.size > 2  # no spurious breakdown at bfloat16's epsilon


def test_auto_switches_to_lanczos_above_max_params_and_weights_rows_like_dense():
    # A diagonal Hessian with 4 distinct eigenvalues: each Rademacher probe reads tr f(H) exactly
    # (zᵀf(H)z = Σ f(h_i) z_i², z_i² = 1) after a breakdown at step 4, so se ≈ 0 and the
    # estimate must match to float32 precision — a check of the batch weighting and max_rows.
    h = np.tile(H, 2049)  # 8196 parameters
    scale = np.array([0.5, 1.5, 0.7, 1.2, 0.9, 1.1, 0.6, 1.4, 0.8, 2.0, 100.0])  # row 10 is cut by max_rows

    def loss(w, c):
        return 0.5 * jnp.mean(c[:, 0]) * jnp.sum(jnp.asarray(h, jnp.float32) * w**2)

    result = laplace_llc(loss, jnp.zeros(h.size), jnp.asarray(scale[:, None], jnp.float32), localization=3.0,
                         nbeta=2.0, batch_size=3, max_rows=10)  # batches of 3, 3, 3 and 1 row
    exact = regular_llc(scale[:10].mean() * h, 2.0, 3.0)
    assert result.method == "lanczos"
    assert abs(result.llc - exact) <= 3 * result.llc_se + 1e-5 * exact
    assert result.llc_se < 1e-5 * exact
    assert result.num_stiff == int(np.sum(2.0 * scale[:10].mean() * h > 3.0))


def test_methods_and_probe_counts_are_checked_by_name():
    with pytest.raises(ValueError, match="method"):
        laplace_llc(_quadratic, jnp.zeros(4), jnp.zeros((10, 1)), localization=1.0, method="cholesky")
    with pytest.raises(ValueError, match="num_probes"):
        laplace_llc(_quadratic, jnp.zeros(4), jnp.zeros((10, 1)), localization=1.0, method="lanczos", num_probes=1)
