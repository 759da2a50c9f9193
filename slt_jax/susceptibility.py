"""Susceptibilities: how a component's observable responds when the data move toward a shift q.

Baker, Wang, Hoogland, Pathak, Murfet (arXiv:2504.18274), docs/mathematics.md §8.2. Move the
data distribution from p (the training data, loss L_n) toward q (loss L_q) with strength h:

    p_h(w) ∝ exp(−nβ·[(1 − h)·L_n(w) + h·L_q(w)] − γ/2·‖w − w*‖²).

This is an exponential family in h with sufficient statistic −nβ·(L_q − L_n), so the response of
any observable is exactly a posterior covariance:

    χ(φ, q) = d/dh E_h[φ] |_{h=0} = −nβ·Cov_p(φ, L_q − L_n).

Component observable (as the paper, and devinterp 2.0.1): for a component C (a weight
restriction, e.g. one attention head) φ_C is the training loss L_n(w) − L_n(w*) under the
posterior restricted to C — C's weights sampled, every other weight frozen at w* (the paper's
φ_C = δ(u − u*)·L localizes the observable on C; sampling only C is how it is computed). Every
component runs as one chain group of the same compiled program (per-chain masks), and each
group also gives C's weight-refined λ̂ = nβ·E_C[φ_C].

Normalisation. Our χ is the derivative itself, with the factor nβ. Baker et al. and devinterp
report the covariance without it (``χ_paper = −Cov(φ_C, ΔL) = χ/nβ``); devinterp also takes the
mean of ΔL from the unrestricted posterior, where the derivative of the restricted one needs
C's own (used here). Per-sample (per-token) contributions: with L_q the mean of the entries
ℓ_x of q (rows, or every token of every row for a per-token ``per_sample_loss``),
``χ = mean_x χ_x`` with ``χ_x = −nβ·Cov_p(φ_C, ℓ_x − L_n)``, the paper's attribution scores
(times nβ).

Estimator. φ_C at a draw is the draw's own loss record (the λ̂ draw over nβ: L_B(w_t) − L_B(w*)
on the sampler's minibatch with the control variate — free), and the L_n inside ΔL a second
estimate on an independent minibatch of the training data (with its own control variate), so
E[φ̂·L̂_n | w] = φ(w)·L_n(w) and the covariance is unbiased; with ``loss_estimator="full_batch"``
both are the exact L_n of the draw, and a user ``observable`` pairs with the draw's record
directly. The shift's entries are evaluated on all of q's rows at every draw.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import validation
from slt_jax.data import batches
from slt_jax.estimators import observables as estimators
from slt_jax.observables import (RowLosses, check_like, check_observable, check_rows, group_of, healthy_moments,
                                 observing_problem, resolve_components, resolve_step, row_losses, run_observed)
from slt_jax.results import summarize
from slt_jax.runner import divergence
from slt_jax.runner.observation import DRAW_LOSS, Observation
from slt_jax.serialization import json_safe
from slt_jax.settings import AutoSettings, Precision, RunSettings

SHIFT = "shift/"


@dataclasses.dataclass(frozen=True)
class SusceptibilityObservables:
    """The observation of a susceptibility run.

    φ_C is the draw's own loss record (``"draw_loss"``, free); the L_n inside ΔL is a second,
    independent minibatch estimate (``"loss"``, keyed) when φ is that record and the record is a
    minibatch estimate, and the record itself otherwise (exact, or independent of a user ``"phi"``).
    ``"shift/<q>"`` holds every entry's loss on shift q.
    """

    loss_fn: Callable
    shift_losses: RowLosses
    shifts: tuple
    batch_size: int
    exact: bool
    observable: Callable | None = None

    @property
    def separate_loss(self) -> bool:
        return self.observable is None and not self.exact

    @property
    def phi(self) -> str:
        return DRAW_LOSS if self.observable is None else "phi"

    @property
    def loss(self) -> str:
        return "loss" if self.separate_loss else DRAW_LOSS

    def __call__(self, params, inputs, key=None):
        out = {}
        if self.separate_loss:
            # A control variate at w* on the same rows (only the change is noisy): read from the
            # problem's table of ℓ_i(w*) when it has one, else a second forward pass.
            batch, rows = batches.minibatch(key, inputs["data"], self.batch_size)
            if "table" in inputs:
                at_center = jnp.mean(jnp.take(inputs["table"], rows, mode="clip"))
            else:
                at_center = self.loss_fn(inputs["center"], batch)
            out["loss"] = (self.loss_fn(params, batch) - at_center)[None]
        if self.observable is not None:
            out["phi"] = jnp.ravel(self.observable(params))
        for name in self.shifts:
            out[SHIFT + name] = jnp.ravel(self.shift_losses(params, inputs["shifts"][name]))
        return out


@dataclasses.dataclass(frozen=True)
class SusceptibilityResult:
    """Susceptibilities of components to shifts of the data (arXiv:2504.18274).

    Attributes:
      chi: χ(φ_C, q) = −nβ·Cov_C(φ_C, L_q − L_n), ``(components, shifts)``.
      se: its Monte Carlo standard error (delete-one-chain jackknife, docs/mathematics.md §8.5).
      components, shifts: the names, in the order of ``chi``'s axes.
      contributions: ``{shift: (components, *entry_shape)}``, χ_x = −nβ·Cov_C(φ_C, ℓ_x − L_n) of
        each row (or token) x of the shift; ``chi`` is their mean.
      contributions_se: their standard errors.
      pca: principal components of ``chi`` with components as samples and shifts as features
        (:func:`slt_jax.estimators.observables.principal_components`), or ``None`` when ``chi``
        is not finite.
      llc_mean, llc_se: each component's weight-refined λ̂ = nβ·E_C[φ_C] from the same chains.
      llc: ``{component: LLCResult}``.
      nbeta: nβ.
      settings: every setting (JSON-ready).
    """

    chi: np.ndarray
    se: np.ndarray
    components: tuple
    shifts: tuple
    contributions: dict
    contributions_se: dict
    pca: estimators.PrincipalComponents | None
    llc_mean: np.ndarray
    llc_se: np.ndarray
    llc: dict
    nbeta: float
    settings: dict

    def __str__(self) -> str:
        width = max(10, *(len(s) for s in self.shifts))
        lines = [f"{'component':>12} " + " ".join(f"{s:>{width + 9}}" for s in self.shifts) + f" {'λ̂ (refined)':>16}"]
        for i, c in enumerate(self.components):
            cells = " ".join(f"{self.chi[i, j]:>{width}.4g} ± {self.se[i, j]:<6.2g}" for j in range(len(self.shifts)))
            lines.append(f"{c:>12} {cells} {self.llc_mean[i]:>9.4g} ± {self.llc_se[i]:.2g}")
        return "\n".join(lines) + f"\nχ = d/dh E_h[φ_C] = −nβ·Cov(φ_C, L_q − L_n), nβ = {self.nbeta:.4g}"


def susceptibilities(loss_fn, params, data, key, *, shifts: dict, step_size, localization, components=None,
                     observable=None, per_sample_loss=None, observe_every: int = 1, nbeta=None, sampler="sgld",
                     mesh=None, devices=None,
                     run: RunSettings | None = None, auto: AutoSettings | None = None,
                     precision: Precision | None = None, progress: bool = True, **options) -> SusceptibilityResult:
    """χ(φ_C, q) = d/dh E_h[φ_C] = −nβ·Cov_C(φ_C, L_q − L_n) for every component C and shift q.

    Every component runs as its own group of ``num_chains`` chains in one compiled program (per
    chain masks), sampling the posterior restricted to that component (module docstring).

    Args:
      loss_fn, params, data, key, step_size, localization, nbeta, sampler, mesh, devices, run,
        auto, precision, progress, **options: as for :func:`slt_jax.estimate_llc`
        (``step_size="auto"`` calibrates on the whole model; ``num_chains`` is per component;
        ``loss_estimator="full_batch"`` measures φ_C and L_n exactly at every draw, else on the
        draw's own minibatch and one independent minibatch of ``batch_size`` rows).
      shifts: ``{name: q}``, each a dataset with rows like ``data``'s (same structure and row
        shapes), e.g. data toward a pattern, or a per-token probe set for a language model.
      components: ``{name: weight restriction}`` — anything ``param_mask`` accepts (a regular
        expression, a path prefix, ``slt_jax.head(l, h)``, a boolean pytree) or ``None`` for the
        whole model; default ``{"model": None}``.
      observable: optionally a scalar function of the parameters to use as φ in place of φ_C
        (every component's chains then observe it).
      per_sample_loss: ``per_sample_loss(params, batch) -> (B,)`` or ``(B, …)`` for the shifts'
        entries — e.g. per-token next-token losses ``(B, T − 1)``
        (:func:`slt_jax.models.adapters.per_token_loss`), whose mean must be L_q; default
        ``loss_fn`` on one-row batches.
      observe_every: evaluate the observables at every ``observe_every``-th draw only (λ̂ uses
        every draw): successive draws of a small step are strongly correlated, so χ loses little
        precision while the observables cost ``observe_every`` times less.

    Returns:
      A :class:`SusceptibilityResult`.
    """
    problem, kernel, run, auto = observing_problem(
        loss_fn, params, data, key, sampler=sampler, run=run, auto=auto, precision=precision, options=options,
        localization=localization, nbeta=nbeta, mesh=mesh, devices=devices)
    if not isinstance(shifts, dict) or not shifts:
        raise ValueError(f"shifts must be a non-empty dict of name → dataset, got {shifts!r}")
    shift_losses = row_losses(problem, per_sample_loss)
    entry_shapes = {}
    for name, q in shifts.items():
        check_like(data, q, f"shifts[{name!r}]")
        rows, entry = check_rows(shift_losses, problem.params, q, f"shifts[{name!r}]")
        entry_shapes[str(name)] = (rows, *entry)
    if observable is not None:
        check_observable(observable, problem.params, "observable", scalar=True)
    names, masks, counts = resolve_components(components, problem.params)
    eps, run, record = resolve_step(problem, kernel, run, auto, key, step_size, progress=progress)

    exact = run.loss_estimator == "full_batch"
    fn = SusceptibilityObservables(problem.loss_fn, shift_losses, tuple(entry_shapes), problem.eval_batch_size,
                                   exact, observable)
    phi, loss = fn.phi, fn.loss
    pairs = tuple((phi, SHIFT + q) for q in entry_shapes) + (() if phi == loss else ((phi, loss),))
    validation.check_positive("observe_every", observe_every, integer=True)
    observation = Observation(fn, pairs=pairs, keyed=fn.separate_loss, draw_loss=True, every=int(observe_every))
    inputs = {"shifts": {name: jax.tree.map(jnp.asarray, q) for name, q in shifts.items()}}
    if fn.separate_loss:
        inputs.update(data=problem.data, center=problem.params)
        if problem.center_losses is not None and problem.eval_data is None:
            inputs["table"] = problem.center_losses
    chains = run.num_chains
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *masks)
    mask_index = np.repeat(np.arange(len(names)), chains)
    thresholds = np.repeat([_threshold(problem, run, count) for count in counts], chains)
    # The fixed step is checked where the first component's chains ended (the whole model, by default).
    observed = run_observed(problem, kernel, run, key, step_size=eps, observation=observation, inputs=inputs,
                            num_chains=len(names) * chains, masks=stacked, mask_index=mask_index, threshold=thresholds,
                            check=not record, check_chains=slice(0, chains), progress=progress)
    record = {**(observed.sampled.record or {}), **record}

    nbeta = problem.nbeta
    chi = np.empty((len(names), len(entry_shapes)))
    se = np.empty_like(chi)
    contributions = {q: np.empty((len(names), *shape)) for q, shape in entry_shapes.items()}
    contributions_se = {q: np.empty_like(v) for q, v in contributions.items()}
    llcs = {}
    for k, (name, spec) in enumerate(zip(names, _specs(components, names))):
        group = slice(k * chains, (k + 1) * chains)
        restricted = dataclasses.replace(problem, mask=masks[k], param_mask=spec, num_sampled=counts[k])
        sampled = group_of(observed.sampled, group)._replace(record=record or None)
        llcs[name] = summarize(restricted, sampled, sampler=kernel.name, key=key)
        m = healthy_moments(llcs[name], sampled.moments)
        phi_loss = m.squares[loss][:, :, None] if phi == loss else m.cross[f"{phi}|{loss}"]
        for j, q in enumerate(entry_shapes):
            shift_sum, shift_cross = m.sums[SHIFT + q], m.cross[f"{phi}|{SHIFT}{q}"]
            per_entry = estimators.ChainMoments(m.count, m.sums[phi], shift_sum - m.sums[loss],
                                                shift_cross - phi_loss)
            estimate = estimators.covariance(per_entry)
            contributions[q][k] = -nbeta * estimate.value.reshape(entry_shapes[q])
            contributions_se[q][k] = nbeta * estimate.se.reshape(entry_shapes[q])
            # L_q is the mean of the entries, and the covariance is linear in it.
            whole = estimators.ChainMoments(m.count, m.sums[phi],
                                            shift_sum.mean(axis=1, keepdims=True) - m.sums[loss],
                                            shift_cross.mean(axis=2, keepdims=True) - phi_loss)
            estimate = estimators.covariance(whole)
            chi[k, j], se[k, j] = -nbeta * estimate.value[0, 0], nbeta * estimate.se[0, 0]
    pca = estimators.principal_components(chi) if np.all(np.isfinite(chi)) else None
    settings = json_safe({**llcs[names[0]].settings, "param_mask": None, "num_sampled": None,
                          "components": {n: llcs[n].settings["param_mask"] for n in names},
                          "num_sampled_per_component": dict(zip(names, counts)),
                          "shifts": {q: list(shape) for q, shape in entry_shapes.items()},
                          "observable": None if observable is None else getattr(observable, "__qualname__", "fn"),
                          "per_sample_loss": per_sample_loss is not None, "observe_every": int(observe_every),
                          "loss_in_shift": "exact" if exact else "independent minibatch" if fn.separate_loss
                          else "the draw's loss record"})
    return SusceptibilityResult(
        chi=chi, se=se, components=names, shifts=tuple(entry_shapes), contributions=contributions,
        contributions_se=contributions_se, pca=pca, llc_mean=np.array([llcs[n].llc_mean for n in names]),
        llc_se=np.array([llcs[n].llc_se for n in names]), llc=llcs, nbeta=nbeta, settings=settings)


def _specs(components, names):
    """The weight restriction of each component as the user wrote it (``None``: the whole model)."""
    return [None] * len(names) if components is None else list(components.values())


def _threshold(problem, run, num_sampled: int) -> float:
    """The divergence bound of a chain that samples ``num_sampled`` coordinates."""
    if run.divergence_threshold is not None:
        return float(run.divergence_threshold)
    return divergence.default_threshold(num_sampled, problem.nbeta, float(problem.reference.batch_std))
