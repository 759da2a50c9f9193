"""Free energy, WBIC and temperature-based λ estimates from E_β[nL_n] on a β-ladder.

All functions take sampled statistics per rung of an inverse-temperature ladder
``0 < β_1 < … < β_K = 1`` — the mean of ``n·L_n`` under the localized tempered posterior
``∝ φ(w)·exp(−β·n·L_n(w))`` and its standard error (the spread of per-chain means across
independent chains) — and return an estimate with a propagated standard error, treating
rungs as independent. ``L_n`` must be the per-sample negative log-likelihood in nats for
free energies and WBIC to be meaningful (λ estimates are scale free). Formulas:
Watanabe (arXiv:1208.6338) and Lau et al. (arXiv:2308.12108).
"""

import numpy as np
from jax.typing import ArrayLike
from scipy import integrate


def beta_ladder(num_rungs: int, *, beta_min: float) -> np.ndarray:
    """Geometric inverse-temperature ladder from ``beta_min`` to 1 for thermodynamic integration.

    ``E_β[nL_n]`` moves from its prior value (β ≪ β_c) to ``≈ nL_0 + λ/β`` (β ≫ β_c),
    with ``β_c ≈ γ/(n·h)`` the temperature at which the likelihood starts to dominate the
    localizer ``N(w*, I/γ)`` along a direction of curvature ``h`` (Hessian eigenvalue of
    ``L_n``). Both regimes and the crossover are smooth in ``log β``, so equal spacing in
    ``log β`` serves every curvature at once, and :func:`thermodynamic_integration`
    integrates in ``log β``. Choose ``beta_min ≤ γ/(100·n·h_max)`` so the ladder starts on
    the prior plateau, and an odd ``num_rungs`` (composite Simpson) with spacing
    ``Δu = log(1/beta_min)/(num_rungs − 1) ≲ 0.6``: the quadrature error is then
    ``≈ λ·Δu⁴/180``, below the Monte Carlo error of a few hundred effective draws per
    rung for any λ up to ~10⁴.

    Args:
        num_rungs: number of rungs, at least 3; odd is best.
        beta_min: lowest inverse temperature, in (0, 1).

    Returns:
        Array of shape ``(num_rungs,)``, increasing, ending exactly at 1.
    """
    if not (isinstance(num_rungs, int | np.integer) and num_rungs >= 3):
        raise ValueError(f"num_rungs must be an integer >= 3, got {num_rungs!r}")
    if not 0.0 < beta_min < 1.0:
        raise ValueError(f"beta_min must lie in (0, 1), got {beta_min!r}")
    betas = np.geomspace(beta_min, 1.0, num_rungs)
    betas[-1] = 1.0
    return betas


