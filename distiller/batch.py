"""Padded graph batches: the one pytree that every model, teacher and loss in distiller takes.

jraph's conventions: atoms of all structures are concatenated; the last graph is always a padding graph that
owns the padding atoms; padding edges join the last (padding) atom to itself. Sizes are rounded up to a few
buckets (`neighbours.round_up`) so that jit sees few distinct shapes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller import neighbours as nl
from distiller.precision import HIGHEST
from distiller.reference import ReferenceEnergies
from distiller.structure import Structure
from pallas_kernels import edge_difference


class BatchShape(NamedTuple):
    """Static padded sizes of a batch (hashable)."""

    atoms: int
    graphs: int


class Batch(NamedTuple):
    numbers: jax.Array  # (A,) int32, 0 on padding atoms
    positions: jax.Array  # (A, 3) Å
    atom_mask: jax.Array  # (A,) bool
    graph_index: jax.Array  # (A,) int32; padding atoms belong to the last graph
    cell: jax.Array  # (G, 3, 3) Å, rows are lattice vectors; identity for non-periodic graphs
    pbc: jax.Array  # (G, 3) bool
    n_atoms: jax.Array  # (G,) int32
    graph_mask: jax.Array  # (G,) bool
    # Edges (see distiller.neighbours for the convention), rebuilt with `with_neighbours`.
    receivers: jax.Array  # (E,) int32
    senders: jax.Array  # (E,) int32
    shifts: jax.Array  # (E, 3) float
    edge_mask: jax.Array  # (E,) bool
    # Labels in eV, eV/Å, eV/Å³ (zeros where absent; see the masks). `energy` is relative to the reference
    # energies `pad_structures` was given (distiller.reference), so that its float32 keeps meV resolution.
    energy: jax.Array  # (G,)
    forces: jax.Array  # (A, 3)
    stress: jax.Array  # (G, 3, 3)
    stress_mask: jax.Array  # (G,) bool: graphs that carry a stress label
    # Hessian-vector-product labels (training with the HVP loss term, labelling with --hvp; None elsewhere): a
    # unit displacement direction per graph (its atoms' 3n components have norm 1) and the teacher's H·v, eV/Å².
    # A training step's labels hold one per graph, (A, 3); `pad_structures(..., hvp=K)` gives a dataset's K
    # stored ones, (K, A, 3), of which the step picks one per graph (train/labels.py).
    directions: jax.Array | None = None  # (A, 3) or (K, A, 3)
    hvp: jax.Array | None = None  # (A, 3) or (K, A, 3)

    @property
    def n_graphs(self) -> int:
        return self.graph_mask.shape[0]

    def edge_vectors(self, positions: jax.Array | None = None, cell: jax.Array | None = None,
                     kernel: str = "xla") -> jax.Array:
        """Edge vectors x[j] - x[i] + shift @ cell, differentiable in positions and cell.

        kernel: the edge-kernel set whose `edge_difference` takes x[j] - x[i] (pallas_kernels.dispatch); with
          "pallas" on a GPU, the position gradient is summed per atom without atomics.
        """
        positions = self.positions if positions is None else positions
        cell = self.cell if cell is None else cell
        offset = jnp.einsum("ek,ekl->el", self.shifts, cell[self.graph_index[self.receivers]], precision=HIGHEST)
        return edge_difference(positions, self.senders, self.receivers, self.edge_mask, kernel=kernel) + offset


# Per-graph sums of per-atom energies are exact and independent of the order of summation: each value is split into
# integer multiples of ENERGY_QUANTUM and of FINE_QUANTUM (the rest, below 1.2e-7 eV per atom, is dropped), summed
# as integers. A plain float32 scatter-add of 19,200 atoms at -3 eV each is off by ~1e-4 eV per atom, and by a
# different amount for a supercell than for its cell; and a float sum's rounding depends on the order XLA picks,
# which differs between programs (a training step redone at grown capacities must give the same numbers). Sums
# beyond ENERGY_SUM_LIMIT (int32 range) fall back to float sums.
ENERGY_QUANTUM = 2.0**-10  # eV
FINE_QUANTUM = 2.0**-22  # eV; at most 2^11 of them per atom: int32 holds a million atoms' worth
ENERGY_SUM_LIMIT = 2.0**30 * ENERGY_QUANTUM  # eV, ~1e6
# Up to this many graphs a per-graph sum is a masked reduction (a tree, no atomics); beyond, a scatter-add. On a
# GPU a scatter of 12,000 atoms into one or two graphs is every thread adding into the same address.
DENSE_GRAPHS = 32


def per_graph(values: jax.Array, batch: Batch) -> jax.Array:
    """(G, ...) sums over each graph's atoms of a per-atom array (A, ...) (padding atoms count for the last graph)."""
    G = batch.n_graphs
    if G > DENSE_GRAPHS:
        return jax.ops.segment_sum(values, batch.graph_index, num_segments=G)
    member = batch.graph_index[None, :] == jnp.arange(G, dtype=batch.graph_index.dtype)[:, None]  # (G, A)
    member = member.reshape(member.shape + (1,) * (values.ndim - 1))
    return jnp.sum(jnp.where(member, values[None], jnp.zeros((), values.dtype)), axis=1)


