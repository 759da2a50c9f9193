"""The Laplace plateau: a flat λ̂ trace that sits on the Laplace value of a degenerate w*.

No test of a finite trace can tell a long metastable plateau from equilibrium, but one plateau
has a known level: chains that have only explored the quadratic part of L_n read its Laplace value
½·Σ nβh_i/(nβh_i + γ) (:func:`slt_jax.laplace_llc`; docs/mathematics.md §3). An 8-layer DLN
(61-86-49-29-30-14-68-62, rank 2, λ = 268) held λ̂ at 123–126 against a Laplace value of 121 for
the first ~18k steps at its calibrated ε = 1.7e-7 — flat enough to pass the trend test after 1750
— and reached 270–273 only at 54–60k. While λ̂ reads the Laplace value at a point whose Hessian
leaves directions unconfined, a calibrated run therefore keeps doubling, up to its own cap
(:func:`slt_jax.tuning.equilibration.run_until_equilibrated`).
"""

import math
from typing import Callable

import jax
import numpy as np

from slt_jax.data.batches import num_samples
from slt_jax.estimators.laplace import laplace_llc
from slt_jax.runner import sharding
from slt_jax.settings import AutoSettings
from slt_jax.tuning.equilibration import level


def laplace_plateau(laplace_llc: float, laplace_se: float, num_sampled: int, rtol: float = 0.03,
                    regular_fraction: float = 0.9) -> Callable | None:
    """The ``plateau`` test of :func:`run_until_equilibrated` for a point's Laplace value.

    Args:
      laplace_llc: ½ Σ nβh/(nβh + γ) at w* (:func:`slt_jax.laplace_llc`).
      laplace_se: its standard error (0 when exact).
      num_sampled: the number of sampled coordinates d.
      rtol: the relative distance from the Laplace value that still reads as the plateau
        (measured: plateaus sat +0.1 % (19.03 vs 19.007) and +1.5 % (122.8 vs 121) above it;
        the nearly regular DLN 23-30-11-11-27 (λ = 186.5) read 193.3 ± 0.6 against 184.5, +4.8 %).
      regular_fraction: points whose Laplace value is at least this fraction of d/2 leave
        (almost) no direction unconfined.

    Returns:
      ``plateau(llc) -> bool``, True when the chains' mean λ̂ is within
      ``rtol·laplace_llc + 2·se`` of it (se combining the chains' spread and ``laplace_se``);
      or None when the Laplace value is at least ``regular_fraction`` of d/2: a (nearly)
      regular point has no plateau to leave.
    """
    if not 2.0 * laplace_llc < regular_fraction * num_sampled:
        return None

    def plateau(llc) -> bool:
        found = level(np.asarray(llc))
        if found is None:
            return False
        mean, se = found
        return abs(mean - laplace_llc) <= rtol * laplace_llc + 2.0 * math.hypot(se, laplace_se)

    return plateau


def plateau_check(problem, auto: AutoSettings, key):
    """The Laplace value of w* as ``estimate_llc`` records it, and the plateau test built on it.

    The Hessian is that of the mean loss over ``auto.laplace_rows`` rows drawn (without
    replacement) with ``key`` and gathered to the host, so it is the same for any mesh; dense
    up to ``auto.laplace_dense_params`` parameters, stochastic Lanczos above. It assumes w* is
    a minimum (∇L_n(w*) ≈ 0); elsewhere the plateau sits at a different level.

    Returns:
      ``(record, plateau)``: the record (``llc``, ``llc_se``, ``num_stiff``, ``method``,
      ``rows``; or ``skipped`` and why), and :func:`laplace_plateau`'s test, or None where
      there is none (a saddle whose quadratic posterior is improper, a nearly regular point).
    """
    data = problem.resident_data  # streamed data: a fixed sample of rows
    n, limit = num_samples(data), auto.laplace_rows
    rows = np.sort(np.asarray(jax.random.permutation(key, n)[:limit])) if n > limit else np.arange(n)
    sample = sharding.to_host(jax.tree.map(lambda x: x[rows], data))  # gathered on device, then to the host
    method = "dense" if problem.num_sampled <= auto.laplace_dense_params else "lanczos"
    try:
        value = laplace_llc(problem.user_loss_fn, sharding.to_host(problem.params), sample,
                            localization=problem.localization, nbeta=problem.nbeta, method=method,
                            key=jax.random.fold_in(key, 1))
    except (ValueError, jax.errors.JaxRuntimeError) as err:  # a saddle (improper posterior), out of memory
        return {"skipped": str(err).splitlines()[0]}, None
    record = {"llc": value.llc, "llc_se": value.llc_se, "num_stiff": value.num_stiff, "method": value.method,
              "rows": int(rows.size)}
    return record, laplace_plateau(value.llc, value.llc_se, problem.num_sampled, auto.plateau_rtol,
                                   auto.regular_fraction)


