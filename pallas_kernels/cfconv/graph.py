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


def csr_offsets(receivers: jax.Array, edge_mask: jax.Array, n_atoms: int) -> jax.Array:
    """(A + 1,) int32: atom i's edges are positions offsets[i]:offsets[i+1] once grouped by receiver.

    Counts, then a prefix sum: no sort and no loop (a binary search lowers to a device loop that syncs with
    the host every round on GPU). Padding edges are not counted.
    """
    counts = jnp.zeros((n_atoms,), jnp.int32).at[receivers].add(edge_mask.astype(jnp.int32), mode="drop")
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def edge_order(centres: jax.Array, far: jax.Array, edge_mask: jax.Array, n_atoms: int) -> EdgeOrder:
    """Group edges by `centres` (stable, so an already sorted list keeps its order); padding last."""
    key = jnp.where(edge_mask, centres, n_atoms).astype(jnp.int32)
    perm = jnp.argsort(key, stable=True).astype(jnp.int32)  # a key-value radix sort on GPU
    return EdgeOrder(csr_offsets(centres, edge_mask, n_atoms), perm, far[perm].astype(jnp.int32))


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
        by_receiver = EdgeOrder(csr_offsets(receivers, edge_mask, n_atoms),
                                jnp.arange(edge_mask.shape[0], dtype=jnp.int32), senders.astype(jnp.int32))
    else:
        by_receiver = edge_order(receivers, senders, edge_mask, n_atoms)
    # In a program whose passes never walk the sender order (energy and forces through the symmetric
    # transpose, see pallas.py), XLA drops this sort as dead code.
    return EdgeGraph(edge_mask, by_receiver=by_receiver, by_sender=edge_order(senders, receivers, edge_mask, n_atoms))
