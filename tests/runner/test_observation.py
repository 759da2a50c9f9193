"""Observables inside the chain runner (slt_jax.runner.observation): streaming moments equal
the moments of stored traces, their memory does not grow with draws, traces go to disk chunk by
chunk, and observing changes nothing about the chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.problem import make_problem
from slt_jax.runner.chains import run_chains, setup
from slt_jax.runner.observation import Observation, TraceWriter, pair_key
from slt_jax.samplers import SGLD
from slt_jax.settings import RunSettings

CHAINS, BURNIN = 4, 10
RUN = RunSettings(num_chains=CHAINS, num_burnin=BURNIN, num_draws=30, batch_size=16, chunk_size=16)


def regression(n=64, d=3):
    x = jax.random.normal(jax.random.key(0), (n, d))
    y = x @ jnp.array([1.0, -2.0, 0.5]) + jax.random.normal(jax.random.key(1), (n,))
    loss = lambda w, b: 0.5 * jnp.mean(jnp.square(b["x"] @ w - b["y"]))
    return loss, {"x": x, "y": y}, jnp.linalg.lstsq(x, y)[0]


def observed_fn(params, inputs, key):
    """Parameters, residuals of probe rows, and a keyed draw (a different number per chain and draw)."""
    return {"w": params, "res": inputs["x"] @ params - inputs["y"], "noise": jax.random.normal(key, (1,))}


@pytest.fixture(scope="module")
def problem():
    loss, data, w = regression()
    return make_problem(loss, w, data, localization=1.0, run=RUN), data


def run(problem, data, num_draws, *, observation=None, sink=None, key=1):
    config, inputs = setup(problem, SGLD, RUN, 1e-3, masks=jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
                           mask_index=jnp.array([0, 1, 0, 1]), observation=observation,
                           observed_inputs={"x": data["x"][:5], "y": data["y"][:5]})
    return run_chains(jax.random.key(key), config, inputs, num_chains=CHAINS, num_burnin=BURNIN, num_draws=num_draws,
                      chunk_size=RUN.chunk_size, progress=False, sink=sink)


RECORDED = Observation(observed_fn, pairs=(("w", "res"), ("noise", "res")), record=True, keyed=True)


def test_streaming_moments_equal_the_moments_of_the_traces(problem):
    state, draws = run(*problem, 30, observation=RECORDED)
    m = jax.tree.map(np.asarray, state.moments)
    traces = {name: np.asarray(v, np.float64) for name, v in draws.observed.items()}
    np.testing.assert_array_equal(m.count, np.full(CHAINS, 30))
    for name, values in traces.items():
        np.testing.assert_allclose(m.sums[name], values.sum(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.squares[name], np.square(values).sum(1), rtol=1e-5, atol=1e-6)
    for a, b in RECORDED.pairs:
        np.testing.assert_allclose(m.cross[pair_key(a, b)], np.einsum("cdi,cdj->cij", traces[a], traces[b]),
                                   rtol=1e-5, atol=1e-6)
    # Values are relative to w*; the masked coordinates of each chain group never move.
    w = traces["w"]
    assert np.all(w[0::2, :, 1:] == 0) and np.all(w[1::2, :, 0] == 0) and np.all(w[0::2, :, 0] != 0)
    # The keyed draws differ between chains and draws, with unit spread (relative to their value
    # at w*, drawn with a fixed key: a shift); 120 draws put the sample sd within ±0.26 at 4σ.
    noise = traces["noise"][..., 0]
    assert len(np.unique(noise)) == noise.size and abs(noise.std() - 1) < 0.26


def test_moments_do_not_grow_with_draws_and_traces_are_kept_only_on_request(problem):
    moments_only = Observation(observed_fn, pairs=(("w", "res"),), keyed=True)
    short, draws = run(*problem, 5, observation=moments_only)
    long, _ = run(*problem, 40, observation=moments_only)
    shapes = jax.tree.map(np.shape, short.moments)
    assert shapes == jax.tree.map(np.shape, long.moments)
    assert shapes.sums == {"noise": (CHAINS, 1), "res": (CHAINS, 5), "w": (CHAINS, 3)}
    assert shapes.cross == {"w|res": (CHAINS, 3, 5)}
    assert draws.observed is None


def test_traces_are_written_to_disk_chunk_by_chunk_and_not_kept(problem, tmp_path):
    # 10 burn-in steps + 30 draws in chunks of 16 steps: draws arrive in three chunks.
    _, in_memory = run(*problem, 30, observation=RECORDED)
    shapes = RECORDED.shapes(problem[0].params, {"x": problem[1]["x"][:5], "y": problem[1]["y"][:5]})
    writer = TraceWriter(tmp_path / "traces", shapes, CHAINS, 30, np.float32)
    _, draws = run(*problem, 30, observation=RECORDED, sink=writer)
    assert draws.observed is None and writer.written == 30
    for name, path in writer.paths.items():
        np.testing.assert_array_equal(np.load(path), np.asarray(in_memory.observed[name]))


def test_observing_leaves_the_chains_unchanged(problem):
    plain, plain_draws = run(*problem, 30)
    observed, observed_draws = run(*problem, 30, observation=RECORDED)
    np.testing.assert_allclose(np.asarray(plain.kernel_state.position), np.asarray(observed.kernel_state.position),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plain_draws.batch_loss, observed_draws.batch_loss, rtol=1e-6)
