"""Weight-refined LLCs of many components at once: one chain group per restriction, one program.

The weight-refined LLC of a component V (Wang et al., arXiv:2410.02984; docs/mathematics.md
§1.6) samples V's coordinates with the rest frozen at w*. Per-head curves of a transformer need
it for every head at every checkpoint; running the restrictions one after another in Python
would compile and launch a program per head. Here the K restrictions become K groups of
``num_chains`` chains in one compiled program — chain i samples mask ``i // num_chains`` of a
stack of K masks (:mod:`slt_jax.runner.chain`) — and each group is summarised like an
``estimate_llc`` result with its own number of sampled parameters. Chain i of group k draws from
``fold_in(key, k·num_chains + i)``: the first component's chains are those of
``estimate_llc(param_mask=…)`` with the same key, and a component's draws depend on its place in
the list, so keep the list fixed to compare runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masks, settings, validation
from slt_jax.problem import make_problem
from slt_jax.results import LLCResult, summarize
from slt_jax.runner.chains import run_chains, sampled_of, setup
from slt_jax.samplers import get_kernel
from slt_jax.settings import AutoSettings, Precision, RunSettings
from slt_jax.tuning.auto import calibration_for
from slt_jax.tuning.calibration import Calibration


def _components(components: dict, params) -> tuple[list[str], list]:
    """Names and resolved 0/1 masks of the restrictions, each checked to cover a parameter."""
    if not isinstance(components, dict) or not components:
        raise ValueError(f"components must be a non-empty dict name → weight restriction, got {components!r}")
    names, resolved = [], []
    for name, restriction in components.items():
        if not isinstance(name, str):
            raise ValueError(f"components has the key {name!r}; component names must be strings")
        mask = masks.resolve_mask(restriction, params)
        if mask is None:
            mask = jax.tree.map(jnp.ones_like, params)
        if masks.num_sampled(mask, params) == 0:
            raise ValueError(f"components[{name!r}] = {masks.mask_label(restriction)!r} covers no parameter")
        names.append(name)
        resolved.append(mask)
    return names, resolved


def estimate_refined_llcs(loss_fn, params, data, key, *, components: dict, step_size, localization, nbeta=None,
                          sampler="sgld", eval_data=None, mesh=None, devices=None, run: RunSettings | None = None,
                          auto: AutoSettings | None = None, precision: Precision | None = None,
                          progress: bool = True, **options) -> dict[str, LLCResult]:
    """λ̂ of each weight restriction in ``components`` at ``params``, in one compiled program.

    Args:
      loss_fn, params, data, key, localization, nbeta, sampler, eval_data, mesh, devices, run,
        auto, precision, progress, **options: as for :func:`slt_jax.estimate_llc`; ``num_chains``
        is per component.
      components: name → weight restriction (anything ``param_mask`` accepts: a regex, a path
        prefix, ``slt_jax.head(layer, index)``, a boolean pytree, or ``None`` for the whole model).
      step_size: ε shared by every component, or ``"auto"``/a :class:`~slt_jax.Calibration`:
        calibrated on the whole model (a restriction's largest Hessian eigenvalue is at most the
        whole model's, so the whole model's stable step is stable for every component); the
        calibrated run here is the schedule of that calibration, without extensions.

    Returns:
      ``{name: LLCResult}`` in the order of ``components``; each result's ``settings`` records its
      restriction (``param_mask``), its sampled parameters and the shared step size.
    """
    run, auto, precision = settings.resolve(options, (run, RunSettings), (auto, AutoSettings),
                                            (precision, Precision))
    validation.key_data(key)
    kernel = get_kernel(sampler)
    calibrated = isinstance(step_size, Calibration) or step_size == "auto"
    if not calibrated:
        validation.check_positive("step_size", step_size)
    problem = make_problem(loss_fn, params, data, localization=localization, nbeta=nbeta, eval_data=eval_data,
                           mesh=mesh, devices=devices, precision=precision, run=run)
    names, resolved = _components(components, problem.params)
    record = None
    if calibrated:
        calibration = calibration_for(problem, kernel, run, auto, key, step_size, progress=progress)
        step_size = calibration.recommended(problem.nbeta, problem.localization)
        burnin, draws = calibration.schedule(step_size, run.steps_per_draw, problem.nbeta, problem.localization)
        run = dataclasses.replace(run, num_burnin=max(run.num_burnin, burnin), num_draws=max(run.num_draws, draws))
        record = {"calibration": calibration.summary(problem.nbeta, problem.localization)}
    per, total = run.num_chains, run.num_chains * len(names)
    stacked = jax.tree.map(lambda *ms: jnp.stack(ms), *resolved)
    config, inputs = setup(problem, kernel, dataclasses.replace(run, num_chains=total), step_size, masks=stacked,
                           mask_index=np.repeat(np.arange(len(names)), per))
    state, draws = run_chains(key, config, inputs, num_chains=total, num_burnin=run.num_burnin,
                              num_draws=run.num_draws, chunk_size=run.chunk_size, progress=progress)
    sampled = sampled_of(state, draws, step_size, run)
    results = {}
    for k, (name, mask) in enumerate(zip(names, resolved)):
        group = slice(k * per, (k + 1) * per)
        part = sampled._replace(draws=jax.tree.map(lambda x: x[group], sampled.draws),
                                diverged_at=sampled.diverged_at[group],
                                positions=jax.tree.map(lambda x: x[group], sampled.positions),
                                record=record)
        restricted = dataclasses.replace(problem, mask=mask, param_mask=components[name],
                                         num_sampled=masks.num_sampled(mask, problem.params))
        results[name] = summarize(restricted, part, sampler=kernel.name, key=key)
    return results
