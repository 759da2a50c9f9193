"""Settings as values: frozen, hashable dataclasses passed through every entry point.

After numpyro's ``MCMC(kernel, num_warmup=..., num_samples=...)``: the driver takes the shape
of a run, the kernel its own settings. Four groups:

- :class:`RunSettings` — the shape of a run (chains, draws, burn-in, thinning, batch, the loss
  estimator, chunking, the divergence policy);
- :class:`SweepSettings` — the step-size sweep of :func:`slt_jax.calibrate`;
- :class:`AutoSettings` — what ``step_size="auto"`` may do (extend the run, wait on a plateau,
  reduce the step), with the sweep it runs;
- :class:`Precision` — the dtype of positions and losses, and the model's compute dtype.

Every entry point also takes the fields as plain keywords (``num_chains=16``,
``max_extension=4``, ``dtype=jnp.float64``): :func:`resolve` maps each keyword to the one group
that owns it — that mapping is the dataclasses' field names, nothing else — and names the
closest field when a keyword is unknown. Equal settings hash alike, so results and stores
compare them as values (:func:`to_dict`).

Its length: four settings classes, with every field documented and validated where it is
defined.
"""

import dataclasses
import difflib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LOSS_ESTIMATORS = ("control_variate", "minibatch", "full_batch")


def _positive_int(name, value, *, allow_zero=False):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


