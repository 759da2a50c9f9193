"""The import paths of slt-jax 0.1, kept for one release as aliases of the modules' new homes.

``import slt_jax.calibration`` (and every other module that moved when the package was laid out
by the data flow) still works, returns the new module, and warns with a ``DeprecationWarning``
naming the new path. The aliases go in the next release.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "slt_jax.calibration": "slt_jax.tuning.sweep",
    "slt_jax.chains": "slt_jax.runner.chains",
    "slt_jax.checkpoints": "slt_jax.trajectory.checkpoints",
    "slt_jax.divergence": "slt_jax.runner.divergence",
    "slt_jax.early_warning": "slt_jax.curves.early_warning",
    "slt_jax.equilibration": "slt_jax.tuning.equilibration",
    "slt_jax.laplace": "slt_jax.estimators.laplace",
    "slt_jax.llc_curve": "slt_jax.trajectory.curve",
    "slt_jax.mala": "slt_jax.samplers.mala",
    "slt_jax.nuts": "slt_jax.samplers.nuts",
    "slt_jax.results_store": "slt_jax.trajectory.store",
    "slt_jax.sharding": "slt_jax.runner.sharding",
    "slt_jax.stages": "slt_jax.curves.stages",
    "slt_jax.step_check": "slt_jax.tuning.stiffness",
    "slt_jax.step_choice": "slt_jax.tuning.choice",
    "slt_jax.step_grid": "slt_jax.tuning.grid",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and loads each as a thin module forwarding to its new home."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default: a fresh, empty module object

    def exec_module(self, module):
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__getattr__ = lambda name: getattr(target, name)
        module.__dir__ = lambda: dir(target)
        module.__doc__ = f"Alias of :mod:`{new}` (deprecated). " + (target.__doc__ or "")


def install():
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
