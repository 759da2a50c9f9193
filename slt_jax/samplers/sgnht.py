"""Stochastic-gradient Nosé–Hoover thermostat (SGNHT) on the localized tempered posterior.

Ding, Fang, Babbush, Chen, Skeel, Neven, *Bayesian Sampling Using Stochastic Gradient
Thermostats* (NeurIPS 2014), Algorithm 2, with the potential
``U(w) = nβ·L_B(w) + γ/2·‖w − w*‖²`` of Lau et al. (arXiv:2308.12108). Written in the
per-step variables ``u = p·h`` (the position increment) and ``ζ = ξ·h`` with ``ε = h²``, so
that ``ε`` plays the role of SGLD's step size (increments of size ``√ε``)::

    u ← (1 − ζ)·u − ε·∇U(w) + √(2·D·ε)·N(0, I)
    w ← w + u
    ζ ← ζ + (‖u‖²/d − ε)

The thermostat ζ is a per-step friction that rises while the kinetic temperature
``T = ‖u‖²/(d·ε)`` exceeds 1 and falls while it is below: it absorbs the unknown extra heat
of minibatch gradients (variance ``σ²`` per coordinate of ∇U) and settles at
``ζ ≈ D + ε·σ²/2``, which keeps the chain at the target temperature. It moves by
``ε·(T − 1)`` per step, so absorbing that heat takes about ``σ²/2`` steps whatever ε: with
large minibatch noise (say nβ = 1000, batch 100: σ² ~ 10⁴) a short burn-in leaves the chain
hot and λ̂ high — check that ``sampler_stats["kinetic_temperature"]`` is close to 1.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.posterior import LocalPosterior
from slt_jax.samplers.base import KernelFactory, SamplingAlgorithm, Stability
from slt_jax.samplers.noise import tree_normal

PyTree = Any
DEFAULT_DIFFUSION = 0.01


class SGNHTState(NamedTuple):
    """Position, per-step increment ``u`` (momentum) and the thermostat ζ (a scalar)."""

    position: PyTree
    momentum: PyTree
    thermostat: jax.Array


class SGNHTInfo(NamedTuple):
    """The thermostat's view of the step.

    Attributes:
      kinetic_temperature: ``‖u‖²/(d·ε)`` over the d sampled coordinates; 1 at equilibrium.
      thermostat: ζ after the step.
    """

    kinetic_temperature: jax.Array
    thermostat: jax.Array


def _sum_squares(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def sgnht(step_size, posterior: LocalPosterior, *, diffusion=DEFAULT_DIFFUSION) -> SamplingAlgorithm:
    """Build the SGNHT kernel for the posterior ∝ exp(−nβ·L(w) − γ/2·‖w − w*‖²).

    Args:
      step_size: ε = h², the squared time step (increments are of size √ε, as in SGLD).
      posterior: w*, nβ, γ and the optional 0/1 mask (coordinates with 0 stay at w*, no momentum).
      diffusion: D = A·h, the injected noise as a per-step friction; the thermostat starts
        there.

    Returns:
      A :class:`SamplingAlgorithm`; the momentum starts at zero and heats up within about
      ``1/D`` steps.
    """
    num_sampled = posterior.num_sampled()

    def init(position):
        zeros = jax.tree.map(jnp.zeros_like, position)
        dtype = jax.tree.leaves(position)[0].dtype
        return SGNHTState(position, zeros, jnp.asarray(diffusion, dtype))

    def step(key, state, loss_grad):
        noise = tree_normal(key, state.position)
        zeta = state.thermostat
        force = posterior.force(state.position, loss_grad)

        def new_momentum(u, w, f, xi):
            return ((1 - zeta) * u - step_size * f + jnp.sqrt(2 * diffusion * step_size) * xi).astype(w.dtype)

        momentum = posterior.masked(jax.tree.map(new_momentum, state.momentum, state.position, force, noise))
        position = jax.tree.map(jnp.add, state.position, momentum)
        mean_square = _sum_squares(momentum)
        mean_square = mean_square / num_sampled.astype(mean_square.dtype)
        thermostat = (zeta + mean_square - step_size).astype(zeta.dtype)
        info = SGNHTInfo(mean_square / step_size, thermostat)
        return SGNHTState(position, momentum, thermostat), info

    return SamplingAlgorithm(init, step)


@functools.lru_cache(maxsize=None)
def sgnht_kernel(diffusion: float = DEFAULT_DIFFUSION) -> KernelFactory:
    """An SGNHT :class:`KernelFactory` with its own injected-noise level.

    Args:
      diffusion: D > 0, the per-step friction the injected noise corresponds to.

    Returns:
      A factory named ``"sgnht"`` for the default, else ``"sgnht(diffusion=…)"``. Equal
      arguments return the same factory, so repeated runs reuse one compiled program.
    """
    if not diffusion > 0.0:
        raise ValueError(f"diffusion must be positive, got {diffusion!r}")
    name = "sgnht" if diffusion == DEFAULT_DIFFUSION else f"sgnht(diffusion={diffusion:g})"

    def build(step_size, posterior):
        return sgnht(step_size, posterior, diffusion=diffusion)

    # Along a direction of curvature a: w_{t+1} = (2 − ζ − εa)·w_t − (1 − ζ)·w_{t−1} + noise, with
    # characteristic polynomial x² − (2 − ζ − εa)x + (1 − ζ); both roots lie inside the unit
    # circle (Jury) iff 0 < ζ < 2 and 0 < εa < 4 − 2ζ (docs/mathematics.md §2.4).
    stability = Stability(limit=4.0 - 2.0 * diffusion, state_limit=lambda state: 4.0 - 2.0 * np.clip(
        np.asarray(state.thermostat, np.float64), 0.0, 2.0),
        health=functools.partial(thermostat_health, diffusion=diffusion),
        healthy_step=functools.partial(thermostat_step, diffusion=diffusion))
    # Eight chains per sweep group: with four, the thermostat's group means at neighbouring steps
    # came out in the wrong order often enough that a +10 % biased step passed the agreement
    # test (a noisy 4-3-4 DLN: 27 of 40 seeds covered NUTS, against 39 of 40 with eight chains;
    # docs/calibration.md §10). That makes each grid point twice as dear, so the grid has three,
    # from one factor below the stability rule: the minibatch heat ∝ ε is largest at the rule, and
    # on benchmarks/samplers.py's γ = 50 DLN the rule's step was biased in 6 of 6 sweeps, serving
    # only as the chord partner of the pick. 200 window draws keep a four-step grid's thinning:
    # at 100 the coarser draws moved group means by about one standard error and, on that noisy
    # DLN, turned a seed's pick from 1.5e-6 (+5 %) to 3e-6 (+10 %, a miss).
    sweep = (("num_chains", 8), ("grid_points", 3), ("grid_skip", 1), ("window_draws", 200))
    return KernelFactory(name, build, stability, sweep=sweep)


MAX_COMPARED_SHARE = 1.0 / 3.0
"""The largest minibatch share ``(ζ − D)/ζ`` of the friction a sweep accepts at a step it compares
with others (:func:`thermostat_health`)."""


def _minibatch_share(info, diffusion):
    zeta = float(np.mean(np.asarray(info.thermostat, np.float64)))
    return zeta, (zeta - diffusion) / zeta if zeta > 0 else float("inf")


def thermostat_health(info, rtol: float, z: float, *, compared: bool = False,
                      diffusion: float = DEFAULT_DIFFUSION):
    """Why the thermostat does not vouch for the chains, or ``None``.

    Two tests over the window (docs/mathematics.md §2.4):

    - the mean kinetic temperature ``‖u‖²/(dε)`` must be 1 within ``rtol`` plus ``z`` standard
      errors (chain spread): at a stationary thermostat E[T] = 1 exactly (ζ integrates
      ε(T − 1)); a hot chain's positions are spread wider than the posterior's;
    - the friction must come from the injected noise, not the minibatch's: ζ settles near
      ``D + ε·σ²/2``, and one scalar ζ balances the *total* heat — directions with more
      minibatch noise than average stay hot, the rest cold, and λ̂ is off by about
      ``s·C`` for the minibatch share ``s = (ζ − D)/ζ`` and a constant C of the model and its
      noise (on a noisy (4, 3, 4) DLN at γ = 10, s = 0.77 at every step of the grid, the
      kinetic temperature was 0.99 and λ̂ read 9.4 against NUTS's 5.75: +64 %). A lone step
      must keep s within ``rtol``. A step the sweep compares with others at equal simulated
      time (``compared``) may reach :data:`MAX_COMPARED_SHARE`: s = x/(1 + x) with x ∝ ε, so
      up to there the bias still changes with ε like a step-size bias and the agreement test
      bounds it (linear extrapolation from a pair a factor 2 apart under-reads it by
      ``1 + x/2 ≤ 1.25``); beyond, s saturates and two biased steps can agree.
    """
    temperature = np.asarray(info.kinetic_temperature, np.float64)
    if temperature.size == 0:
        return None
    per_chain = temperature.mean(axis=1)
    se = float(per_chain.std(ddof=1) / np.sqrt(per_chain.size)) if per_chain.size > 1 else 0.0
    mean = float(per_chain.mean())
    if abs(mean - 1.0) > rtol + z * se:
        return (f"kinetic temperature {mean:.3f} ± {se:.2g}, not 1: the thermostat has not absorbed the minibatch "
                f"heat (docs/mathematics.md §2.4)")
    zeta, share = _minibatch_share(info, diffusion)
    limit = MAX_COMPARED_SHARE if compared else rtol
    if share > limit:
        return (f"the thermostat's friction ζ = {zeta:.3g} is {share:.0%} minibatch heat (D = {diffusion:g}, limit "
                f"{limit:.0%}): one scalar friction cannot cool anisotropic minibatch noise, so λ̂ may read high; "
                f"use a smaller step, a larger batch or sgnht_kernel(diffusion=...) above ε·σ²/2")
    return None


def thermostat_step(info, step_size: float, *, diffusion: float = DEFAULT_DIFFUSION, margin: float = 0.8):
    """The step at which the minibatch share would pass a sweep's health test, or ``None``.

    The minibatch heat ``x·D = ζ − D`` grows in proportion to ε, so the share ``x/(1 + x)`` falls to
    :data:`MAX_COMPARED_SHARE` (x = ½) at ``ε·½/x``; ``margin`` places the step that much below.
    ``None`` where the share already passes or the window shows no thermostat.
    """
    if np.asarray(info.thermostat).size == 0:
        return None
    zeta, _ = _minibatch_share(info, diffusion)
    excess = (zeta - diffusion) / diffusion
    largest = MAX_COMPARED_SHARE / (1.0 - MAX_COMPARED_SHARE)
    if not excess > largest:
        return None
    return float(step_size * margin * largest / excess)


SGNHT = sgnht_kernel()
