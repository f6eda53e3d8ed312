"""Online MD sampling: training structures drawn from a pool of replicas of the seed structures that move by
teacher MD between optimiser steps, inside the jitted training step (`Experiment(sampling=MDSampling(...))`).

The pool is one padded Batch of R replicas (`Layout`: replica r is seed r mod S at temperature
temperatures[(r // S) mod T]); its state (`Pool`: positions, momenta, forces and the last advance's
observables) is a field of the TrainState, so it is checkpointed with the optimizer and a resume continues
exactly. Each optimiser step:

    pool ──md_steps(steps_between, Langevin BAOAB, teacher forces)──▶ pool'        (overflow, observables)
    pool' ──drawn(Draw of (seed, step))──▶ batch_size replicas' frames ──OnlineTeacher.labelled──▶ labels

The integrator is JAX-MD's `nvt_langevin` scheme (BAOAB: half kick, half drift, friction and noise over the
whole step, half drift, forces, half kick; friction 0 is velocity Verlet) written over the padded Batch, so the
forces are `derivatives.predictions` of the teacher on the neighbour list rebuilt at every MD step (fixed
capacity, overflow flag). Units are ASE's as in distiller.md.simulate: eV, Å, amu, time in ASE's unit; masses
are `md.simulate.masses`. A molecule's centre-of-mass momentum is removed after the noise (it would random-walk
the molecule away from the origin, where float32 is coarse), so its temperature counts 3N − 3 degrees of
freedom; periodic replicas count 3N and are wrapped into their cell after every drift.

Random numbers depend on (seed, step) only: the MD noise of optimiser step k is drawn from the step's key
(folded with 2), equilibration's and the initial momenta from a key of the seed that no step uses. A step that
overflows a capacity (the pool's or the drawn batch's) is not applied; `MDSampler.grow` replays its advance
recording the frames, measures the capacities they need, and the step is recomputed with the same key.

Blow-ups: every advance records each replica's hottest step, shortest interatomic distance and the change of its
total energy (`violations`, with md.simulate's `Safety` temperature rule). An advance in which a replica broke
a limit is never an overflow, so the step is applied and `MDSampler.check` (after every optimiser step, before
it is logged or checkpointed) raises `md.simulate.MDFailure` naming the replica, its seed structure and
temperature, the training step, the MD step and the cause: exploded coordinates never reach the neighbour
list's allocation (nor do those that would ask for absurd bins in a replayed advance: `_frames`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import units

from distiller import capacity as capacities
from distiller.batch import Batch, BatchShape, cell_inverse, pad_structures, per_graph, unbatch, with_neighbours
from distiller.config import Experiment, MDSampling
from distiller.derivatives import predictions
from distiller.model import EnergyModel
from distiller.neighbours import round_up
from distiller.precision import HIGHEST
from distiller.structure import Structure
from distiller.train.labels import OnlineTeacher, step_key

if TYPE_CHECKING:
    from distiller.md.simulate import MDFailure

# distiller.md.simulate is imported where it is used: it imports jax_md, whose import initialises JAX's backend,
# and a training program must leave that to the torch memory policy (distiller.gpu_memory) until a teacher loads.

# A step number no run reaches: the key of the initial momenta (folded with 0) and of equilibration's advances.
START = 2**32 - 1


class Layout(NamedTuple):
    """What does not change in a pool: its replicas padded as one Batch (R + 1 graphs) and the dynamics' constants."""

    batch: Batch  # the seed structures of the replicas (positions: where they started), no edges
    mass: jax.Array  # (A,) amu, 1 on padding atoms
    kT: jax.Array  # (A,) eV, each atom's replica's thermostat; 0 on padding atoms
    dof: jax.Array  # (G,) degrees of freedom: 3N − 3 for molecules, 3N for periodic cells (1 on padding)
    molecule: jax.Array  # (G,) bool: real non-periodic graphs, whose centre-of-mass momentum is removed
    dt: jax.Array  # () ASE time units
    c1: jax.Array  # () exp(−friction dt): what the O step keeps of the momenta
    limit: jax.Array  # (G,) K: the hottest MD step a replica may have (md.simulate's Safety rule; inf on padding)


