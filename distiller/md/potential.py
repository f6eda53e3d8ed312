"""A distiller model as a JAX-MD potential: `neighbor_fn, energy_fn = potential(model, structure)`.

JAX-MD's conventions, followed exactly:

    displacement_fn, shift_fn = space(structure)        # jax_md.space.free() or periodic_general(cell.T, ...)
    neighbor_fn, energy_fn = potential(model, structure)
    nbrs = neighbor_fn.allocate(R)                      # outside jit: measures capacities
    E = energy_fn(R, neighbor=nbrs)                     # eV; jax_md.quantity.force(energy_fn) gives eV/Å
    init_fn, apply_fn = jax_md.simulate.nve(energy_fn, shift_fn, dt)
    state = apply_fn(state, neighbor=nbrs)              # inside jit / lax.scan
    nbrs = nbrs.update(state.position)                  # jittable
    if nbrs.did_buffer_overflow:                        # on the host, between chunks
        nbrs = neighbor_fn.allocate(R_start, previous=nbrs)   # and redo the chunk from R_start

`neighbor_fn` is a `jax_md.partition.NeighborListFns(allocate, update)`; the list itself is a `NeighbourList`
(a JAX-MD dataclass: arrays as leaves, capacities as static fields, so jit retraces when they grow).

Coordinates are real (Å), never fractional, in the frame of `structure.cell` (rows = lattice vectors; JAX-MD's
`box` is its transpose, columns = lattice vectors). `space()` returns JAX-MD's `periodic_general(cell.T,
fractional_coordinates=False)`, whose shift wraps atoms back into the cell; the energy is exact for wrapped
and unwrapped positions alike: each list edge keeps the integer lattice shift it had when the list was built,
and `energy_fn` adds the lattice jumps every atom made since (round((R - R_ref) cell^-1), exact while atoms move
less than half a cell between rebuilds, which the skin guarantees). JAX-MD's own minimum-image displacement is
not used for energies, so cells thinner than twice the cutoff (watertiny: 9.3 Å against ANI's 5.2 Å) are fine.

Skin (JAX-MD's `dr_threshold`): the list holds pairs closer than cutoff + dr_threshold and is rebuilt only when
some atom moved more than dr_threshold / 2 since the last rebuild (or the cell changed), so forces computed at
positions one step ahead of the list are still exact. Models drop the longer pairs themselves (FeNNol filters by
distance; the student's envelope is exactly zero beyond its cutoff).

Capacities (jax-md's overflow pattern, for the neighbour list and for the model): the list carries the
neighbour-list capacity and the model's own capacity (FeNNol's preprocessing sizes; None for students) as static
fields. `update` rebuilds the list when needed and checks the model's capacity at the new positions, so every
configuration whose forces the integrator used is checked; both flags are sticky, so one check per chunk on
the host sees any overflow of the chunk. (The model check is FeNNol's preprocessing alone: under jit the network
it does not need is dead code.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import jax_md
import numpy as np
from jax_md import dataclasses as jmd_dataclasses
from jax_md.partition import NeighborListFns

from distiller import batch as batching
from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape
from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.precision import HIGHEST, full_precision
from distiller.structure import Structure, StructureError

DEFAULT_SKIN = 0.5  # Å


@jmd_dataclasses.dataclass
class NeighbourList:
    """A neighbour list of one structure in distiller's edge convention, JAX-MD's NeighborList protocol.

    Edge e: receiver i, sender j, vector R[j] - R[i] + shifts[e] @ cell, for the positions the list was built
    at (`reference_position`); padding edges have edge_mask False.
    """

    receivers: jax.Array  # (E,) int32
    senders: jax.Array  # (E,) int32
    shifts: jax.Array  # (E, 3) float, integer lattice shifts
    edge_mask: jax.Array  # (E,) bool
    reference_position: jax.Array  # (N, 3) Å, positions at the last rebuild
    reference_cell: jax.Array  # (3, 3) Å, cell at the last rebuild (identity for molecules)
    overflow: jax.Array  # () bool, sticky: the neighbour capacity was too small at some rebuild
    model_overflow: jax.Array  # () bool, sticky: the model's capacity was too small at some update
    needed: jax.Array  # (4,) int32: running maximum of what the rebuilds needed (NeighbourCapacity's order)
    capacity: nl.NeighbourCapacity = jmd_dataclasses.static_field()
    model_capacity: Any = jmd_dataclasses.static_field()
    update_fn: Callable = jmd_dataclasses.static_field()

    def update(self, position: jax.Array, **kwargs) -> "NeighbourList":
        return self.update_fn(position, self, **kwargs)

    @property
    def did_buffer_overflow(self) -> jax.Array:
        return self.overflow | self.model_overflow


def space(structure: Structure):
    """JAX-MD's (displacement_fn, shift_fn) for the structure, real coordinates in Å.

    Molecules: `space.free()`. Fully periodic cells: `space.periodic_general(cell.T,
    fractional_coordinates=False)` (positions wrapped into the cell after each step). Partly periodic cells
    (slabs) have no JAX-MD space and are refused.
    """
    if not structure.periodic:
        return jax_md.space.free()  # no matrix products
    if not np.all(structure.pbc):
        raise StructureError(f"{structure.name or '<unnamed structure>'}: pbc={structure.pbc.tolist()}; MD supports "
                             f"molecules (no pbc) and fully periodic cells only")
    displacement_fn, shift_fn = jax_md.space.periodic_general(jnp.asarray(np.asarray(structure.cell).T, jnp.float32),
                                                              fractional_coordinates=False)
    # Its fractional <-> real transforms are matrix products, at every step: not TF32 (distiller.precision).
    return full_precision(displacement_fn), full_precision(shift_fn)


class _System:
    """One structure padded as a distiller Batch (one real graph, one padding graph, one padding atom)."""

    def __init__(self, model: EnergyModel, structure: Structure):
        structure = structure.validated()
        model.check([structure])
        space(structure)  # refuses partly periodic cells
        self.structure = structure
        self.n = structure.n_atoms
        padded = batching.pad_structures([structure], BatchShape(atoms=self.n + 1, graphs=2))
        self.batch: Batch = jax.tree.map(jnp.asarray, padded)
        self.periodic = structure.periodic
        self.default_cell = self.batch.cell[0]  # the real cell, or the identity for a molecule

    def cell(self, cell) -> jax.Array:
        if cell is None:
            return self.default_cell
        if not self.periodic:
            raise ValueError(f"{self.structure.name}: a cell was given for a non-periodic structure")
        return jnp.asarray(cell, self.default_cell.dtype)

    def positions(self, R) -> jax.Array:
        R = jnp.asarray(R)
        if R.shape != (self.n, 3):
            raise ValueError(f"{self.structure.name}: positions of shape {R.shape}, expected ({self.n}, 3)")
        return self.batch.positions.at[: self.n].set(R.astype(self.batch.positions.dtype))

    def jumps(self, R, reference, cell) -> jax.Array:
        """(N, 3) integer lattice vectors each atom jumped by (wrapping) since `reference`; zeros for molecules."""
        if not self.periodic:
            return jnp.zeros_like(R)
        frac = jnp.matmul(R - reference, batching.cell_inverse(cell), precision=HIGHEST)
        return jax.lax.stop_gradient(jnp.round(frac))

    def numbers(self, numbers) -> jax.Array:
        """The padded atomic numbers with the real atoms' replaced by `numbers` (N,); the structure's for None."""
        if numbers is None:
            return self.batch.numbers
        numbers = jnp.asarray(numbers)
        if numbers.shape != (self.n,):
            raise ValueError(f"{self.structure.name}: atomic numbers of shape {numbers.shape}, expected ({self.n},)")
        return self.batch.numbers.at[: self.n].set(numbers.astype(self.batch.numbers.dtype))

    def at(self, R, cell, numbers=None) -> Batch:
        """The padded batch at positions R (N, 3), the real graph's cell and atomic numbers (None: the structure's)."""
        return self.batch._replace(positions=self.positions(R), cell=self.batch.cell.at[0].set(cell),
                                   numbers=self.numbers(numbers))

    def with_edges(self, R, cell, receivers, senders, shifts, edge_mask, numbers=None) -> Batch:
        return self.at(R, cell, numbers)._replace(receivers=receivers, senders=senders, shifts=shifts,
                                                  edge_mask=edge_mask)

    def build(self, R, cell, cutoff: float, capacity: nl.NeighbourCapacity) -> nl.Neighbours:
        return batching.with_neighbours(self.at(R, cell), cutoff, capacity)[1]

    def allocate(self, R, cell, cutoff: float, margin: float,
                 extra: nl.NeighbourCapacity | None = None) -> nl.NeighbourCapacity:
        return batching.allocate_neighbours(self.at(R, cell), cutoff, margin, extra=extra)


# --------------------------------------------------------------------------------------------------
# Reuse of compiled functions

_MEMO: dict = {}
_MEMO_SIZE = 32


def structure_key(structure: Structure) -> tuple:
    """What the functions built for a structure depend on: its atoms, cell and pbc (not its positions)."""
    return (np.asarray(structure.numbers).tobytes(), np.asarray(structure.cell, np.float64).tobytes(),
            np.asarray(structure.pbc).tobytes(), structure.n_atoms)


def memoised(kind: str, model: EnergyModel, structure: Structure, extra: tuple, build: Callable[[], Any]) -> Any:
    """build(), or what it returned before for the same model object, atoms, cell and `extra`.

    jit caches compilations per Python function; a closure built anew for every call compiles anew. Keeping
    the closures per (model, atoms, cell) lets samplers, benchmarks and tests that revisit a structure compile
    once. The model object itself is the key (and is kept alive with the entry), so two loads of one spec do
    not share; pass one loaded `EnergyModel` around to share.
    """
    key = (kind, id(model), structure_key(structure), extra)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    value = build()
    while len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = (model, value)
    return value


def potential(model, structure: Structure, dr_threshold: float = DEFAULT_SKIN,
              capacity_multiplier: float = 1.25) -> tuple[NeighborListFns, Callable[..., jax.Array]]:
    """(neighbor_fn, energy_fn) for `model` on `structure`, as JAX-MD's `energy.*_neighbor_list` return them.

    model: an `EnergyModel`, a teacher spec or a student run directory (see `distiller.load.as_model`).
    `energy_fn(R, neighbor, cell=None, numbers=None, **kwargs)` is the energy in eV of positions R (N, 3) Å,
    relative to the model's reference energies (`model.reference.energy(numbers)` is the constant rest); `cell`
    (3, 3) overrides the structure's cell (periodic structures; the list then rebuilds at its next update),
    `numbers` (N,) its atomic numbers (one program for other structures of the same atom count and pbc:
    `simulate_replicas`); other keyword arguments (e.g. the `kT` JAX-MD's thermostats pass along) are ignored.
    The same model object on the same atoms and cell gets the same functions back (see `memoised`).

    Replicas: under `jax.vmap(..., axis_name=AXIS)`, `nbrs.update(R, replica_axis=AXIS)` rebuilds the lists of
    all replicas together when any of them is stale (a real `lax.cond`; per replica, vmap would turn it into
    a select that rebuilds every step). A rebuild at unchanged positions gives the same energies, so every
    replica is exact either way.
    """
    model = as_model(model)
    if not dr_threshold >= 0:
        raise ValueError(f"dr_threshold must be >= 0 Å, got {dr_threshold}")
    structure = structure.validated()
    return memoised("potential", model, structure, (float(dr_threshold), float(capacity_multiplier)),
                    lambda: _potential(model, structure, float(dr_threshold), float(capacity_multiplier)))


def _potential(model: EnergyModel, structure: Structure, dr_threshold: float, capacity_multiplier: float):
    system = _System(model, structure)
    cutoff = model.cutoff + dr_threshold
    threshold_sq = (0.5 * dr_threshold) ** 2

    def edges(R, nbrs: NeighbourList, cell):
        """Edges valid at R: the list's shifts corrected by the lattice jumps since it was built."""
        m = jnp.concatenate([system.jumps(R, nbrs.reference_position, cell), jnp.zeros((1, 3), R.dtype)])
        shifts = nbrs.shifts + m[nbrs.receivers] - m[nbrs.senders]
        return nbrs.receivers, nbrs.senders, shifts, nbrs.edge_mask

    def energy_fn(R, neighbor: NeighbourList | None = None, cell=None, numbers=None, **unused_kwargs) -> jax.Array:
        if neighbor is None:
            raise TypeError("energy_fn needs neighbor=NeighbourList (from neighbor_fn.allocate / .update)")
        cell = system.cell(cell)
        batch = system.with_edges(R, cell, *edges(R, neighbor, cell), numbers=numbers)
        return model.energies(model.params, batch, neighbor.model_capacity).energy[0]

    def model_overflow(R, cell, nbrs: NeighbourList, numbers=None) -> jax.Array:
        if model.capacity_for is None:
            return jnp.asarray(False)
        batch = system.with_edges(R, cell, *edges(R, nbrs, cell), numbers=numbers)
        return jnp.asarray(model.energies(model.params, batch, nbrs.model_capacity).overflow, bool)

    def rebuilt(R, cell, nbrs: NeighbourList) -> NeighbourList:
        found = system.build(R, cell, cutoff, nbrs.capacity)
        return dataclasses.replace(nbrs, receivers=found.receivers, senders=found.senders, shifts=found.shifts,
                                   edge_mask=found.edge_mask, reference_position=R, reference_cell=cell,
                                   overflow=nbrs.overflow | found.overflow,
                                   needed=jnp.maximum(nbrs.needed, found.needed))

    @functools.partial(jax.jit, static_argnames=("replica_axis", "rebuild"))
    def update_fn(R, nbrs: NeighbourList, cell=None, numbers=None, replica_axis: str | None = None,
                  rebuild: bool = False, **unused_kwargs) -> NeighbourList:
        """The list at R: rebuilt when an atom moved more than half the skin, or the cell changed, or `rebuild`
        (a list for new positions with the capacities of `nbrs`)."""
        cell = system.cell(cell)
        R = jnp.asarray(R, nbrs.reference_position.dtype)
        moved = R - nbrs.reference_position - jnp.matmul(system.jumps(R, nbrs.reference_position, cell), cell, precision=HIGHEST)
        stale = jnp.any(jnp.sum(moved**2, axis=-1) > threshold_sq) | jnp.any(cell != nbrs.reference_cell) | rebuild
        if replica_axis is not None:  # one decision for all replicas: the cond stays a cond under vmap
            stale = jax.lax.psum(stale.astype(jnp.int32), replica_axis) > 0
        nbrs = jax.lax.cond(stale, lambda: rebuilt(R, cell, nbrs), lambda: nbrs)
        return dataclasses.replace(nbrs, model_overflow=nbrs.model_overflow | model_overflow(R, cell, nbrs, numbers))

    def allocate_fn(R, extra_capacity: int = 0, *, cell=None, numbers=None,
                    capacity: nl.NeighbourCapacity | None = None, model_capacity=None,
                    previous: NeighbourList | None = None, margin: float | None = None,
                    also: Sequence[jax.Array] = ()) -> NeighbourList:
        """A list for positions R (outside jit), capacities measured with room to spare.

        cell, numbers: as for energy_fn (the model's capacity is measured with these atomic numbers).
        capacity / model_capacity: use these instead of measuring (tests start from a too small one).
        previous: an overflowed list; the new capacities fit all it needed, and the model's capacity is grown
          to fit R and the configurations in `also` (e.g. the end of the chunk that overflowed) with `margin`.
        """
        margin = capacity_multiplier if margin is None else float(margin)
        cell = system.cell(cell)
        R = jnp.asarray(R, system.batch.positions.dtype)
        fits = system.allocate(R, cell, cutoff, margin,
                               extra=None if previous is None else nl.grow(previous.capacity, previous.needed, margin))
        if extra_capacity:
            fits = fits._replace(edges=nl.round_up(fits.edges + int(extra_capacity)))
        capacity = fits if capacity is None else capacity
        found = system.build(R, cell, cutoff, capacity)
        if model.capacity_for is not None and model_capacity is None:
            def measured_batch(X):
                X = jnp.asarray(X, R.dtype)
                complete = system.build(X, cell, cutoff, system.allocate(X, cell, cutoff, margin))
                return system.with_edges(X, cell, complete.receivers, complete.senders, complete.shifts,
                                         complete.edge_mask, numbers=numbers)

            configurations = [R] + [X for X in also if bool(jnp.all(jnp.isfinite(X)))]
            if previous is not None and previous.model_capacity is not None:
                model_capacity = previous.model_capacity
            else:
                model_capacity = model.capacity_for(measured_batch(configurations.pop(0)), margin)
            for X in configurations:
                model_capacity = model.grow(model_capacity, measured_batch(X), margin)
        return NeighbourList(receivers=found.receivers, senders=found.senders, shifts=found.shifts,
                             edge_mask=found.edge_mask, reference_position=R, reference_cell=cell,
                             overflow=found.overflow, model_overflow=jnp.asarray(False), needed=found.needed,
                             capacity=capacity, model_capacity=model_capacity, update_fn=update_fn)

    return NeighborListFns(allocate_fn, update_fn), energy_fn
