"""Teachers computed outside JAX (PyTorch models, ASE calculators) as energy models.

A host teacher is a `label` function (structures in, structures with energy, forces and, for periodic ones,
stress out; float64, eV and Å). `host_model` makes it an `EnergyModel`: `label` for host-side work (the
Predictor, datasets, evaluation), and an `energies` usable inside jit, a `jax.pure_callback` into `label` whose
derivative is the teacher's own forces and stress, so `distiller.derivatives` (and MD) treat it like any model.

The derivative: with D = ∂E/∂x = −F and the strain derivative ∂E/∂ε = V σ (x → x(I+ε), cell → cell(I+ε)),
V σ = Xᵀ D + cellᵀ ∂E/∂cell, so ∂E/∂cell = cell⁻ᵀ (V σ + Xᵀ F) (X: the graph's positions). Only first
derivatives exist (Hessians need a JAX model), and every evaluation is a host round trip with the teacher's full
cost: label offline (`distiller label`) when the structures are known in advance.

Under `jax.vmap` (N MD replicas as one program, `simulate_replicas`) the callback is batched
(`vmap_method="broadcast_all"`): the host gets every replica's padded arrays at once and labels all their
structures in one `label` call, so a step of N replicas costs one round trip and one teacher call, not N.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller.batch import Batch, cell_determinant, cell_inverse, unbatch
from distiller.model import EnergyModel, ModelEnergies
from distiller.precision import HIGHEST
from distiller.structure import Structure


def _host_labels(label: Callable, info: dict, numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask):
    """Energies (..., G), forces (..., A, 3) and stress (..., G, 3, 3) of padded batches' arrays, zeros on padding.

    Leading axes (those of `graph_mask` before its last) are vmap's (`vmap_method="broadcast_all"`: every
    array has them): the real structures of every batch go to ONE `label` call, so N replicas of an MD program
    cost one teacher call per step, not N (on a GPU a torch teacher's time is launches and the round trip)."""
    lead = np.shape(graph_mask)[:-1]
    arrays = [np.asarray(x) for x in (numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask)]
    arrays = [x.reshape((-1,) + x.shape[len(lead):]) for x in arrays]
    positions, graph_mask = arrays[1], arrays[6]
    energy = np.zeros(graph_mask.shape, positions.dtype)
    forces = np.zeros(positions.shape, positions.dtype)
    stress = np.zeros(graph_mask.shape + (3, 3), positions.dtype)
    places, structures = [], []  # (batch, graph, atom indices) of each structure in the one call
    for b in range(graph_mask.shape[0]):
        parts = unbatch(Batch(*(x[b] for x in arrays[:6]), None, arrays[6][b], *[None] * 8))
        for (s, index), g in zip(parts, np.flatnonzero(graph_mask[b])):
            places.append((b, g, index))
            structures.append(s.replace(info=dict(info)))
    if structures:
        for (b, g, index), t in zip(places, label(structures)):
            energy[b, g], forces[b, index] = t.energy, t.forces
            if t.stress is not None:
                stress[b, g] = t.stress
    return (energy.reshape(lead + energy.shape[1:]), forces.reshape(lead + forces.shape[1:]),
            stress.reshape(lead + stress.shape[1:]))


def callback_energies(label: Callable, info: dict | None = None) -> Callable:
    """energies(params, batch, capacity) -> ModelEnergies through `label` on the host (see the module docstring).
    `info` (e.g. charge and spin) is given to every structure."""
    info = dict(info or {})

    def host(*arrays):
        return _host_labels(label, info, *arrays)

    def evaluate(numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask):
        dtype = positions.dtype
        shapes = (jax.ShapeDtypeStruct(graph_mask.shape, dtype), jax.ShapeDtypeStruct(positions.shape, dtype),
                  jax.ShapeDtypeStruct(graph_mask.shape + (3, 3), dtype))
        return jax.pure_callback(host, shapes, numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask,
                                 vmap_method="broadcast_all")

    @jax.custom_jvp
    def energy(positions, cell, numbers, atom_mask, graph_index, pbc, graph_mask):
        return evaluate(numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask)[0]

    @energy.defjvp
    def energy_jvp(primals, tangents):
        positions, cell, numbers, atom_mask, graph_index, pbc, graph_mask = primals
        d_positions, d_cell = tangents[:2]
        e, f, sigma = evaluate(numbers, positions, atom_mask, graph_index, cell, pbc, graph_mask)
        n_graphs = graph_mask.shape[0]
        periodic = jnp.any(pbc, axis=-1) & graph_mask
        volume = jnp.abs(cell_determinant(cell))
        x_f = jax.ops.segment_sum(positions[:, :, None] * f[:, None, :], graph_index, num_segments=n_graphs)
        de_dcell = jnp.einsum("gji,gjk->gik", cell_inverse(cell), volume[:, None, None] * sigma + x_f,
                              precision=HIGHEST)
        de_dcell = jnp.where(periodic[:, None, None], de_dcell, 0.0)
        de = -jax.ops.segment_sum(jnp.sum(f * d_positions, axis=-1), graph_index, num_segments=n_graphs)
        de = de + jnp.sum(de_dcell * d_cell, axis=(-2, -1))
        return e, jnp.where(graph_mask, de, 0.0)

    def energies(params: Any, batch: Batch, capacity: Any = None) -> ModelEnergies:
        inputs = jax.lax.stop_gradient((batch.numbers, batch.atom_mask, batch.graph_index, batch.pbc, batch.graph_mask))
        e = energy(batch.positions, batch.cell, *inputs)
        return ModelEnergies(jnp.where(batch.graph_mask, e, 0.0)[None], jnp.asarray(False))

    return energies


def host_model(name: str, label: Callable[[Sequence[Structure]], list[Structure]], *, cutoff: float,
               elements: frozenset[int], check_more: Callable | None = None, info: dict | None = None,
               source: Any = None) -> EnergyModel:
    """A host teacher as an EnergyModel: `label` on the host, its `pure_callback` form as `energies`."""
    return EnergyModel(name=name, cutoff=float(cutoff), elements=frozenset(elements),
                       energies=callback_energies(label, info), label=label, check_more=check_more, source=source)
