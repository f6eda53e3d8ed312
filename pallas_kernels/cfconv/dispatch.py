"""Choose a cfconv implementation by name: "xla" is the plain-JAX reference; kernels register beside it."""

from __future__ import annotations

import jax

from pallas_kernels.cfconv.reference import cfconv_reference


def _pallas(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff):
    # Imported on first use: Pallas' Triton pieces stay out of plain CPU imports.
    from pallas_kernels.cfconv.pallas import cfconv_pallas

    return cfconv_pallas(features, lengths, senders, receivers, edge_mask, filter_params, cutoff=cutoff)


# name -> implementation with exactly cfconv_reference's signature. A kernel that imports GPU-only
# modules should register a small wrapper that imports them on first call, so CPU imports keep working.
KERNELS = {"xla": cfconv_reference, "pallas": _pallas}


def check_kernel(name: str) -> str:
    """Return `name` if a cfconv implementation is registered under it; ValueError otherwise."""
    if name not in KERNELS:
        raise ValueError(f"unknown cfconv kernel {name!r}; available: {', '.join(sorted(KERNELS))}")
    return name


def cfconv(features: jax.Array, lengths: jax.Array, senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array,
           filter_params: dict, *, cutoff: float, kernel: str = "xla") -> jax.Array:
    """`cfconv_reference`'s computation (see its docstring), done by the implementation named `kernel`."""
    return KERNELS[check_kernel(kernel)](features, lengths, senders, receivers, edge_mask, filter_params,
                                         cutoff=cutoff)
