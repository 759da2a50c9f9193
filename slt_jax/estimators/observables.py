"""Posterior means, covariances and correlations of observables from streaming moments.

The chain runner keeps, per chain, the count of draws, the sums and squares of each observable
and the cross-products of chosen pairs (:mod:`slt_jax.runner.observation`). These functions turn
them into estimates with Monte Carlo standard errors, pure functions of arrays
(docs/mathematics.md §8.5):

- the estimate pools the chains (grand means, not per-chain means): a per-chain covariance
  loses Cov(chain mean of a, chain mean of b) — about τ/N of the covariance for N draws of
  integrated autocorrelation time τ — where the pooled one loses a C-th of that over C chains;
- the delete-one-chain jackknife removes that remaining O(1/C) bias exactly for a covariance
  (a product of two means is the one nonlinearity) and gives the standard error from the
  spread of the leave-one-chain-out estimates. Chains are independent replicas, so the
  autocorrelation inside each is accounted for without modelling it, as for λ̂'s chain-spread
  standard error (§1.4). With one chain the standard error is NaN.
"""

from typing import NamedTuple

import numpy as np

from slt_jax.runner.observation import pair_key

# Entries × chains processed at once on the host (float64 temporaries of ~32 MB each).
BLOCK_ENTRIES = 2**22


class ChainMoments(NamedTuple):
    """Per-chain moments of two vector observables a (k_a entries) and b (k_b entries).

    Attributes:
      count: draws per chain, ``(C,)``.
      sum_a, sum_b: ``Σ a`` and ``Σ b`` per chain, ``(C, k_a)`` and ``(C, k_b)``.
      cross: ``Σ a bᵀ`` per chain, ``(C, k_a, k_b)``.
      square_a, square_b: ``Σ a²`` and ``Σ b²`` per chain (for correlations), or ``None``.
    """

    count: np.ndarray
    sum_a: np.ndarray
    sum_b: np.ndarray
    cross: np.ndarray
    square_a: np.ndarray | None = None
    square_b: np.ndarray | None = None


class Estimate(NamedTuple):
    """An estimate and its standard error, of the same shape."""

    value: np.ndarray
    se: np.ndarray


def chain_moments(moments, a: str, b: str, chains=None) -> ChainMoments:
    """The moments of pair ``(a, b)`` from the runner's :class:`~slt_jax.runner.observation.Moments`.

    Args:
      moments: the run's moments on the host, leading axis the chains.
      a, b: observable names; ``(a, b)`` must be an accumulated pair.
      chains: which chains to use (indices or a boolean mask); default all.
    """
    take = (lambda x: np.asarray(x)) if chains is None else (lambda x: np.asarray(x)[chains])
    key = pair_key(a, b)
    if key not in moments.cross:
        raise ValueError(f"({a!r}, {b!r}) is not an accumulated pair; the run kept {sorted(moments.cross)}")
    return ChainMoments(take(moments.count), take(moments.sums[a]), take(moments.sums[b]), take(moments.cross[key]),
                        take(moments.squares[a]), take(moments.squares[b]))


def _pooled(count, sum_a, sum_b, cross):
    """The pooled covariance ``P/N − (S_a/N)(S_b/N)ᵀ`` of totals (any leading shape)."""
    count = count[..., None, None]
    return cross / count - (sum_a[..., :, None] / count) * (sum_b[..., None, :] / count)


