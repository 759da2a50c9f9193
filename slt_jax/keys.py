"""Where every random number comes from: chain keys and the named side streams.

A run's random numbers are a function of its root key alone. Chain ``i`` draws from
``fold_in(key, i)`` and its step ``t`` from ``fold_in(chain_key, t)``, so chain i's trace does
not depend on how many chains run beside it, on how many devices or hosts they are split over,
or on how the run is chunked. The auxiliary computations an estimate makes — the calibration
sweep, the Laplace value, curvature probes, the stiffness checks at the chains — draw from
``fold_in(key, s)`` with stream indices ``s`` near 2³¹, which no chain index reaches.
"""

import jax

CALIBRATION = 2**31 - 1  # the step-size sweep of step_size="auto"
LAPLACE = 2**31 - 2  # the Laplace value's rows and probe vectors
CURVATURE = 2**31 - 3  # the free-energy ladder's curvature probe
STEP_CHECK = 2**31 - 4  # the curvature probe of the check after a fixed-step run
STIFFNESS = 2**31 - 16  # + k: the k-th stiffness check at the chains' positions


def stream(key, index: int, offset: int = 0):
    """The side stream ``fold_in(key, index + offset)`` (``index`` one of this module's constants)."""
    return jax.random.fold_in(key, index + offset)


def chain_key(key, index):
    """Chain ``index``'s key: ``fold_in(key, index)``, independent of the number of chains."""
    return jax.random.fold_in(key, index)