class Pool(NamedTuple):
    """The replicas' state between optimiser steps (per-graph arrays have R + 1 entries, the last padding)."""

    positions: jax.Array  # (A, 3) Å
    momenta: jax.Array  # (A, 3) amu Å / ASE time
    forces: jax.Array  # (A, 3) eV/Å, the teacher's at `positions`
    total: jax.Array  # (G,) eV: potential (relative to the teacher's reference) + kinetic
    temperature: jax.Array  # (G,) K, mean over the last advance's MD steps
    hottest: jax.Array  # (G,) K, the hottest MD step of the last advance
    closest: jax.Array  # (G,) Å, the shortest interatomic distance over the last advance
    jump: jax.Array  # (G,) eV/atom, change of `total` over the last advance
    md_step: jax.Array  # () int32, MD steps done (equilibration included)


class Draw(NamedTuple):
    """A step's inputs: which replicas it draws, as the padded batch of their seeds and where their atoms are."""

    batch: Batch  # the drawn replicas' seed structures, padded like OnlineTeacher's (positions: the seeds')
    atoms: jax.Array  # (A,) int32: each atom's index in the pool (the pool's last, a padding atom, for padding)


class MDCapacity(NamedTuple):
    """The static capacities of a step: the drawn batch's (neighbour list at both cutoffs, teacher) and the pool's."""

    draw: capacities.Capacity
    pool: capacities.Capacity


# --- the dynamics: pure functions over the pool ------------------------------------------------------------
def kinetic(layout: Layout, momenta: jax.Array) -> jax.Array:
    """(G,) eV."""
    per_atom = jnp.where(layout.batch.atom_mask, 0.5 * jnp.sum(momenta**2, axis=1) / layout.mass, 0.0)
    return per_graph(per_atom, layout.batch)


def temperature(layout: Layout, momenta: jax.Array) -> jax.Array:
    """(G,) K, the kinetic temperature of each graph's degrees of freedom."""
    return 2.0 * kinetic(layout, momenta) / (layout.dof * units.kB)


def without_drift(layout: Layout, momenta: jax.Array) -> jax.Array:
    """The momenta less each molecule's centre-of-mass motion (p_i − m_i P / M); periodic graphs unchanged."""
    b = layout.batch
    total = jax.ops.segment_sum(momenta, b.graph_index, num_segments=b.n_graphs)
    mass = jax.ops.segment_sum(jnp.where(b.atom_mask, layout.mass, 0.0), b.graph_index, num_segments=b.n_graphs)
    velocity = jnp.where(layout.molecule[:, None], total / jnp.maximum(mass, 1e-12)[:, None], 0.0)
    return jnp.where(b.atom_mask[:, None], momenta - layout.mass[:, None] * velocity[b.graph_index], 0.0)


def wrapped(layout: Layout, positions: jax.Array) -> jax.Array:
    """Periodic atoms moved by whole lattice vectors into their cell (as `batch.near_origin` places them)."""
    b = layout.batch
    cell = b.cell[b.graph_index]
    fractional = jnp.einsum("ai,aij->aj", positions, cell_inverse(b.cell)[b.graph_index], precision=HIGHEST)
    lattice = jnp.where(b.pbc[b.graph_index], jnp.floor(fractional), 0.0)
    return positions - jnp.einsum("ai,aij->aj", lattice, cell, precision=HIGHEST)


def evaluate(teacher: EnergyModel, capacity: capacities.Capacity, params: Any, layout: Layout,
             positions: jax.Array):
    """The teacher at the pool's positions: (forces, potential energy (G,), shortest distance (G,), overflow,
    what the neighbour list needed (4,)), the list built at the teacher's cutoff."""
    batch, neighbours = with_neighbours(layout.batch._replace(positions=positions), teacher.cutoff,
                                        capacity.neighbours)
    labels = predictions(teacher, params, batch, capacity.model)
    length = jnp.linalg.norm(batch.edge_vectors(), axis=1)
    closest = jax.ops.segment_min(jnp.where(batch.edge_mask, length, jnp.inf), batch.graph_index[batch.receivers],
                                  num_segments=batch.n_graphs)
    return labels.forces, labels.energy, closest, neighbours.overflow | labels.overflow, neighbours.needed


