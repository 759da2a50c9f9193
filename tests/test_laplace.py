"""The Laplace value: exact on a quadratic loss, rank(Hess)/2 at a singular DLN point — where the
true λ is larger (REFERENCE.md §3; the plateau this value explains is in slt_jax.laplace)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.groundtruth import dln_learning_coefficient, regular_llc
from slt_jax.laplace import laplace_llc
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

H = np.array([0.5, 1.0, 2.0, 4.0])


def _quadratic(w, batch):
    return 0.5 * jnp.sum(jnp.asarray(H, jnp.float32) * w**2) + 0.0 * jnp.mean(batch)


def test_a_quadratic_loss_gives_its_exact_estimand():
    result = laplace_llc(_quadratic, jnp.zeros(4), jnp.zeros((10, 1)), localization=3.0, nbeta=2.0, batch_size=3)
    np.testing.assert_allclose(result.eigenvalues, H, rtol=1e-5)
    assert result.llc == pytest.approx(regular_llc(H, 2.0, 3.0), rel=1e-5)
    assert result.num_stiff == 2  # nβh > γ only for h = 2 and 4


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
        laplace_llc(_quadratic, jnp.zeros(9000), jnp.zeros((4, 1)), localization=1.0)
