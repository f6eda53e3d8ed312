"""Where a training step's labels come from: a teacher inside the step (online) or a dataset (offline).

Both sources (and MD sampling's, distiller.train.md_sampling.MDSampler) give the step the same things:

    inputs(step) / batches(start)       the step's inputs: functions of (seed, step) only, so resumes replay exactly
    capacity(inputs)                    static capacities for those inputs (grown by `grow` after an overflow)
    initial_pool(teacher_params)        the source's state between steps (TrainState.pool: MD sampling's replicas;
                                        None here), and pool_template() its shapes for a checkpoint
    advance(capacity, teacher_params, pool, inputs, key)
                                        -> (inputs, pool, overflow, metrics), inside jit: the state moved on (here:
                                        nothing moves)
    labelled(capacity, teacher_params, inputs, key, shift)
                                        -> (batch with edges and labels, overflow), inside jit
    reference_data(label, pool)         structures and float64 energies to fit the student's reference energies
    held_out(count)                     structures kept out of training, for the final report

Labels' energies are relative to the student's reference energies: a dataset's loader subtracts them on the
host in float64; an online teacher's energies (relative to its own reference) are shifted inside the step by
`shift`, the per-element difference of the two tables (small: a few eV per atom).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller import capacity as capacities
from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape, graph_sum, pad_structures, unbatch, with_neighbours
from distiller.config import Experiment
from distiller.data.perturb import perturb
from distiller.derivatives import predictions, unit_directions
from distiller.model import EnergyModel
from distiller.reference import ReferenceEnergies
from distiller.structure import Structure, read_structures

if TYPE_CHECKING:
    from distiller.data.dataset import Dataset


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def _graph_numbers(batch: Batch) -> list[np.ndarray]:
    gi, z, atoms = np.asarray(batch.graph_index), np.asarray(batch.numbers), np.asarray(batch.atom_mask)
    return [z[(gi == g) & atoms] for g in np.flatnonzero(np.asarray(batch.graph_mask))]


class Stateless:
    """A label source without a state between steps: no pool, and `advance` leaves the inputs as they are."""

    def initial_pool(self, teacher_params: Any) -> None:
        return None

    def pool_template(self) -> None:
        return None

    def advance(self, capacity: Any, teacher_params: Any, pool: None, inputs: Batch, key: jax.Array):
        return inputs, pool, jnp.asarray(False), {}


class OnlineTeacher(Stateless):
    """Seed structures rattled and strained inside the step and labelled there by a JAX teacher (FeNNol). One
    batch shape; capacities (neighbour list at the larger of the two cutoffs, teacher) grow on overflow."""

    def __init__(self, config: Experiment, teacher: EnergyModel, student_cutoff: float):
        if teacher.host_only:
            raise ValueError(f"teacher {config.teacher} is computed outside JAX: label a dataset with `distiller "
                             f"label` and set `dataset` in the experiment (it would leave the device at every step)")
        self.config, self.teacher = config, teacher
        self.cutoff = max(float(teacher.cutoff), float(student_cutoff))
        self.seeds = [s for path in config.structures for s in read_structures(path)]
        if not self.seeds:
            raise ValueError(f"experiment {config.name!r} has no seed structures (set `structures`, or `dataset` "
                             f"for offline training)")
        teacher.check(self.seeds)
        largest = max(s.n_atoms for s in self.seeds)
        self.shape = BatchShape(atoms=nl.round_up(largest * config.batch_size + 1), graphs=config.batch_size + 1)
        self.current: capacities.Capacity | None = None
        self.grow(self.inputs(0), step_key(config.seed, 0))

    def inputs(self, step: int, seed: int | None = None) -> Batch:
        """The seed structures of `step`: a function of (seed, step) only, so resumes replay exactly."""
        rng = np.random.default_rng([self.config.seed if seed is None else seed, step])
        chosen = [self.seeds[k] for k in rng.integers(0, len(self.seeds), self.config.batch_size)]
        return jax.tree.map(jnp.asarray, pad_structures(chosen, self.shape))

    def batches(self, start: int):
        step = start
        while True:
            yield self.inputs(step)
            step += 1

    def sample(self, seeds: Batch, key: jax.Array) -> Batch:
        s = self.config.sampling
        return perturb(seeds, key, s.rattle, s.strain)

    # --- capacities: static, a function of what the run has seen so far ---------------------------------
    def capacity(self, inputs: Batch) -> capacities.Capacity:
        return self.current

    def grow(self, inputs: Batch, key: jax.Array, pool: None = None) -> None:
        """Capacities that fit the step of (inputs, key) and everything they fitted before."""
        self.current = capacities.allocate(self.teacher, self.sample(inputs, key), self.cutoff, previous=self.current)

    def capacity_state(self):
        return self.current

    def restore_capacity(self, state) -> None:
        self.current = state

    # --- inside the step ----------------------------------------------------------------------------------
    def labelled(self, capacity: capacities.Capacity, teacher_params: Any, inputs: Batch, key: jax.Array,
                 shift: jax.Array, stress: bool = False, hvp: bool = False) -> tuple[Batch, jax.Array]:
        """Sample, build edges and ask the teacher (energy, forces; stress if asked; H·v along random unit
        directions if `hvp`); energies shifted by the per-element `shift` table (teacher's reference minus the
        student's)."""
        batch = self.sample(inputs, key)
        batch, neighbours = with_neighbours(batch, self.cutoff, capacity.neighbours)
        directions = unit_directions(batch, jax.random.fold_in(key, 1)) if hvp else None
        labels = jax.lax.stop_gradient(predictions(self.teacher, teacher_params, batch, capacity.model, stress=stress,
                                                   directions=directions))
        energy = labels.energy + graph_sum(shift[batch.numbers], batch)
        batch = batch._replace(energy=energy, forces=labels.forces, directions=directions, hvp=labels.hvp)
        if stress:
            batch = batch._replace(stress=labels.stress, stress_mask=jnp.any(batch.pbc, axis=-1) & batch.graph_mask)
        return batch, neighbours.overflow | labels.overflow

    def shift(self, student_reference: ReferenceEnergies) -> jax.Array:
        return jnp.asarray(self.teacher.reference.minus(student_reference), jnp.float32)

    def reference_data(self, label, pool: None = None) -> tuple[list[np.ndarray], np.ndarray, Batch]:
        """Atomic numbers and teacher energies (float64 totals) of the first steps' structures, and a batch.
        `label(capacity, inputs, key)` is the jitted `labelled` with no shift (energies relative to the teacher's
        reference)."""
        numbers, energies = [], []
        for step in range(max(4, 32 // self.config.batch_size)):
            inputs, key = self.inputs(step), step_key(self.config.seed, step)

            def compute(capacity):
                return label(capacity, inputs, key)

            def grow(capacity, result, attempt):
                self.grow(inputs, key)
                return self.current

            batch, self.current, _ = capacities.until_fits(compute, self.current, grow, what="teacher labels")
            graphs = _graph_numbers(batch)
            numbers += graphs
            relative = np.asarray(batch.energy, np.float64)[np.asarray(batch.graph_mask)]
            energies += list(self.teacher.reference.energies(graphs) + relative)
        return numbers, np.asarray(energies), batch

    def held_out(self, count: int) -> list[Structure]:
        """Structures drawn like the training ones but from another seed."""
        sample = jax.jit(self.sample)
        seed = self.config.seed + 10_007
        out: list[Structure] = []
        step = 0
        while len(out) < count:
            drawn = unbatch(sample(self.inputs(step, seed=seed), step_key(seed, step)), name=f"held-out {step}/")
            out += [s for s, _ in drawn]
            step += 1
        return out[:count]


def stored_products(config: Experiment, dataset: Dataset) -> int:
    """K, the Hessian-vector products stored per structure of `dataset`, which the HVP loss term trains on
    offline; a ValueError naming the dataset if it holds none."""
    if not dataset.hvp_directions:
        raise ValueError(f"experiment {config.name!r}: loss.hvp_weight needs Hessian-vector products and dataset "
                         f"{dataset.path} holds none: label it with `distiller label --hvp K` (a JAX teacher), or "
                         f"set loss.hvp_weight=0")
    return dataset.hvp_directions


class DatasetLabels(Stateless):
    """Offline mode: labelled structures from a dataset (any teacher), batched by the grain loader.

    `held_out` structures (a seeded choice) are kept out of training for evaluation. The loader's batches
    have a few shapes (size buckets); each gets its own neighbour-list capacity, measured the first time
    the shape appears and grown on overflow, so the step compiles once per bucket.
    """

    def __init__(self, config: Experiment, cutoff: float):
        from distiller.data.dataset import open_dataset

        self.config, self.cutoff = config, cutoff
        if config.structures:
            raise ValueError(f"experiment {config.name!r} sets both `structures` (online training) and `dataset` "
                             f"(offline training); set one")
        self.dataset = open_dataset(config.dataset)
        if self.dataset.teacher != config.teacher:
            raise ValueError(f"experiment {config.name!r} names teacher {config.teacher!r} but dataset "
                             f"{config.dataset} was labelled by {self.dataset.teacher!r}; set teacher to the "
                             f"dataset's (evaluation compares the student with it)")
        if config.held_out >= len(self.dataset):
            raise ValueError(f"held_out={config.held_out} leaves nothing to train on in {config.dataset} "
                             f"({len(self.dataset)} structures)")
        # The HVP term reads the products stored with the structures: K of them, one picked per step.
        self.hvp = stored_products(config, self.dataset) if config.loss.weighs("hvp") else 0
        order = np.random.default_rng([config.seed, 1]).permutation(len(self.dataset))
        self.held_out_indices, self.train_indices = np.sort(order[:config.held_out]), np.sort(order[config.held_out:])
        self.capacities: dict[BatchShape, nl.NeighbourCapacity] = {}
        self.use_reference(None)

    def use_reference(self, reference: ReferenceEnergies | None) -> None:
        """Batches from now on carry energies relative to `reference` (the student's)."""
        from distiller.data.loader import Loader

        lc = self.config.loader
        self.loader = Loader(self.dataset, self.config.batch_size, seed=self.config.seed,
                             max_atoms=lc.max_atoms or None, indices=self.train_indices, threads=lc.threads,
                             prefetch=lc.prefetch, reference=reference, hvp=self.hvp)

    def add_training(self, extra: Sequence[Dataset]) -> None:
        """Train on `extra` datasets too (after the run's, e.g. active learning's rounds): the held-out split stays
        the run's. They must be labelled by the run's dataset's teacher (and for the HVP term with as many
        stored products per structure)."""
        from distiller.data.dataset import PooledDataset

        for dataset in extra:
            if dataset.teacher != self.dataset.teacher:
                raise ValueError(f"{dataset.path}: labelled by {dataset.teacher!r}, the run's dataset by "
                                 f"{self.dataset.teacher!r}")
            if self.hvp and stored_products(self.config, dataset) != self.hvp:
                raise ValueError(f"experiment {self.config.name!r}: dataset {dataset.path} holds "
                                 f"{dataset.hvp_directions} Hessian-vector products per structure and the run's "
                                 f"{self.dataset.path} {self.hvp}: label it with `distiller label --hvp {self.hvp}`")
        base = len(self.dataset)
        self.dataset = PooledDataset(self.dataset, extra)
        self.train_indices = np.concatenate([self.train_indices, np.arange(base, len(self.dataset))])
        self.use_reference(self.loader.reference)  # the loader over the pool (run() sets the run's reference again)

    def inputs(self, step: int, seed: int | None = None) -> Batch:
        if seed is not None and seed != self.config.seed:
            raise ValueError("offline training draws batches from its dataset with the run's seed only")
        return jax.tree.map(jnp.asarray, self.loader.batch(step))

    def batches(self, start: int):
        return self.loader.iterator(start)

    def capacity(self, inputs: Batch) -> capacities.Capacity:
        shape = BatchShape(atoms=inputs.positions.shape[0], graphs=inputs.graph_mask.shape[0])
        if shape not in self.capacities:
            self.capacities[shape] = capacities.allocate(None, inputs, self.cutoff).neighbours
        return capacities.Capacity(self.capacities[shape])

    def grow(self, inputs: Batch, key: jax.Array, pool: None = None) -> None:
        shape = BatchShape(atoms=inputs.positions.shape[0], graphs=inputs.graph_mask.shape[0])
        self.capacities[shape] = capacities.allocate(None, inputs, self.cutoff, previous=self.capacity(inputs)).neighbours

    def capacity_state(self):
        return dict(self.capacities)

    def restore_capacity(self, state) -> None:
        self.capacities = dict(state)

    def labelled(self, capacity: capacities.Capacity, teacher_params: Any, inputs: Batch, key: jax.Array,
                 shift: jax.Array, stress: bool = False, hvp: bool = False) -> tuple[Batch, jax.Array]:
        """Edges for the dataset's structures; their labels came with them (relative to the loader's reference).
        With `hvp`, each structure's direction and H·v are one of its K stored ones, picked by the step's key (as
        the online teacher draws its direction from it): a new one each time the structure comes back."""
        batch, neighbours = with_neighbours(inputs, self.cutoff, capacity.neighbours)
        if hvp:
            picked = jax.random.randint(jax.random.fold_in(key, 1), (batch.n_graphs,), 0, self.hvp)[batch.graph_index]
            atoms = jnp.arange(batch.positions.shape[0])
            batch = batch._replace(directions=batch.directions[picked, atoms], hvp=batch.hvp[picked, atoms])
        else:
            batch = batch._replace(directions=None, hvp=None)
        return batch, neighbours.overflow

    def shift(self, student_reference: ReferenceEnergies) -> jax.Array:
        return jnp.zeros(student_reference.table.shape, jnp.float32)

    def reference_data(self, label, pool: None = None) -> tuple[list[np.ndarray], np.ndarray, Batch]:
        """Atomic numbers and energies (float64) of (up to 512) training structures, and the first step's batch."""
        # Spread over the whole training set: a dataset is ordered by its labelling job's inputs (often one
        # system after another), so its first 512 structures can miss whole systems and their elements.
        spread = np.linspace(0, len(self.train_indices) - 1, min(512, len(self.train_indices))).astype(int)
        structures = self.dataset.get(self.train_indices[spread])
        inputs, key = self.inputs(0), step_key(self.config.seed, 0)

        def grow(capacity, result, attempt):
            self.grow(inputs, key)
            return self.capacity(inputs)

        batch, _, _ = capacities.until_fits(lambda capacity: label(capacity, inputs, key), self.capacity(inputs),
                                            grow, what="neighbour list")
        return [s.numbers for s in structures], np.array([s.energy for s in structures], np.float64), batch

    def held_out(self, count: int) -> list[Structure]:
        return self.dataset.get(self.held_out_indices[:count])