def md_steps(teacher: EnergyModel, capacity: capacities.Capacity, params: Any, layout: Layout, pool: Pool,
             key: jax.Array, steps: int, record: bool = False):
    """`steps` BAOAB steps of every replica (one lax.scan): (pool, overflow, recorded). recorded: per step the
    positions (if `record`, else None), the temperature (G,) and what the neighbour list needed (4,)."""
    half = 0.5 * layout.dt
    atoms = layout.batch.atom_mask[:, None]
    noise_scale = jnp.sqrt((1.0 - layout.c1**2) * layout.mass * layout.kT)[:, None]
    n_atoms = jnp.maximum(layout.batch.n_atoms, 1).astype(jnp.float32)

    def one(carry, k):
        x, p, f, _, overflow = carry
        p = p + half * f
        x = x + half * p / layout.mass[:, None]
        noise = jax.random.normal(jax.random.fold_in(key, k), p.shape, p.dtype)
        p = without_drift(layout, layout.c1 * p + jnp.where(atoms, noise_scale * noise, 0.0))
        x = wrapped(layout, x + half * p / layout.mass[:, None])
        f, energy, closest, overflow_k, needed = evaluate(teacher, capacity, params, layout, x)
        p = p + half * f
        t = temperature(layout, p)
        return (x, p, f, energy, overflow | overflow_k), (x if record else None, t, closest, needed)

    start = (pool.positions, pool.momenta, pool.forces, jnp.zeros_like(pool.total), jnp.asarray(False))
    (x, p, f, energy, overflow), (frames, t, closest, needed) = jax.lax.scan(one, start, jnp.arange(steps))
    total = energy + kinetic(layout, p)
    moved = Pool(x, p, f, total, jnp.mean(t, axis=0), jnp.max(t, axis=0), jnp.min(closest, axis=0),
                 (total - pool.total) / n_atoms, pool.md_step + steps)
    return moved, overflow, (frames, t, needed)


advance_pool = jax.jit(md_steps, static_argnames=("teacher", "capacity", "steps", "record"))
_evaluate = jax.jit(evaluate, static_argnames=("teacher", "capacity"))


def layout_of(structures: Sequence[Structure], temperatures: Sequence[float], sampling: MDSampling) -> Layout:
    """The layout of a pool of these replicas (one structure each) at these temperatures (K)."""
    n_real = sum(s.n_atoms for s in structures)
    batch = pad_structures(structures, BatchShape(atoms=round_up(n_real + 1), graphs=len(structures) + 1))
    A, G = batch.positions.shape[0], batch.graph_mask.shape[0]
    mass, kT = np.ones(A, np.float32), np.zeros(A, np.float32)
    dof, molecule = np.ones(G, np.float32), np.zeros(G, bool)
    limit = np.full(G, np.inf, np.float32)
    from distiller.md.simulate import Dynamics, Safety, masses

    safety = Safety(max_temperature=sampling.max_temperature, max_energy_jump=sampling.max_energy_jump)
    start = 0
    for r, (s, t) in enumerate(zip(structures, temperatures, strict=True)):
        mass[start:start + s.n_atoms], kT[start:start + s.n_atoms] = masses(s), units.kB * t
        molecule[r] = not s.periodic
        dof[r] = max(3 * s.n_atoms - (3 if molecule[r] else 0), 1)
        limit[r] = safety.temperature_limit(Dynamics("nvt", temperature=float(t)))
        start += s.n_atoms
    dt = sampling.dt * units.fs
    c1 = np.exp(-sampling.friction / units.fs * dt)
    return jax.tree.map(jnp.asarray, Layout(batch, mass, kT, dof, molecule, np.float32(dt), np.float32(c1), limit))