def graph_sum(values: jax.Array, batch: Batch) -> jax.Array:
    """(G,) sums of a per-atom float array (A,) over each graph's atoms, 0 on padding graphs; differentiable (the
    derivative is that of the plain sum). float32: exact to float32 rounding of the result (and to FINE_QUANTUM),
    the same whatever the order of summation, wherever |sum| < ~1e6; float64 (x64 evaluations, e.g. finite
    differences): the plain sum, already exact to 1e-16."""
    values = jnp.where(batch.atom_mask, values, 0.0)
    if values.dtype == jnp.float64:
        return jnp.where(batch.graph_mask, per_graph(values, batch), 0.0)
    v = jax.lax.stop_gradient(values)
    whole = jnp.round(v / ENERGY_QUANTUM)  # exact: the quanta are powers of two
    fits = jnp.abs(whole) < 2.0**30
    whole = jnp.where(fits, whole, 0.0)
    fine = jnp.where(fits, jnp.round((v - whole * ENERGY_QUANTUM) / FINE_QUANTUM), 0.0)  # the remainder is exact
    counts = per_graph(jnp.stack([whole, fine, (~fits).astype(v.dtype)], axis=-1).astype(jnp.int32), batch)
    plain = per_graph(values, batch)
    exact = counts[:, 0].astype(values.dtype) * ENERGY_QUANTUM + counts[:, 1].astype(values.dtype) * FINE_QUANTUM
    exact = jnp.where((jnp.abs(plain) < ENERGY_SUM_LIMIT) & (counts[:, 2] == 0), exact, plain)
    # The value is `exact` (plain + (exact - plain) rounds to it), the derivative the plain sum's.
    total = plain + jax.lax.stop_gradient(exact - plain)
    return jnp.where(batch.graph_mask, total, 0.0)


def cell_determinant(cell: jax.Array) -> jax.Array:
    """det of (..., 3, 3) cells as a triple product (jnp.linalg's LU costs ~1 s of compile time on CPU)."""
    return jnp.sum(cell[..., 0, :] * jnp.cross(cell[..., 1, :], cell[..., 2, :]), axis=-1)


def cell_inverse(cell: jax.Array) -> jax.Array:
    """Inverse of (..., 3, 3) cells with lattice vectors as rows: column k is a_{k+1} x a_{k+2} / det."""
    a0, a1, a2 = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]
    columns = jnp.stack([jnp.cross(a1, a2), jnp.cross(a2, a0), jnp.cross(a0, a1)], axis=-1)
    return columns / cell_determinant(cell)[..., None, None]


def shape_for(structures: Sequence[Structure]) -> BatchShape:
    """The bucketed shape that holds these structures (always one spare atom and one padding graph)."""
    return BatchShape(atoms=nl.round_up(sum(s.n_atoms for s in structures) + 1), graphs=len(structures) + 1)


