"""Exact ground truths: Aoyagi's formula, quadrature estimands, linear-Gaussian free energy, toys."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from slt_jax.groundtruth import (
    LearningCoefficient,
    dln_learning_coefficient,
    linear_gaussian_free_energy,
    linear_gaussian_mean_nloss,
    linear_gaussian_var_nloss,
    regular_llc,
    rrr_learning_coefficient,
    toy_llc_quadrature,
)
from slt_jax.models.toys import TOY_NAMES, toy_model, toy_potential

pytestmark = pytest.mark.unit  # pure and fast: the `-m unit` tier


def _num_params(widths):
    return sum(a * b for a, b in zip(widths, widths[1:]))


def _small_architectures(max_depth=4, max_width=4):
    for depth in range(1, max_depth + 1):
        for widths in itertools.product(range(1, max_width + 1), repeat=depth + 1):
            for rank in range(min(widths) + 1):
                yield widths, rank


# --- Aoyagi's formula -------------------------------------------------------------------

REFERENCE_TABLE = [
    ((2, 2, 2), 0, 8, Fraction(3, 2), 1),
    ((2, 1, 2), 0, 4, Fraction(1), 2),
    ((5, 3, 5), 0, 30, Fraction(13, 2), 2),
    ((5, 4, 5), 0, 40, Fraction(8), 1),
    ((2, 2, 2, 2, 2), 0, 16, Fraction(3, 2), 5),
    ((10, 10, 10, 10), 0, 300, Fraction(67, 2), 3),
    ((10, 10, 10, 10), 5, 300, Fraction(46), 3),
    ((5, 1, 5), 0, 10, Fraction(5, 2), 2),
]


@pytest.mark.parametrize("widths, rank, d, lam, m", REFERENCE_TABLE)
def test_aoyagi_reference_table(widths, rank, d, lam, m):
    assert _num_params(widths) == d
    result = dln_learning_coefficient(widths, rank)
    assert result == LearningCoefficient(lam, m)
    assert isinstance(result.lam, Fraction) and isinstance(result.multiplicity, int)
    lam_unpacked, m_unpacked = result
    assert (lam_unpacked, m_unpacked) == (lam, m)


def test_single_layer_is_regular():
    for a, b in itertools.product(range(1, 7), repeat=2):
        for rank in range(min(a, b) + 1):
            assert dln_learning_coefficient((a, b), rank) == (Fraction(a * b, 2), 1)


def test_bounds_and_reversal_symmetry():
    for widths, rank in _small_architectures():
        lam, m = dln_learning_coefficient(widths, rank)
        assert 0 <= lam <= Fraction(_num_params(widths), 2), (widths, rank)
        assert m >= 1
        assert dln_learning_coefficient(widths[::-1], rank) == (lam, m), (widths, rank)


def test_permutation_invariance_at_rank_zero():
    for depth in range(1, 5):
        for multiset in itertools.combinations_with_replacement(range(1, 5), depth + 1):
            expected = dln_learning_coefficient(multiset, 0)
            for widths in set(itertools.permutations(multiset)):
                assert dln_learning_coefficient(widths, 0) == expected, widths


def test_square_deep_network_at_rank_zero():
    for h in range(1, 6):
        for depth in range(h, h + 4):
            lam, _ = dln_learning_coefficient((h,) * (depth + 1), 0)
            assert lam == Fraction(h * (h + 1), 4), (h, depth)


def test_full_rank_product_is_smooth_point():
    # r = min width: the fibre is smooth and λ = dim(rank-r matrices)/2 (docs/mathematics.md §5.3).
    for widths, rank in _small_architectures():
        if rank == min(widths):
            expected = Fraction(rank * (widths[0] + widths[-1] - rank), 2)
            assert dln_learning_coefficient(widths, rank) == (expected, 1), widths


def test_matches_reduced_rank_regression_table():
    for M, H, N in itertools.product(range(1, 7), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert dln_learning_coefficient((M, H, N), r) == rrr_learning_coefficient(M, H, N, r), (M, H, N, r)


@pytest.mark.parametrize(
    "widths, rank, match",
    [
        (3, 0, "widths"),
        ((3,), 0, "widths"),
        ("33", 0, "widths"),
        ((3, 0, 2), 0, r"widths\[1\]"),
        ((3, 2.0, 2), 0, r"widths\[1\]"),
        ((3, True, 2), 0, r"widths\[1\]"),
        ((3, 2, 4), 3, "rank"),
        ((3, 2, 4), -1, "rank"),
        ((3, 2, 4), 1.0, "rank"),
    ],
)
def test_dln_learning_coefficient_rejects_bad_input(widths, rank, match):
    with pytest.raises(ValueError, match=match):
        dln_learning_coefficient(widths, rank)


@pytest.mark.parametrize("args, match", [((0, 2, 2, 0), "M"), ((2, 2, 2, 3), "r"), ((2, 1.5, 2, 0), "H")])
def test_rrr_learning_coefficient_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rrr_learning_coefficient(*args)


# --- regular models and quadrature -----------------------------------------------------


def test_regular_llc_closed_form():
    assert regular_llc([1.0, 1.0, 1.0], nbeta=1e12, localization=1.0) == pytest.approx(1.5, rel=1e-9)
    assert regular_llc([2.0], nbeta=10.0, localization=20.0) == pytest.approx(0.25)
    # a saddle direction is allowed while the posterior stays proper
    assert regular_llc([1.0, -0.5], nbeta=10.0, localization=10.0) == pytest.approx(0.5 * (10 / 20 - 5 / 5))
    with pytest.raises(ValueError, match="hessian_eigenvalues"):
        regular_llc([1.0, -2.0], nbeta=10.0, localization=10.0)
    with pytest.raises(ValueError, match="nbeta"):
        regular_llc([1.0], nbeta=0.0, localization=1.0)
    with pytest.raises(ValueError, match="localization"):
        regular_llc([1.0], nbeta=1.0, localization=-1.0)


@pytest.mark.parametrize("eigenvalues", [(3.0,), (0.5, 40.0)])
@pytest.mark.parametrize("nbeta, localization", [(10.0, 1.0), (1e4, 30.0), (1e9, 1.0)])
def test_quadrature_matches_regular_closed_form(eigenvalues, nbeta, localization):
    potential, center, _ = toy_potential("regular_d", eigenvalues=eigenvalues)
    value = toy_llc_quadrature(potential, center, nbeta, localization)
    assert value == pytest.approx(regular_llc(eigenvalues, nbeta, localization), rel=1e-8)


def test_quadrature_around_a_shifted_center():
    center = np.array([0.7, -1.2])
    potential = lambda w: 0.5 * (w[..., 0] - 0.7) ** 2 + 2.0 * (w[..., 1] + 1.2) ** 2 + 3.0
    value = toy_llc_quadrature(potential, center, 1e3, 5.0)
    assert value == pytest.approx(regular_llc([1.0, 4.0], 1e3, 5.0), rel=1e-8)


def _crossing_estimand(power, nbeta, localization):
    """nβ(E[K] − 0) for K = w1² w2^power by a 1-D integral: w1 is Gaussian given w2 and
    integrates out in closed form, Z = E_{w2 ~ N(0, 1/γ)}[(1 + 2nβ w2^power/γ)^{-1/2}]."""
    density = lambda w: math.exp(-0.5 * localization * w * w)
    stiffness = lambda w: 2 * nbeta * w**power / localization

    def integrate_split(f):
        edges = [0.0] + [nbeta ** (-1 / power) * 10.0**j for j in range(-3, 6)]
        edges = sorted({e for e in edges if e < 12 / math.sqrt(localization)} | {12 / math.sqrt(localization)})
        return sum(integrate.quad(f, lo, hi, epsabs=0, epsrel=1e-13, limit=200)[0] for lo, hi in zip(edges, edges[1:]))

    z = integrate_split(lambda w: density(w) * (1 + stiffness(w)) ** -0.5)
    mean = integrate_split(lambda w: density(w) * 0.5 * stiffness(w) * (1 + stiffness(w)) ** -1.5)
    return mean / z


@pytest.mark.parametrize("name, power", [("w1^2 w2^2", 2), ("w1^2 w2^4", 4), ("w1^2 w2^6", 6)])
@pytest.mark.parametrize("nbeta, localization", [(1e3, 1.0), (1e6, 3.0), (1e10, 1.0), (1e3, 100.0)])
def test_quadrature_matches_semi_analytic_crossing(name, power, nbeta, localization):
    potential, center, _ = toy_potential(name)
    value = toy_llc_quadrature(potential, center, nbeta, localization, num_points=401)
    assert value == pytest.approx(_crossing_estimand(power, nbeta, localization), rel=1e-7)


@pytest.mark.parametrize(
    "nbeta, localization, expected", [(1e3, 1.0, 0.390), (1e4, 1.0, 0.412), (1e6, 1.0, 0.438), (1e3, 100.0, 0.061)]
)
def test_quadrature_reference_values_for_w1sq_w2sq(nbeta, localization, expected):
    potential, center, _ = toy_potential("w1^2 w2^2")
    # docs/mathematics.md §6.2 quotes three decimals: agree to within half a unit of the last one.
    assert abs(toy_llc_quadrature(potential, center, nbeta, localization) - expected) <= 5e-4


@pytest.mark.parametrize(
    "name, options", [("w^2k", {"k": 1}), ("w^2k", {"k": 2}), ("w^2k", {"k": 3}), ("radial", {"k": 1}), ("radial", {"k": 3})]
)
@pytest.mark.parametrize("nbeta", [10.0, 1e4, 1e8])
def test_quadrature_homogeneous_potentials_are_exact_without_localization(name, options, nbeta):
    # For K homogeneous of degree 2k in d parameters and γ = 0, substituting w = nβ^{-1/2k} v
    # gives nβ·E[K] = d/(2k) = λ exactly at every nβ: no finite-n drift at all.
    potential, center, lam = toy_potential(name, **options)
    half_width = 40 * nbeta ** (-1 / (2 * options["k"]))
    value = toy_llc_quadrature(potential, center, nbeta, 0.0, bounds=(-half_width, half_width))
    assert value == pytest.approx(float(lam.lam), rel=1e-9)


@pytest.mark.parametrize("localization", [1.0, 4.0])
@pytest.mark.parametrize("nbeta", [1e6, 1e9, 1e12])
def test_quadrature_multiplicity_two_drift(localization, nbeta):
    # K = w1² w2² (λ = ½, m = 2): Z(nβ) = ∫φ exp(−nβK) = A nβ^{-1/2}(log nβ + c) + O(nβ^{-3/2} log),
    # so λ̂ = −nβ Z'/Z = ½ − 1/(log nβ + c), with c = 4 log 2 − γ_Euler − 2 log γ from the
    # finite part of ∫ N(x) / |x| dx. The drift is (m − 1)/log nβ-slow; the remainder is
    # O(γ²/nβ) (measured ≈ γ²/(8nβ)), budgeted with a factor 8.
    potential, center, lam = toy_potential("w1^2 w2^2")
    c = 4 * math.log(2) - np.euler_gamma - 2 * math.log(localization)
    value = toy_llc_quadrature(potential, center, nbeta, localization, num_points=401)
    expected = float(lam.lam) - 1 / (math.log(nbeta) + c)
    assert value == pytest.approx(expected, abs=localization**2 / nbeta + 1e-12)
    assert lam.multiplicity == 2


@pytest.mark.parametrize("localization", [1.0, 4.0])
@pytest.mark.parametrize("nbeta", [1e6, 1e8, 1e10])
def test_quadrature_multiplicity_one_drift(localization, nbeta):
    # K = w1² w2⁴ (λ = ¼, m = 1): Z = A nβ^{-1/4} + B nβ^{-1/2} + O(nβ^{-3/4}) (Mellin poles at
    # 1/4 and 1/2), A = √(γ/2π)(γ/2)^{1/4} Γ(1/4)²/(2√π), B = (γ/2)^{1/2}·E_φ|w|^{-2} = −γ^{3/2}/√2
    # (E|w|^{-2} continued analytically). Hence λ̂ = ¼ + (B/4A) nβ^{-1/4} + O(nβ^{-1/2}).
    potential, center, lam = toy_potential("w1^2 w2^4")
    gaussian_at_zero = math.sqrt(localization / (2 * math.pi))
    a = gaussian_at_zero * (localization / 2) ** 0.25 * math.gamma(0.25) ** 2 / (2 * math.sqrt(math.pi))
    b = -(localization**1.5) / math.sqrt(2)
    value = toy_llc_quadrature(potential, center, nbeta, localization, num_points=401)
    first_order = float(lam.lam) + b / (4 * a) * nbeta ** (-0.25)
    assert abs(value - first_order) <= nbeta ** (-0.5)
    # and the drift is really there: the first-order term explains > 99 % of it
    assert abs(value - first_order) < 0.01 * abs(value - float(lam.lam))


def test_quadrature_refuses_unresolved_posterior():
    # a narrow valley along the diagonal is not aligned with the grid's refinement
    with pytest.raises(ValueError, match="num_points"):
        toy_llc_quadrature(lambda w: (w[..., 0] - w[..., 1]) ** 2, [0.0, 0.0], 1e6, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"center": [0.0, 0.0, 0.0]}, "center"),
        ({"center": [[0.0]]}, "center"),
        ({"nbeta": -1.0}, "nbeta"),
        ({"localization": 0.0}, "bounds"),
        ({"bounds": (0.5, 1.0)}, "bounds"),
        ({"bounds": [(-1, 1), (-1, 1), (-1, 1)]}, "bounds"),
        ({"num_points": 2}, "num_points"),
        ({"potential": lambda w: w}, "potential"),
        ({"potential": lambda w: np.where(w[..., 0] > 1.0, np.nan, w[..., 0] ** 2)}, "potential"),
        ({"potential": lambda w: np.where(w[..., 0] == 0.0, np.inf, w[..., 0] ** 2)}, "potential"),
    ],
)
def test_quadrature_rejects_bad_input(kwargs, match):
    args = {"potential": lambda w: (w**2).sum(-1), "center": [0.0], "nbeta": 10.0, "localization": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        toy_llc_quadrature(
            args.pop("potential"), args.pop("center"), args.pop("nbeta"), args.pop("localization"), **args
        )


# --- linear-Gaussian free energy ---------------------------------------------------------


def _regression(seed, n=12, d=3, outputs=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w_shape = (d,) if outputs is None else (d, outputs)
    y = x @ rng.normal(size=w_shape) + 0.5 * rng.normal(size=(n,) + w_shape[1:])
    center = rng.normal(size=w_shape) * 0.3
    return {"x": x, "y": y, "sigma": 0.7, "center": center, "localization": 2.0}


@pytest.mark.parametrize("seed, outputs", [(0, None), (1, None), (2, 2)])
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_free_energy_is_integral_of_mean_nloss(seed, outputs, beta):
    model = _regression(seed, outputs=outputs)
    mean = lambda b: linear_gaussian_mean_nloss(**model, beta=b)
    integral, _ = integrate.quad(mean, 0.0, beta, epsabs=0, epsrel=1e-12)
    assert linear_gaussian_free_energy(**model, beta=beta) == pytest.approx(integral, rel=1e-10)


@pytest.mark.parametrize("seed, outputs", [(0, None), (3, 2)])
@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_mean_nloss_derivative_is_minus_variance(seed, outputs, beta):
    model = _regression(seed, outputs=outputs)
    h = 1e-6
    mean = lambda b: linear_gaussian_mean_nloss(**model, beta=b)
    # one-sided second-order difference at β = 0, central elsewhere
    if beta == 0:
        slope = (-3 * mean(0.0) + 4 * mean(h) - mean(2 * h)) / (2 * h)
    else:
        slope = (mean(beta + h) - mean(beta - h)) / (2 * h)
    assert -slope == pytest.approx(linear_gaussian_var_nloss(**model, beta=beta), rel=1e-6)


@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_one_parameter_free_energy_by_direct_integration(seed, beta):
    model = _regression(seed, n=10, d=1)
    x, y, sigma, center, gamma = (model[k] for k in ("x", "y", "sigma", "center", "localization"))
    n = len(y)

    def nloss(w):
        return 0.5 * np.sum((y - x[:, 0] * w) ** 2) / sigma**2 + 0.5 * n * math.log(2 * math.pi * sigma**2)

    shift = nloss(center[0])  # keeps exp(−β·nL_n) in range
    prior = lambda w: math.sqrt(gamma / (2 * math.pi)) * math.exp(-0.5 * gamma * (w - center[0]) ** 2)
    weight = lambda w: prior(w) * math.exp(-beta * (nloss(w) - shift))
    lo, hi = center[0] - 12 / math.sqrt(gamma), center[0] + 12 / math.sqrt(gamma)
    z, _ = integrate.quad(weight, lo, hi, epsabs=0, epsrel=1e-12, limit=200)
    first, _ = integrate.quad(lambda w: weight(w) * nloss(w), lo, hi, epsabs=0, epsrel=1e-12, limit=200)
    second, _ = integrate.quad(lambda w: weight(w) * nloss(w) ** 2, lo, hi, epsabs=0, epsrel=1e-12, limit=200)
    assert linear_gaussian_free_energy(**model, beta=beta) == pytest.approx(beta * shift - math.log(z), rel=1e-9)
    assert linear_gaussian_mean_nloss(**model, beta=beta) == pytest.approx(first / z, rel=1e-9)
    assert linear_gaussian_var_nloss(**model, beta=beta) == pytest.approx(second / z - (first / z) ** 2, rel=1e-6)


def test_outputs_are_independent_problems():
    model = _regression(6, outputs=2)
    columns = [dict(model, y=model["y"][:, j], center=model["center"][:, j]) for j in range(2)]
    for fn in (linear_gaussian_free_energy, linear_gaussian_mean_nloss, linear_gaussian_var_nloss):
        assert fn(**model, beta=0.7) == pytest.approx(sum(fn(**c, beta=0.7) for c in columns), rel=1e-12)


def test_mean_nloss_at_least_squares_gives_regular_llc():
    # At ŵ the linear term vanishes: β·(E_β[nL_n] − nL_n(ŵ)) = ½ Σ βa_i/(βa_i + γ), i.e.
    # regular_llc with Hessian eigenvalues a_i/n of L_n and nβ = n·β.
    model = _regression(7, n=30)
    x, y, sigma = model["x"], model["y"], model["sigma"]
    w_hat = np.linalg.lstsq(x, y, rcond=None)[0]
    model["center"] = w_hat
    beta, n = 0.4, len(y)
    nloss_hat = 0.5 * np.sum((y - x @ w_hat) ** 2) / sigma**2 + 0.5 * n * math.log(2 * math.pi * sigma**2)
    hessian = np.linalg.eigvalsh(x.T @ x / sigma**2 / n)
    llc = beta * (linear_gaussian_mean_nloss(**model, beta=beta) - nloss_hat)
    assert llc == pytest.approx(regular_llc(hessian, n * beta, model["localization"]), rel=1e-9)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": np.zeros(5)}, "x"),
        ({"y": np.zeros(11)}, "y"),
        ({"center": np.zeros(2)}, "center"),
        ({"sigma": 0.0}, "sigma"),
        ({"localization": 0.0}, "localization"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_linear_gaussian_rejects_bad_input(change, match):
    args = dict(_regression(0), beta=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        linear_gaussian_free_energy(**args)


# --- toy models ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, lam, m, dim",
    [
        ("regular_d", {"eigenvalues": (1.0, 2.0, 3.0)}, Fraction(3, 2), 1, 3),
        ("w1^2 w2^2", {}, Fraction(1, 2), 2, 2),
        ("w1^2 w2^4", {}, Fraction(1, 4), 1, 2),
        ("w1^2 w2^6", {}, Fraction(1, 6), 1, 2),
        ("w^2k", {"k": 3}, Fraction(1, 6), 1, 1),
        ("radial", {"dim": 3, "k": 2}, Fraction(3, 4), 1, 3),
    ],
)
def test_toy_model_is_sampler_ready(name, options, lam, m, dim):
    loss_fn, params_star, data, truth = toy_model(name, n=50, **options)
    assert truth == (lam, m)
    assert params_star.shape == (dim,) and data.shape == (50, 1)
    value, grad = jax.jit(jax.value_and_grad(loss_fn))(params_star, data[:10])
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    w = jnp.full((dim,), 0.5)
    assert float(loss_fn(w, data)) > 0.0
    assert float(loss_fn(w, data)) == pytest.approx(float(toy_potential(name, **options).potential(np.full(dim, 0.5))))


def test_toy_names_are_all_buildable():
    for name in TOY_NAMES:
        potential, center, lam = toy_potential(name)
        assert float(np.asarray(potential(center))) == 0.0 and lam.multiplicity >= 1


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("banana", {}, "name"),
        ("w1^2 w2^2", {"k": 2}, "k"),
        ("w^2k", {"dim": 2}, "dim"),
        ("w^2k", {"k": 0}, "k"),
        ("radial", {"dim": 1.5}, "dim"),
        ("regular_d", {"eigenvalues": (1.0, 0.0)}, "eigenvalues"),
        ("regular_d", {"n": 0}, "n"),
    ],
)
def test_toy_model_rejects_bad_input(name, kwargs, match):
    kwargs = {"n": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        toy_model(name, **kwargs)
