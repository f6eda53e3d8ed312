"""Forces, stress, virial, Hessian-vector products and Hessians of any energy model, written once.

Conventions (ASE's):
    forces  F = −∂E/∂x                                        eV/Å
    strain  x → x (I + ε), cell → cell (I + ε)  (row vectors, as ASE scales cells), each graph its own ε
    stress  σ = (1/V) ∂E/∂ε, symmetrised (the antisymmetric part is a rotation)   eV/Å³; 0 without a cell
    virial  W = −V σ                                           eV
    H v     = ∂²E/∂x² · v                                      eV/Å²
Forces and stress come from one reverse pass over the same energy, so every model is conservative by
construction. Energies are `model.energies` (relative to the model's reference energies, see distiller.model).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distiller.batch import Batch, cell_determinant
from distiller.model import EnergyModel
from distiller.precision import HIGHEST


class Predictions(NamedTuple):
    energy: jax.Array  # (G,) eV relative to the model's reference (ensemble mean), 0 on padding graphs
    forces: jax.Array  # (A, 3) eV/Å, 0 on padding atoms
    stress: jax.Array  # (G, 3, 3) eV/Å³, 0 for non-periodic graphs (and all graphs unless asked for)
    spread: jax.Array  # (G,) eV, standard deviation of the ensemble members' energies (0 for one model)
    overflow: jax.Array  # () bool: a capacity was too small; the numbers are not to be used
    hvp: jax.Array | None = None  # (A, 3) eV/Å², H·v along the `directions` given (None without)


def strained(batch: Batch, positions: jax.Array, strain: jax.Array) -> Batch:
    """The batch at `positions`, positions and cells deformed by (I + strain[g]) graph by graph."""
    positions = positions + jnp.einsum("ai,aij->aj", positions, strain[batch.graph_index], precision=HIGHEST)
    cell = batch.cell + jnp.einsum("gki,gij->gkj", batch.cell, strain, precision=HIGHEST)
    return batch._replace(positions=positions, cell=cell)


def _periodic(batch: Batch) -> jax.Array:
    return jnp.any(batch.pbc, axis=-1) & batch.graph_mask


def predictions(model: EnergyModel, params: Any, batch: Batch, capacity: Any = None, *,
                stress: bool = False, directions: jax.Array | None = None) -> Predictions:
    """Energy, forces and (if `stress`) stress of every graph, from one reverse pass; with `directions` (A, 3)
    also H·v along them, the same pass differentiated forward (forward over reverse). Jittable."""
    if stress:
        def gradient(positions, strain):
            def total(positions, strain):
                out = model.energies(params, strained(batch, positions, strain), capacity)
                return jnp.sum(out.energy), out

            return jax.grad(total, argnums=(0, 1), has_aux=True)(positions, strain)

        primals = (batch.positions, jnp.zeros((batch.n_graphs, 3, 3), batch.positions.dtype))
    else:  # no strain at all: XLA cannot drop x + x·0 (NaN semantics), and forces alone are MD's hot path
        def gradient(positions):
            def total(positions):
                out = model.energies(params, batch._replace(positions=positions), capacity)
                return jnp.sum(out.energy), out

            de_dx, out = jax.grad(total, has_aux=True)(positions)
            return (de_dx,), out

        primals = (batch.positions,)
    if directions is None:
        grads, out = gradient(*primals)
        hvp = None
    else:
        _second_order(model)
        v = jnp.where(batch.atom_mask[:, None], directions, 0.0).astype(batch.positions.dtype)
        tangents = (v,) + tuple(jnp.zeros_like(p) for p in primals[1:])
        (grads, out), (grad_tangents, _) = jax.jvp(gradient, primals, tangents)
        hvp = jnp.where(batch.atom_mask[:, None], grad_tangents[0], 0.0)
    if stress:
        de_deps = grads[1]
        volume = jnp.abs(cell_determinant(batch.cell))
        periodic = _periodic(batch)
        sigma = 0.5 * (de_deps + jnp.swapaxes(de_deps, -1, -2)) / jnp.where(periodic, volume, 1.0)[:, None, None]
        sigma = jnp.where(periodic[:, None, None], sigma, 0.0)
    else:
        sigma = jnp.zeros((batch.n_graphs, 3, 3), batch.positions.dtype)
    forces = jnp.where(batch.atom_mask[:, None], -grads[0], 0.0)
    return Predictions(out.energy, forces, sigma, out.spread, out.overflow, hvp)


def forces(model: EnergyModel, params: Any, batch: Batch, capacity: Any = None) -> jax.Array:
    """(A, 3) eV/Å."""
    return predictions(model, params, batch, capacity).forces


def virial(model: EnergyModel, params: Any, batch: Batch, capacity: Any = None) -> jax.Array:
    """(G, 3, 3) eV: −V σ (ASE's sign), zero for non-periodic graphs."""
    sigma = predictions(model, params, batch, capacity, stress=True).stress
    return -jnp.abs(cell_determinant(batch.cell))[:, None, None] * sigma


def _second_order(model: EnergyModel) -> None:
    if model.host_only:
        raise TypeError(f"{model.name} is computed outside JAX and has first derivatives only (its forces and "
                        f"stress); Hessians need a JAX model (a FeNNol teacher or a student)")


def unit_directions(batch: Batch, key: jax.Array) -> jax.Array:
    """(A, 3) a random direction per graph, uniform on the sphere of its atoms' 3n components (norm 1 per graph),
    0 on padding atoms: what H·v is taken along, online in the training step and by `distiller label --hvp`."""
    v = jnp.where(batch.atom_mask[:, None], jax.random.normal(key, batch.positions.shape, batch.positions.dtype), 0.0)
    norm = jnp.sqrt(jax.ops.segment_sum(jnp.sum(v * v, axis=1), batch.graph_index, num_segments=batch.n_graphs))
    return v / jnp.maximum(norm, 1e-12)[batch.graph_index][:, None]


def hessian_vector_product(model: EnergyModel, params: Any, batch: Batch, capacity: Any, vectors: jax.Array) -> jax.Array:
    """(A, 3) H v in eV/Å² for displacements `vectors` (A, 3) (forward over reverse; padding atoms give 0)."""
    return predictions(model, params, batch, capacity, directions=vectors).hvp


def hessian(model: EnergyModel, params: Any, batch: Batch, capacity: Any, n_atoms: int, block: int = 64) -> jax.Array:
    """(3n, 3n) Hessian in eV/Å² of the first `n_atoms` atoms of the batch (one structure), column by column:
    `block` Hessian-vector products at a time, so memory stays at `block` gradients. Not symmetrised."""
    _second_order(model)
    size = 3 * n_atoms

    def column(k):  # the k-th unit vector made inside the map: no (3n, 3n) identity in memory
        v = jnp.zeros_like(batch.positions).at[:n_atoms].set(jax.nn.one_hot(k, size, dtype=batch.positions.dtype)
                                                            .reshape(n_atoms, 3))
        return hessian_vector_product(model, params, batch, capacity, v)[:n_atoms].reshape(size)

    return jax.lax.map(column, jnp.arange(size), batch_size=min(block, size)).T
