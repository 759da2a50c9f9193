"""What an LLC estimate returns: the numbers, the traces, and the settings that made them."""

import dataclasses
import json
from typing import Any

import numpy as np

from slt_jax.paths import local_path


def json_safe(value):
    """Plain JSON types: containers recursed, arrays as lists, numpy scalars as Python, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return json_safe(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def dump_json(record: dict, path=None, indent: int = 2) -> str:
    """``record`` as JSON text; also written (UTF-8) to ``path`` if given. Every result's ``to_json``."""
    text = json.dumps(record, indent=indent)
    if path is not None:
        with open(local_path(path), "w", encoding="utf-8") as file:
            file.write(text)
    return text


@dataclasses.dataclass(frozen=True)
class LLCResult:
    """The local learning coefficient at one point, with everything needed to trust or redo it.

    Attributes:
      llc_mean: λ̂, the mean of the per-chain estimates over chains that did not diverge.
      llc_std: spread (std, ddof=1) of the per-chain λ̂.
      llc_se: standard error of ``llc_mean`` (chain spread / √chains; with one chain, the
        Monte Carlo standard error from the effective sample size).
      llc_per_chain: λ̂ of each chain, ``(chains,)``, diverged chains included (NaN or huge).
      loss_trace: per-draw estimates of L_n(w_t), ``(chains, draws)``.
      llc_trace: per-draw λ̂ values ``nβ·(…)``, ``(chains, draws)``.
      distance_trace: ‖w_t − w*‖² per draw, ``(chains, draws)``.
      init_loss: L_n(w*), exact over the full (evaluation) dataset.
      nbeta: nβ used.
      n: number of samples in the gradient dataset.
      diverged_chains: indices of chains excluded as divergent.
      diverged_at: the step at which each of those chains diverged.
      plain: for the control-variate estimator, the plain minibatch estimate from the same
        draws ``{"llc_mean", "llc_se"}`` — to show what the control variate saved.
      diagnostics: ESS, split R-hat and MCSE of the λ̂ trace.
      settings: every setting that produced the result (JSON-ready).
      sampler_stats: what the sampler reported, or ``None``: the mean of each field of the
        kernel's per-step info over the draws of healthy chains (e.g. SGNHT's kinetic
        temperature), the MALA acceptance rate (``mala=True``), or NUTS's adapted step size,
        acceptance, divergent transitions and leapfrog steps.
    """

    llc_mean: float
    llc_std: float
    llc_se: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    llc_trace: np.ndarray
    distance_trace: np.ndarray
    init_loss: float
    nbeta: float
    n: int
    diverged_chains: list
    diverged_at: list
    plain: dict | None
    diagnostics: Any
    settings: dict
    sampler_stats: dict | None = None

    def to_dict(self, traces: bool = False) -> dict:
        """A JSON-serialisable dict; traces (chains × draws arrays) only if ``traces``."""
        skip = () if traces else ("loss_trace", "llc_trace", "distance_trace")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return json_safe(out)

    def to_json(self, path=None, traces: bool = False) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` if given."""
        return dump_json(self.to_dict(traces=traces), path)

    def __str__(self) -> str:
        chains = len(self.llc_per_chain)
        s = f"λ̂ = {self.llc_mean:.4g} ± {self.llc_se:.2g} (se; {chains} chains, nβ = {self.nbeta:.4g})"
        if self.diverged_chains:
            s += f", {len(self.diverged_chains)} diverged chain(s) excluded: {self.diverged_chains}"
        return s
