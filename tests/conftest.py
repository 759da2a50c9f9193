"""Strict, deterministic test setup (after equinox's tests/conftest.py).

Tests run on the single default CPU device; tests that need several devices start a
subprocess with XLA_FLAGS set, so the rest of the suite keeps its device count.
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)



@pytest.fixture(scope="session")
def on_devices(tmp_path_factory):
    """``on_devices(script, count, name, timeout=600)``: run the test module ``script`` as a fresh
    process with ``count`` simulated CPU devices (its ``__main__`` calls ``_worker(out_path)``,
    which pickles what it measured) and return what it pickled; the process's stderr tail is the
    failure message. The rest of the suite keeps its one device."""
    import os
    import pickle
    import subprocess
    import sys

    def run(script, count: int, name: str, timeout: float = 600):
        path = tmp_path_factory.mktemp(name) / "results.pkl"
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, script, str(path)], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(path, "rb") as f:
            return pickle.load(f)

    return run
