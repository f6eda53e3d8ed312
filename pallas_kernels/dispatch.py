"""Kernel sets by name. "xla" is the plain-JAX references; "pallas" the fused kernels. A student's `kernel`
picks one set for every edge operation of its energy: the cfconv of each SchNet layer, PaiNN's message
(`directional_cfconv`) and the edge vectors' difference (whose transpose is the position gradient).

    cfconv(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff, kernel="xla")
    directional_cfconv(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params, *,
                       cutoff, kernel="xla")
    edge_difference(values, senders, receivers, edge_mask, *, kernel="xla")

directional_cfconv's vectors may be None, meaning all zero (PaiNN's first layer): every set then leaves their
term out, and the Pallas kernels do not read those rows.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from pallas_kernels.cfconv.reference import cfconv_reference
from pallas_kernels.directional_cfconv.reference import directional_cfconv_reference
from pallas_kernels.edge_difference.reference import edge_difference_reference


class Kernels(NamedTuple):
    """One implementation of each edge operation, each with exactly its reference's signature."""

    cfconv: Callable
    edge_difference: Callable
    directional_cfconv: Callable


def _on_cpu(config) -> bool:
    """On a CPU backend the Pallas set is the reference (the same numbers): a student trained with
    kernel="pallas" on a GPU runs at full speed on a laptop, not in Pallas' interpreter. A config with
    interpret=True runs the kernels in the interpreter anyway (the tests do)."""
    return jax.default_backend() == "cpu" and not (config is not None and config.interpret)


# The Pallas wrappers import on first use: Pallas' Triton pieces stay out of plain CPU imports. Both take
# distiller's neighbour lists as they are: real edges sorted by receiver and before the padding, closed
# under reversal (tests/test_neighbours.py checks that layout). The graph is built per call; inside one jit
# XLA computes the identical graphs of all layers and of the edge vectors once.

def _neighbour_list_graph(senders, receivers, edge_mask, n_atoms: int):
    from pallas_kernels.edges.graph import edge_graph

    return edge_graph(senders, receivers, edge_mask, n_atoms, sorted_by_receiver=True)


def _pallas_cfconv(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff, config=None):
    if _on_cpu(config):
        return cfconv_reference(features, lengths, senders, receivers, edge_mask, filter_params, cutoff=cutoff)
    from pallas_kernels.cfconv.pallas import cfconv_pallas

    return cfconv_pallas(features, lengths, senders, receivers, edge_mask, filter_params, cutoff=cutoff,
                         graph=_neighbour_list_graph(senders, receivers, edge_mask, features.shape[0]),
                         config=config, symmetric=True)


def _pallas_directional_cfconv(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params,
                               *, cutoff, config=None):
    args = (scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params)
    if _on_cpu(config):
        return directional_cfconv_reference(*args, cutoff=cutoff)
    from pallas_kernels.directional_cfconv.pallas import directional_cfconv_pallas

    return directional_cfconv_pallas(*args, cutoff=cutoff, config=config,
                                     graph=_neighbour_list_graph(senders, receivers, edge_mask, scalars.shape[0]))


def _pallas_edge_difference(values, senders, receivers, edge_mask, *, config=None):
    if _on_cpu(config):
        return edge_difference_reference(values, senders, receivers, edge_mask)
    from pallas_kernels.edge_difference.pallas import edge_difference_pallas

    return edge_difference_pallas(values, senders, receivers, edge_mask, config=config,
                                  graph=_neighbour_list_graph(senders, receivers, edge_mask, values.shape[0]))


def pallas_set(config=None) -> Kernels:
    """The Pallas set launched with `config` (a `PallasConfig`; None: the tuned defaults)."""
    return Kernels(functools.partial(_pallas_cfconv, config=config),
                   functools.partial(_pallas_edge_difference, config=config),
                   functools.partial(_pallas_directional_cfconv, config=config))


KERNELS = {"xla": Kernels(cfconv_reference, edge_difference_reference, directional_cfconv_reference),
           "pallas": pallas_set()}


def check_kernel(name: str) -> str:
    """Return `name` if a kernel set is registered under it; ValueError otherwise."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel set {name!r}; available: {', '.join(sorted(KERNELS))}")
    return name


def cfconv(features: jax.Array, lengths: jax.Array, senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array,
           filter_params: dict, *, cutoff: float, kernel: str = "xla") -> jax.Array:
    """`cfconv_reference`'s computation (see its docstring), done by the kernel set named `kernel`."""
    return KERNELS[check_kernel(kernel)].cfconv(features, lengths, senders, receivers, edge_mask, filter_params,
                                                cutoff=cutoff)


def directional_cfconv(scalars: jax.Array, vectors: jax.Array | None, along: jax.Array, edge_vectors: jax.Array,
                       senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array, filter_params: dict, *,
                       cutoff: float, kernel: str = "xla") -> tuple[jax.Array, jax.Array]:
    """`directional_cfconv_reference`'s computation (see its docstring), done by the kernel set named `kernel`."""
    return KERNELS[check_kernel(kernel)].directional_cfconv(scalars, vectors, along, edge_vectors, senders, receivers,
                                                            edge_mask, filter_params, cutoff=cutoff)


def edge_difference(values: jax.Array, senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array, *,
                    kernel: str = "xla") -> jax.Array:
    """`edge_difference_reference`'s computation (see its docstring), done by the kernel set named `kernel`."""
    return KERNELS[check_kernel(kernel)].edge_difference(values, senders, receivers, edge_mask)