def thermodynamic_integration(
    betas: ArrayLike,
    mean_nloss: ArrayLike,
    mean_nloss_se: ArrayLike,
    *,
    prior_mean_nloss: float | None = None,
    prior_mean_nloss_se: float = 0.0,
) -> tuple[float, float]:
    """Free energy ``F = −log ∫ φ(w) exp(−nL_n(w)) dw = ∫_0^1 E_β[nL_n] dβ`` by quadrature.

    Thermodynamic integration (Watanabe, arXiv:1208.6338; φ is the normalised prior — the
    localizer ``N(w*, I/γ)`` for the local free energy of arXiv:2308.12108). Writing
    ``E_β = E_1 + D(β)``, ``F = E_1 + ∫_0^1 D(β) dβ``; ``D`` vanishes at β = 1 and is
    smooth in ``u = log β``, so ``∫_{β_1}^1 D dβ = ∫ D(e^u)·e^u du`` is done by Simpson's
    rule in ``u``. The rule is exact for a constant curve (so the large ``n·L_n(w*)`` costs
    nothing); where ``E_β ≈ E_1 + λ·(1/β − 1)`` near β = 1 its error is ``≈ λ·Δu⁴/180``
    for an odd number of equally log-spaced rungs, and about five times that for an even
    number (scipy's end correction). The remaining ``[0, β_1]`` piece uses the trapezoid
    between ``prior_mean_nloss`` (β = 0, e.g. a direct average over prior draws) and
    ``β_1`` when given, else the rectangle ``β_1·E_{β_1}``, whose error
    ``≈ β_1²·Var_0[nL_n]/2`` is negligible when ``β_1`` sits on the prior plateau.
    ``F`` is a fixed linear combination ``Σ_k c_k·E_{β_k}`` (``Σ_k c_k = 1``), so its
    standard error is ``sqrt(Σ_k c_k²·se_k²)`` for independent rungs.

    Args:
        betas: increasing inverse temperatures, shape ``(K,)`` with ``K >= 3``, in (0, 1],
            the last 1 (to within 1e-6); best equally spaced in ``log β`` (see :func:`beta_ladder`).
        mean_nloss: ``E_{β_k}[n·L_n]`` per rung, shape ``(K,)``.
        mean_nloss_se: standard errors of ``mean_nloss``, shape ``(K,)``, non-negative.
        prior_mean_nloss: ``E_0[n·L_n]`` under the prior itself, if available.
        prior_mean_nloss_se: its standard error.

    Returns:
        ``(free_energy, free_energy_se)`` as floats.
    """
    betas, means, ses = _as_rungs(betas, mean_nloss, mean_nloss_se, min_rungs=3)
    if not np.all(np.diff(betas) > 0.0):
        raise ValueError(f"betas must be strictly increasing, got {betas}")
    if not np.isclose(betas[-1], 1.0, rtol=0.0, atol=1e-6):
        raise ValueError(f"betas must end at 1 (the integral runs to β = 1), got {betas[-1]}")
    if not prior_mean_nloss_se >= 0.0:
        raise ValueError(f"prior_mean_nloss_se must be >= 0, got {prior_mean_nloss_se!r}")
    num_rungs = betas.shape[0]
    # Simpson weights in u = log β, read off by integrating unit vectors (the rule is linear).
    simpson = integrate.simpson(np.eye(num_rungs), x=np.log(betas), axis=-1)
    weights = simpson * betas
    beta_min = betas[0]
    prior_weight = 0.0
    if prior_mean_nloss is None:
        weights[0] += beta_min
    else:
        if not np.isfinite(prior_mean_nloss):
            raise ValueError(f"prior_mean_nloss must be finite, got {prior_mean_nloss!r}")
        weights[0] += beta_min / 2
        prior_weight = beta_min / 2
    # Every D_k = E_k − E_top, so the top rung takes the remaining weight and Σ c_k = 1.
    weights[-1] += 1.0 - weights.sum() - prior_weight
    free_energy = float(weights @ means)
    variance = float(np.sum(weights**2 * ses**2))
    if prior_mean_nloss is not None:
        free_energy += prior_weight * float(prior_mean_nloss)
        variance += (prior_weight * prior_mean_nloss_se) ** 2
    return free_energy, float(np.sqrt(variance))


def wbic(mean_nloss_at_beta_star: float) -> float:
    """Widely applicable Bayesian information criterion, ``WBIC = E^{β*}[n·L_n]``.

    Watanabe (arXiv:1208.6338): the posterior mean of ``n·L_n`` at ``β* = 1/log n``
    (i.e. sampled with ``nβ = n/log n``) estimates the free energy ``F_n`` up to
    ``O_p(√log n)``. With the localizer as prior it is a *local* WBIC around w*. ``L_n``
    must be the full-data per-sample negative log-likelihood in nats.

    Args:
        mean_nloss_at_beta_star: estimate of ``E_{β*}[n·L_n]``.

    Returns:
        The WBIC as a float.
    """
    value = float(mean_nloss_at_beta_star)
    if not np.isfinite(value):
        raise ValueError(f"mean_nloss_at_beta_star must be finite, got {value}")
    return value


def llc_from_slope(
    betas: ArrayLike, mean_nloss: ArrayLike, mean_nloss_se: ArrayLike
) -> tuple[float, float]:
    """λ̂ as the weighted least-squares slope of ``E_β[n·L_n]`` against ``1/β``.

    Since ``E_β[n·L_n] ≈ n·L_n(w0) + λ/β`` (Watanabe, arXiv:1208.6338; arXiv:2308.12108),
    fit ``E_k = a + λ/β_k`` with weights ``1/se_k²`` over a small grid around
    ``β* = 1/log n`` (e.g. ``β*·(1 ± 1/√(2 log n))``). The standard error trusts the
    supplied ``se_k`` (it is not rescaled by the residual scatter, which a handful of rungs
    cannot estimate) and ignores curvature of the curve in ``1/β`` (the multiplicity term).

    Args:
        betas: inverse temperatures, shape ``(K,)`` with ``K >= 2`` and at least two
            distinct values, in (0, 1].
        mean_nloss: ``E_{β_k}[n·L_n]`` per rung, shape ``(K,)``.
        mean_nloss_se: standard errors, shape ``(K,)``, strictly positive.

    Returns:
        ``(llc, llc_se)`` as floats.
    """
    betas, means, ses = _as_rungs(betas, mean_nloss, mean_nloss_se, min_rungs=2)
    if np.any(ses <= 0.0):
        raise ValueError("mean_nloss_se must be strictly positive for a weighted fit")
    inverse_beta = 1.0 / betas
    weights = 1.0 / ses**2
    centre = np.sum(weights * inverse_beta) / np.sum(weights)
    spread = np.sum(weights * (inverse_beta - centre) ** 2)
    if not spread > 0.0:
        raise ValueError(f"betas must take at least two distinct values, got {betas}")
    slope = np.sum(weights * (inverse_beta - centre) * means) / spread
    return float(slope), float(np.sqrt(1.0 / spread))


