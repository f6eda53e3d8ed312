"""The edge list in the two orders the fused kernels walk it: grouped by receiver and grouped by sender.

A kernel pass walks the atoms; atom i owns the contiguous run offsets[i]:offsets[i+1] of an edge order and
reduces that run into its own row, so no pass needs atomics and every sum is deterministic. The forward
pass and every cotangent that lands on receivers walk the receiver order; cotangents that land on senders
(the transpose: gather <-> scatter) walk the sender order. Padding edges (edge_mask False) sort past the
last atom, so no pass ever visits them.

Both orders cost a sort of E keys: build an `EdgeGraph` once per neighbour-list update and pass it to every
layer (`cfconv_pallas(..., graph=...)`). The kernel's reference-signature entry point builds it itself when
not given one; inside one jit, XLA merges the identical sorts of the layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class EdgeOrder(NamedTuple):
    """One walk over the real edges: atom i owns positions offsets[i]:offsets[i+1] of `perm`."""

    offsets: jax.Array  # (A + 1,) int32; offsets[A] = number of real edges
    perm: jax.Array  # (E,) int32: canonical edge id at each position (padding edges at the end)
    other: jax.Array  # (E,) int32: the atom at the far end of that edge (sender in the receiver order)


class EdgeGraph(NamedTuple):
    """A padded edge list in both orders (a pytree of int/bool arrays; not differentiable)."""

    edge_mask: jax.Array  # (E,) bool, in the caller's (canonical) edge order
    by_receiver: EdgeOrder
    by_sender: EdgeOrder

    @property
    def n_atoms(self) -> int:
        return self.by_receiver.offsets.shape[0] - 1

    @property
    def n_edges(self) -> int:
        return self.edge_mask.shape[0]


def csr_offsets(keys: jax.Array, n_atoms: int) -> jax.Array:
    """(A + 1,) int32: atom i's edges are positions offsets[i]:offsets[i+1] of `keys`, which must be sorted
    ascending with padding edges keyed n_atoms; offsets[A] = number of real edges.

    Each run's first position is written at its key and every atom without edges takes the next run's start
    (a reversed running minimum): no atomics. (Counting edges per atom with a scatter-add had every lane of a
    warp add to the same atom, sorted keys being the worst case for atomics: 127 us at 12k atoms on the H200.)
    """
    n = keys.shape[0]
    starts = jnp.concatenate([jnp.ones((min(n, 1),), bool), keys[1:] != keys[:-1]])
    at = jnp.where(starts, keys, n_atoms + 1)  # out of range: dropped
    offsets = jnp.full((n_atoms + 1,), n, jnp.int32).at[at].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return jax.lax.cummin(offsets, axis=0, reverse=True)


def edge_order(centres: jax.Array, far: jax.Array, edge_mask: jax.Array, n_atoms: int) -> EdgeOrder:
    """Group edges by `centres` (stable, so an already sorted list keeps its order); padding last."""
    key = jnp.where(edge_mask, centres, n_atoms).astype(jnp.int32)
    # One stable key-value sort (a radix sort on GPU) gives the sorted keys and the permutation together.
    key, perm = jax.lax.sort((key, jnp.arange(key.shape[0], dtype=jnp.int32)), num_keys=1, is_stable=True)
    return EdgeOrder(csr_offsets(key, n_atoms), perm, far[perm].astype(jnp.int32))


def edge_graph(senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array, n_atoms: int, *,
               sorted_by_receiver: bool = False) -> EdgeGraph:
    """Both walks of an edge list in any order (jittable; `n_atoms` static). Call once per neighbour update.

    sorted_by_receiver: the caller promises that the real edges are sorted by receiver and come before every
      padding edge (distiller's neighbour lists are built so, tests/test_neighbours.py checks it): the
      receiver walk is then the list itself and costs no sort. A broken promise gives wrong sums.

    Raises ValueError when the index arrays disagree in length; out-of-range indices on real edges are the
    caller's bug (as for `jax.ops.segment_sum`), padding edges may hold anything.
    """
    senders, receivers, edge_mask = jnp.asarray(senders), jnp.asarray(receivers), jnp.asarray(edge_mask, bool)
    if not senders.shape == receivers.shape == edge_mask.shape or senders.ndim != 1:
        raise ValueError(f"senders {senders.shape}, receivers {receivers.shape} and edge_mask {edge_mask.shape} "
                         "must be equal-length vectors")
    # Padding edges may point anywhere (even out of range): clamp them so every gather stays in bounds.
    senders = jnp.where(edge_mask, senders, 0)
    receivers = jnp.where(edge_mask, receivers, 0)
    if sorted_by_receiver:
        by_receiver = EdgeOrder(csr_offsets(jnp.where(edge_mask, receivers, n_atoms).astype(jnp.int32), n_atoms),
                                jnp.arange(edge_mask.shape[0], dtype=jnp.int32), senders.astype(jnp.int32))
    else:
        by_receiver = edge_order(receivers, senders, edge_mask, n_atoms)
    # In a program whose passes never walk the sender order (energy and forces through the symmetric
    # transpose, see pallas.py), XLA drops this sort as dead code.
    return EdgeGraph(edge_mask, by_receiver=by_receiver, by_sender=edge_order(senders, receivers, edge_mask, n_atoms))


def graph_for(graph: EdgeGraph | None, senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array,
              n_atoms: int) -> EdgeGraph:
    """A kernel's graph: the one the caller built (checked to fit its inputs: ValueError otherwise), or one
    built here from the edge list in any order when `graph` is None."""
    if graph is None:
        return edge_graph(senders, receivers, edge_mask, n_atoms)
    if graph.n_atoms != n_atoms or graph.n_edges != edge_mask.shape[0]:
        raise ValueError(f"graph is for {graph.n_atoms} atoms and {graph.n_edges} edges, the inputs have "
                         f"{n_atoms} and {edge_mask.shape[0]}")
    return graph
