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
