"""The largest-eigenvalue estimate every step-size rule uses: Lanczos on Hessian-vector products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import curvature


def _quadratic(matrix):
    a = jnp.asarray(matrix, jnp.float32)
    return lambda w: 0.5 * w @ a @ w


def _counted(matrix):
    """The quadratic loss of ``matrix`` and a list that grows by one per traced-and-run HVP."""
    calls = []
    a = jnp.asarray(matrix, jnp.float32)

    def loss(w):
        jax.debug.callback(lambda: calls.append(1))
        return 0.5 * w @ a @ w

    return loss, calls


def _power_iteration(matrix, probe, steps):
    u = probe / np.linalg.norm(probe)
    for _ in range(steps):
        hu = matrix @ u
        norm = np.linalg.norm(hu)
        u = hu / norm
    return norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_reads_the_largest_absolute_eigenvalue_from_below(seed):
    # A hard indefinite 200×200 spectrum: uniform on [−1, 1] up to an outlier 2 % beyond it,
    # negative on odd seeds. Lanczos reads below the exact value (a Ritz value), at least as high
    # as the 30 power iterations it replaced from the same probe (0.984–1.000 here) and within
    # 5 % of the exact value.
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(200, 200)))[0]
    spectrum = np.concatenate([rng.uniform(-1.0, 1.0, 198), [1.02 * (-1) ** seed, 0.5]])
    matrix = (q * spectrum) @ q.T
    probe = jax.random.normal(jax.random.key(seed), (200,))
    h = float(jax.jit(lambda z: curvature.top_eigenvalue(_quadratic(matrix), jnp.zeros(200), z))(probe))
    power = _power_iteration(matrix, np.asarray(probe, np.float64), 30)
    assert max(power, 1.02 * 0.95) <= h * (1 + 1e-5) and h <= 1.02 * (1 + 1e-5), (h, power)


def test_top_eigenvalue_is_exact_after_a_breakdown_and_spends_its_budget_of_products():
    # Three distinct eigenvalues: the Krylov space is invariant after three products (a
    # breakdown; the rest add zeros), so the value is exact; every call spends LANCZOS_STEPS
    # Hessian-vector products, 20 against the 30 power iterations they replaced.
    matrix = np.diag(np.repeat([3.0, 1.0, 0.5], 10))
    loss, calls = _counted(matrix)
    h = jax.block_until_ready(jax.jit(lambda z: curvature.top_eigenvalue(loss, jnp.zeros(30), z))(jnp.ones(30)))
    assert float(h) == pytest.approx(3.0, rel=1e-5) and len(calls) == curvature.LANCZOS_STEPS == 20


def test_top_eigenvalue_of_a_vanishing_or_undefined_hessian():
    # A zero Hessian reads 0 (a breakdown at the first product); a NaN one reads NaN (the grid
    # then raises).
    zero = curvature.top_eigenvalue(lambda w: 0.0 * jnp.sum(w), jnp.zeros(5), jnp.ones(5))
    undefined = curvature.top_eigenvalue(lambda w: jnp.nan * jnp.sum(w**2), jnp.zeros(5), jnp.ones(5))
    assert float(zero) == 0.0 and np.isnan(float(undefined))


def test_top_eigenvalue_on_scaled_pytrees_under_vmap():
    # Masked coordinates drop out (scale 0); two positions at once, as the stiffness check runs.
    def loss(p):
        return jnp.sum(p["a"] ** 4) + 0.5 * 7.0 * p["b"] ** 2

    positions = {"a": jnp.array([[1.0, 0.5], [0.2, 0.1]]), "b": jnp.array([0.0, 0.0])}
    probe = {"a": jnp.ones(2), "b": jnp.ones(())}
    full = jax.vmap(lambda p: curvature.top_eigenvalue(loss, p, probe))(positions)
    masked = jax.vmap(lambda p: curvature.top_eigenvalue(loss, p, probe, {"a": jnp.ones(2), "b": jnp.zeros(())}))(
        positions)
    np.testing.assert_allclose(full, [12.0, 7.0], rtol=1e-5)
    np.testing.assert_allclose(masked, [12.0, 12 * 0.04], rtol=1e-5)
