"""Same key ⇒ same Bayesian influence and susceptibilities on 1 and 8 devices.

Runs once, in a subprocess with 8 simulated CPU devices (this file run as a script), like
tests/runner/test_sharding.py: chains are split over the devices' "chains" axis, and chain i
draws from fold_in(key, i) alone, so the moments — and every estimate made of them — agree to
float rounding (XLA may fuse a vmap over one chain differently from one over eight).
"""

import pickle
import sys

import numpy as np
import pytest

RUN = dict(step_size=0.01, localization=1.0, num_chains=8, num_burnin=50, num_draws=100, batch_size=16,
           chunk_size=64, progress=False)


def _worker(out_path):
    import warnings

    warnings.simplefilter("error")
    import jax
    import jax.numpy as jnp

    import slt_jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(64)}
    query = {"x": rng.standard_normal((5, 3)), "y": rng.standard_normal(5)}
    w = jnp.asarray(np.linalg.lstsq(x, data["y"], rcond=None)[0], jnp.float32)
    loss = lambda w, b: 0.5 * jnp.mean(jnp.square(b["y"] - b["x"] @ w))
    out = {}
    for devices in (1, 8):
        bif = slt_jax.bayesian_influence(loss, w, data, jax.random.key(3), query_data=query, train_rows=np.arange(10),
                                         devices=devices, **RUN)
        sus = slt_jax.susceptibilities(loss, w, data, jax.random.key(3), shifts={"q": query},
                                       components={"model": None, "w0": np.array([True, False, False])},
                                       devices=devices, **RUN)
        out[devices] = {"bif": bif.covariance, "bif_se": bif.se, "chi": sus.chi, "chi_se": sus.se,
                        "contributions": sus.contributions["q"], "devices": len(set(bif.settings["devices"])),
                        "llc": sus.llc_mean}
    with open(out_path, "wb") as f:
        pickle.dump(out, f)


@pytest.fixture(scope="module")
def runs(on_devices):
    return on_devices(__file__, 8, "observables_sharding")


def test_same_key_same_influence_and_susceptibilities_on_1_and_8_devices(runs):
    one, eight = runs[1], runs[8]
    assert one["devices"] == 1 and eight["devices"] == 8
    for name in ("bif", "bif_se", "chi", "chi_se", "contributions", "llc"):
        scale = np.abs(one[name]).max()
        np.testing.assert_allclose(eight[name], one[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


if __name__ == "__main__":
    _worker(sys.argv[1])
