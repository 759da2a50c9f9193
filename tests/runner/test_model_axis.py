"""The "model" mesh axis (slt_jax.runner.sharding.param_specs): each chain's parameters and
sampler state split over devices, the result that of one device to float rounding, and streamed
data on a data axis.

The multi-device checks run once, in a subprocess with 8 simulated CPU devices (this file run as
a script), as in test_sharding.py.
"""

import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slt_jax.runner import sharding

RUN = dict(step_size=1e-5, localization=1.0, num_chains=4, num_burnin=40, num_draws=40, batch_size=64)


def mlp(key, widths=(32, 512, 512, 4)):
    keys = jax.random.split(key, len(widths))
    return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, widths[:-1], widths[1:])]


def mlp_loss(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"][None])
    return jnp.mean(jnp.square(h @ params[-1]["w"] + params[-1]["b"][None] - batch["y"]))


def awkward(key):
    """Leaves the default rule cannot split evenly: odd sizes, a large odd matrix, a scalar."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"odd": jax.random.normal(k1, (131, 129)) / 40, "wide": jax.random.normal(k2, (3, 8192)) / 90,
            "vec": jax.random.normal(k3, (7,)), "scale": jnp.float32(0.5)}


def awkward_loss(params, batch):
    x = batch["x"]  # (B, 131)
    h = jnp.tanh(x @ params["odd"])[:, :3]  # (B, 3)
    out = (h @ params["wide"]).reshape(x.shape[0], -1, 8).mean(axis=1)  # (B, 8)
    return params["scale"] * jnp.mean(jnp.square(out[:, :7] * params["vec"][None] - batch["y"]))


def data_for(key, width, outputs, n=1024):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, width)), "y": jax.random.normal(ky, (n, outputs))}


def _device_bytes(tree):
    """Bytes of ``tree`` on each device."""
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[str(shard.device)] = out.get(str(shard.device), 0) + shard.data.nbytes
    return out


def _worker(out_path):
    import slt_jax
    from slt_jax.data import streaming
    from slt_jax.problem import make_problem
    from slt_jax.runner.chains import run_chains, setup
    from slt_jax.samplers import get_kernel
    from slt_jax.settings import RunSettings

    import warnings

    warnings.simplefilter("error")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == 8
    out = {}
    run = RunSettings(**{k: v for k, v in RUN.items() if k in ("num_chains", "num_burnin", "num_draws", "batch_size")})

    def final_state(loss_fn, params, data, mesh, sampler="sgld", specs=None):
        problem = make_problem(loss_fn, params, data, localization=1.0, mesh=mesh, param_specs=specs, run=run)
        config, inputs = setup(problem, get_kernel(sampler), run, RUN["step_size"])
        state, draws = run_chains(jax.random.key(3), config, inputs, num_chains=run.num_chains,
                                  num_burnin=run.num_burnin, num_draws=run.num_draws, progress=False)
        return problem, state, draws

    cases = {"mlp": (mlp_loss, mlp(jax.random.key(0)), data_for(jax.random.key(1), 32, 4), "sgld"),
             "awkward": (awkward_loss, awkward(jax.random.key(0)), data_for(jax.random.key(1), 131, 7), "sgnht")}
    for name, (loss_fn, params, data, sampler) in cases.items():
        _, _, one = final_state(loss_fn, params, data, slt_jax.make_mesh(1), sampler)
        problem, state, split = final_state(loss_fn, params, data, slt_jax.make_mesh(8, model=2), sampler)
        out[name] = {
            "one": one.batch_loss, "split": split.batch_loss, "specs": [str(s) for s in problem.param_specs.specs],
            "state_specs": [str(x.sharding.spec) for x in jax.tree.leaves(state.kernel_state)],
            "position_bytes": _device_bytes(state.kernel_state.position),  # one chain per model group
            "chain_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
            "mesh": dict(problem.mesh.shape)}
    # A user's layout: the MLP's first kernel split on its input dimension, nothing else.
    specs = [{"w": P("model", None), "b": None}, {"w": None, "b": None}, {"w": None, "b": None}]
    problem, _, draws = final_state(mlp_loss, mlp(jax.random.key(0)), data_for(jax.random.key(1), 32, 4),
                                    slt_jax.make_mesh(8, model=2), specs=specs)
    out["user_specs"] = {"specs": [str(s) for s in problem.param_specs.specs], "loss": draws.batch_loss}

    # Streamed data on a mesh with a data axis: the draws of the data on device, shard by shard.
    x = np.random.default_rng(0).normal(size=(1024, 3)).astype(np.float32)
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
    linear = lambda w, batch: 0.5 * jnp.mean(jnp.square(batch["x"] @ w - batch["y"]))
    kw = dict(step_size=1e-4, localization=1.0, num_chains=4, num_burnin=40, num_draws=40, batch_size=64,
              mesh=slt_jax.make_mesh(8, data=2), progress=False)
    w = jnp.array([1.0, -2.0, 0.5])
    on_device = slt_jax.estimate_llc(linear, w, data, jax.random.key(4), **kw)
    streamed = slt_jax.estimate_llc(linear, w, streaming.streamed(data), jax.random.key(4), **kw)
    out["stream_data_axis"] = (on_device.llc_trace, streamed.llc_trace, streamed.settings["mesh"])

    errors = {}
    for key, call in {
        "indivisible": lambda: sharding.param_specs({"a": jnp.zeros((3, 5))}, slt_jax.make_mesh(8, model=2),
                                                    {"a": P("model", None)}),
        "axis": lambda: sharding.param_specs({"a": jnp.zeros((4, 4))}, slt_jax.make_mesh(8, model=2),
                                             {"a": P("chains", None)}),
        "explicit": lambda: sharding.resolve_mesh(jax.make_mesh((4, 2), ("chains", "model"))),
    }.items():
        try:
            call()
            errors[key] = None
        except ValueError as error:
            errors[key] = str(error)
    out["errors"] = errors
    with open(out_path, "wb") as f:
        pickle.dump(jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, out), f)


@pytest.fixture(scope="module")
def eight(on_devices):
    return on_devices(__file__, 8, "model_axis", timeout=900)


def test_model_axis_equals_one_device_for_an_mlp(eight):
    r = eight["mlp"]
    assert r["mesh"] == {"chains": 4, "model": 2}
    # Leaves in tree order (each layer's "b", then "w"): the two large kernels are split.
    assert r["specs"] == ["P()", "P(None, 'model')", "P()", "P('model',)", "P()", "P()"]
    np.testing.assert_allclose(r["split"], r["one"], rtol=1e-5, atol=1e-6)


def test_parameter_bytes_per_device_halve(eight):
    r = eight["mlp"]
    # One chain per group of 2 model devices: each device holds half of the two large kernels
    # (99 % of the parameters) and all of the rest.
    per_device = r["position_bytes"]
    assert len(per_device) == 8
    assert max(per_device.values()) < 0.51 * r["chain_bytes"], (per_device, r["chain_bytes"])


def test_awkward_leaves_are_replicated_and_the_result_still_agrees(eight):
    r = eight["awkward"]
    # "odd" (131 × 129) and "vec" divide by nothing; "wide" splits its 8192 columns; the scalar stays.
    assert r["specs"] == ["P()", "P()", "P()", "P(None, 'model')"]
    # SGNHT's momentum follows the position's layout; its thermostat is per chain.
    assert r["state_specs"].count("P('chains', None, 'model')") == 2, r["state_specs"]
    np.testing.assert_allclose(r["split"], r["one"], rtol=1e-5, atol=1e-6)


def test_a_user_layout_is_used_as_given(eight):
    r = eight["user_specs"]
    assert r["specs"] == ["P()", "P('model', None)", "P()", "P()", "P()", "P()"]
    np.testing.assert_allclose(r["loss"], eight["mlp"]["one"], rtol=1e-5, atol=1e-6)


def test_streamed_data_on_a_data_axis_gives_the_draws_of_the_data_on_device(eight):
    on_device, streamed, mesh = eight["stream_data_axis"]
    assert mesh == {"chains": 4, "data": 2}
    np.testing.assert_allclose(streamed, on_device, rtol=1e-6, atol=1e-6)


def test_bad_layouts_name_the_leaf(eight):
    errors = eight["errors"]
    assert "param_specs['a']" in errors["indivisible"] and "do not divide" in errors["indivisible"]
    assert "may name only 'model'" in errors["axis"]
    assert "Explicit" in errors["explicit"]


@pytest.mark.unit
def test_default_rule():
    assert sharding.model_spec((512, 1024), 2) == P(None, "model")
    assert sharding.model_spec((1024, 1024), 2) == P("model")
    assert sharding.model_spec((1023, 1025), 2) == P()
    assert sharding.model_spec((64, 64), 2) == P()  # below MIN_SHARDED_ELEMENTS
    assert sharding.model_spec((64, 64), 2, min_elements=1) == P("model")
    assert sharding.model_spec((3, 8192), 4) == P(None, "model")
    assert sharding.model_spec((8192,), 1) == P()


if __name__ == "__main__":
    _worker(sys.argv[1])
