"""Chains and data sharded over devices (slt_jax.runner.sharding), and the per-step noise.

The multi-device checks run once, in a subprocess with 8 simulated CPU devices (this file run
as a script), so the rest of the suite keeps its single device: the same key gives the same
chains on 1, 4 and 8 devices, uneven chain counts are padded and dropped, the chain axis is
really split over the 8 devices, data-sharded gradients equal the single-device gradient,
stratified minibatches are unbiased, the progress bar can be silenced, and a second point
reuses the compiled sharded program.
"""

import io
import math
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import pytest

from slt_jax.runner import sharding
from slt_jax.samplers.noise import normal, tree_normal

NUM_DRAWS, NUM_BURNIN = 200, 100


def regression(key, n=512, d=3):
    """A noisy linear regression, its squared-error loss and the least-squares point ŵ."""
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    y = x @ jax.random.normal(kw, (d,)) + jax.random.normal(ke, (n,))
    loss_fn = lambda w, batch: 0.5 * jnp.mean(jnp.square(batch["x"] @ w - batch["y"]))
    return loss_fn, {"x": x, "y": y}, jnp.linalg.lstsq(x, y)[0]


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _worker(out_path):
    """Everything that needs 8 devices; writes a dict of results to ``out_path``."""
    import warnings

    warnings.simplefilter("error")  # as pytest's filterwarnings = error
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import slt_jax
    from jax.sharding import PartitionSpec as P
    from slt_jax.runner.chains import ChainInputs, RunConfig, run_chains
    from slt_jax.runner.divergence import Divergence
    from slt_jax.posterior import LocalPosterior
    from slt_jax.samplers import SGLD

    assert jax.device_count() == 8
    out = {}
    loss_fn, data, w_hat = regression(jax.random.key(0))
    traces = []

    def counted_loss(w, batch):
        traces.append(1)  # runs only while JAX traces
        return loss_fn(w, batch)

    kw = dict(step_size=1e-3, localization=100.0, batch_size=64, num_draws=NUM_DRAWS,
              num_burnin=NUM_BURNIN, progress=False)
    estimate = lambda key, **more: slt_jax.estimate_llc(counted_loss, w_hat, data, jax.random.key(key),
                                                        **(kw | more))

    # Device-count invariance; 6 chains on 4 devices and 5 on 8 are padded and dropped.
    for name, devices, chains in [("d1", 1, 8), ("d8", 8, 8), ("d4_c6", 4, 6)]:
        r = estimate(1, devices=devices, num_chains=chains)
        out[name] = {"trace": r.llc_trace, "devices": r.settings["devices"], "mesh": r.settings["mesh"],
                     "llc_mean": r.llc_mean, "llc_se": r.llc_se}
    out["d1_seed2"] = {k: getattr(estimate(2, devices=1, num_chains=8), k) for k in ("llc_mean", "llc_se")}
    before = len(traces)
    r = estimate(1, devices=8, num_chains=5)
    out["d8_c5"] = {"trace": r.llc_trace, "per_chain": r.llc_per_chain}
    # Compile once: another point, key and step size on the same 8-device mesh.
    with warnings.catch_warnings():  # 100 burn-in steps from off the minimum: the run's check says it trends
        warnings.simplefilter("ignore", slt_jax.CalibrationWarning)
        slt_jax.estimate_llc(counted_loss, w_hat + 0.01, data, jax.random.key(9), devices=8, num_chains=8,
                             **(kw | {"step_size": 5e-4}))
    out["retraces"] = len(traces) - before

    # Progress: a bar on a terminal, none with progress=False (same compiled program).
    for flag in (True, False):
        sys.stderr, saved = _FakeTerminal(), sys.stderr
        try:
            estimate(1, devices=8, num_chains=8, progress=flag)
            out[f"progress_{flag}"] = sys.stderr.getvalue()
        finally:
            sys.stderr = saved

    # The chain axis is split: each device holds one chain's state.
    mesh8 = sharding.make_mesh(8)
    config = RunConfig(lambda w, b: jnp.sum(w**2) + 0.0 * jnp.mean(b), SGLD, 4, 1, "minibatch", 4, mesh8)
    inputs = ChainInputs(1e-3, LocalPosterior(jnp.zeros(3), 1.0, 1.0), Divergence(0.0, 1e9),
                         jnp.zeros((16, 1)), None)
    state, draws = run_chains(jax.random.key(0), config, inputs, num_chains=8, num_burnin=0, num_draws=10,
                              progress=False)
    position = state.kernel_state.position
    out["shards"] = [(str(s.device), s.data.shape) for s in position.addressable_shards]
    out["draws_shape"] = draws.batch_loss.shape

    # Data axis: 2 groups of chains × 4 data shards.
    mesh = sharding.make_mesh(8, data=4)

    def mlp_loss(w, batch):
        return jnp.mean(jnp.square(jnp.tanh(batch["x"] @ w[:3]) * w[3] - batch["y"]))

    w = jnp.array([0.3, -0.2, 0.5, 1.5])
    batch = {"x": data["x"][:64], "y": data["y"][:64]}
    shard_grad = jax.shard_map(
        jax.value_and_grad(lambda w, b: sharding.global_mean(mlp_loss(w, b), mesh)),
        mesh=mesh, in_specs=(P(), P(sharding.DATA)), out_specs=P(), check_vma=True)
    out["grad_sharded"] = jax.jit(shard_grad)(w, batch)
    out["grad_single"] = jax.value_and_grad(mlp_loss)(w, batch)
    # The wrong recipe — one shard's own loss, differentiated — is a type error, not a gradient.
    wrong = jax.shard_map(jax.value_and_grad(mlp_loss), mesh=mesh, in_specs=(P(), P(sharding.DATA)),
                          out_specs=P(), check_vma=True)
    try:
        jax.jit(wrong)(w, batch)
        out["wrong_recipe_error"] = None
    except Exception as e:  # the vma type check
        out["wrong_recipe_error"] = f"{type(e).__name__}: {e}"

    # Stratified minibatch: shard s draws its rows from its own block of 16 rows.
    rows = {"i": jnp.arange(64, dtype=jnp.float32)}
    draw = jax.shard_map(lambda k, d: sharding.minibatch(k, d, 16, mesh)[0]["i"], mesh=mesh,
                         in_specs=(P(), P(sharding.DATA)), out_specs=P(sharding.DATA), check_vma=True)
    out["stratified_rows"] = np.asarray(jax.jit(draw)(jax.random.key(3), rows))
    mean_of = jax.shard_map(
        lambda ks, d: jax.vmap(lambda k: sharding.global_mean(jnp.mean(sharding.minibatch(k, d, 16, mesh)[0]["i"]),
                                                              mesh))(ks),
        mesh=mesh, in_specs=(P(), P(sharding.DATA)), out_specs=P(), check_vma=True)
    out["minibatch_means"] = np.asarray(jax.jit(mean_of)(jax.random.split(jax.random.key(4), 4000), rows))

    for seed in (1, 2):
        r = estimate(seed, mesh=mesh, num_chains=8)
        out[f"data_seed{seed}"] = {"llc_mean": r.llc_mean, "llc_se": r.llc_se, "mesh": r.settings["mesh"]}

    errors = {}
    for name, call in {
        "rows": lambda: slt_jax.estimate_llc(
            loss_fn, w_hat, {"x": data["x"][:510], "y": data["y"][:510]}, jax.random.key(0), mesh=mesh,
            step_size=1e-3, localization=1.0, batch_size=64, progress=False),
        "batch": lambda: estimate(1, mesh=mesh, batch_size=66),
        "both": lambda: estimate(1, mesh=mesh, devices=8),
        "axes": lambda: estimate(1, mesh=jax.sharding.Mesh(np.array(jax.devices()), ("batch",))),
        "count": lambda: estimate(1, devices=9),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    with open(out_path, "wb") as f:
        pickle.dump(jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, out), f)


