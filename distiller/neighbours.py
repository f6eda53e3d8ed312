"""A jittable, linear-scaling neighbour list for batches of periodic and non-periodic systems.

jax-md's pattern: the list has a static capacity and an explicit overflow flag; `allocate` (outside jit)
measures what a configuration needs and adds a margin, `neighbour_list` (inside jit) rebuilds the list for
new positions and says when the capacity no longer fits, so the caller re-allocates and recomputes.

Method: every graph's atoms are put in bins of its own cell (in fractional coordinates, after wrapping the
periodic directions), each bin at least `cutoff` high perpendicular to its faces. An atom's neighbours lie in
bins at most `reach` bins away in each direction; where a cell is thinner than the cutoff, `reach` > 1 and the
same bin is visited at several lattice shifts, which gives every periodic image. Work is O(atoms).

Edge convention, used everywhere in distiller: edge e joins receiver i (the centre) to sender j (the
neighbour); its vector is  x[j] - x[i] + shifts[e] @ cell[graph(i)].  Both directions of every pair are
present. Edges come out sorted by receiver. Padding edges have edge_mask False and point at the last atom.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distiller.precision import HIGHEST


class NeighbourCapacity(NamedTuple):
    """Static sizes of a neighbour list (hashable: a jit static argument)."""

    edges: int  # directed edges in the whole batch
    bins: int  # spatial bins over all graphs of the batch
    bin_size: int  # atoms one bin can hold
    reach: int  # the most bins an atom looks away in one direction


class Neighbours(NamedTuple):
    receivers: jax.Array  # (E,) int32, the centre atom
    senders: jax.Array  # (E,) int32, the neighbour atom
    shifts: jax.Array  # (E, 3) float32, integer lattice shifts of the sender's image
    edge_mask: jax.Array  # (E,) bool
    overflow: jax.Array  # () bool: some pair was lost; re-allocate and recompute
    needed: jax.Array  # (4,) int32: what this configuration needs, in NeighbourCapacity's order


class _Bins(NamedTuple):
    key: jax.Array  # (A,) bin of each atom, `total` for padding atoms
    coord: jax.Array  # (A, 3) bin coordinates
    wrap: jax.Array  # (A, 3) lattice vectors subtracted to wrap the atom into its cell
    n_bins: jax.Array  # (G, 3) bins per direction
    first_bin: jax.Array  # (G,) key of each graph's first bin
    reach: jax.Array  # (G, 3) bins to look away in each direction
    total: jax.Array  # () bins over the batch


def _binning(positions, cell, pbc, graph_index, atom_mask, n_graphs: int, cutoff: float) -> _Bins:
    inv_cell = jnp.linalg.inv(cell)  # columns are reciprocal vectors b_k (a_i . b_k = delta_ik)
    frac = jnp.einsum("ai,aij->aj", positions, inv_cell[graph_index], precision=HIGHEST)
    periodic = pbc[graph_index]
    wrap = jnp.where(periodic, jnp.floor(frac), 0.0)
    frac = frac - wrap
    # Non-periodic directions are binned over the span the atoms occupy.
    big = jnp.asarray(1e30, frac.dtype)
    lo = jax.ops.segment_min(jnp.where(atom_mask[:, None], frac, big), graph_index, n_graphs)
    hi = jax.ops.segment_max(jnp.where(atom_mask[:, None], frac, -big), graph_index, n_graphs)
    has_atoms = (hi >= lo)[:, :1]
    lo = jnp.where(pbc | ~has_atoms, 0.0, lo)
    height = 1.0 / jnp.linalg.norm(inv_cell, axis=1)  # (G, 3): perpendicular height of the cell per direction
    span = jnp.where(pbc | ~has_atoms, 1.0, (hi - lo) + 1e-6 / height)
    extent = span * height
    n_bins = jnp.maximum(jnp.floor(extent / cutoff), 1.0)
    bin_height = extent / n_bins
    reach = jnp.where(pbc, jnp.ceil(cutoff / bin_height - 1e-6), jnp.minimum(n_bins - 1.0, 1.0))
    n_bins = jnp.where(has_atoms, n_bins, 0.0).astype(jnp.int32)
    reach = jnp.where(has_atoms, reach, 0.0).astype(jnp.int32)
    coord = jnp.floor((frac - lo[graph_index]) / (span / jnp.maximum(n_bins, 1))[graph_index]).astype(jnp.int32)
    coord = jnp.clip(coord, 0, jnp.maximum(n_bins[graph_index] - 1, 0))
    per_graph = jnp.prod(n_bins, axis=1)
    first_bin = jnp.cumsum(per_graph) - per_graph
    total = jnp.sum(per_graph)
    key = first_bin[graph_index] + _linear(coord, n_bins[graph_index])
    key = jnp.where(atom_mask, key, total)
    return _Bins(key, coord, wrap, n_bins, first_bin, reach, total)


def _linear(coord, n_bins):
    return (coord[..., 0] * n_bins[..., 1] + coord[..., 1]) * n_bins[..., 2] + coord[..., 2]


@partial(jax.jit, static_argnames=("n_graphs", "cutoff", "capacity"))
def neighbour_list(positions, cell, pbc, graph_index, atom_mask, *, n_graphs: int, cutoff: float,
                   capacity: NeighbourCapacity) -> Neighbours:
    """All pairs closer than `cutoff`, every periodic image included, within a fixed capacity.

    positions (A, 3), cell (G, 3, 3) with rows as lattice vectors (any non-singular cell for a
    non-periodic graph), pbc (G, 3), graph_index (A,), atom_mask (A,).
    """
    n_atoms = positions.shape[0]
    bins = _binning(positions, cell, pbc, graph_index, atom_mask, n_graphs, cutoff)

    # Cell list: table[bin, slot] = atom, filled by sorting atoms by bin.
    order = jnp.argsort(bins.key, stable=True)
    sorted_key = bins.key[order]
    rank = jnp.arange(n_atoms) - jnp.searchsorted(sorted_key, sorted_key, side="left")
    table = jnp.full((capacity.bins, capacity.bin_size), n_atoms, jnp.int32)
    table = table.at[sorted_key, rank].set(order.astype(jnp.int32), mode="drop")
    max_in_bin = jnp.max(jnp.where(sorted_key < bins.total, rank + 1, 0))

    # Candidate neighbours of atom i: every slot of every bin within reach, at the right lattice shift.
    r = capacity.reach
    offsets = jnp.asarray(list(itertools.product(range(-r, r + 1), repeat=3)), jnp.int32)  # (O, 3)
    g = graph_index
    n_bins_i = bins.n_bins[g][:, None, :]  # (A, 1, 3)
    target = bins.coord[:, None, :] + offsets[None]  # (A, O, 3)
    within_reach = jnp.all(jnp.abs(offsets)[None] <= bins.reach[g][:, None, :], axis=-1)
    periodic = pbc[g][:, None, :]
    lattice = jnp.floor_divide(target, jnp.maximum(n_bins_i, 1))
    inside = jnp.all(periodic | ((target >= 0) & (target < n_bins_i)), axis=-1)
    lattice = jnp.where(periodic, lattice, 0)
    target = target - lattice * n_bins_i
    target_key = bins.first_bin[g][:, None] + _linear(target, n_bins_i)
    target_ok = within_reach & inside & atom_mask[:, None]
    target_key = jnp.where(target_ok, target_key, capacity.bins)
    candidates = table.at[target_key].get(mode="fill", fill_value=n_atoms)  # (A, O, P)

    # Distances from wrapped positions: one lattice vector per (atom, offset), not per candidate.
    j = candidates
    j_safe = jnp.minimum(j, n_atoms - 1)
    cell_g = cell[g]
    wrapped = positions - jnp.einsum("ak,akl->al", bins.wrap, cell_g, precision=HIGHEST)
    image = wrapped[:, None, :] - jnp.einsum("aok,akl->aol", lattice.astype(positions.dtype), cell_g, precision=HIGHEST)  # (A, O, 3)
    d2 = jnp.sum((wrapped[j_safe] - image[:, :, None, :]) ** 2, axis=-1)
    i = jnp.arange(n_atoms)[:, None, None]
    self_pair = (j == i) & jnp.all(lattice == 0, axis=-1)[:, :, None]
    is_edge = (j < n_atoms) & (d2 < cutoff**2) & ~self_pair

    flat = is_edge.reshape(-1)
    n_edges = jnp.sum(flat)
    (index,) = jnp.nonzero(flat, size=capacity.edges, fill_value=flat.shape[0])
    edge_mask = index < flat.shape[0]
    index = jnp.where(edge_mask, index, 0)
    per_atom = candidates.shape[1] * candidates.shape[2]
    receivers = index // per_atom
    offset = (index // candidates.shape[2]) % candidates.shape[1]
    senders = j.reshape(-1)[index]
    # Shift of the sender's image in the caller's (unwrapped) coordinates.
    shift = lattice[receivers, offset] + bins.wrap[receivers] - bins.wrap[jnp.minimum(senders, n_atoms - 1)]
    pad_atom = n_atoms - 1
    receivers = jnp.where(edge_mask, receivers, pad_atom)
    senders = jnp.where(edge_mask, senders, pad_atom)
    shifts = jnp.where(edge_mask[:, None], shift, 0.0).astype(positions.dtype)

    needed = jnp.stack([n_edges, bins.total, max_in_bin, jnp.max(bins.reach)]).astype(jnp.int32)
    limits = jnp.asarray([capacity.edges, capacity.bins, capacity.bin_size, capacity.reach], jnp.int32)
    overflow = jnp.any(needed > limits)
    return Neighbours(receivers.astype(jnp.int32), senders.astype(jnp.int32), shifts, edge_mask, overflow, needed)


def allocate(positions, cell, pbc, graph_index, atom_mask, *, n_graphs: int, cutoff: float,
             margin: float = 1.25, extra: NeighbourCapacity | None = None) -> NeighbourCapacity:
    """Measure what a configuration needs (outside jit) and return a capacity with room to spare."""
    bins = jax.jit(_binning, static_argnums=(5, 6))(positions, cell, pbc, graph_index, atom_mask, n_graphs, cutoff)
    keys = np.asarray(bins.key)
    total = int(bins.total)
    counts = np.bincount(keys[keys < total], minlength=1)
    reach = max(int(np.max(np.asarray(bins.reach), initial=0)), 1)
    bin_size = int(counts.max(initial=1))
    probe = NeighbourCapacity(edges=1, bins=max(total, 1), bin_size=max(bin_size, 1), reach=reach)
    needed = np.asarray(neighbour_list(positions, cell, pbc, graph_index, atom_mask, n_graphs=n_graphs,
                                       cutoff=cutoff, capacity=probe).needed)
    capacity = NeighbourCapacity(
        edges=round_up(int(needed[0] * margin) + 1),
        bins=int(total * margin) + 1,
        bin_size=bin_size + max(2, int(math.ceil(bin_size * (margin - 1)))),
        reach=reach,
    )
    if extra is not None:
        capacity = NeighbourCapacity(*(max(a, b) for a, b in zip(capacity, extra)))
    return capacity


def grow(capacity: NeighbourCapacity, needed, margin: float = 1.25) -> NeighbourCapacity:
    """A capacity that fits `needed` (from an overflowing Neighbours) with room to spare."""
    needed = [int(n) for n in np.asarray(needed)]
    return NeighbourCapacity(
        edges=max(capacity.edges, round_up(int(needed[0] * margin) + 1)),
        bins=max(capacity.bins, int(needed[1] * margin) + 1),
        bin_size=max(capacity.bin_size, needed[2] + 2),
        reach=max(capacity.reach, needed[3]),
    )


def round_up(n: int) -> int:
    """Round up to the next of 2^k and 3*2^(k-1): at most 50 % padding, few distinct shapes for jit."""
    n = max(int(n), 1)
    k = 1
    while k < n:
        if k * 3 // 2 >= n and k >= 2:
            return k * 3 // 2
        k *= 2
    return k
