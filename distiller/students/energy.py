"""Energies, forces and stress of a student on a Batch: pure functions of (model, params, batch).

Forces are -dE/dx and stress is (1/V) dE/d(strain), both from one reverse-mode pass over the same
energy, so the student is conservative by construction. Strain acts on each graph as x -> x (I + eps),
cell -> cell (I + eps) (row vectors), and edge vectors come from `Batch.edge_vectors(positions, cell)`,
so periodic images move with the cell. Sign convention: ASE's (stress = (1/V) dE/d eps; positive under
tension), zero for non-periodic graphs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller.batch import Batch
from distiller.precision import HIGHEST, full_precision_scope
from distiller.students.schnet import SchNet, StudentConfig


def build_model(config: StudentConfig) -> SchNet:
    return SchNet(config)


def edge_lengths(vectors: jax.Array, edge_mask: jax.Array) -> jax.Array:
    """|v| on real edges, 0 on padding edges, with finite gradients everywhere.

    Padding edges join an atom to itself (v = 0), where d|v|/dv is 0/0; the where-before-sqrt keeps that
    NaN out of the backward pass (a where after the sqrt would still multiply 0 by NaN).
    """
    d2 = jnp.sum(vectors**2, axis=-1)
    safe = jnp.where(edge_mask, d2, 1.0)
    return jnp.where(edge_mask, jnp.sqrt(safe), 0.0)


def atom_energies(model: SchNet, params, batch: Batch, positions: jax.Array | None = None,
                  cell: jax.Array | None = None) -> jax.Array:
    """(A,) per-atom energies in eV (0 on padding atoms) at the given (or the batch's) positions and cells."""
    lengths = edge_lengths(batch.edge_vectors(positions, cell, kernel=model.config.kernel), batch.edge_mask)
    with full_precision_scope():  # not TF32 on GPUs (distiller.precision)
        return model.apply(params, batch.numbers, lengths, batch.senders, batch.receivers, batch.edge_mask,
                           batch.atom_mask)


def energy(model: SchNet, params, batch: Batch) -> jax.Array:
    """(G,) total energy of each graph in eV; 0 on padding graphs.

    Here and below, the batch's edges must include every pair closer than the student's cutoff (a list
    built with a larger cutoff is fine: the envelope zeroes the longer edges).
    """
    return _graph_sum(atom_energies(model, params, batch), batch)


def energy_forces(model: SchNet, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Energy (G,) eV and forces (A, 3) eV/Å = -dE/dx, without the strain derivative (MD, benchmarks)."""
    def total(positions):
        e = _graph_sum(atom_energies(model, params, batch, positions), batch)
        return jnp.sum(e), e

    de_dx, e = jax.grad(total, has_aux=True)(batch.positions)
    return e, jnp.where(batch.atom_mask[:, None], -de_dx, 0.0)


def energy_forces_stress(model: SchNet, params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Energy (G,) eV, forces (A, 3) eV/Å = -dE/dx, stress (G, 3, 3) eV/Å³ = (1/V) dE/d eps (0 if not periodic)."""
    def total(positions, strain):
        # x (I + eps_g) for every atom of graph g; cells likewise. eps = 0, so only its derivative matters.
        positions = positions + jnp.einsum("ai,aij->aj", positions, strain[batch.graph_index], precision=HIGHEST)
        cell = batch.cell + jnp.einsum("gki,gij->gkj", batch.cell, strain, precision=HIGHEST)
        e = _graph_sum(atom_energies(model, params, batch, positions, cell), batch)
        return jnp.sum(e), e

    strain = jnp.zeros_like(batch.cell)
    (de_dx, de_deps), e = jax.grad(total, argnums=(0, 1), has_aux=True)(batch.positions, strain)
    forces = jnp.where(batch.atom_mask[:, None], -de_dx, 0.0)
    periodic = jnp.any(batch.pbc, axis=-1) & batch.graph_mask
    volume = jnp.abs(jnp.linalg.det(batch.cell))
    stress = jnp.where(periodic[:, None, None], de_deps / jnp.where(periodic, volume, 1.0)[:, None, None], 0.0)
    return e, forces, stress


def _graph_sum(per_atom: jax.Array, batch: Batch) -> jax.Array:
    e = jax.ops.segment_sum(per_atom, batch.graph_index, num_segments=batch.n_graphs)
    return jnp.where(batch.graph_mask, e, 0.0)


def fit_reference_energies(numbers_per_structure: Sequence[np.ndarray], energies,
                           elements: Sequence[int]) -> np.ndarray:
    """Per-element energies (eV) that best explain `energies` as sums over atoms: least squares on counts.

    Returns (len(elements),) float64 in `elements`' order. An element absent from the data gets 0; where the
    data cannot tell elements apart (e.g. only water: H and O always 2:1) the minimum-norm solution is used.
    Raises ValueError for mismatched lengths, non-finite energies or elements outside `elements`.
    """
    elements = [int(z) for z in elements]
    energies = np.asarray(energies, np.float64).reshape(-1)
    if len(numbers_per_structure) != energies.shape[0]:
        raise ValueError(f"{len(numbers_per_structure)} structures but {energies.shape[0]} energies")
    if energies.shape[0] == 0:
        raise ValueError("fit_reference_energies needs at least one structure")
    if not np.all(np.isfinite(energies)):
        raise ValueError(f"non-finite energies at structures {np.flatnonzero(~np.isfinite(energies))[:10].tolist()}")
    counts = np.zeros((energies.shape[0], len(elements)), np.float64)
    column = {z: k for k, z in enumerate(elements)}
    for s, numbers in enumerate(numbers_per_structure):
        zs, n = np.unique(np.asarray(numbers, np.int64), return_counts=True)
        unknown = sorted(set(zs.tolist()) - set(column))
        if unknown:
            raise ValueError(f"structure {s} has elements {unknown} outside {elements}")
        counts[s, [column[z] for z in zs.tolist()]] = n
    present = counts.sum(axis=0) > 0
    reference = np.zeros(len(elements), np.float64)
    solution, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    reference[present] = solution
    return reference


def init_student(config: StudentConfig, key: jax.Array, batch: Batch, reference_energies=None):
    """Random student parameters for `config` (shapes from `batch`), reference energies set if given."""
    if reference_energies is not None:
        reference = np.asarray(reference_energies, np.float64)
        if reference.shape != (len(config.elements),) or not np.all(np.isfinite(reference)):
            raise ValueError(f"reference_energies must be {len(config.elements)} finite numbers (one per element "
                             f"of {config.elements}), got {reference}")
    model = build_model(config)
    lengths = edge_lengths(batch.edge_vectors(), batch.edge_mask)
    # jit: one compilation instead of hundreds of eager dispatches.
    params = jax.jit(model.init)(key, batch.numbers, lengths, batch.senders, batch.receivers, batch.edge_mask,
                                 batch.atom_mask)
    if reference_energies is not None:
        inner = dict(params["params"])
        inner["reference_energies"] = jnp.asarray(reference, inner["reference_energies"].dtype)
        params = {**params, "params": inner}
    return params