def llc_from_two_temperatures(
    beta1: float,
    mean_nloss1: float,
    beta2: float,
    mean_nloss2: float,
    se1: float,
    se2: float,
) -> tuple[float, float]:
    """λ̂ from two temperatures: ``(E_{β1} − E_{β2}) / (1/β1 − 1/β2)``.

    Watanabe (arXiv:1208.6338), via ``E_β[n·L_n] ≈ n·L_n(w0) + λ/β``; the two rungs are
    taken as independent for the standard error.

    Args:
        beta1: first inverse temperature, in (0, 1].
        mean_nloss1: ``E_{β1}[n·L_n]``.
        beta2: second inverse temperature, in (0, 1], different from ``beta1``.
        mean_nloss2: ``E_{β2}[n·L_n]``.
        se1: standard error of ``mean_nloss1``, non-negative.
        se2: standard error of ``mean_nloss2``, non-negative.

    Returns:
        ``(llc, llc_se)`` as floats.
    """
    values = {"beta1": beta1, "mean_nloss1": mean_nloss1, "beta2": beta2,
              "mean_nloss2": mean_nloss2, "se1": se1, "se2": se2}
    values = {name: float(value) for name, value in values.items()}
    for name, value in values.items():
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    for name in ("beta1", "beta2"):
        if not 0.0 < values[name] <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {values[name]!r}")
    for name in ("se1", "se2"):
        if values[name] < 0.0:
            raise ValueError(f"{name} must be non-negative, got {values[name]!r}")
    if values["beta1"] == values["beta2"]:
        raise ValueError(f"beta1 and beta2 must differ, both are {values['beta1']!r}")
    lever = 1.0 / values["beta1"] - 1.0 / values["beta2"]
    llc = (values["mean_nloss1"] - values["mean_nloss2"]) / lever
    return llc, float(np.hypot(values["se1"], values["se2"]) / abs(lever))


def llc_from_variance(beta: ArrayLike, var_nloss: ArrayLike) -> np.ndarray | float:
    """Fluctuation estimate ``λ ≈ β²·Var_β[n·L_n]`` (a consistency check of the sampler).

    From ``d/dβ E_β[n·L_n] = −Var_β[n·L_n]`` and ``E_β ≈ n·L_0 + λ/β`` (Watanabe,
    arXiv:1208.6338); valid for multiplicity 1, and it should agree with the mean-based
    λ̂. ``Var`` must be the posterior variance of the full-data (or fixed evaluation
    batch) ``n·L_n``: minibatch losses add ``n²·Var_B/m`` of batch noise and inflate it.

    Args:
        beta: inverse temperature(s), in (0, 1].
        var_nloss: ``Var_β[n·L_n]``, non-negative, broadcastable with ``beta``.

    Returns:
        ``β²·Var_β[n·L_n]``, a float for scalar inputs.
    """
    beta = np.asarray(beta, dtype=np.float64)
    var_nloss = np.asarray(var_nloss, dtype=np.float64)
    if not np.all((beta > 0.0) & (beta <= 1.0)):
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    if not np.all(var_nloss >= 0.0):
        raise ValueError(f"var_nloss must be finite and non-negative, got {var_nloss}")
    result = beta**2 * var_nloss
    return float(result) if result.ndim == 0 else result


def _as_rungs(
    betas: ArrayLike, mean_nloss: ArrayLike, mean_nloss_se: ArrayLike, *, min_rungs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate per-rung arrays and return them as float64 host arrays."""
    arrays = {
        "betas": np.asarray(betas, dtype=np.float64),
        "mean_nloss": np.asarray(mean_nloss, dtype=np.float64),
        "mean_nloss_se": np.asarray(mean_nloss_se, dtype=np.float64),
    }
    for name, value in arrays.items():
        if value.ndim != 1 or value.shape[0] < min_rungs:
            raise ValueError(
                f"{name} must have shape (K,) with K >= {min_rungs}, got shape {value.shape}"
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} has non-finite values: {value}")
    betas, means, ses = arrays.values()
    if means.shape != betas.shape or ses.shape != betas.shape:
        raise ValueError(
            f"betas, mean_nloss and mean_nloss_se must share one shape, got "
            f"{betas.shape}, {means.shape}, {ses.shape}"
        )
    if not np.all((betas > 0.0) & (betas <= 1.0)):
        raise ValueError(f"betas must lie in (0, 1], got {betas}")
    if np.any(ses < 0.0):
        raise ValueError(f"mean_nloss_se must be non-negative, got {ses}")
    return betas, means, ses
