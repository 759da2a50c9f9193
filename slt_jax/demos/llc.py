"""The single-point example: λ̂ of a deep linear network next to Aoyagi's exact λ.

A DLN with widths (5, 3, 4) and a rank-2 teacher at its most singular (aligned) point, where
the local learning coefficient equals Aoyagi's λ = 8 (multiplicity 1); noise-free teacher
data make the teacher an exact minimum (docs/mathematics.md §5.3, §6.1).
"""

import functools

import jax

from slt_jax.estimate import estimate_llc
from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher

WIDTHS, RANK = (5, 3, 4), 2
SETTINGS = dict(step_size=3e-5, localization=1.0, num_chains=8, num_draws=4000, num_burnin=4000,
                batch_size=100)


def run(seed: int = 0, n: int = 10_000, progress: bool = True) -> dict:
    """Estimate λ̂ at the teacher and return it with the exact λ."""
    key_teacher, key_data, key_sample = jax.random.split(jax.random.key(seed), 3)
    teacher = dln_teacher(key_teacher, WIDTHS, RANK)
    data = dln_data(key_data, teacher, n)
    result = estimate_llc(functools.partial(dln_loss, sigma=1.0), teacher, data, key_sample,
                          progress=progress, **SETTINGS)
    lam, m = dln_learning_coefficient(WIDTHS, RANK)
    return {"result": result, "lambda": float(lam), "multiplicity": m, "widths": WIDTHS, "rank": RANK}


def report(out: dict) -> str:
    r = out["result"]
    rel = r.llc_mean / out["lambda"] - 1
    return (
        f"Deep linear network, widths {out['widths']}, teacher rank {out['rank']}, n = {r.n}\n"
        f"  λ̂ = {r.llc_mean:.3f} ± {r.llc_se:.3f} (standard error, {len(r.llc_per_chain)} chains, "
        f"nβ = {r.nbeta:.1f}, ε = {r.settings['step_size']:g}, γ = {r.settings['localization']:g})\n"
        f"  Aoyagi's λ = {out['lambda']:g} (multiplicity {out['multiplicity']}): relative error {rel:+.1%}"
    )