# What `violations` finds, by code (0: nothing).
CAUSES = (None, "non-finite", "temperature", "distance", "energy")


def violations(layout: Layout, pool: Pool, min_distance: float, max_energy_jump: float) -> jax.Array:
    """(G,) int32: the first blow-up criterion each replica's last advance broke (CAUSES), 0 for none."""
    finite = jnp.isfinite(pool.hottest) & jnp.isfinite(pool.jump) & ~jnp.isnan(pool.closest)
    code = jnp.where(jnp.abs(pool.jump) > max_energy_jump, 4, 0)
    code = jnp.where(pool.closest < min_distance, 3, code)
    code = jnp.where(pool.hottest > layout.limit, 2, code)
    return jnp.where(finite, code, 1).astype(jnp.int32)


def drawn(pool: Pool, draw: Draw) -> Batch:
    """The drawn replicas' frames: the seeds' batch at the pool's positions."""
    positions = jnp.where(draw.batch.atom_mask[:, None], pool.positions[draw.atoms], 0.0)
    return draw.batch._replace(positions=positions)


def thermal_momenta(layout: Layout, key: jax.Array) -> jax.Array:
    """(A, 3) Maxwell-Boltzmann momenta at each replica's temperature, without a molecule's centre-of-mass motion,
    scaled so that each replica's kinetic temperature is exactly its own (md.simulate.maxwell_boltzmann's rule)."""
    p = jnp.sqrt(layout.mass * layout.kT)[:, None] * jax.random.normal(key, layout.batch.positions.shape, jnp.float32)
    p = without_drift(layout, jnp.where(layout.batch.atom_mask[:, None], p, 0.0))
    target = 0.5 * layout.dof * per_graph(jnp.where(layout.batch.atom_mask, layout.kT, 0.0), layout.batch) / \
        jnp.maximum(layout.batch.n_atoms, 1)
    now = kinetic(layout, p)
    scale = jnp.where(now > 0, jnp.sqrt(target / jnp.where(now > 0, now, 1.0)), 0.0)
    return p * scale[layout.batch.graph_index][:, None]


