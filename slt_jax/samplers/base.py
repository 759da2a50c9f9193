"""The sampler interface shared by every kernel (after blackjax's ``SamplingAlgorithm``)."""

from typing import Any, Callable, NamedTuple

import numpy as np

PyTree = Any


class SamplingAlgorithm(NamedTuple):
    """A sampler as a pair of pure functions.

    ``init(position) -> state`` builds the state a chain carries forward; ``step(key, state,
    loss_grad) -> (state, info)`` advances it by one step, given the gradient of the minibatch
    loss ``∇L_B`` at ``state.position`` (the chain runner evaluates it, because only the runner
    knows the minibatch). ``info`` holds per-step scalars the runner may record.
    """

    init: Callable[[PyTree], Any]
    step: Callable[[Any, Any, PyTree], tuple[Any, Any]]


class Stability(NamedTuple):
    """How a kernel's step size meets the curvature of the potential (docs/mathematics.md §3.1).

    Along a direction of curvature ``a`` of the potential *as the kernel sees it* — scaled by its
    diagonal preconditioner G, i.e. an eigenvalue of ``G^½·(nβ·∇²L + γ)·G^½`` — the kernel is
    linearly stable for ``ε·a < limit``. Calibration places its grid at, and checks the chains
    against, a quarter of that limit: ``ε ≤ limit / (4·a)``, where plain SGLD inflates the
    stiffest direction's variance by 4/3 (:mod:`slt_jax.tuning.grid`, :mod:`slt_jax.tuning.stiffness`).

    Attributes:
      limit: the stability limit of ``ε·a`` at the start (SGLD's update ``w' = (1 − εa/2)·w + …``:
        4; SGNHT's with its initial friction D: ``4 − 2D``).
      state_limit: ``state_limit(state) -> (chains,)``, the limit given the chains' kernel state
        (leading chain axis), where it depends on it (SGNHT's friction ζ: ``4 − 2ζ``); ``None``
        for ``limit``.
      start_preconditioner: G before the first step, uniform (RMSProp-SGLD with V = 0:
        ``1/eps``, its largest value); 1 without a preconditioner.
      preconditioner: ``preconditioner(state) -> pytree`` of G per chain (leading chain axis,
        like the position), or ``None`` for the identity.
      health: ``health(info, rtol, z, *, compared) -> str | None``: given the kernel's per-draw
        info over a window, ``(chains, draws)`` per field, why the chains are not sampling the
        posterior (SGNHT: a kinetic temperature away from 1), or ``None``. ``compared`` says
        whether the step is compared with others at equal simulated time (the sweep), which sees
        a bias that changes with ε; a lone step (the check after a fixed run) has no such witness.
      healthy_step: ``healthy_step(info, step_size) -> float | None``: from a window's info at
        ``step_size``, the step the kernel expects to pass its health test in a sweep, where it
        can tell (SGNHT: minibatch heat ∝ ε), else ``None``; the sweep extends its grid down to it.
    """

    limit: float = 4.0
    state_limit: Callable | None = None
    start_preconditioner: float = 1.0
    preconditioner: Callable | None = None
    health: Callable | None = None
    healthy_step: Callable | None = None

    def limits(self, state, num_chains: int):
        """The limit of each chain, ``(chains,)`` (``state=None``: at the start)."""
        if state is None or self.state_limit is None:
            return np.full(num_chains, self.limit)
        return np.asarray(self.state_limit(state), np.float64).reshape(num_chains)

    def stable_step(self, curvature, *, nbeta, localization, limit=None, max_preconditioner=None) -> float:
        """``limit/(4·(nβ·h + γ·G_max))``: the rule, for the (preconditioned) curvature h of L and
        the largest preconditioner entry (``start_preconditioner`` by default; 1 for SGLD)."""
        limit = self.limit if limit is None else limit
        g_max = self.start_preconditioner if max_preconditioner is None else max_preconditioner
        return float(limit / (4.0 * (nbeta * curvature + localization * g_max)))


SGLD_STABILITY = Stability()


class KernelFactory(NamedTuple):
    """How the chain runner builds a kernel inside its compiled program.

    ``build(step_size, posterior)`` returns a :class:`SamplingAlgorithm` for the
    :class:`~slt_jax.posterior.LocalPosterior` ``posterior``. The step size and the posterior's
    fields are traced arrays, so one compiled program serves every checkpoint, step size and
    temperature. ``stability`` says how the step size meets the potential's curvature
    (:class:`Stability`): what calibration places its grid and checks its chains with.
    ``sweep`` holds the kernel's own defaults for a calibration sweep, as ``(field, value)``
    pairs of :class:`~slt_jax.settings.SweepSettings` fields in
    :data:`~slt_jax.settings.SWEEP_DEFAULTS` (``num_chains``, ``grid_points``, ``grid_skip``,
    ``window_draws``), used where the user leaves the field ``None``: enough chains that two
    neighbouring steps' group means come out in the order of their bias (docs/calibration.md §10),
    and a grid and thinning to suit.
    """

    name: str
    build: Callable[..., SamplingAlgorithm]
    stability: Stability = SGLD_STABILITY
    sweep: tuple = ()
