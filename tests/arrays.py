"""Array comparisons the kernel tests share."""

import jax
import numpy as np


def assert_close(actual, desired, rtol=2e-5):
    """Every leaf of `actual` finite and within rtol x (the largest |leaf| of `desired`) of `desired`'s."""
    actual, desired = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert len(actual) == len(desired)
    for a, d in zip(actual, desired):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        assert a.shape == d.shape and np.all(np.isfinite(a))
        np.testing.assert_allclose(a, d, rtol=0, atol=rtol * max(np.abs(d).max(), 1e-30))