@pytest.fixture(scope="module")
def eight(on_devices):
    return on_devices(__file__, 8, "sharding")


def test_same_key_same_chains_on_1_4_and_8_devices(eight):
    one = eight["d1"]["trace"]
    assert one.shape == (8, NUM_DRAWS)
    np.testing.assert_allclose(eight["d8"]["trace"], one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eight["d4_c6"]["trace"], one[:6], rtol=1e-5, atol=1e-5)
    assert len(set(eight["d8"]["devices"])) == 8 and len(eight["d1"]["devices"]) == 1
    assert eight["d8"]["mesh"] == {"chains": 8} and eight["d4_c6"]["mesh"] == {"chains": 4}


def test_uneven_chains_are_padded_and_dropped(eight):
    r = eight["d8_c5"]
    assert r["trace"].shape == (5, NUM_DRAWS) and r["per_chain"].shape == (5,)
    np.testing.assert_allclose(r["trace"], eight["d1"]["trace"][:5], rtol=1e-5, atol=1e-5)


def test_chain_axis_is_split_over_the_eight_devices(eight):
    shards = eight["shards"]
    assert len(shards) == 8
    assert len({device for device, _ in shards}) == 8
    assert all(tuple(shape) == (1, 3) for _, shape in shards)
    assert tuple(eight["draws_shape"]) == (8, 10)


def test_sharded_run_compiles_once_for_many_points(eight):
    # 5 chains pad to the 8-chain program; a new point, key and step size reuse it too.
    assert eight["retraces"] == 0


def test_progress_bar_shows_and_can_be_silenced(eight):
    assert "sampling" in eight["progress_True"]
    assert eight["progress_False"] == ""


def test_data_sharded_gradient_equals_single_device_gradient(eight):
    (loss_s, grad_s), (loss_1, grad_1) = eight["grad_sharded"], eight["grad_single"]
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
    np.testing.assert_allclose(grad_s, grad_1, rtol=1e-5, atol=1e-6)
    assert np.abs(grad_1).min() > 1e-3  # a gradient that could be wrong in every coordinate
    assert eight["wrong_recipe_error"] is not None
    assert "varying" in eight["wrong_recipe_error"], eight["wrong_recipe_error"]


