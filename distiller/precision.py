"""Full float32 precision for the matrix products distiller computes.

On GPUs, XLA runs float32 matrix products as TF32 by default: inputs rounded to a 10-bit mantissa, a relative
error of ~5e-4. For geometry that is ~0.01 Å on a 20 Å cell vector, and JAX-MD's periodic shift (positions →
fractional coordinates → wrapped → back) takes that error at every step. Measured on an H200: ANI-1x NVE MD of
waterbox (1500 atoms, dt 0.5 fs) heated from 300 K to 3675 K in 0.5 ps under the default (drift 1576
meV/atom/ps), and held its energy with full float32 everywhere (JAX_DEFAULT_MATMUL_PRECISION=highest: drift
-0.34 meV/atom/ps, 346 K after 0.5 ps). Labels and forces in training lose accuracy the same way.

distiller does not change the process-wide default (it is the caller's); it asks for full precision where it
computes: `HIGHEST` on its own geometric products, `full_precision` around models and JAX-MD's functions.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

HIGHEST = jax.lax.Precision.HIGHEST

F = TypeVar("F", bound=Callable)


def full_precision_scope():
    """A context in which every float32 matrix product traced (and its gradient) is full float32."""
    return jax.default_matmul_precision("highest")


def full_precision(fn: F) -> F:
    """`fn` traced inside `full_precision_scope`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with full_precision_scope():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
