"""Structures perturbed inside jit (the online trainer's step, the rattle sampler): rattling and cell strain."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distiller.batch import Batch
from distiller.precision import HIGHEST


def perturb(batch: Batch, key: jax.Array, rattle: float, strain: float) -> Batch:
    """Gaussian displacements (std `rattle` Å) on real atoms, then a random symmetric strain of periodic cells.

    The strain deforms positions and cell together (x → x (I + ε)), so a periodic structure stays the same
    crystal, compressed or sheared; molecules are only rattled.
    """
    key_rattle, key_strain = jax.random.split(key)
    noise = rattle * jax.random.normal(key_rattle, batch.positions.shape, batch.positions.dtype)
    positions = batch.positions + jnp.where(batch.atom_mask[:, None], noise, 0.0)
    eps = strain * jax.random.uniform(key_strain, batch.cell.shape, batch.cell.dtype, -1.0, 1.0)
    eps = 0.5 * (eps + jnp.swapaxes(eps, -1, -2))
    periodic = jnp.any(batch.pbc, axis=-1) & batch.graph_mask
    deform = jnp.eye(3, dtype=eps.dtype) + jnp.where(periodic[:, None, None], eps, 0.0)
    positions = jnp.einsum("ai,aij->aj", positions, deform[batch.graph_index], precision=HIGHEST)
    cell = jnp.einsum("gij,gjk->gik", batch.cell, deform, precision=HIGHEST)
    return batch._replace(positions=positions, cell=cell)
