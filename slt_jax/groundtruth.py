"""Exact learning coefficients and finite-(nβ, γ) estimands to test estimators against.

Everything here is deterministic numpy/scipy: closed forms (Aoyagi's deep-linear-network
formula, the reduced-rank-regression case table, regular and linear-Gaussian models) and a
grid quadrature for low-dimensional toy potentials.

Its length: a catalogue of independent closed forms, one function each, looked up by name; they
share nothing but numpy and scipy.
"""

import math
import numbers
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np

# Default grid sizes of `toy_llc_quadrature`, per axis (odd, so the coarse check grid nests).
_QUADRATURE_POINTS = {1: 4001, 2: 801}
# Relative disagreement between the grid and a grid of half the resolution above which
# `toy_llc_quadrature` refuses to answer.
_QUADRATURE_RTOL = 1e-4


class LearningCoefficient(NamedTuple):
    """A learning coefficient λ (exact rational) with its multiplicity m."""

    lam: Fraction
    multiplicity: int


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _rank(value, upper: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= upper:
        raise ValueError(f"{name} must be an integer in [0, {upper}], got {value!r}")
    return int(value)


def _architecture(widths, rank) -> tuple[list[int], int]:
    """Validated deep-linear-network widths (at least two positive ints) and product rank."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or len(widths) < 2:
        raise ValueError(f"widths must be a sequence of at least two positive integers, got {widths!r}")
    widths = [_positive_int(h, f"widths[{i}]") for i, h in enumerate(widths)]
    return widths, _rank(rank, min(widths), "rank")


def dln_learning_coefficient(widths, rank) -> LearningCoefficient:
    """Aoyagi's learning coefficient of a deep linear network with a rank-r true product.

    Aoyagi, *Consideration on the learning efficiency of multiple-layered neural networks
    with linear units*, Neural Networks 172 (2024) 106132; the ground truth of Furman & Lau
    (arXiv:2402.03698). This is the *global* λ: the LLC at w* equals it only at the points
    described in `slt_jax.models.dln.dln_teacher`.

    Args:
      widths: layer widths ``(H_0, ..., H_L)``, input first, output last (at least two
        positive integers); the model is ``f(x) = W_L ⋯ W_1 x`` with ``W_s`` of shape
        ``(H_s, H_{s-1})``.
      rank: rank r of the true product ``W_L ⋯ W_1``, ``0 <= r <= min(widths)``.

    Returns:
      ``LearningCoefficient(lam, multiplicity)`` with ``lam`` an exact ``Fraction``.
    """
    widths, rank = _architecture(widths, rank)
    deficits = sorted(h - rank for h in widths)
    ell = _accepted_group_size(deficits)
    chosen = deficits[: ell + 1]
    total = sum(chosen)
    m_bar = -(-total // ell)  # ⌈S/ℓ⌉
    a = total - (m_bar - 1) * ell
    pair_sum = Fraction(total**2 - sum(m * m for m in chosen), 2)  # Σ_{s<t∈Σ} M_s M_t
    lam = (
        Fraction(rank * (widths[0] + widths[-1] - rank), 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction((ell - 1) * total**2, 4 * ell)  # ℓ(ℓ−1)/4 · (S/ℓ)²
        + pair_sum / 2
    )
    return LearningCoefficient(lam, a * (ell - a) + 1)


def _accepted_group_size(deficits: list[int]) -> int:
    """ℓ = k − 1 for the first k whose k smallest deficits satisfy Aoyagi's two inequalities.

    A k that splits a group of equal values can never be accepted (there max_Σ = min_∉Σ,
    so ``S >= ℓ·max`` and ``S < ℓ·min`` contradict each other), which enforces "never split
    a group". Aoyagi's theorem guarantees an accepted k exists; if none below L + 1 is, the
    whole set (where the second inequality is vacuous) is.
    """
    for k in range(2, len(deficits)):
        ell, total = k - 1, sum(deficits[:k])
        if ell * deficits[k - 1] <= total < ell * deficits[k]:
            return ell
    return len(deficits) - 1


def rrr_learning_coefficient(M, H, N, r) -> LearningCoefficient:
    """Learning coefficient of reduced-rank regression from Aoyagi & Watanabe's case table.

    Aoyagi & Watanabe, *Stochastic complexities of reduced rank regression in Bayesian
    estimation*, Neural Networks 18 (2005); the L = 2 case of `dln_learning_coefficient`.

    Args:
      M: input dimension.
      H: inner (hidden) width.
      N: output dimension.
      r: rank of the true matrix, ``0 <= r <= min(M, H, N)``.

    Returns:
      ``LearningCoefficient(lam, multiplicity)`` with ``lam`` an exact ``Fraction``.
    """
    M, H, N = (_positive_int(v, name) for v, name in ((M, "M"), (H, "H"), (N, "N")))
    r = _rank(r, min(M, H, N), "r")
    if M + H < N + r:
        return LearningCoefficient(Fraction(H * M - H * r + N * r, 2), 1)
    if N + H < M + r:
        return LearningCoefficient(Fraction(H * N - H * r + M * r, 2), 1)
    if M + N < H + r:
        return LearningCoefficient(Fraction(M * N, 2), 1)
    odd = (M + H + N + r) % 2
    lam = Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + odd, 8)
    return LearningCoefficient(lam, 1 + odd)


def regular_llc(hessian_eigenvalues, nbeta, localization) -> float:
    """Finite-(nβ, γ) LLC estimand of a regular model at the empirical minimiser.

    With ``L_n(w) ≈ L_n(w*) + ½ (w − w*)ᵀ Hess (w − w*)`` the localized posterior
    (arXiv:2308.12108) is Gaussian and ``nβ·(E[L_n] − L_n(w*)) = ½ Σ_i nβh_i / (nβh_i + γ)``,
    which tends to d/2 when γ ≪ nβ·h_i. Negative eigenvalues (a saddle) are allowed as long
    as the posterior stays proper, ``nβ·h_i + γ > 0``.

    Args:
      hessian_eigenvalues: eigenvalues h_i of the Hessian of the mean loss L_n at w*.
      nbeta: nβ > 0.
      localization: γ >= 0.

    Returns:
      The estimand as a float.
    """
    h = np.asarray(hessian_eigenvalues, dtype=float)
    if h.ndim != 1 or h.size == 0 or not np.all(np.isfinite(h)):
        raise ValueError("hessian_eigenvalues must be a non-empty 1-D sequence of finite numbers")
    nbeta, localization = _positive(nbeta, "nbeta"), _non_negative(localization, "localization")
    precision = nbeta * h + localization
    if np.any(precision <= 0):
        raise ValueError(
            "hessian_eigenvalues: the localized posterior is improper (nbeta*h + localization <= 0 "
            f"for h = {h[precision <= 0].min()}); increase localization above nbeta*|h_min|"
        )
    return float(0.5 * np.sum(nbeta * h / precision))


def _real(value, name: str, *, allow_zero: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number > 0 or (allow_zero and number == 0))):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return number


def _positive(value, name: str) -> float:
    return _real(value, name, allow_zero=False)


def _non_negative(value, name: str) -> float:
    return _real(value, name, allow_zero=True)


def toy_llc_quadrature(
    potential: Callable,
    center,
    nbeta,
    localization,
    *,
    bounds=None,
    num_points: int | None = None,
) -> float:
    """Exact finite-(nβ, γ) LLC estimand of a 1-D or 2-D potential by grid quadrature.

    Computes ``nβ·(E_p[K] − K(w*))`` with ``p(w) ∝ exp(−nβK(w) − γ/2‖w − w*‖²)``, the
    quantity SGLD estimates (arXiv:2308.12108), so a sampler can be tested against the same
    finite-n number rather than the asymptotic λ.

    The rule is the trapezoidal rule in t on the tensor grid ``w_i = w*_i + s·sinh(t)``: it
    is dense near w* (spacing ``s·dt`` with ``s = 1e-4·min(span, nβ^{-1/2})``) and
    geometric away from it, which resolves posteriors that are narrow along the coordinate
    axes through w* (normal-crossing potentials such as ``w1² w2⁴``) to near machine
    precision. Weights are combined in log space. The result is compared with the same rule
    at half the resolution; a relative disagreement above 1e-4 raises instead of returning
    an unresolved number (e.g. for a narrow valley that is not axis-aligned: rotate the
    coordinates first).

    Args:
      potential: K, vectorised over leading axes: maps a float64 numpy array of shape
        ``(..., d)`` to shape ``(...)`` (index coordinates as ``w[..., i]``).
      center: w*, shape ``(d,)`` with d ∈ {1, 2}.
      nbeta: nβ > 0.
      localization: γ >= 0; γ = 0 requires explicit ``bounds``.
      bounds: integration box: one ``(low, high)`` pair for every axis or one pair per
        axis, containing w* strictly inside. Default ``w* ± 10/√γ`` (the localizer puts
        less than e^{-50} of its mass outside; valid when K >= K(w*) nearby).
      num_points: grid points per axis (default 4001 in 1-D, 801 in 2-D).

    Returns:
      The estimand as a float.
    """
    center = np.asarray(center, dtype=float)
    if center.ndim != 1 or center.size not in (1, 2) or not np.all(np.isfinite(center)):
        raise ValueError(f"center must be a finite 1-D array of length 1 or 2, got shape {center.shape}")
    dim = center.size
    nbeta, localization = _positive(nbeta, "nbeta"), _non_negative(localization, "localization")
    if bounds is None:
        if localization == 0:
            raise ValueError("bounds must be given when localization is 0 (no automatic scale)")
        bounds = [(c - 10 / math.sqrt(localization), c + 10 / math.sqrt(localization)) for c in center]
    bounds = np.asarray(bounds, dtype=float)
    if bounds.shape == (2,):
        bounds = np.tile(bounds, (dim, 1))
    if bounds.shape != (dim, 2) or not np.all(np.isfinite(bounds)):
        raise ValueError(f"bounds must be a (low, high) pair or {dim} such pairs, got shape {bounds.shape}")
    if not np.all((bounds[:, 0] < center) & (center < bounds[:, 1])):
        raise ValueError(f"bounds {bounds.tolist()} must contain center {center.tolist()} strictly inside")
    if num_points is None:
        num_points = _QUADRATURE_POINTS[dim]
    if isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral) or num_points < 5:
        raise ValueError(f"num_points must be an integer >= 5, got {num_points!r}")

    k_star = np.asarray(potential(center), dtype=float)
    if k_star.shape != () or not np.isfinite(k_star):
        raise ValueError(f"potential must map center to a finite scalar, got {k_star!r}")
    k_star = float(k_star)
    fine = _grid_estimand(potential, center, k_star, nbeta, localization, bounds, num_points)
    coarse = _grid_estimand(potential, center, k_star, nbeta, localization, bounds, (num_points + 1) // 2)
    if abs(fine - coarse) > _QUADRATURE_RTOL * abs(fine) + 1e-12:
        raise ValueError(
            f"num_points={num_points} does not resolve the posterior (estimate {fine:.6g} vs "
            f"{coarse:.6g} at half resolution); increase num_points or tighten bounds"
        )
    return fine


def _grid_estimand(potential, center, k_star, nbeta, localization, bounds, num_points) -> float:
    axes, log_weights = [], []
    for c, (low, high) in zip(center, bounds):
        inner = 1e-4 * min(high - low, 1 / math.sqrt(nbeta))
        t = np.linspace(np.arcsinh((low - c) / inner), np.arcsinh((high - c) / inner), num_points)
        log_w = np.log(inner * np.cosh(t) * (t[1] - t[0]))
        log_w[[0, -1]] -= math.log(2)  # trapezoid end points
        axes.append(c + inner * np.sinh(t))
        log_weights.append(log_w)
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    log_weight = sum(np.meshgrid(*log_weights, indexing="ij"))
    values = np.asarray(potential(points), dtype=float)
    if values.shape != points.shape[:-1]:
        raise ValueError(
            f"potential must map shape (..., d) to (...): got {values.shape} for input {points.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("potential returned non-finite values inside bounds")
    energy = nbeta * (values - k_star)
    log_density = log_weight - energy - 0.5 * localization * np.sum((points - center) ** 2, axis=-1)
    weights = np.exp(log_density - np.max(log_density))  # normalised below: no overflow, no scipy import
    return float(np.sum(weights * energy) / np.sum(weights))


class _LinearGaussian(NamedTuple):
    """Linear-Gaussian model in the eigenbasis of A = XᵀX/σ² (see `linear_gaussian_free_energy`)."""

    curvature: np.ndarray  # eigenvalues a_i of A, shape (d,)
    slope_sq: np.ndarray  # Σ over outputs of (Vᵀb)_i², b = Xᵀ(y − Xw*)/σ², shape (d,)
    nloss_star: float  # n·L_n(w*)
    num_outputs: int
    localization: float


def _linear_gaussian(x, y, sigma, center, localization) -> _LinearGaussian:
    x, y, center = (np.asarray(v, dtype=float) for v in (x, y, center))
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got {x.shape}")
    n, d = x.shape
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) or ({n}, k), got {y.shape}")
    expected = (d,) + y.shape[1:]
    if center.shape != expected:
        raise ValueError(f"center must have shape {expected} to match x and y, got {center.shape}")
    if not all(np.all(np.isfinite(v)) for v in (x, y, center)):
        raise ValueError("x, y and center must be finite")
    sigma, localization = _positive(sigma, "sigma"), _positive(localization, "localization")
    residual = y - x @ center
    num_outputs = 1 if y.ndim == 1 else y.shape[1]
    curvature, basis = np.linalg.eigh(x.T @ x / sigma**2)
    slope = basis.T @ (x.T @ residual / sigma**2)
    slope_sq = slope**2 if slope.ndim == 1 else np.sum(slope**2, axis=1)
    nloss_star = 0.5 * np.sum(residual**2) / sigma**2 + 0.5 * n * num_outputs * math.log(2 * math.pi * sigma**2)
    return _LinearGaussian(np.clip(curvature, 0, None), slope_sq, float(nloss_star), num_outputs, localization)


def linear_gaussian_free_energy(x, y, *, sigma, center, localization, beta=1.0) -> float:
    """Local free energy of Bayesian linear regression with a Gaussian localizer, in closed form.

    ``F(β) = −log ∫ N(w; w*, I/γ) exp(−β·n·L_n(w)) dw`` for ``y = x·w + ε``,
    ``ε ~ N(0, σ²)``, where ``L_n`` is the mean per-sample Gaussian negative log-likelihood
    in nats, ``½‖y_i − x_i·w‖²/σ² + (k/2)·log(2πσ²)`` for k outputs (Watanabe 2013,
    arXiv:1208.6338, thermodynamic integration: ``F(β) = ∫_0^β E_b[nL_n] db``). With
    ``A = xᵀx/σ²`` (eigenvalues a_i) and ``b = xᵀ(y − x·w*)/σ²``,
    ``F = β·nL_n(w*) + (k/2)·Σ log(1 + βa_i/γ) − (β²/2)·bᵀ(γI + βA)⁻¹b``.

    Args:
      x: inputs, shape ``(n, d)``.
      y: targets, shape ``(n,)`` (single output) or ``(n, k)`` (k outputs sharing x; each
        output column has its own weight column).
      sigma: noise standard deviation σ > 0.
      center: w*, shape ``(d,)`` for single-output y, ``(d, k)`` otherwise.
      localization: γ > 0 (the localizer must be a normalised prior).
      beta: inverse temperature β >= 0.

    Returns:
      F(β) in nats.
    """
    model = _linear_gaussian(x, y, sigma, center, localization)
    beta = _non_negative(beta, "beta")
    a, gamma = model.curvature, model.localization
    return float(
        beta * model.nloss_star
        + 0.5 * model.num_outputs * np.sum(np.log1p(beta * a / gamma))
        - 0.5 * beta**2 * np.sum(model.slope_sq / (gamma + beta * a))
    )


def linear_gaussian_mean_nloss(x, y, *, sigma, center, localization, beta=1.0) -> float:
    """``E_β[n·L_n]`` under ``∝ N(w; w*, I/γ) exp(−β·n·L_n(w))`` for linear regression, closed form.

    The derivative ``dF/dβ`` of `linear_gaussian_free_energy` (same model and arguments);
    the integrand of thermodynamic integration (arXiv:1208.6338) and, at β = 1/log n, the WBIC.

    Args:
      x: inputs, shape ``(n, d)``.
      y: targets, shape ``(n,)`` or ``(n, k)``.
      sigma: noise standard deviation σ > 0.
      center: w*, shape ``(d,)`` or ``(d, k)``.
      localization: γ > 0.
      beta: inverse temperature β >= 0.

    Returns:
      ``E_β[n·L_n]`` in nats.
    """
    model = _linear_gaussian(x, y, sigma, center, localization)
    beta = _non_negative(beta, "beta")
    a, gamma = model.curvature, model.localization
    precision = gamma + beta * a
    trace_term = 0.5 * model.num_outputs * a / precision
    shift_term = beta * model.slope_sq * (gamma + 0.5 * beta * a) / precision**2
    return float(model.nloss_star + np.sum(trace_term - shift_term))


def linear_gaussian_var_nloss(x, y, *, sigma, center, localization, beta=1.0) -> float:
    """``Var_β[n·L_n]`` for linear regression, in closed form (= −d/dβ of the mean).

    From the Gaussian posterior's moments: with ``P = γI + βA``,
    ``Var = γ²·bᵀP⁻³b + (k/2)·tr((AP⁻¹)²)``; ``β²·Var`` is the susceptibility-like
    diagnostic of arXiv:1208.6338 (docs/mathematics.md §4.5).

    Args:
      x: inputs, shape ``(n, d)``.
      y: targets, shape ``(n,)`` or ``(n, k)``.
      sigma: noise standard deviation σ > 0.
      center: w*, shape ``(d,)`` or ``(d, k)``.
      localization: γ > 0.
      beta: inverse temperature β >= 0.

    Returns:
      ``Var_β[n·L_n]`` in nats².
    """
    model = _linear_gaussian(x, y, sigma, center, localization)
    beta = _non_negative(beta, "beta")
    a, gamma = model.curvature, model.localization
    precision = gamma + beta * a
    return float(np.sum(gamma**2 * model.slope_sq / precision**3 + 0.5 * model.num_outputs * a**2 / precision**2))


class GaussianLaw(NamedTuple):
    """A mean and covariance (of the parameters, or of a sampler's stationary law)."""

    mean: np.ndarray
    cov: np.ndarray


def linear_regression_posterior(x, y, *, center, nbeta, localization, step_size=0.0, batch_size=None,
                                mask=None) -> GaussianLaw:
    """The localized posterior of ½-squared-error linear regression, or SGLD's stationary law on it.

    With per-sample loss ``ℓ_i(w) = ½(y_i − x_iᵀw)²``, ``H = xᵀx/n`` and ``P = nβ·H + γI`` the
    posterior ``∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` is ``N(μ, P⁻¹)``, ``μ = P⁻¹(nβ·xᵀy/n + γw*)``
    (docs/mathematics.md §8.4). With a ``mask`` only its coordinates C move (the rest stay at w*):
    ``μ_C = w*_C + P_CC⁻¹·nβ·(xᵀ(y − x w*)/n)_C`` and covariance ``P_CC⁻¹`` on C.

    With ``step_size`` ε > 0 the covariance is instead that of SGLD's stationary law (§3.3; the
    mean is unchanged): ``δ' = Aδ − (ε/2)·η + √ε·ξ`` with ``A = I − (ε/2)P_CC`` and η the
    minibatch noise ``nβ·(∇L_B − ∇L_n)`` of a batch of B rows drawn with replacement, whose
    covariance at ``w = μ + δ`` is ``(nβ²/B)·Cov_i(x_i r_i(w))``. Averaging it over δ gives,
    exactly for second moments,

        S = A S Aᵀ + εI + (ε²nβ²/4B)·(C₀ + mean_i x_ix_iᵀ S x_ix_iᵀ − H S H),

    C₀ = Cov_i(x_i r_i(μ)) (population covariance over the rows), solved as one linear system in
    vec(S). ``batch_size=None`` means full-batch gradients (no η): the discrete Lyapunov equation.
    The law is Gaussian for full batches; with minibatches its fourth moments differ from a
    Gaussian's by O((ε²nβ²/B)²).

    Args:
      x: inputs ``(n, d)``; y: targets ``(n,)``.
      center: w* ``(d,)``; nbeta: nβ; localization: γ.
      step_size: ε (0 for the posterior itself).
      batch_size: SGLD's minibatch rows (with replacement), or ``None`` for full batches.
      mask: optional boolean ``(d,)``: the sampled coordinates.

    Returns:
      A :class:`GaussianLaw` ``(mean (d,), cov (d, d))``.
    """
    x, y, center = (np.asarray(v, dtype=float) for v in (x, y, center))
    n, d = x.shape
    if y.shape != (n,) or center.shape != (d,):
        raise ValueError(f"x (n, d) = {x.shape} needs y of shape ({n},) and center of shape ({d},), "
                         f"got {y.shape} and {center.shape}")
    chosen = np.ones(d, bool) if mask is None else np.asarray(mask, bool)
    idx = np.flatnonzero(chosen)
    nbeta, gamma = _positive(nbeta, "nbeta"), _non_negative(localization, "localization")
    hessian = x.T @ x / n
    precision = (nbeta * hessian + gamma * np.eye(d))[np.ix_(idx, idx)]
    mean = center.copy()
    mean[idx] += np.linalg.solve(precision, nbeta * (x.T @ (y - x @ center) / n)[idx])
    cov = np.zeros((d, d))
    k = len(idx)
    if step_size == 0:
        cov[np.ix_(idx, idx)] = np.linalg.inv(precision)
        return GaussianLaw(mean, cov)
    eps = _positive(step_size, "step_size")
    xc = x[:, idx]
    a = np.eye(k) - 0.5 * eps * precision
    system = np.eye(k * k) - np.kron(a, a)
    source = eps * np.eye(k)
    if batch_size is not None:
        scale = eps**2 * nbeta**2 / (4.0 * _positive(batch_size, "batch_size"))
        grads = -xc * (y - x @ mean)[:, None]
        outer = np.einsum("ni,nj->nij", xc, xc)
        fourth = np.einsum("nij,nkl->ikjl", outer, outer).reshape(k * k, k * k) / n
        h = xc.T @ xc / n
        system -= scale * (fourth - np.kron(h, h))
        source = source + scale * np.cov(grads.T, bias=True).reshape(k, k)
    cov[np.ix_(idx, idx)] = np.linalg.solve(system, source.reshape(-1)).reshape(k, k)
    return GaussianLaw(mean, 0.5 * (cov + cov.T))


def squared_residual_covariance(x_a, y_a, x_b, y_b, law: GaussianLaw) -> np.ndarray:
    """``Cov(½r_a², ½r_b²)`` for residuals ``r = y − xᵀw`` under ``w ~ N(law.mean, law.cov)``.

    With residual means ``m = y − xᵀμ`` and covariances ``s_ab = x_aᵀ Σ x_b``,
    ``Cov(½r_a², ½r_b²) = ½·s_ab² + m_a·m_b·s_ab`` (Isserlis; docs/mathematics.md §8.4): the
    Bayesian influence of linear regression is its negative.

    Returns:
      ``(rows of a, rows of b)``.
    """
    x_a, y_a, x_b, y_b = (np.asarray(v, dtype=float) for v in (x_a, y_a, x_b, y_b))
    m_a, m_b = y_a - x_a @ law.mean, y_b - x_b @ law.mean
    s = x_a @ law.cov @ x_b.T
    return 0.5 * s**2 + m_a[:, None] * m_b[None, :] * s