def _pooled_correlation(count, sum_a, sum_b, cross, square_a, square_b):
    var_a = square_a / count[..., None] - np.square(sum_a / count[..., None])
    var_b = square_b / count[..., None] - np.square(sum_b / count[..., None])
    scale = np.sqrt(np.maximum(var_a, 0.0))[..., :, None] * np.sqrt(np.maximum(var_b, 0.0))[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return _pooled(count, sum_a, sum_b, cross) / scale


def _jackknife(statistic, moments: ChainMoments, fields, block_entries: int) -> Estimate:
    """Delete-one-chain jackknife of ``statistic(*totals)`` over the chains, block by block of a's entries."""
    parts = [np.asarray(getattr(moments, f)) for f in fields]  # cast per block: no float64 copy of the whole
    chains = parts[0].shape[0]
    k_a, k_b = moments.sum_a.shape[1], moments.sum_b.shape[1]
    value = np.empty((k_a, k_b))
    se = np.full((k_a, k_b), np.nan)
    step = max(1, block_entries // max(1, k_b * chains))
    for start in range(0, k_a, step):
        rows = slice(start, min(k_a, start + step))
        sliced = [np.asarray(_rows(f, p, rows), np.float64) for f, p in zip(fields, parts)]
        totals = [p.sum(axis=0) for p in sliced]
        full = statistic(*totals)
        if chains < 2:
            value[rows] = full
            continue
        total = np.zeros_like(full)
        total_sq = np.zeros_like(full)
        for c in range(chains):
            left_out = statistic(*[t - p[c] for t, p in zip(totals, sliced)])
            total += left_out
            total_sq += np.square(left_out)
        mean = total / chains
        value[rows] = chains * full - (chains - 1) * mean
        spread = np.maximum(total_sq / chains - np.square(mean), 0.0)
        se[rows] = np.sqrt((chains - 1) * spread)
    return Estimate(value, se)


def _rows(field, array, rows):
    """The part of a moment array that belongs to a's entries ``rows``."""
    if field in ("sum_a", "square_a"):
        return array[:, rows]
    if field == "cross":
        return array[:, rows, :]
    return array


def covariance(moments: ChainMoments, *, block_entries: int = BLOCK_ENTRIES) -> Estimate:
    """Cov_p(a, b) over the chains, ``(k_a, k_b)``: jackknife-corrected pooled estimate and its se.

    ``block_entries`` bounds the host memory: a's entries are processed in blocks of about
    ``block_entries / (k_b·chains)``.
    """
    _check(moments)
    return _jackknife(_pooled, moments, ("count", "sum_a", "sum_b", "cross"), block_entries)


def correlation(moments: ChainMoments, *, block_entries: int = BLOCK_ENTRIES) -> Estimate:
    """Corr_p(a, b) over the chains, ``(k_a, k_b)``: jackknife-corrected pooled estimate and its se.

    Needs the squares of a and b. An observable that does not move (zero variance) gives NaN.
    """
    _check(moments)
    if moments.square_a is None or moments.square_b is None:
        raise ValueError("a correlation needs the squares of both observables")
    return _jackknife(_pooled_correlation, moments, ("count", "sum_a", "sum_b", "cross", "square_a", "square_b"),
                      block_entries)


def mean(count, sums) -> Estimate:
    """The pooled mean of an observable over the chains, ``(k,)``, and its jackknife se.

    For chains of equal length the jackknife se is the chain-spread standard error
    ``std(chain means)/√C`` of §1.4.
    """
    count = np.asarray(count, np.float64)
    sums = np.asarray(sums, np.float64)
    value = sums.sum(axis=0) / count.sum()
    chains = count.shape[0]
    if chains < 2:
        return Estimate(value, np.full(value.shape, np.nan))
    left_out = (sums.sum(axis=0) - sums) / (count.sum() - count)[:, None]
    spread = np.mean(np.square(left_out - left_out.mean(axis=0)), axis=0)
    return Estimate(value, np.sqrt((chains - 1) * spread))


def variance(count, sums, squares) -> Estimate:
    """Var_p of each entry of an observable, ``(k,)``: jackknife-corrected pooled estimate and its se
    (the diagonal of :func:`covariance` of the observable with itself, without forming k × k)."""
    count = np.asarray(count, np.float64)[:, None]
    sums, squares = np.asarray(sums, np.float64), np.asarray(squares, np.float64)
    statistic = lambda n, s, q: q / n - np.square(s / n)
    totals = (count.sum(axis=0), sums.sum(axis=0), squares.sum(axis=0))
    full = statistic(*totals)
    chains = sums.shape[0]
    if chains < 2:
        return Estimate(full, np.full(full.shape, np.nan))
    left_out = statistic(totals[0] - count, totals[1] - sums, totals[2] - squares)
    average = left_out.mean(axis=0)
    spread = np.mean(np.square(left_out - average), axis=0)
    return Estimate(chains * full - (chains - 1) * average, np.sqrt((chains - 1) * spread))


def _check(moments: ChainMoments):
    count = np.asarray(moments.count)
    if count.ndim != 1 or count.size == 0:
        raise ValueError(f"count must have one entry per chain, got shape {count.shape}")
    if np.any(count < 2):
        raise ValueError(f"every chain needs at least 2 draws for a covariance, got counts {count.tolist()}")


class PrincipalComponents(NamedTuple):
    """Principal components of a response matrix whose rows are samples (e.g. model components).

    Attributes:
      scores: each row's coordinates on the components, ``(rows, r)``.
      loadings: the components as unit vectors over the columns (e.g. shifts), ``(r, columns)``.
      singular_values: ``(r,)``, decreasing.
      explained: each component's share of the total (centred) sum of squares, ``(r,)``.
      center: the column means that were subtracted (zeros when not centred), ``(columns,)``.
    """

    scores: np.ndarray
    loadings: np.ndarray
    singular_values: np.ndarray
    explained: np.ndarray
    center: np.ndarray


def principal_components(matrix, *, center: bool = True) -> PrincipalComponents:
    """PCA of ``matrix`` (rows = samples, columns = features) by the SVD of its centred copy.

    Signs are fixed so that each loading's largest-magnitude entry is positive (the SVD's sign
    is arbitrary; this makes results comparable between runs).
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("matrix has non-finite entries; principal components need finite responses")
    offset = matrix.mean(axis=0) if center else np.zeros(matrix.shape[1])
    u, s, vt = np.linalg.svd(matrix - offset, full_matrices=False)
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    signs[signs == 0] = 1.0
    u, vt = u * signs, vt * signs[:, None]
    total = float(np.sum(np.square(s)))
    explained = np.square(s) / total if total > 0 else np.zeros_like(s)
    return PrincipalComponents(u * s, vt, s, explained, offset)
