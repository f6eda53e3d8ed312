"""Geometry relaxation (JAX-MD's FIRE) and Hessians for any distiller model, at a fixed cell.

`Relaxer` compiles FIRE once for a structure (the step count is traced) and reuses it for any positions and
(periodic) cell of the same atoms, which is what rattle-relax-repeat needs: many short relaxations, one
compilation. Positions are not wrapped during relaxation (the energy is exact either way, see
`distiller.md.potential`), and every atom's step is capped at `max_step` Å, as ASE's FIRE does, so a strongly
rattled structure cannot jump apart.

Units: JAX-MD's FIRE with unit masses, time in ASE's unit (10.18 fs), ASE's FIRE defaults (dt 0.1, dt_max 1.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax_md
import numpy as np

from distiller import capacity as capacities
from distiller.batch import BatchShape, near_origin, pad_structures, with_neighbours
from distiller.derivatives import hessian as model_hessian
from distiller.load import as_model
from distiller.md.potential import DEFAULT_SKIN, memoised, potential
from distiller.md.simulate import run_regrowing
from distiller.predict import batch_predictions
from distiller.structure import Structure


def capped_shift(max_step: float):
    """A JAX-MD shift_fn, R + dR with each atom's dR shortened to at most `max_step` Å."""
    def shift_fn(R, dR, **unused_kwargs):
        norm = jnp.sqrt(jnp.sum(dR**2, axis=-1, keepdims=True) + 1e-30)
        return R + dR * jnp.minimum(1.0, max_step / norm)

    return shift_fn


def _fire(model, structure: Structure, dt_start: float, dt_max: float, max_step: float, dr_threshold: float):
    """(neighbor_fn, init, run, force) of FIRE for a structure: the functions jit compiles, built once."""
    neighbor_fn, energy_fn = potential(model, structure, dr_threshold)
    init_fn, apply_fn = jax_md.minimize.fire_descent(energy_fn, capped_shift(max_step), dt_start=dt_start,
                                                     dt_max=dt_max)
    init = jax.jit(lambda R, nbrs, cell: init_fn(R, neighbor=nbrs, cell=cell))
    force = jax.jit(lambda R, nbrs, cell: jax_md.quantity.force(energy_fn)(R, neighbor=nbrs, cell=cell))

    @jax.jit
    def run(state, nbrs, cell, steps):
        """`steps` FIRE steps (a traced count: one compilation serves every length)."""
        def one_step(_, carry):
            state, nbrs = carry
            state = apply_fn(state, neighbor=nbrs, cell=cell)
            return state, nbrs.update(state.position, cell=cell)

        return jax.lax.fori_loop(0, steps, one_step, (state, nbrs))

    return neighbor_fn, init, run, force