def bucket_shape(atoms_per_graph: int, most_graphs: int, max_atoms: int | None = None) -> BatchShape:
    """The shape of batches of up to `most_graphs` structures of at most `atoms_per_graph` atoms each, with at most
    `max_atoms` atoms in all (None: no limit) but always room for one: it holds shape.graphs - 1 structures."""
    graphs = most_graphs if max_atoms is None else max(1, min(most_graphs, max_atoms // atoms_per_graph))
    return BatchShape(atoms=nl.round_up(graphs * atoms_per_graph + 1), graphs=graphs + 1)


def group_by_atoms(structures: Sequence[Structure], max_atoms: int) -> list[list[Structure]]:
    """Consecutive groups of at most `max_atoms` atoms (a larger structure goes alone)."""
    groups, current, count = [], [], 0
    for s in structures:
        if current and count + s.n_atoms > max_atoms:
            groups.append(current)
            current, count = [], 0
        current.append(s)
        count += s.n_atoms
    if current:
        groups.append(current)
    return groups


def shape_for_groups(groups: Sequence[Sequence[Structure]]) -> BatchShape:
    """One shape that holds every group, so that a jitted function compiles once for all of them."""
    return BatchShape(atoms=max(shape_for(g).atoms for g in groups), graphs=max(len(g) for g in groups) + 1)


def binning_cell(structure: Structure) -> np.ndarray:
    """A non-singular cell for the neighbour list: the real one where periodic, completed elsewhere."""
    if not structure.periodic:
        return np.eye(3)
    cell = np.array(structure.cell, np.float64)
    for k in range(3):
        if not structure.pbc[k] and np.linalg.norm(cell[k]) < 1e-6:
            a, b = cell[(k + 1) % 3], cell[(k + 2) % 3]
            normal = np.cross(a, b)
            cell[k] = normal / np.linalg.norm(normal)
    return cell


def near_origin(structure: Structure) -> np.ndarray:
    """The structure's positions (float64) moved near the origin before they become float32, where an atom 1e4 Å
    away is resolved to 1e-3 Å only (aspirin there had forces 0.04 eV/Å off): each atom by whole lattice vectors
    into the cell along periodic directions, the whole structure by whole cell vectors (Å for a molecule)
    towards the origin along the others. Energies, forces and stress do not change under these moves; atoms
    already in place do not move at all, and a molecule moves by whole Å, exactly."""
    cell = binning_cell(structure)
    positions = np.asarray(structure.positions, np.float64)
    fractional = positions @ np.linalg.inv(cell)
    lattice = np.where(structure.pbc, np.floor(fractional), np.round(fractional.mean(axis=0)))
    return positions - lattice @ cell if np.any(lattice) else positions


def pad_structures(structures: Sequence[Structure], shape: BatchShape | None = None,
                   reference: ReferenceEnergies | None = None, hvp: int = 0) -> Batch:
    """Concatenate and pad structures into a Batch without edges (E = 0); labels where present, energies minus
    `reference` (taken in float64, before the labels become float32). Positions are `near_origin`'s: a batch's
    structures may sit away from the given ones by lattice vectors and whole Å, so the positions of structures
    taken back out of a batch (`unbatch`) are where the model saw them.
    With `hvp` = K > 0, also every structure's K stored directions and H·v (its `directions`, required, and
    `hvp`, zeros where it has none yet: labelling computes them), (K, A, 3), zeros on padding atoms."""
    shape = shape or shape_for(structures)
    n_real = sum(s.n_atoms for s in structures)
    if n_real >= shape.atoms or len(structures) >= shape.graphs:
        raise ValueError(f"{len(structures)} structures with {n_real} atoms do not fit {shape}")
    A, G = shape.atoms, shape.graphs
    numbers = np.zeros(A, np.int32)
    positions = np.zeros((A, 3), np.float32)
    atom_mask = np.zeros(A, bool)
    graph_index = np.full(A, G - 1, np.int32)
    cell = np.tile(np.eye(3, dtype=np.float32), (G, 1, 1))
    pbc = np.zeros((G, 3), bool)
    n_atoms = np.zeros(G, np.int32)
    graph_mask = np.zeros(G, bool)
    energy = np.zeros(G, np.float32)
    forces = np.zeros((A, 3), np.float32)
    stress = np.zeros((G, 3, 3), np.float32)
    stress_mask = np.zeros(G, bool)
    directions = np.zeros((hvp, A, 3), np.float32) if hvp else None
    products = np.zeros((hvp, A, 3), np.float32) if hvp else None
    start = 0
    for g, s in enumerate(structures):
        sl = slice(start, start + s.n_atoms)
        numbers[sl], positions[sl], atom_mask[sl], graph_index[sl] = s.numbers, near_origin(s), True, g
        cell[g], pbc[g], n_atoms[g], graph_mask[g] = binning_cell(s), s.pbc, s.n_atoms, True
        if s.energy is not None:
            energy[g] = s.energy - (reference.energy(s.numbers) if reference is not None else 0.0)
        if s.forces is not None:
            forces[sl] = s.forces
        if s.stress is not None and s.periodic:
            stress[g], stress_mask[g] = s.stress, True
        if hvp:
            if s.directions is None or len(s.directions) != hvp:
                held = "none" if s.directions is None else len(s.directions)
                raise ValueError(f"structure '{s.name}': {hvp} Hessian-vector-product directions expected, it has "
                                 f"{held}")
            directions[:, sl] = s.directions
            if s.hvp is not None:
                products[:, sl] = s.hvp
        start += s.n_atoms
    # Padding atoms sit far apart from each other so that nothing can be near them.
    positions[n_real:] = 0.0
    no_edges = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 3), np.float32), np.zeros(0, bool))
    return Batch(numbers, positions, atom_mask, graph_index, cell, pbc, n_atoms, graph_mask, *no_edges,
                 energy, forces, stress, stress_mask, directions, products)


