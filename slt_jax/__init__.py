"""slt-jax: Singular Learning Theory estimation at scale in JAX.

Data flows one way: model adapter → local posterior → sampler kernel → chain runner →
statistics → estimators → results, plots and the ``slt-jax`` command.
"""

from slt_jax import groundtruth, models
from slt_jax.tuning.sweep import Calibration, CalibrationError, CalibrationWarning, calibrate
from slt_jax.trajectory.checkpoints import CheckpointTrajectory, list_steps
from slt_jax.runner.divergence import DivergenceError, DivergenceWarning
from slt_jax.curves.early_warning import EarlyWarning, early_warning
from slt_jax.estimate import estimate_llc
from slt_jax.estimators.diagnostics import (
    ChainDiagnostics,
    chain_diagnostics,
    effective_sample_size,
    ess_per_chain,
    mcse_mean,
    split_rhat,
)
from slt_jax.estimators.free_energy import (
    beta_ladder,
    llc_from_slope,
    llc_from_two_temperatures,
    llc_from_variance,
    thermodynamic_integration,
    wbic,
)
from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.estimators.laplace import LaplaceLLC, laplace_llc
from slt_jax.plots import plot_early_warning, plot_llc_curve, plot_llc_vs_step_size
from slt_jax.results import LLCResult
from slt_jax.trajectory.store import ResultsStore
from slt_jax.samplers import KernelFactory, SamplingAlgorithm
from slt_jax.runner.sharding import make_mesh
from slt_jax.curves.stages import Stages, detect_stages
from slt_jax.temperature import FreeEnergyResult, estimate_free_energy
from slt_jax.trajectory.curve import LLCCurve
from slt_jax.trajectory.llc_trajectory import escaped_chains, llc_trajectory

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationWarning",
    "ChainDiagnostics",
    "CheckpointTrajectory",
    "DivergenceError",
    "DivergenceWarning",
    "EarlyWarning",
    "FreeEnergyResult",
    "KernelFactory",
    "LLCCurve",
    "LaplaceLLC",
    "LLCResult",
    "ResultsStore",
    "SamplingAlgorithm",
    "Stages",
    "beta_ladder",
    "calibrate",
    "chain_diagnostics",
    "detect_stages",
    "dln_learning_coefficient",
    "early_warning",
    "effective_sample_size",
    "escaped_chains",
    "ess_per_chain",
    "estimate_free_energy",
    "estimate_llc",
    "groundtruth",
    "laplace_llc",
    "list_steps",
    "llc_from_slope",
    "llc_from_two_temperatures",
    "llc_from_variance",
    "llc_trajectory",
    "make_mesh",
    "mcse_mean",
    "models",
    "plot_early_warning",
    "plot_llc_curve",
    "plot_llc_vs_step_size",
    "split_rhat",
    "thermodynamic_integration",
    "wbic",
]