def test_stratified_minibatch_is_unbiased(eight):
    rows = eight["stratified_rows"]
    for shard in range(4):
        block = rows[4 * shard: 4 * shard + 4]
        assert np.all((block >= 16 * shard) & (block < 16 * shard + 16)), rows
    means = eight["minibatch_means"]
    # The mean of 4000 minibatch means vs the data mean 31.5: tolerance 4 standard errors,
    # the SE estimated from the 4000 draws themselves.
    assert abs(means.mean() - 31.5) < 4 * means.std(ddof=1) / math.sqrt(means.size)
    # Stratified draws vary less than uniform ones (variance of a uniform 16-row mean).
    assert means.var() < np.var(np.arange(64)) / 16


def test_data_mesh_estimate_agrees_with_one_device(eight):
    for seed, single in [(1, eight["d1"]), (2, eight["d1_seed2"])]:
        sharded = eight[f"data_seed{seed}"]
        assert sharded["mesh"] == {"chains": 2, "data": 4}
        # Different minibatches, same estimand: 4 standard errors of the difference.
        tolerance = 4 * math.hypot(sharded["llc_se"], single["llc_se"])
        assert abs(sharded["llc_mean"] - single["llc_mean"]) < tolerance, (sharded, single)


def test_bad_meshes_name_the_problem(eight):
    errors = eight["errors"]
    assert "510 rows" in errors["rows"] and "4 data shards" in errors["rows"]
    assert "batch_size=66" in errors["batch"]
    assert "either mesh or devices" in errors["both"]
    assert "'batch'" in errors["axes"]
    assert "devices=9" in errors["count"]


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"chains": 1}
    assert sharding.padded_num_chains(5, mesh) == 5
    with pytest.raises(ValueError, match="data=2 must be a positive divisor"):
        sharding.make_mesh(1, data=2)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        sharding.resolve_mesh("chains")


def test_fast_noise_is_a_16_bit_normal_with_unit_variance():
    """The fast path maps 16 random bits to c·√2·erf⁻¹((2k + 1)/2¹⁶ − 1): all 65,536 levels occur,
    symmetric about 0, with variance 1 exactly over the levels, CDF within 1.1·10⁻⁵ of the normal's."""
    draws = np.asarray(jax.jit(lambda k: normal(k, (4_000_001,), jnp.float32))(jax.random.key(11)), np.float64)
    levels = np.unique(draws)
    assert levels.size == 2**16
    np.testing.assert_allclose(levels, -levels[::-1], rtol=0, atol=1e-6)
    assert np.mean(levels**2) == pytest.approx(1.0, abs=1e-6)
    cdf = scipy.stats.norm.cdf(levels)
    steps = np.arange(levels.size)
    assert max(np.max(np.abs(cdf - steps / levels.size)), np.max(np.abs(cdf - (steps + 1) / levels.size))) < 1.1e-5
    # And the draws follow it: Kolmogorov–Smirnov against the normal at the 1e-4 level (the test's
    # own distance is ~1e-5, well below the KS critical value 0.0022 at 4M draws).
    assert scipy.stats.kstest(draws, "norm").pvalue > 1e-4


def test_fast_noise_is_standard_normal_and_per_key():
    n = 200_000
    draws = np.asarray(normal(jax.random.key(5), (n,), jnp.float32), np.float64)
    # Moments within 4 standard errors: SE(mean) = 1/√n, SE(var) = √(2/n), SE(kurtosis) = √(24/n).
    assert abs(draws.mean()) < 4 / math.sqrt(n)
    assert abs(draws.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(np.mean(draws**4) / draws.var() ** 2 - 3) < 4 * math.sqrt(24 / n)
    keys = jax.random.split(jax.random.key(6), 8)
    batched = jax.vmap(lambda k: normal(k, (5,), jnp.float32))(keys)
    np.testing.assert_array_equal(batched[3], normal(keys[3], (5,), jnp.float32))
    assert not np.allclose(batched[3], batched[4])


def test_fast_noise_depends_on_the_size_not_the_shape():
    # An even leading axis builds the draws in the leaf's shape, an odd one flat: the same values.
    key = jax.random.key(7)
    flat = np.asarray(normal(key, (60,), jnp.float32))
    for shape in [(4, 15), (3, 20), (6, 2, 5), (5, 3, 4)]:
        np.testing.assert_array_equal(np.asarray(normal(key, shape, jnp.float32)).ravel(), flat)
    odd = np.asarray(normal(key, (3, 5), jnp.float32)).ravel()  # an odd size: the flat path throughout
    np.testing.assert_array_equal(odd, np.asarray(normal(key, (15,), jnp.float32)))


def test_noise_falls_back_for_other_dtypes_and_impls():
    tree = {"a": jnp.zeros(4, jnp.bfloat16), "b": jnp.zeros((2, 2))}
    draws = tree_normal(jax.random.key(0), tree)
    assert draws["a"].dtype == jnp.bfloat16 and draws["b"].dtype == jnp.float32
    rbg = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(normal(rbg, (4,), jnp.float32), jax.random.normal(rbg, (4,)))


if __name__ == "__main__":
    _worker(sys.argv[1])
