"""slt-jax: Singular Learning Theory estimation at scale in JAX.

Data flows one way: model adapter → local posterior → sampler kernel → chain runner →
statistics → estimators → results, plots and the ``slt-jax`` command.

Public names are imported on first use (PEP 562), so ``import slt_jax`` loads neither
matplotlib, Orbax nor numpyro; each arrives with the first function that needs it.
"""

import importlib
import importlib.metadata

from slt_jax import _aliases

try:
    __version__ = importlib.metadata.version("slt-jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

# Public name → the module that defines it.
_EXPORTS = {
    "AutoSettings": "slt_jax.settings",
    "Calibration": "slt_jax.tuning.calibration",
    "CalibrationError": "slt_jax.errors",
    "CalibrationWarning": "slt_jax.errors",
    "ChainDiagnostics": "slt_jax.estimators.diagnostics",
    "CheckpointTrajectory": "slt_jax.trajectory.checkpoints",
    "ComponentCurves": "slt_jax.trajectory.refined",
    "DivergenceError": "slt_jax.errors",
    "DivergenceWarning": "slt_jax.errors",
    "EarlyWarning": "slt_jax.curves.early_warning",
    "FreeEnergyResult": "slt_jax.temperature",
    "KernelFactory": "slt_jax.samplers.base",
    "LLCCurve": "slt_jax.trajectory.curve",
    "InfluenceResult": "slt_jax.influence",
    "LLCResult": "slt_jax.results",
    "LaplaceLLC": "slt_jax.estimators.laplace",
    "LocalPosterior": "slt_jax.posterior",
    "ObservedResult": "slt_jax.observables",
    "Precision": "slt_jax.settings",
    "ResultsStore": "slt_jax.trajectory.store",
    "RunSettings": "slt_jax.settings",
    "SampleLosses": "slt_jax.observables",
    "SamplingAlgorithm": "slt_jax.samplers.base",
    "Stages": "slt_jax.curves.stages",
    "SusceptibilityResult": "slt_jax.susceptibility",
    "attention": "slt_jax.selectors",
    "describe_mask": "slt_jax.selectors",
    "embedding": "slt_jax.selectors",
    "head": "slt_jax.selectors",
    "mlp": "slt_jax.selectors",
    "refined_llc_curves": "slt_jax.trajectory.refined",
    "select": "slt_jax.selectors",
    "unembedding": "slt_jax.selectors",
    "SweepSettings": "slt_jax.settings",
    "bayesian_influence": "slt_jax.influence",
    "beta_ladder": "slt_jax.estimators.free_energy",
    "calibrate": "slt_jax.tuning.sweep",
    "chain_diagnostics": "slt_jax.estimators.diagnostics",
    "detect_stages": "slt_jax.curves.stages",
    "dln_learning_coefficient": "slt_jax.groundtruth",
    "early_warning": "slt_jax.curves.early_warning",
    "effective_sample_size": "slt_jax.estimators.diagnostics",
    "escaped_chains": "slt_jax.estimators.llc",
    "ess_per_chain": "slt_jax.estimators.diagnostics",
    "estimate_free_energy": "slt_jax.temperature",
    "estimate_llc": "slt_jax.estimate",
    "estimate_refined_llcs": "slt_jax.refined",
    "laplace_llc": "slt_jax.estimators.laplace",
    "list_steps": "slt_jax.trajectory.checkpoints",
    "llc_from_slope": "slt_jax.estimators.free_energy",
    "llc_from_two_temperatures": "slt_jax.estimators.free_energy",
    "llc_from_variance": "slt_jax.estimators.free_energy",
    "llc_trajectory": "slt_jax.trajectory.llc_trajectory",
    "make_mesh": "slt_jax.runner.sharding",
    "mcse_mean": "slt_jax.estimators.diagnostics",
    "observable_trajectory": "slt_jax.trajectory.observable_trajectory",
    "observe": "slt_jax.observables",
    "plot_component_curves": "slt_jax.plots",
    "plot_early_warning": "slt_jax.plots",
    "plot_llc_curve": "slt_jax.plots",
    "plot_curve_panels": "slt_jax.plots",
    "plot_llc_vs_step_size": "slt_jax.plots",
    "principal_components": "slt_jax.estimators.observables",
    "split_rhat": "slt_jax.estimators.diagnostics",
    "susceptibilities": "slt_jax.susceptibility",
    "thermodynamic_integration": "slt_jax.estimators.free_energy",
    "wbic": "slt_jax.estimators.free_energy",
}
_SUBMODULES = ("data", "distributed", "groundtruth", "models", "selectors")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"slt_jax.{name}")
    else:
        raise AttributeError(f"module 'slt_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return __all__


_aliases.install()
