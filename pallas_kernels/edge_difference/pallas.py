"""The edge difference whose transpose is a fused Pallas pass: per-atom sums over the CSR walks, no atomics.

    edge_difference_pallas(values, senders, receivers, edge_mask, *, graph=None, config=None) -> (E, D)

Computes `reference.edge_difference_reference`. Forwards it is a gather, which XLA does well. Its VJP sums
the edge cotangents into atoms, + over each atom's edges as sender (the sender walk) and - over its edges as
receiver (the receiver walk), each program writing only its own atoms' rows (`edges.edge_op`). That pass is
an EdgeOp, so its own VJP, which training on forces differentiates, is edge_op's generic one: the gather
difference again, as a kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.edge_difference.reference import edge_difference_reference
from pallas_kernels.edges.edge_op import EdgeOp, Launch, PallasConfig, apply, block_size
from pallas_kernels.edges.graph import EdgeGraph, graph_for


@dataclasses.dataclass(frozen=True)
class EdgeSumBody:
    """Per edge: its D cotangents as one row (zero-padded to `width` columns), + at the sender, - at the receiver.

    Edges (D per-edge scalars); node outputs (summed into the sender, summed into the receiver).
    """

    width: int  # a power of two >= 16: Triton's one-hot reduction is a dot with this many columns

    def __call__(self, glob, nodes, edges, valid, want):
        del glob, nodes, valid  # the kernel masks per-edge node outputs itself
        columns = jnp.arange(self.width, dtype=jnp.int32)[None, :]
        row = sum(jnp.where(columns == d, e[:, None], 0.0) for d, e in enumerate(edges))
        at_sender, at_receiver = want[0]
        return (row if at_sender else None, -row if at_receiver else None), (), ()


@functools.lru_cache(maxsize=None)
def _difference(n_columns: int, launch: Launch):
    """custom_vjp function (graph, senders, receivers, values) -> (E, D) with the fused transpose."""
    op = EdgeOp(EdgeSumBody(block_size(n_columns)), node_sides=(), out_sides=("s", "r"), n_glob=0,
                n_edge=n_columns, n_edge_out=0, n_glob_out=0)

    @jax.custom_vjp
    def difference(graph, senders, receivers, values):
        return edge_difference_reference(values, senders, receivers, graph.edge_mask)

    def fwd(graph, senders, receivers, values):
        return difference(graph, senders, receivers, values), graph  # linear: no values kept

    def bwd(graph, ct):
        (at_senders, at_receivers), _, _ = apply(op, launch, graph, (), (), tuple(ct[:, d] for d in range(n_columns)))
        return None, None, None, (at_senders + at_receivers)[:, :n_columns]

    difference.defvjp(fwd, bwd)
    return difference


def edge_difference_pallas(values: jax.Array, senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array, *,
                           graph: EdgeGraph | None = None, config: PallasConfig | None = None) -> jax.Array:
    """`edge_difference_reference` (same arguments, same result) with its transpose as fused Pallas passes.

    graph: `edge_graph(senders, receivers, edge_mask, n_atoms)` of this edge list, shared with the other
      kernels of the same step; built here when None. The transpose walks both orders, so it needs the
      sender order's sort unless another kernel of the program already asked for it.
    config: launch settings (`PallasConfig`); None uses the defaults.
    """
    n_atoms, n_columns = values.shape
    config = PallasConfig() if config is None else config
    if senders.shape != receivers.shape or senders.shape != edge_mask.shape or senders.ndim != 1:
        raise ValueError(f"senders {senders.shape}, receivers {receivers.shape} and edge_mask {edge_mask.shape} "
                         "must be equal-length vectors")
    graph = graph_for(graph, senders, receivers, edge_mask, n_atoms)
    return _difference(n_columns, config.launch())(graph, senders, receivers, values)
