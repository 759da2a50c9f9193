"""The Bayesian influence function between training rows and query losses.

Kreer, Wu, Adam, Furman, Hoogland (arXiv:2509.26544): under the localized tempered posterior,
the influence of training sample z_i on an observable φ is

    BIF(z_i, φ) = −Cov_p(ℓ_i(w), φ(w)),

ℓ_i the loss of row i (docs/mathematics.md §8.1). Upweighting row i in the tempered likelihood,
``exp(−β·Σ_j (1 + ε_j)·ℓ_j(w))`` with β = nβ/n, moves the posterior mean of φ by
``d E[φ]/dε_i = −β·Cov_p(ℓ_i, φ) = β·BIF``: a negative BIF means that more weight on row i
lowers E[φ] (for φ a query loss: row i helps the query), a positive one that it raises it. The
paper's BIF is this covariance without the factor β, and so is ours; devinterp 2.0.1 reports
the covariance or the correlation of the per-sample (or per-token) loss traces, the latter
with the opposite sign (its ``influences`` are +Corr); ``correlation`` here carries the BIF's
sign, −Corr. For a regular model at large nβ, ``BIF ≈ −∇ℓ_iᵀ(nβH + γI)⁻¹∇φ``, the classical
influence function damped by γ and scaled by 1/nβ (§8.1).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import validation
from slt_jax.estimators import observables as estimators
from slt_jax.observables import (RowLosses, check_rows, check_train_rows, healthy_moments, observing_problem, resolve_step,
                                 row_losses, run_observed)
from slt_jax.results import LLCResult, summarize
from slt_jax.runner.observation import Observation
from slt_jax.serialization import json_safe
from slt_jax.settings import AutoSettings, Precision, RunSettings


@dataclasses.dataclass(frozen=True)
class InfluenceObservables:
    """The observation of a BIF run: every training row's loss and every query's loss per draw."""

    train: RowLosses
    query: RowLosses

    def __call__(self, params, inputs):
        return {"train": jnp.ravel(self.train(params, inputs["train"])),
                "query": jnp.ravel(self.query(params, inputs["query"]))}


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """The Bayesian influence of training rows on query losses (arXiv:2509.26544).

    Attributes:
      covariance: BIF(z_i, φ_j) = −Cov_p(ℓ_i, φ_j), shape ``(rows, *query_shape)``: row i of
        ``train_rows`` against query j (per token: ``(rows, queries, T − 1)``). This and the
        next three are float32 (estimated in float64; the Monte Carlo error is far larger).
      se: its Monte Carlo standard error (delete-one-chain jackknife, docs/mathematics.md §8.5).
      correlation: −Corr_p(ℓ_i, φ_j), the same shape (NaN where a loss does not move).
      correlation_se: its standard error.
      mean_influence: the mean of ``covariance`` over all entries, −Cov_p(mean_i ℓ_i, mean_j φ_j),
        and ``mean_influence_se`` its standard error (a per-checkpoint summary).
      train_rows: the rows of ``data`` in ``covariance``'s first axis.
      query_shape: the shape of the query losses, ``(queries,)`` or ``(queries, T − 1)``.
      llc: λ̂ from the same draws.
      settings: every setting (JSON-ready), with ``block_rows`` and the number of runs.
    """

    covariance: np.ndarray
    se: np.ndarray
    correlation: np.ndarray
    correlation_se: np.ndarray
    mean_influence: float
    mean_influence_se: float
    train_rows: np.ndarray
    query_shape: tuple
    llc: LLCResult
    settings: dict

    def __str__(self) -> str:
        z = np.abs(self.covariance) / self.se
        return (f"BIF over {len(self.train_rows)} training rows × queries {self.query_shape}: mean "
                f"{self.mean_influence:.4g} ± {self.mean_influence_se:.2g}, max |BIF| "
                f"{np.nanmax(np.abs(self.covariance)):.4g}, {int(np.sum(z > 4))} entries beyond 4 se; "
                f"{self.llc}")


def bayesian_influence(loss_fn, params, data, key, *, query_data, step_size, localization, train_rows=None,
                       per_sample_loss=None, block_rows=None, observe_every: int = 1, nbeta=None, sampler="sgld",
                       param_mask=None, mesh=None,
                       devices=None, run: RunSettings | None = None, auto: AutoSettings | None = None,
                       precision: Precision | None = None, progress: bool = True, **options) -> InfluenceResult:
    """The BIF matrix −Cov_p(ℓ_i, φ_j) between training rows and query losses (arXiv:2509.26544).

    Samples the localized posterior ``p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)`` on ``data`` as
    :func:`slt_jax.estimate_llc` does, and at every draw evaluates the loss of each training row
    in ``train_rows`` (``loss_fn`` on one-row batches, so ``L_n`` is their mean) and of each query
    (``per_sample_loss`` if given, e.g. per token); only their sums, squares and cross-products
    are kept, per chain (docs/mathematics.md §8.5).

    Args:
      loss_fn, params, data, key, step_size, localization, nbeta, sampler, param_mask, mesh,
        devices, run, auto, precision, progress, **options: as for :func:`slt_jax.estimate_llc`
        (``step_size="auto"`` calibrates first; the run is not extended after it).
      query_data: rows shaped like batches of ``data`` (held-out samples, probes, or training
        rows) whose losses are the observables φ_j.
      train_rows: indices of the rows of ``data`` whose influence is wanted (distinct); default all.
      per_sample_loss: ``per_sample_loss(params, batch) -> (B,)`` or ``(B, …)`` for the queries
        (e.g. per-token losses ``(B, T − 1)``); default ``loss_fn`` on one-row batches.
      block_rows: training rows per sampling run. ``None`` (default) keeps all rows in one run,
        whose per-chain cross-products take ``4·chains·rows·queries`` bytes (float32); with
        ``block_rows`` the rows are split into blocks run one after another with the same key —
        the same chains, draw for draw, since the observables do not touch the sampler — so
        memory is that of one block, at one sampling run per block.
      observe_every: evaluate the losses at every ``observe_every``-th draw only (λ̂ uses every
        draw): the per-row losses cost ``observe_every`` times less, at little loss of precision
        when successive draws are strongly correlated.

    Returns:
      An :class:`InfluenceResult`.
    """
    problem, kernel, run, auto = observing_problem(
        loss_fn, params, data, key, sampler=sampler, run=run, auto=auto, precision=precision, options=options,
        localization=localization, nbeta=nbeta, param_mask=param_mask, mesh=mesh, devices=devices)
    rows = check_train_rows(train_rows, problem.n)
    train_losses, query_losses = row_losses(problem), row_losses(problem, per_sample_loss)
    _, entry = check_rows(query_losses, problem.params, query_data, "query_data")
    num_queries = validation.check_data(query_data, "query_data")
    check_rows(train_losses, problem.params, data, "data")
    if block_rows is None:
        block_rows = len(rows)
    validation.check_positive("block_rows", block_rows, integer=True)
    block_rows = min(int(block_rows), len(rows))
    eps, run, record = resolve_step(problem, kernel, run, auto, key, step_size, progress=progress)

    validation.check_positive("observe_every", observe_every, integer=True)
    observation = Observation(InfluenceObservables(train_losses, query_losses), pairs=(("train", "query"),),
                              every=int(observe_every))
    host_data = jax.tree.map(np.asarray, data)
    query = jax.tree.map(jnp.asarray, query_data)
    query_shape = (num_queries, *entry)
    num_blocks = math.ceil(len(rows) / block_rows)
    # Estimates are computed in float64 and stored in float32: the Monte Carlo error is far larger
    # than float32's, and a 10⁴ × 10³ matrix takes 40 MB instead of 80.
    covariance = np.empty((len(rows), math.prod(query_shape)), np.float32)
    se, correlation, correlation_se = np.empty_like(covariance), np.empty_like(covariance), np.empty_like(covariance)
    llc, count, query_sum, totals = None, None, None, None
    for b in range(num_blocks):
        chosen = rows[b * block_rows:(b + 1) * block_rows]
        size = len(chosen)
        # The last block is padded with its first row, so every block runs one compiled program.
        padded = np.concatenate([chosen, np.full(block_rows - size, chosen[0])])
        inputs = {"train": jax.tree.map(lambda x: jnp.asarray(x[padded]), host_data), "query": query}
        observed = run_observed(problem, kernel, run, key, step_size=eps, observation=observation, inputs=inputs,
                                check=llc is None and not record, progress=progress)
        if llc is None:  # every block runs the same chains: one λ̂, one set of healthy chains, one check
            sampled = observed.sampled
            llc = summarize(problem, sampled._replace(record={**(sampled.record or {}), **record} or None),
                            sampler=kernel.name, key=key)
        m = healthy_moments(llc, observed.sampled.moments)
        pair = estimators.chain_moments(m, "train", "query")
        pair = pair._replace(sum_a=pair.sum_a[:, :size], cross=pair.cross[:, :size], square_a=pair.square_a[:, :size])
        block = slice(b * block_rows, b * block_rows + size)
        cov, corr = estimators.covariance(pair), estimators.correlation(pair)
        covariance[block], se[block] = -cov.value, cov.se
        correlation[block], correlation_se[block] = -corr.value, corr.se
        # The mean over all entries is linear in the moments: sum its per-chain parts over blocks.
        part = (pair.sum_a.sum(axis=1, dtype=np.float64), pair.cross.sum(axis=(1, 2), dtype=np.float64))
        totals = part if totals is None else (totals[0] + part[0], totals[1] + part[1])
        count, query_sum = pair.count, pair.sum_b.mean(axis=1, dtype=np.float64)
        del observed, m, pair
    entries = covariance.shape[1]
    mean_pair = estimators.ChainMoments(count, (totals[0] / len(rows))[:, None], query_sum[:, None],
                                        (totals[1] / (len(rows) * entries))[:, None, None])
    mean_influence = estimators.covariance(mean_pair)
    shape = (len(rows), *query_shape)
    settings = json_safe({**llc.settings, "train_rows": len(rows), "query_shape": list(query_shape),
                          "block_rows": block_rows, "runs": num_blocks, "observe_every": int(observe_every),
                          "per_sample_loss": per_sample_loss is not None})
    return InfluenceResult(
        covariance=covariance.reshape(shape), se=se.reshape(shape), correlation=correlation.reshape(shape),
        correlation_se=correlation_se.reshape(shape), mean_influence=-float(mean_influence.value[0, 0]),
        mean_influence_se=float(mean_influence.se[0, 0]), train_rows=rows, query_shape=query_shape, llc=llc,
        settings=settings)