class Relaxer:
    """FIRE relaxation of one structure's atoms (any positions, any cell of the same atoms), compiled once."""

    def __init__(self, model, structure: Structure, *, chunk: int = 50, dt_start: float = 0.1, dt_max: float = 1.0,
                 max_step: float = 0.2, dr_threshold: float = DEFAULT_SKIN):
        self.model = as_model(model)
        self.structure = structure.validated()
        self.chunk = int(chunk)
        settings = (float(dt_start), float(dt_max), float(max_step), float(dr_threshold))
        self.neighbor_fn, self._init, self._run, self._force = memoised(
            "fire", self.model, self.structure, settings, lambda: _fire(self.model, self.structure, *settings))
        self._nbrs = None

    def _cell(self, cell):
        return jnp.asarray(self.structure.cell if cell is None else cell, jnp.float32) if self.structure.periodic \
            else None

    def __call__(self, positions, cell=None, *, steps: int | None = None, fmax: float | None = None):
        """Relax `positions` (N, 3) Å at `cell` for at most `steps` FIRE steps (default: one chunk), stopping
        after the first chunk whose largest force is below `fmax` eV/Å. Returns (positions (N, 3) float64,
        largest force eV/Å at them, steps taken)."""
        steps = self.chunk if steps is None else int(steps)
        positions = np.asarray(positions, np.float64)
        # Relaxed near the origin (float32 far from it is coarse), moved back by the same whole vectors after.
        offset = positions - near_origin(self.structure.replace(
            positions=positions, cell=self.structure.cell if cell is None else np.asarray(cell, np.float64)))
        cell = self._cell(cell)
        R = jnp.asarray(positions - offset, jnp.float32)
        if self._nbrs is None:
            self._nbrs = self.neighbor_fn.allocate(R, cell=cell)
        nbrs = self._nbrs.update(R, cell=cell)
        if bool(nbrs.did_buffer_overflow):
            nbrs = self.neighbor_fn.allocate(R, cell=cell, previous=nbrs)
        state = self._init(R, nbrs, cell)
        done = 0
        largest = _largest_force(state.force)
        while done < steps and not (fmax is not None and largest < fmax):
            n = min(self.chunk, steps - done)
            state, nbrs, _, _ = run_regrowing(lambda s, nb: (*self._run(s, nb, cell, n), None), state, nbrs,
                                              self.neighbor_fn, lambda R, nb: self._force(R, nb, cell),
                                              self.structure.name, cell=cell)
            done += n
            largest = _largest_force(state.force)
            if not np.isfinite(largest):
                raise FloatingPointError(f"{self.structure.name}: relaxation with {self.model.name} became non-finite")
        self._nbrs = nbrs  # its capacities serve the next call
        return np.asarray(state.position, np.float64) + offset, largest, done


def _largest_force(force) -> float:
    return float(np.sqrt(np.max(np.sum(np.asarray(force, np.float64) ** 2, axis=-1))))


def relax(model, structure: Structure, *, fmax: float = 0.01, steps: int = 2000, chunk: int = 50) -> Structure:
    """The structure relaxed (positions only, cell fixed) until the largest force is below `fmax` eV/Å or
    `steps` FIRE steps have run; `info["relax"]` records the steps and the final largest force."""
    relaxer = Relaxer(model, structure, chunk=chunk)
    positions, largest, done = relaxer(structure.positions, steps=steps, fmax=fmax)
    return structure.replace(positions=positions, energy=None, forces=None, stress=None,
                             info={**structure.info, "relax": {"steps": done, "fmax": largest}})


def _hessian_function(model, n_atoms: int, block: int):
    """The jitted Hessian of the first `n_atoms` atoms of a batch with edges (one structure), built once."""
    return jax.jit(lambda params, batch, capacity: model_hessian(model, params, batch, capacity, n_atoms, block),
                   static_argnums=2)


def hessian(model, structure: Structure, block: int = 64) -> np.ndarray:
    """(3N, 3N) Hessian of the model's energy at the structure's positions, eV/Å², symmetrised (float64).

    Columns are Hessian-vector products (forward over reverse, `distiller.derivatives.hessian`), `block` at a
    time, so memory stays at `block` gradients whatever the size.
    """
    model = as_model(model)
    structure = structure.validated()
    model.check([structure])
    n = structure.n_atoms
    columns = memoised("hessian", model, structure, (int(block),), lambda: _hessian_function(model, n, int(block)))
    batch = jax.tree.map(jnp.asarray, pad_structures([structure], BatchShape(atoms=n + 1, graphs=2)))
    capacity = capacities.allocate(model, batch, model.cutoff)

    def compute(capacity):  # the model's capacity checked by a forces pass at the same capacities
        out, needed = batch_predictions(model, model.params, batch, capacity, float(model.cutoff), False)
        return needed, out.overflow

    _, capacity, _ = capacities.until_fits(
        compute, capacity, lambda c, needed, _: capacities.grow(model, c, batch, model.cutoff, needed),
        what=f"{structure.name}: Hessian of {model.name}")
    with_edges, _ = with_neighbours(batch, float(model.cutoff), capacity.neighbours)
    H = np.asarray(columns(model.params, with_edges, capacity.model), np.float64)
    if not np.all(np.isfinite(H)):
        raise FloatingPointError(f"{structure.name}: the Hessian of {model.name} is not finite")
    return 0.5 * (H + H.T)
