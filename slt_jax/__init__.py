"""slt-jax: Singular Learning Theory estimation at scale in JAX.

Data flows one way: model adapter → local posterior → sampler kernel → chain runner →
statistics → estimators → results, plots and the ``slt-jax`` command.
"""

from slt_jax import data, groundtruth, models, selectors
from slt_jax.calibration import Calibration, CalibrationError, CalibrationWarning, calibrate
from slt_jax.checkpoints import CheckpointTrajectory, list_steps
from slt_jax.divergence import DivergenceError, DivergenceWarning
from slt_jax.early_warning import EarlyWarning, early_warning
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
from slt_jax.laplace import LaplaceLLC, laplace_llc
from slt_jax.plots import plot_early_warning, plot_llc_curve, plot_llc_vs_step_size
from slt_jax.results import LLCResult
from slt_jax.results_store import ResultsStore
from slt_jax.samplers import KernelFactory, SamplingAlgorithm
from slt_jax.selectors import attention, describe_mask, embedding, head, mlp, select, unembedding
from slt_jax.sharding import make_mesh
from slt_jax.stages import Stages, detect_stages
from slt_jax.temperature import FreeEnergyResult, estimate_free_energy
from slt_jax.llc_curve import LLCCurve
from slt_jax.trajectory import escaped_chains, llc_trajectory

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
    "attention",
    "beta_ladder",
    "calibrate",
    "chain_diagnostics",
    "data",
    "describe_mask",
    "detect_stages",
    "dln_learning_coefficient",
    "early_warning",
    "effective_sample_size",
    "embedding",
    "escaped_chains",
    "ess_per_chain",
    "estimate_free_energy",
    "estimate_llc",
    "groundtruth",
    "head",
    "laplace_llc",
    "list_steps",
    "llc_from_slope",
    "llc_from_two_temperatures",
    "llc_from_variance",
    "llc_trajectory",
    "make_mesh",
    "mcse_mean",
    "mlp",
    "models",
    "plot_early_warning",
    "plot_llc_curve",
    "plot_llc_vs_step_size",
    "select",
    "selectors",
    "split_rhat",
    "thermodynamic_integration",
    "unembedding",
    "wbic",
]