# --- the label source ------------------------------------------------------------------------------------------
class MDSampler(OnlineTeacher):
    """OnlineTeacher's labels on frames of teacher MD: a pool of replicas of the seeds advanced in the step."""

    def __init__(self, config: Experiment, teacher: EnergyModel, student_cutoff: float):
        if not isinstance(config.sampling, MDSampling):
            raise TypeError(f"MDSampler needs sampling=MDSampling(...), got {type(config.sampling).__name__}")
        super().__init__(config, teacher, student_cutoff)  # seeds checked; capacities (self.grow) at the seeds

    # --- the pool's layout: from the seeds and the config ----------------------------------------------------
    @property
    def md(self) -> MDSampling:
        return self.config.sampling

    @functools.cached_property
    def replica_seeds(self) -> list[int]:
        """The seed structure of each replica (round-robin)."""
        return [r % len(self.seeds) for r in range(self.md.replicas)]

    @functools.cached_property
    def replica_temperatures(self) -> np.ndarray:
        """(R,) K: each seed's replicas run along the ladder."""
        ladder = self.md.temperatures
        return np.asarray([ladder[(r // len(self.seeds)) % len(ladder)] for r in range(self.md.replicas)], np.float64)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(R,) the pool index of each replica's first atom."""
        sizes = [self.seeds[k].n_atoms for k in self.replica_seeds]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)

    @functools.cached_property
    def layout(self) -> Layout:
        return layout_of([self.seeds[k] for k in self.replica_seeds], self.replica_temperatures, self.md)

    @property
    def limits(self) -> np.ndarray:
        """(R,) K: md.simulate's Safety rule at each replica's temperature."""
        return np.asarray(self.layout.limit)[:self.md.replicas]

    # --- inputs --------------------------------------------------------------------------------------------------
    def inputs(self, step: int, seed: int | None = None) -> Draw:
        """The replicas of `step`: batch_size distinct ones, a function of (seed, step) only."""
        rng = np.random.default_rng([self.config.seed if seed is None else seed, step])
        chosen = rng.choice(self.md.replicas, self.config.batch_size, replace=False)
        batch = pad_structures([self.seeds[self.replica_seeds[r]] for r in chosen], self.shape)
        atoms = np.full(self.shape.atoms, self.layout.batch.positions.shape[0] - 1, np.int32)
        start = 0
        for r in chosen:
            n = self.seeds[self.replica_seeds[r]].n_atoms
            atoms[start:start + n] = self.offsets[r] + np.arange(n)
            start += n
        return jax.tree.map(jnp.asarray, Draw(batch, atoms))

    # --- capacities ----------------------------------------------------------------------------------------------
    def grow(self, inputs: Draw, key: jax.Array, pool: Pool | None = None) -> None:
        """Capacities that fit the step of (inputs, key) from `pool` and everything they fitted before; without a
        pool (at the start), capacities that fit the seeds. The step's advance is replayed at the current
        capacities, recording its frames (`_frames`), and the capacities are measured on them and on its draw."""
        previous = self.current or MDCapacity(None, None)
        if pool is None:
            frames, moved = [self.layout.batch.positions], None
        else:
            frames, moved = self._frames(self.teacher.params, pool, md_key(key), self.step_of(pool))
        pool_capacity = previous.pool
        for positions in frames:
            pool_capacity = capacities.allocate(self.teacher, self.layout.batch._replace(positions=positions),
                                                self.teacher.cutoff, previous=pool_capacity)
        batch = inputs.batch if moved is None else drawn(moved, inputs)
        draw_capacity = capacities.allocate(self.teacher, self.sample(batch, key), self.cutoff,
                                            previous=previous.draw)
        self.current = MDCapacity(draw_capacity, pool_capacity)

    def _frames(self, teacher_params: Any, pool: Pool, key: jax.Array, where: str) -> tuple[list[jax.Array], Pool]:
        """The advance of `pool` at the current capacity, recorded: the frames that need the most of some
        neighbour-list capacity and the last, and the pool after it. An advance that overflowed has no replica
        past the blow-up limits (`blown`); coordinates that would still ask for absurd bins are an MDFailure."""
        moved, _, (frames, _, needed) = advance_pool(self.teacher, self.current.pool, teacher_params, self.layout,
                                                     pool, key, self.md.steps_between, record=True)
        needed = np.asarray(needed)
        from distiller.md.simulate import MAX_BINS

        for k in np.flatnonzero((needed[:, 1] > MAX_BINS) | np.any(needed < 0, axis=1))[:1]:
            raise self.failure(self._widest(np.asarray(frames[k])), int(pool.md_step) + int(k) + 1,
                               f"coordinates exploded (the neighbour list would need {int(needed[k, 1]):,} bins)",
                               where)
        most = {int(np.argmax(needed[:, c])) for c in range(needed.shape[1])} | {len(needed) - 1}
        return [frames[k] for k in sorted(most)], moved

    def _widest(self, positions: np.ndarray) -> int:
        """The replica whose atoms spread farthest (the one whose coordinates exploded)."""
        spans = [np.ptp(positions[o:o + self.seeds[k].n_atoms], axis=0).max()
                 for o, k in zip(self.offsets, self.replica_seeds)]
        return int(np.argmax(spans))

    def restore_capacity(self, state) -> None:
        self.current = MDCapacity(*state)

    # --- inside the step ---------------------------------------------------------------------------------------
    def advance(self, capacity: MDCapacity, teacher_params: Any, pool: Pool, inputs: Draw, key: jax.Array):
        """Every replica `steps_between` MD steps on, then the step's frames drawn: (batch, pool, overflow,
        metrics: the mean and the highest temperature of the replicas over the advance, the shortest distance).

        An advance in which a replica blew up does not overflow: the step is applied, so that the loop's `check`
        stops the run with its cause (exploded coordinates are not a capacity to grow)."""
        moved, overflow, _ = md_steps(self.teacher, capacity.pool, teacher_params, self.layout, pool, md_key(key),
                                      self.md.steps_between)
        overflow = overflow & ~self.blown(moved)
        R = self.md.replicas
        metrics = {"md_temperature": jnp.mean(moved.temperature[:R]), "md_temperature_max": jnp.max(moved.hottest[:R]),
                   "md_min_distance": jnp.min(moved.closest[:R])}
        return drawn(moved, inputs), moved, overflow, metrics

    def blown(self, pool: Pool) -> jax.Array:
        """() bool: some replica broke a blow-up limit in the last advance (jittable)."""
        return jnp.any(violations(self.layout, pool, self.md.min_distance, self.md.max_energy_jump) > 0)

    def labelled(self, capacity: MDCapacity, teacher_params: Any, inputs: Batch, key: jax.Array,
                 shift: jax.Array, stress: bool = False, hvp: bool = False) -> tuple[Batch, jax.Array]:
        """The drawn frames (`advance`) rattled, strained and labelled as OnlineTeacher labels its seeds."""
        return super().labelled(capacity.draw, teacher_params, inputs, key, shift, stress, hvp)

    # --- the pool on the host ----------------------------------------------------------------------------------
    def initial_pool(self, teacher_params: Any, seed: int | None = None) -> Pool:
        """The replicas at their seeds with thermal momenta, advanced by `equilibration` MD steps (checked)."""
        seed = self.config.seed if seed is None else seed
        start = step_key(seed, START)
        layout = self.layout
        momenta = thermal_momenta(layout, jax.random.fold_in(start, 0))

        def compute(capacity):
            out = _evaluate(self.teacher, capacity, teacher_params, layout, layout.batch.positions)
            return out, out[3]

        def grow(capacity, result, attempt):
            self.current = self.current._replace(pool=capacities.grow(
                self.teacher, capacity, layout.batch, self.teacher.cutoff, needed=result[4]))
            return self.current.pool

        (forces, energy, closest, _, _), pool_capacity, _ = capacities.until_fits(
            compute, self.current.pool, grow, what=f"{self.config.name}: MD sampling pool")
        t = temperature(layout, momenta)
        pool = Pool(layout.batch.positions, momenta, forces, energy + kinetic(layout, momenta), t, t, closest,
                    jnp.zeros_like(t), jnp.zeros((), jnp.int32))
        for chunk in range(self.md.equilibration // self.md.steps_between):
            pool = self.advanced(teacher_params, pool, jax.random.fold_in(start, chunk + 1), "equilibration")
        return pool

    def advanced(self, teacher_params: Any, pool: Pool, key: jax.Array, where: str) -> Pool:
        """One advance of the pool outside the step (equilibration, held-out frames), its capacity grown until it
        fits, checked for blow-ups; `where` names it in an MDFailure."""
        def compute(capacity):
            moved, overflow, _ = advance_pool(self.teacher, capacity, teacher_params, self.layout, pool, key,
                                              self.md.steps_between)
            return moved, overflow & ~self.blown(moved)  # a blow-up is checked below, not grown for

        def grow(capacity, result, attempt):
            for positions in self._frames(teacher_params, pool, key, where)[0]:
                capacity = capacities.allocate(self.teacher, self.layout.batch._replace(positions=positions),
                                               self.teacher.cutoff, previous=capacity)
            self.current = self.current._replace(pool=capacity)
            return capacity

        moved, _, _ = capacities.until_fits(compute, self.current.pool, grow,
                                            what=f"{self.config.name}: MD sampling pool")
        self.check(moved, where)
        return moved

    def pool_template(self) -> Pool:
        """A Pool of the run's shapes and dtypes, to restore a checkpoint into."""
        A, G = self.layout.batch.positions.shape[0], self.layout.batch.graph_mask.shape[0]
        vectors, graphs = jnp.zeros((A, 3), jnp.float32), jnp.zeros(G, jnp.float32)
        return Pool(vectors, vectors, vectors, graphs, graphs, graphs, graphs, graphs, jnp.zeros((), jnp.int32))

    def step_of(self, pool: Pool) -> str:
        """Where the pool is, for messages: the training step its next advance belongs to."""
        done = int(pool.md_step) - self.md.equilibration
        return "equilibration" if done < 0 else f"training step {done // self.md.steps_between + 1}"

    def check(self, pool: Pool, where: str, kept: str | None = None) -> None:
        """MDFailure at the first replica whose last advance broke a limit (`violations`: non-finite values, the
        hottest step, the shortest distance, the total energy's change). `where`: e.g. "training step 12";
        `kept`: what of the run is kept, for the message."""
        codes = np.asarray(violations(self.layout, pool, self.md.min_distance, self.md.max_energy_jump))
        failing = np.flatnonzero(codes[:self.md.replicas])
        if not len(failing):
            return
        r = int(failing[0])
        hottest, closest, jump = (float(np.asarray(x)[r]) for x in (pool.hottest, pool.closest, pool.jump))
        cause = {"non-finite": "positions or energy became non-finite",
                 "temperature": f"temperature {hottest:,.0f} K (limit {self.limits[r]:,.0f} K)",
                 "distance": f"atoms {closest:.3g} Å apart (limit {self.md.min_distance:g} Å)",
                 "energy": f"total energy changed by {jump:+,.3g} eV/atom over {self.md.steps_between} MD steps "
                           f"(limit {self.md.max_energy_jump:g} eV/atom)"}[CAUSES[codes[r]]]
        raise self.failure(r, int(pool.md_step), cause if kept is None else f"{cause}; {kept}", where)

    def failure(self, replica: int, md_step: int, cause: str, where: str) -> MDFailure:
        from distiller.md.simulate import MDFailure

        seed = self.seeds[self.replica_seeds[replica]]
        name = seed.name or f"seed {self.replica_seeds[replica]}"
        return MDFailure(f"{self.config.name}: MD sampling replica {replica} ({name}, "
                         f"{self.replica_temperatures[replica]:g} K), {where}", md_step, md_step * self.md.dt,
                         f"{cause}; lower sampling.dt ({self.md.dt:g} fs) or the temperatures", None, replica=replica)

    def reference_data(self, label, pool: Pool) -> tuple[list[np.ndarray], np.ndarray, Batch]:
        """Atomic numbers and teacher energies (float64 totals) of the equilibrated replicas (the pool's own: no
        labelling needed), and the first step's draw from them with edges (for the student's shapes)."""
        replicas = [self.seeds[k] for k in self.replica_seeds]
        relative = np.asarray(pool.total - kinetic(self.layout, pool.momenta), np.float64)[:self.md.replicas]
        energies = self.teacher.reference.energies([s.numbers for s in replicas]) + relative
        # Edges at the current capacity: init_params takes its shapes from them, whatever an overflow left out.
        batch, _ = with_neighbours(drawn(pool, self.inputs(0)), self.cutoff, self.current.draw.neighbours)
        return [s.numbers for s in replicas], np.asarray(energies), batch

    def held_out(self, count: int) -> list[Structure]:
        """Frames of an independent pool (another seed: its own momenta and noise), drawn like the training ones."""
        seed = self.config.seed + 10_007
        training = self.current  # capacities grown here are not the run's (they would change its padding)
        try:
            pool = self.initial_pool(self.teacher.params, seed)
            sample = jax.jit(self.sample)
            out: list[Structure] = []
            step = 0
            while len(out) < count:
                key = step_key(seed, step)
                pool = self.advanced(self.teacher.params, pool, md_key(key), "held-out frames")
                frames = unbatch(sample(drawn(pool, self.inputs(step, seed=seed)), key), name=f"held-out {step}/")
                out += [s for s, _ in frames]
                step += 1
        finally:
            self.current = training
        return out[:count]


def md_key(key: jax.Array) -> jax.Array:
    """The MD noise of a training step, from its key (0: its perturbation, 1: its H·v directions)."""
    return jax.random.fold_in(key, 2)
