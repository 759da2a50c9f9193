"""Streamed data (slt_jax.data.streaming): a memmap on the host gives the draws — and the per-chain
λ̂ — of the same array on device, and the device never holds the whole dataset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax.data import streaming
from slt_jax.data.batches import full_batch_loss

N, D = 4096, 8
RUN = dict(step_size=1e-4, localization=1.0, num_chains=4, num_burnin=60, num_draws=60, batch_size=64,
           progress=False)


def _loss(w, batch):
    return 0.5 * jnp.mean(jnp.square(jnp.tanh(batch["x"] @ w["a"]) @ w["b"] - batch["y"]))


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A small tanh regression, its data in memory and as memmaps of the same values."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = {"a": (rng.normal(size=(D, 16)) / 3).astype(np.float32), "b": (rng.normal(size=(16,)) / 4).astype(np.float32)}
    y = (np.tanh(x @ w["a"]) @ w["b"]).astype(np.float32)
    directory = tmp_path_factory.mktemp("memmap")
    mapped = {}
    for name, array in (("x", x), ("y", y)):
        np.save(directory / f"{name}.npy", array)
        mapped[name] = np.load(directory / f"{name}.npy", mmap_mode="r")
    return w, {"x": x, "y": y}, mapped


def test_a_memmap_gives_the_draws_of_the_array_on_device(problem):
    w, data, mapped = problem
    on_device = slt_jax.estimate_llc(_loss, w, data, jax.random.key(1), **RUN)
    streamed = slt_jax.estimate_llc(_loss, w, streaming.streamed(mapped), jax.random.key(1), **RUN)
    assert isinstance(mapped["x"], np.memmap)
    np.testing.assert_allclose(streamed.llc_per_chain, on_device.llc_per_chain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.llc_trace, on_device.llc_trace, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.init_loss, on_device.init_loss, rtol=1e-6)
    assert streamed.settings["streamed"] and not on_device.settings["streamed"]


def test_the_streamed_pass_is_the_full_batch_loss(problem):
    w, data, mapped = problem
    w = jax.tree.map(lambda x: x + 0.05, w)  # off the teacher: a loss well above rounding
    for batch_size, chunk_bytes in ((64, 3000), (100, 10_000), (N, 2**20)):  # blocks of 1, 2 or all batches
        exact = full_batch_loss(_loss, w, data, batch_size)
        passed = streaming.full_batch_loss(_loss, w, streaming.streamed(mapped, chunk_bytes=chunk_bytes), batch_size,
                                           jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        np.testing.assert_allclose(passed.mean, exact.mean, rtol=1e-6)
        np.testing.assert_allclose(passed.batch_std, exact.batch_std, rtol=1e-4, atol=1e-9)


def test_the_device_never_holds_the_whole_dataset(problem, monkeypatch):
    w, data, mapped = problem
    dataset = sum(a.nbytes for a in data.values())
    budget = dataset // 16
    sizes = []

    def spy(name):
        original = getattr(jax, name)

        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            sizes.extend((x.shape, x.nbytes) for x in jax.tree.leaves(out) if hasattr(x, "nbytes"))
            return out

        monkeypatch.setattr(jax, name, recorded)

    for name in ("device_put", "make_array_from_callback", "make_array_from_process_local_data"):
        spy(name)
    before = {id(x) for x in jax.live_arrays()}  # other tests' arrays may still be alive
    result = slt_jax.estimate_llc(_loss, w, streaming.streamed(mapped, chunk_bytes=budget), jax.random.key(1), **RUN)
    assert np.all(np.isfinite(result.llc_per_chain))
    # Rows reach the device a chunk at a time; the one array of n entries is the control
    # variate's table, one float per row (here 1/9 of the dataset's 9 floats per row).
    assert result.settings["control_variate"]["method"] == "table"
    rows = [nbytes for shape, nbytes in sizes if shape != (N,)]
    assert rows and max(rows) <= budget < dataset, (max(rows), budget, dataset)
    assert {nbytes for shape, nbytes in sizes if shape == (N,)} == {4 * N}
    assert all(x.nbytes < dataset for x in jax.live_arrays() if id(x) not in before)


@pytest.mark.slow
def test_calibrate_on_streamed_data_chooses_what_it_chooses_in_memory(problem):
    w, data, mapped = problem
    kw = dict(localization=1.0, num_chains=2, num_steps=400, min_window_draws=10, mala=False, batch_size=64,
              progress=False)
    on_device = slt_jax.calibrate(_loss, w, data, jax.random.key(2), **kw)
    streamed = slt_jax.calibrate(_loss, w, streaming.streamed(mapped), jax.random.key(2), **kw)
    np.testing.assert_allclose(streamed.step_sizes, on_device.step_sizes, rtol=1e-6)
    np.testing.assert_allclose(streamed.llc_mean, on_device.llc_mean, rtol=1e-5)


@pytest.mark.unit
def test_what_cannot_stream_says_so(problem):
    w, data, mapped = problem
    source = streaming.streamed(mapped)
    with pytest.raises(ValueError, match="full_batch"):
        slt_jax.estimate_llc(_loss, w, source, jax.random.key(0), **(RUN | {"loss_estimator": "full_batch"}))
    with pytest.raises(ValueError, match="mala=True needs the whole dataset"):
        slt_jax.estimate_llc(_loss, w, source, jax.random.key(0), mala=True, **RUN)
    with pytest.raises(ValueError, match="eval_data cannot be streamed"):
        slt_jax.estimate_llc(_loss, w, data, jax.random.key(0), eval_data=source, **RUN)
    with pytest.raises(ValueError, match="already on a device"):
        streaming.streamed({"x": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="leading row axis"):
        streaming.streamed({"x": np.float32(1.0)})
