"""Deep linear networks: teachers at Aoyagi points, exact zero-residual data, architectures."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.models.dln import DLNArchitecture, dln_data, dln_forward, dln_loss, dln_teacher, random_dln


def _product(params):
    out = params[0]
    for w in params[1:]:
        out = w @ out
    return out


def _singular_values(matrix):
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("widths, rank, scale", [((4, 3, 5), 2, 1.0), ((6, 5, 7, 4, 6), 3, 10.0), ((3, 8, 3), 1, 0.1)])
def test_aligned_teacher_has_rank_r_product_and_layers(seed, widths, rank, scale):
    teacher = dln_teacher(jax.random.key(seed), widths, rank, scale=scale)
    assert [w.shape for w in teacher] == [(h_out, h_in) for h_in, h_out in zip(widths, widths[1:])]
    values = _singular_values(_product(teacher))
    # float32 products: anything below 1e-5 of the scale is round-off
    assert np.all((values[:rank] > scale / 2 * (1 - 1e-4)) & (values[:rank] < 2 * scale * (1 + 1e-4)))
    assert np.all(values[rank:] < 1e-5 * scale)
    for w in teacher:
        layer = _singular_values(w)
        assert layer[rank - 1] > 0.5 * scale ** (1 / (len(widths) - 1)) and np.all(layer[rank:] < 1e-5 * layer[0])


def test_aligned_teacher_rank_zero_is_origin(key):
    teacher = dln_teacher(key, (3, 4, 2), 0)
    assert all(np.all(np.asarray(w) == 0.0) for w in teacher)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind, widths, rank", [("aligned", (5, 3, 4, 2), 1), ("generic", (5, 3, 4, 6), 3)])
@pytest.mark.parametrize("input_dist, input_scale", [("normal", 1.0), ("uniform", 10.0)])
def test_teacher_is_exact_zero_residual_point(seed, kind, widths, rank, input_dist, input_scale):
    key_teacher, key_data = jax.random.split(jax.random.key(seed))
    teacher = dln_teacher(key_teacher, widths, rank, kind=kind)
    data = dln_data(key_data, teacher, 256, input_scale=input_scale, input_dist=input_dist)
    assert data["x"].shape == (256, widths[0]) and data["y"].shape == (256, widths[-1])
    loss_and_grad = jax.jit(jax.value_and_grad(dln_loss))  # sigma traced: one compilation
    for sigma in (1.0, 0.5):
        loss, grads = loss_and_grad(teacher, data, sigma)
        assert float(loss) == pytest.approx(0.5 * widths[-1] * math.log(2 * math.pi * sigma**2), abs=1e-5)
        assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 1e-3
    assert float(functools.partial(dln_loss, sigma=0.5)(teacher, data)) == pytest.approx(float(loss), abs=1e-6)
    if input_dist == "uniform":
        assert float(jnp.max(jnp.abs(data["x"]))) <= input_scale


def test_dln_loss_is_gaussian_nll_in_nats(key):
    teacher = dln_teacher(key, (2, 3, 2), 1)
    batch = {"x": jnp.ones((4, 2)), "y": dln_forward(teacher, jnp.ones((4, 2))) + 0.3}
    # residual 0.3 in each of 2 outputs: ½·2·0.09/σ² + log(2πσ²)
    expected = 0.09 / 0.25 + math.log(2 * math.pi * 0.25)
    assert float(dln_loss(teacher, batch, sigma=0.5)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_noise_has_requested_scale(seed):
    key_teacher, key_data = jax.random.split(jax.random.key(seed))
    teacher = dln_teacher(key_teacher, (3, 2, 4), 2)
    data = dln_data(key_data, teacher, 5000, noise=0.2)
    residual = np.asarray(data["y"] - dln_forward(teacher, data["x"]), dtype=np.float64).ravel()
    # the sample std of 20,000 Gaussians has standard error σ/√(2N) = 0.001: allow 5 of them
    assert abs(residual.std() - 0.2) < 5 * 0.2 / math.sqrt(2 * residual.size)


def _jacobian_rank(params):
    # d vec(A_s W_s B_s) = (B_sᵀ ⊗ A_s) d vec(W_s) (column-major vec), A_s / B_s = the layers after / before s
    layers = [np.asarray(w, dtype=np.float64) for w in params]
    blocks = []
    for s in range(len(layers)):
        after = functools.reduce(lambda acc, w: w @ acc, layers[s + 1 :], np.eye(layers[s].shape[0]))
        before = functools.reduce(lambda acc, w: w @ acc, layers[:s], np.eye(layers[0].shape[1]))
        blocks.append(np.kron(before.T, after))
    matrix = np.concatenate(blocks, axis=1)
    values = _singular_values(matrix)
    rank = int(np.sum(values > 1e-4 * values[0]))
    # the numerical rank is unambiguous: a clear gap between kept and dropped values
    assert rank == len(values) or values[rank] < 1e-5 * values[0]
    assert values[rank - 1] > 1e-2 * values[0]
    return rank


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("widths", [(3, 2, 4), (2, 5, 3), (4, 3, 5, 3), (3, 3, 3, 3), (5, 4, 2, 6, 3), (4, 6, 5)])
def test_generic_full_rank_point_local_lambda_is_half_jacobian_rank(seed, widths):
    rank = min(widths)
    teacher = dln_teacher(jax.random.key(seed), widths, rank, kind="generic")
    assert np.sum(_singular_values(_product(teacher)) > 1e-5) == rank
    lam, m = dln_learning_coefficient(widths, rank)
    half_rank = _jacobian_rank(teacher) / 2
    assert half_rank == rank * (widths[0] + widths[-1] - rank) / 2
    assert (half_rank, m) == (lam, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "generic", "rank": 1}, "generic"),
        ({"kind": "banana"}, "kind"),
        ({"rank": 4}, "rank"),
        ({"widths": (3,)}, "widths"),
        ({"widths": (3, 0, 2)}, r"widths\[1\]"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_dln_teacher_rejects_bad_input(key, kwargs, match):
    args = {"widths": (3, 2, 4), "rank": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        dln_teacher(key, **args)


def test_forward_and_data_reject_bad_input(key):
    teacher = dln_teacher(key, (3, 2, 4), 1)
    with pytest.raises(ValueError, match="x"):
        dln_forward(teacher, jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"params\[1\]"):
        dln_forward([teacher[0], jnp.ones((4, 3))], jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="params"):
        dln_forward([], jnp.ones((5, 3)))
    for kwargs, match in [({"n": 0}, "n"), ({"input_dist": "cauchy"}, "input_dist"), ({"noise": -1.0}, "noise")]:
        with pytest.raises(ValueError, match=match):
            dln_data(key, teacher, **({"n": 10} | kwargs))


@pytest.mark.parametrize("seed", range(8))
def test_random_dln_follows_the_protocol(seed):
    key = jax.random.key(seed)
    arch = random_dln(key, depth_range=(2, 5), width_range=(3, 9))
    widths, rank = arch
    assert isinstance(arch, DLNArchitecture) and random_dln(key, depth_range=(2, 5), width_range=(3, 9)) == arch
    assert 2 <= len(widths) - 1 <= 5 and all(3 <= h <= 9 for h in widths)
    assert all(isinstance(h, int) for h in widths) and isinstance(rank, int)
    assert 0 <= rank <= min(widths)
    assert random_dln(key, depth_range=(2, 5), width_range=(3, 9), rank_cut_prob=0.0).rank == min(widths)
    assert random_dln(key, depth_range=(2, 5), width_range=(3, 9), rank_cut_prob=1.0).rank < min(widths)


def test_random_dln_cuts_ranks_with_the_given_probability():
    # widths all 4, L = 2: r = 4 iff neither layer is cut, probability 1/4. The count over
    # 100 draws is Binomial(100, 1/4): mean 25, standard deviation 4.33; allow 4 of them.
    draws = [random_dln(jax.random.key(s), depth_range=(2, 2), width_range=(4, 4)) for s in range(100)]
    assert all(d.widths == (4, 4, 4) for d in draws)
    assert abs(sum(d.rank == 4 for d in draws) - 25) <= 4 * math.sqrt(100 * 0.25 * 0.75)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth_range": (0, 3)}, "depth_range"),
        ({"depth_range": (3, 2)}, "depth_range"),
        ({"width_range": 5}, "width_range"),
        ({"rank_cut_prob": 1.5}, "rank_cut_prob"),
    ],
)
def test_random_dln_rejects_bad_input(key, kwargs, match):
    args = {"depth_range": (2, 3), "width_range": (2, 4)} | kwargs
    with pytest.raises(ValueError, match=match):
        random_dln(key, **args)