def _positive(name, value, *, allow_zero=False, allow_none=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The shape of a sampling run.

    Attributes:
      num_chains: independent chains (vmapped; split over the mesh's ``"chains"`` axis).
      num_draws: recorded draws per chain.
      num_burnin: steps per chain before the first draw.
      steps_per_draw: sampler steps between draws; a chain runs
        ``num_burnin + num_draws·steps_per_draw`` steps.
      batch_size: rows per gradient minibatch (with replacement, on device); ``None`` for
        ``min(256, n)``.
      loss_estimator: what each draw records: ``"control_variate"`` ``nβ·(L_B(w_t) − L_B(w*))``
        on the same batch, ``"minibatch"`` ``nβ·(L_B(w_t) − L_n(w*))``, ``"full_batch"`` the
        exact loss (docs/mathematics.md §1).
      chunk_size: steps per compiled chunk; ``None`` for 512, or the run's own power of
        two where that is smaller (one chunk size is one compiled program, shared by runs of any length).
      divergence_threshold: a chain diverges when ``nβ·(L_B(w_t) − L_n(w*))`` exceeds this;
        ``None`` for ``10·d + 100 + 20·nβ·std(L_B(w*))``.
      on_divergence: ``"warn"`` (diverged chains are named and excluded) or ``"raise"``.
      check_step: after a run at a fixed step size, check it where the chains ended: the
        kernel's stability rule at their positions (a ``CalibrationWarning`` naming a smaller
        step when ε exceeds it), the kernel's own health (SGNHT's kinetic temperature) and
        whether λ̂ still trends between the halves of the draws; the record, with its cost in
        seconds, is ``settings["step_check"]`` (docs/calibration.md). ``False`` skips it.
    """

    num_chains: int = 8
    num_draws: int = 500
    num_burnin: int = 500
    steps_per_draw: int = 1
    batch_size: int | None = None
    loss_estimator: str = "control_variate"
    chunk_size: int | None = None
    divergence_threshold: float | None = None
    on_divergence: str = "warn"
    check_step: bool = True

    DEFAULT_BATCH_SIZE = 256  # a class constant, not a field

    def __post_init__(self):
        for name in ("num_chains", "num_draws", "steps_per_draw"):
            _positive_int(name, getattr(self, name))
        _positive_int("num_burnin", self.num_burnin, allow_zero=True)
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        if self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
        if self.loss_estimator not in LOSS_ESTIMATORS:
            raise ValueError(f"loss_estimator={self.loss_estimator!r} is not one of {LOSS_ESTIMATORS}")
        _positive("divergence_threshold", self.divergence_threshold, allow_none=True)
        if self.on_divergence not in ("warn", "raise"):
            raise ValueError(f"on_divergence={self.on_divergence!r} must be 'warn' or 'raise'")
        if not isinstance(self.check_step, bool):
            raise ValueError(f"check_step must be True or False, got {self.check_step!r}")

    def batch_size_for(self, n: int) -> int:
        """The minibatch size for a dataset of ``n`` rows (checked against n)."""
        batch_size = min(self.DEFAULT_BATCH_SIZE, n) if self.batch_size is None else self.batch_size
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset (n={n})")
        return batch_size

    def require_draws(self, minimum: int, why: str):
        """Raise unless the run records at least ``minimum`` draws per chain."""
        if self.num_draws < minimum:
            raise ValueError(f"num_draws must be at least {minimum} ({why}), got {self.num_draws}")

    @property
    def num_steps(self) -> int:
        """Steps every chain runs."""
        return self.num_burnin + self.num_draws * self.steps_per_draw


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """The step-size sweep of :func:`slt_jax.calibrate` (docs/mathematics.md §3).

    Attributes:
      num_chains: chains per step size (more sharpen the agreement test); ``None`` — here and
        for ``grid_points``, ``grid_skip`` and ``window_draws`` — for the kernel's own
        (:attr:`~slt_jax.samplers.KernelFactory.sweep`), else :data:`SWEEP_DEFAULTS` (SGLD's:
        4 chains; SGNHT's 8, as its 4-chain group means came out of order).
      num_steps: steps of the program, i.e. of the smallest step size; ``T = num_steps·ε_min``
        is every group's simulated time.
      burnin_fraction: the part of T before the comparison window, in (0, 1).
      rtol: a step size agrees when ``|Δλ̂| + z·se(Δλ̂) ≤ rtol·|λ̂_ref|``.
      z: standard errors added to the difference in that test.
      mala: run the Metropolis acceptance check (plain SGLD); ``None`` for when
        ``n·d ≤ mala_budget`` and the data are not split over devices.
      mala_budget: ``n·d`` up to which the Metropolis check runs by default.
      grid_points: step sizes in the default grid (4; SGNHT 3).
      grid_skip: grid factors between the stability rule and the default grid's largest step
        (0; SGNHT 1: with twice the chains per step it runs three steps from ε_top/f down).
      grid_factor: ratio between neighbouring step sizes of the grid (> 1).
      min_window_draws: draws the largest step size gets in its window, at least.
      window_draws: draws the largest step size's window records where its steps allow (100;
        SGNHT 200, the thinning of a four-step grid on its three-step one; at least
        ``min_window_draws``; every step where they do not); the smaller steps' windows hold
        proportionally more. The draws are a by-product of the gradients, so recording them
        costs only memory, and with few of them a group's λ̂ is noisier than its chains
        (SGNHT on logistic regression: 20 draws left two steps' se at 6 % against the 5 %
        tolerance, and the sweep refused; 100 verified in fewer rounds).
      check_z: standard errors by which a trend or a negative λ̂ must be significant to count.
      min_mala_acceptance: acceptance below which a step size counts as unstable.
      max_grid_extensions: how many more rounds the sweep may run while no two consecutive step
        sizes are stable and agree (docs/calibration.md §3a): a round either runs the smallest
        stable step and the next one up again with as many new chains as they have had (when
        only their standard error keeps them apart), or extends the grid down by one step
        (ε_min/f, run for T/ε steps: f× the steps, at equal simulated time).
      on_unverified: past that budget, ``"raise"`` (:class:`~slt_jax.CalibrationError`) or
        ``"warn"`` (use the smallest stable step, unverified, with a ``CalibrationWarning``).
    """

    num_chains: int | None = None
    num_steps: int = 6000
    burnin_fraction: float = 0.5
    rtol: float = 0.05
    z: float = 1.0
    mala: bool | None = None
    mala_budget: float = 5e7
    grid_points: int | None = None
    grid_skip: int | None = None
    grid_factor: float = 2.0
    min_window_draws: int = 20
    window_draws: int | None = None
    check_z: float = 3.0
    min_mala_acceptance: float = 0.7
    max_grid_extensions: int = 4
    on_unverified: str = "raise"

    def __post_init__(self):
        for name in ("num_steps", "min_window_draws"):
            _positive_int(name, getattr(self, name))
        for name in ("num_chains", "grid_points", "window_draws", "grid_skip"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), allow_zero=name == "grid_skip")
        _positive_int("max_grid_extensions", self.max_grid_extensions, allow_zero=True)
        if self.on_unverified not in ("raise", "warn"):
            raise ValueError(f"on_unverified={self.on_unverified!r} must be 'raise' or 'warn'")
        if not 0 < self.burnin_fraction < 1:
            raise ValueError(f"burnin_fraction must lie in (0, 1), got {self.burnin_fraction!r}")
        _positive("rtol", self.rtol)
        _positive("z", self.z, allow_zero=True)
        _positive("check_z", self.check_z, allow_zero=True)
        _positive("mala_budget", self.mala_budget, allow_zero=True)
        if not self.grid_factor > 1:
            raise ValueError(f"grid_factor must be > 1, got {self.grid_factor!r}")
        if not 0 <= self.min_mala_acceptance <= 1:
            raise ValueError(f"min_mala_acceptance must lie in [0, 1], got {self.min_mala_acceptance!r}")

    def for_kernel(self, defaults=()) -> "SweepSettings":
        """These settings with every field left ``None`` among :data:`SWEEP_DEFAULTS`' filled in
        from ``defaults`` (a kernel's ``(name, value)`` pairs), else from :data:`SWEEP_DEFAULTS`."""
        own = dict(defaults)
        unknown = set(own) - set(SWEEP_DEFAULTS)
        if unknown:
            raise ValueError(f"kernel sweep defaults name unknown fields {sorted(unknown)} (known: "
                             f"{sorted(SWEEP_DEFAULTS)})")
        return dataclasses.replace(self, **{name: own.get(name, value) for name, value in SWEEP_DEFAULTS.items()
                                            if getattr(self, name) is None})


SWEEP_DEFAULTS = {"num_chains": 4, "grid_points": 4, "grid_skip": 0, "window_draws": 100}
"""The :class:`SweepSettings` fields a kernel may set for itself, and their values where it does not."""


@dataclasses.dataclass(frozen=True)
class AutoSettings:
    """What ``step_size="auto"`` (or a :class:`~slt_jax.Calibration`) may do after the sweep.

    Attributes:
      max_extension: the longest run, as a multiple of the calibrated schedule, while λ̂ still
        trends (≥ 1).
      max_plateau_extension: the longest run while λ̂ reads the Laplace value of a degenerate
        w* (≥ ``max_extension``); ``None`` skips the Laplace value.
      max_step_reductions: how often the stiffness check at the chains may halve the step.
      plateau_settle_efolds: a run still on the Laplace plateau, its doublings agreeing, has
        settled there after this many e-folds of ``2/(εγ)`` steps — the relaxation time of a
        direction that only the localizer confines, the slowest there is — so the flat directions
        add nothing within the localizer's reach (at smooth points of a fibre with symmetries the
        Laplace value is λ); ``None`` waits up to ``max_plateau_extension``.
      plateau_rtol: λ̂ within this fraction of the Laplace value (plus 2 se) reads as the plateau.
      regular_fraction: points whose Laplace value is at least this fraction of d/2 have no
        plateau to leave.
      laplace_rows: rows of the Hessian behind the Laplace value.
      laplace_dense_params: up to this many sampled parameters the Laplace value is dense,
        above it stochastic Lanczos quadrature.
      sweep: the sweep run for ``step_size="auto"``.
    """

    max_extension: float = 8.0
    max_plateau_extension: float | None = 64.0
    max_step_reductions: int = 4
    plateau_settle_efolds: float | None = 3.0
    plateau_rtol: float = 0.03
    regular_fraction: float = 0.9
    laplace_rows: int = 8192
    laplace_dense_params: int = 2048
    sweep: SweepSettings = SweepSettings()

    def __post_init__(self):
        if not (isinstance(self.max_extension, (int, float)) and self.max_extension >= 1):
            raise ValueError(f"max_extension must be ≥ 1 (a multiple of the calibrated schedule), "
                             f"got {self.max_extension!r}")
        if self.max_plateau_extension is not None and not self.max_plateau_extension >= self.max_extension:
            raise ValueError(f"max_plateau_extension must be ≥ max_extension ({self.max_extension!r}) or None, "
                             f"got {self.max_plateau_extension!r}")
        _positive_int("max_step_reductions", self.max_step_reductions, allow_zero=True)
        _positive("plateau_settle_efolds", self.plateau_settle_efolds, allow_none=True)
        _positive_int("laplace_rows", self.laplace_rows)
        _positive_int("laplace_dense_params", self.laplace_dense_params)
        _positive("plateau_rtol", self.plateau_rtol)
        if not isinstance(self.sweep, SweepSettings):
            raise ValueError(f"sweep must be a SweepSettings, got {type(self.sweep).__name__}")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Numerical precision of a run.

    Attributes:
      dtype: ``float32`` (default) or ``float64`` (needs ``jax_enable_x64``): positions,
        gradients, step sizes and recorded losses; parameters are cast to it.
      compute_dtype: optionally evaluate the model at a lower precision (``bfloat16``):
        parameters and floating data are cast to it inside the loss, whose value comes back at
        ``dtype``. Write ``loss_fn`` so its final reduction runs in float32.
    """

    dtype: Any = np.dtype(np.float32)
    compute_dtype: Any = None

    def __post_init__(self):
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as error:
            raise ValueError(f"dtype={self.dtype!r} is not a dtype: use jnp.float32 or jnp.float64") from error
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype={dtype} must be float32 or float64 (positions and losses accumulate in it)")
        compute = self.compute_dtype
        if compute is not None:
            try:
                compute = jnp.dtype(compute)
            except TypeError as error:
                raise ValueError(f"compute_dtype={compute!r} is not a dtype") from error
            if not jnp.issubdtype(compute, jnp.floating):
                raise ValueError(f"compute_dtype={compute} must be a floating dtype such as jnp.bfloat16")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "compute_dtype", compute)

    def check_runtime(self):
        """Raise if ``dtype`` needs 64-bit JAX and it is off."""
        if self.dtype == np.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
            raise ValueError("dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
                             "at startup, or run inside `with jax.enable_x64(True):`")


GROUPS = (RunSettings, SweepSettings, AutoSettings, Precision)


def resolve(options: dict, *groups):
    """Fold keyword ``options`` into settings groups.

    Args:
      options: keyword arguments of an entry point (e.g. ``{"num_chains": 16, "dtype": ...}``).
      *groups: ``(instance or None, class)`` pairs in priority order: each keyword goes to the
        first class that has a field of that name.

    Returns:
      One instance per group, with the keywords applied (defaults where ``None`` was given).

    Raises:
      ValueError: naming an unknown keyword and the closest known one.
    """
    instances = [cls() if value is None else value for value, cls in groups]
    for (value, cls), instance in zip(groups, instances):
        if not isinstance(instance, cls):
            raise ValueError(f"expected a {cls.__name__}, got {type(instance).__name__}")
    fields = [{f.name for f in dataclasses.fields(cls)} for _, cls in groups]
    known = sorted(set().union(*fields))
    updates = [{} for _ in groups]
    for name, value in options.items():
        owner = next((i for i, names in enumerate(fields) if name in names), None)
        if owner is None:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown setting {name!r}{hint} (settings: {known})")
        updates[owner][name] = value
    return tuple(dataclasses.replace(instance, **update) if update else instance
                 for instance, update in zip(instances, updates))


def to_dict(settings) -> dict:
    """A settings value as plain JSON types (dtypes as names; nested settings as dicts)."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, np.dtype) or (value is not None and field.name.endswith("dtype")):
            value = str(np.dtype(value)) if not isinstance(value, str) else value
        out[field.name] = value
    return out
