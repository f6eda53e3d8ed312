"""Choose a cfconv implementation by name: "xla" is the plain-JAX reference; kernels register beside it."""

from __future__ import annotations

import jax

from pallas_kernels.cfconv.reference import cfconv_reference


def _pallas(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff, config=None):
    """The fused kernels for distiller's neighbour lists: real edges sorted by receiver and before the padding,
    closed under reversal (tests/test_neighbours.py checks that layout). Energy and forces then need no sort
    at all; `cfconv_pallas` itself takes any edge list.

    On a CPU backend this is the reference (the same numbers): a student trained with kernel="pallas" on a GPU
    runs at full speed on a laptop, not in Pallas' interpreter. A `config` with interpret=True runs the
    kernels in the interpreter anyway (the tests do).
    """
    if jax.default_backend() == "cpu" and not (config is not None and config.interpret):
        return cfconv_reference(features, lengths, senders, receivers, edge_mask, filter_params, cutoff=cutoff)
    # Imported on first use: Pallas' Triton pieces stay out of plain CPU imports.
    from pallas_kernels.cfconv.graph import edge_graph
    from pallas_kernels.cfconv.pallas import cfconv_pallas

    # Built per layer; inside one jit XLA computes the identical graphs of the layers once.
    graph = edge_graph(senders, receivers, edge_mask, features.shape[0], sorted_by_receiver=True)
    return cfconv_pallas(features, lengths, senders, receivers, edge_mask, filter_params, cutoff=cutoff,
                         graph=graph, config=config, symmetric=True)


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