def with_neighbours(batch: Batch, cutoff: float, capacity: nl.NeighbourCapacity) -> tuple[Batch, nl.Neighbours]:
    """The batch with its edges rebuilt for its current positions (jittable); check `.overflow`."""
    neighbours = nl.neighbour_list(batch.positions, batch.cell, batch.pbc, batch.graph_index, batch.atom_mask,
                                   n_graphs=batch.n_graphs, cutoff=cutoff, capacity=capacity)
    batch = batch._replace(receivers=neighbours.receivers, senders=neighbours.senders, shifts=neighbours.shifts,
                           edge_mask=neighbours.edge_mask)
    return batch, neighbours


def allocate_neighbours(batch: Batch, cutoff: float, margin: float = 1.25,
                        extra: nl.NeighbourCapacity | None = None) -> nl.NeighbourCapacity:
    """Capacities that hold the batch's neighbour list with `margin` (and at least `extra`, see nl.allocate)."""
    return nl.allocate(batch.positions, batch.cell, batch.pbc, batch.graph_index, batch.atom_mask,
                       n_graphs=batch.n_graphs, cutoff=cutoff, margin=margin, extra=extra)


def unpad_atoms(batch: Batch, values) -> list[np.ndarray]:
    """Split a per-atom array (A, ...) into one array per real structure."""
    values = np.asarray(values)
    n = np.asarray(batch.n_atoms)[np.asarray(batch.graph_mask)]
    return np.split(values[: int(n.sum())], np.cumsum(n)[:-1])


def unbatch(batch: Batch, name: str = "batch graph") -> list[tuple[Structure, np.ndarray]]:
    """The real structures of a padded batch (positions, cells; no labels), each named `{name} {g}`, and the
    indices of their atoms in the batch. Non-periodic graphs get a zero cell (the batch holds an identity)."""
    positions, numbers = np.asarray(batch.positions, np.float64), np.asarray(batch.numbers)
    cell, pbc, gi = np.asarray(batch.cell, np.float64), np.asarray(batch.pbc), np.asarray(batch.graph_index)
    atom_mask = np.asarray(batch.atom_mask)
    out = []
    for g in np.flatnonzero(np.asarray(batch.graph_mask)):
        index = np.flatnonzero(atom_mask & (gi == g))
        periodic = bool(pbc[g].any())
        out.append((Structure(numbers[index].astype(np.int32), positions[index],
                              cell[g] if periodic else np.zeros((3, 3)), pbc[g].copy(), name=f"{name} {g}"), index))
    return out
