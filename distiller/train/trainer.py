"""Distillation training: one jitted step labels a batch, and updates the student on it.

Two modes share the step, its loss and optimizer; only where the labels come from differs:

* online (`Experiment.dataset` is None): seed batch → rattle and strain → neighbour list → teacher
  energies and forces (FeNNol, in the same XLA program) → student → loss → optax update;
* offline (`Experiment.dataset` is a dataset directory, labelled by any teacher with `distiller label`):
  the grain loader's padded batch (labels included, stress for periodic cells where the teacher gave it)
  → neighbour list → student → loss → optax update.

Capacities (neighbour list, teacher preprocessing) are static; if a step overflows one, the step is not
applied: the host grows the capacity, re-jits, and recomputes the same step with the same key, so the
loss trajectory does not depend on when capacities grew. The data order depends only on (seed, step) in
both modes, and the capacities are saved with every checkpoint, so a resumed run continues exactly where
the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape, allocate_neighbours, pad_structures, with_neighbours
from distiller.config import Experiment, LossConfig, save_config
from distiller.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from distiller.structure import Structure, read_structures, write_structures
from distiller.students import build_model, energy_forces_stress, fit_reference_energies, init_student
from distiller.teachers.registry import load_teacher
from distiller.train import checkpoint
from distiller.train.sampling import perturb


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array


def make_optimizer(config: Experiment) -> optax.GradientTransformation:
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=opt.learning_rate * 0.01, peak_value=opt.learning_rate,
        warmup_steps=max(opt.warmup_steps, 1), decay_steps=max(config.steps, opt.warmup_steps + 1),
        end_value=opt.final_learning_rate,
    )
    return optax.chain(optax.clip_by_global_norm(opt.gradient_clip),
                       optax.adamw(schedule, weight_decay=opt.weight_decay))


def distillation_loss(energy, forces, stress, batch: Batch, target_energy, target_forces, target_stress,
                      weights: LossConfig):
    """Weighted mean-square errors: energy per atom, force components, stress of periodic graphs."""
    graphs = batch.graph_mask.astype(energy.dtype)
    atoms = batch.atom_mask.astype(energy.dtype)
    n_graphs = jnp.maximum(graphs.sum(), 1.0)
    n_atoms = jnp.maximum(atoms.sum(), 1.0)
    per_atom = (energy - target_energy) / jnp.maximum(batch.n_atoms, 1)
    energy_mse = jnp.sum(graphs * per_atom**2) / n_graphs
    force_error = (forces - target_forces) * atoms[:, None]
    forces_mse = jnp.sum(force_error**2) / (3.0 * n_atoms)
    loss = weights.energy_weight * energy_mse + weights.forces_weight * forces_mse
    metrics = {
        "energy_rmse_per_atom": jnp.sqrt(energy_mse),
        "forces_rmse": jnp.sqrt(forces_mse),
        "forces_mae": jnp.sum(jnp.abs(force_error)) / (3.0 * n_atoms),
        "accuracy_retained": 1.0 - jnp.sqrt(jnp.sum(force_error**2) / jnp.maximum(jnp.sum((target_forces * atoms[:, None]) ** 2), 1e-12)),
    }
    if weights.stress_weight > 0:
        # Only graphs with a stress label: periodic cells whose teacher gave one (not every teacher does).
        periodic = (batch.stress_mask & batch.graph_mask).astype(energy.dtype)
        stress_mse = jnp.sum(periodic[:, None, None] * (stress - target_stress) ** 2) / jnp.maximum(9.0 * periodic.sum(), 1.0)
        loss = loss + weights.stress_weight * stress_mse
        metrics["stress_rmse"] = jnp.sqrt(stress_mse)
    metrics["loss"] = loss
    return loss, metrics


class OnlineData:
    """Online mode: seed structures are rattled and strained inside the step and labelled there by a JAX
    teacher (FeNNol). One batch shape; capacities (neighbour list, teacher) grow when a step overflows."""

    def __init__(self, config: Experiment, teacher, teacher_params, cutoff: float):
        self.config, self.teacher, self.teacher_params, self.cutoff = config, teacher, teacher_params, cutoff
        if not hasattr(teacher, "apply"):
            raise ValueError(f"teacher {config.teacher} cannot label inside the training step (no JAX `apply`); "
                             f"label a dataset with `distiller label` and set `dataset` in the experiment")
        self.seeds = [s for path in config.structures for s in read_structures(path)]
        if not self.seeds:
            raise ValueError(f"experiment {config.name!r} has no seed structures (set `structures`, or `dataset` "
                             f"for offline training)")
        teacher.check(self.seeds)
        largest = sorted(self.seeds, key=lambda s: s.n_atoms)[-config.batch_size:]
        worst = [largest[-1]] * config.batch_size
        self.shape = BatchShape(atoms=nl.round_up(worst[0].n_atoms * config.batch_size + 1), graphs=config.batch_size + 1)
        self.nl_capacity = self.teacher_capacity = None
        self.grow(self.inputs(0), step_key(config.seed, 0))

    def inputs(self, step: int, seed: int | None = None) -> Batch:
        """The seed structures of `step`: a function of (seed, step) only, so resumes replay exactly."""
        rng = np.random.default_rng([self.config.seed if seed is None else seed, step])
        chosen = [self.seeds[k] for k in rng.integers(0, len(self.seeds), self.config.batch_size)]
        return jax.tree_util.tree_map(jnp.asarray, pad_structures(chosen, self.shape))

    def batches(self, start: int):
        step = start
        while True:
            yield self.inputs(step)
            step += 1

    def sample(self, seeds: Batch, key: jax.Array) -> Batch:
        s = self.config.sampling
        return perturb(seeds, key, s.rattle, s.strain)

    # --- capacities: static, a function of what the run has seen so far --------------------------------
    def capacity(self, inputs: Batch):
        return self.nl_capacity, self.teacher_capacity

    def grow(self, inputs: Batch, key: jax.Array) -> None:
        """Capacities that fit the step of (inputs, key) and everything they fitted before."""
        batch = self.sample(inputs, key)
        nl_capacity = allocate_neighbours(batch, self.cutoff)
        if self.nl_capacity is not None:
            nl_capacity = nl.NeighbourCapacity(*(max(a, b) for a, b in zip(nl_capacity, self.nl_capacity)))
        batch, _ = with_neighbours(batch, self.cutoff, nl_capacity)
        if self.teacher_capacity is None:
            self.nl_capacity, self.teacher_capacity = nl_capacity, self.teacher.capacity_for(batch)
        else:
            self.nl_capacity, self.teacher_capacity = nl_capacity, self.teacher.grow(self.teacher_capacity, batch)

    def capacity_state(self):
        return self.nl_capacity, self.teacher_capacity

    def restore_capacity(self, state) -> None:
        self.nl_capacity, self.teacher_capacity = state

    # --- inside the step --------------------------------------------------------------------------------
    def labelled(self, capacity, teacher_params, inputs: Batch, key: jax.Array) -> tuple[Batch, jax.Array]:
        """Sample, build edges and ask the teacher (energy, forces; stress only if the loss weighs it)."""
        nl_capacity, teacher_capacity = capacity
        batch = self.sample(inputs, key)
        batch, neighbours = with_neighbours(batch, self.cutoff, nl_capacity)
        if self.config.loss.stress_weight > 0:
            labels, stress = self.teacher.apply_with_stress(teacher_params, batch, teacher_capacity)
            periodic = jnp.any(batch.pbc, axis=-1) & batch.graph_mask
            batch = batch._replace(stress=jax.lax.stop_gradient(stress), stress_mask=periodic)
        else:
            labels = self.teacher.apply(teacher_params, batch, teacher_capacity)
        batch = batch._replace(energy=jax.lax.stop_gradient(labels.energy),
                               forces=jax.lax.stop_gradient(labels.forces))
        return batch, neighbours.overflow | labels.overflow

    def reference_data(self, label) -> tuple[list[np.ndarray], np.ndarray, Batch]:
        """Per-structure atomic numbers and teacher energies of the first steps' structures, and a batch."""
        numbers, energies = [], []
        for step in range(max(4, 32 // self.config.batch_size)):
            inputs, key = self.inputs(step), step_key(self.config.seed, step)
            batch, overflow = label(self.capacity(inputs), inputs, key)
            if bool(overflow):
                self.grow(inputs, key)
                batch, _ = label(self.capacity(inputs), inputs, key)
            numbers += _graph_numbers(batch)
            energies += list(np.asarray(batch.energy)[np.asarray(batch.graph_mask)])
        return numbers, np.asarray(energies), batch

    def held_out(self, count: int) -> list[Structure]:
        """Structures drawn like the training ones but from another seed."""
        sample = jax.jit(self.sample)
        seed = self.config.seed + 10_007
        out: list[Structure] = []
        step = 0
        while len(out) < count:
            out += structures_from_batch(sample(self.inputs(step, seed=seed), step_key(seed, step)), name=f"held-out {step}")
            step += 1
        return out[:count]


class OfflineData:
    """Offline mode: labelled structures from a dataset (any teacher), batched by the grain loader.

    `held_out` structures (a seeded choice) are kept out of training for evaluation. The loader's batches
    have a few shapes (size buckets); each gets its own neighbour-list capacity, measured the first time
    the shape appears and grown on overflow, so the step compiles once per bucket.
    """

    def __init__(self, config: Experiment, cutoff: float):
        from distiller.data.dataset import open_dataset
        from distiller.data.loader import Loader

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
        order = np.random.default_rng([config.seed, 1]).permutation(len(self.dataset))
        self.held_out_indices, self.train_indices = np.sort(order[:config.held_out]), np.sort(order[config.held_out:])
        lc = config.loader
        self.loader = Loader(self.dataset, config.batch_size, seed=config.seed, max_atoms=lc.max_atoms or None,
                             indices=self.train_indices, threads=lc.threads, prefetch=lc.prefetch)
        self.capacities: dict[BatchShape, nl.NeighbourCapacity] = {}

    def inputs(self, step: int, seed: int | None = None) -> Batch:
        if seed is not None and seed != self.config.seed:
            raise ValueError("offline training draws batches from its dataset with the run's seed only")
        return jax.tree_util.tree_map(jnp.asarray, self.loader.batch(step))

    def batches(self, start: int):
        return self.loader.iterator(start)

    def capacity(self, inputs: Batch) -> nl.NeighbourCapacity:
        shape = BatchShape(atoms=inputs.positions.shape[0], graphs=inputs.graph_mask.shape[0])
        if shape not in self.capacities:
            self.capacities[shape] = allocate_neighbours(jax.tree_util.tree_map(jnp.asarray, inputs), self.cutoff)
        return self.capacities[shape]

    def grow(self, inputs: Batch, key: jax.Array) -> None:
        old = self.capacity(inputs)
        new = allocate_neighbours(jax.tree_util.tree_map(jnp.asarray, inputs), self.cutoff)
        shape = BatchShape(atoms=inputs.positions.shape[0], graphs=inputs.graph_mask.shape[0])
        self.capacities[shape] = nl.NeighbourCapacity(*(max(a, b) for a, b in zip(old, new)))

    def capacity_state(self):
        return dict(self.capacities)

    def restore_capacity(self, state) -> None:
        self.capacities = dict(state)

    def labelled(self, capacity, teacher_params, inputs: Batch, key: jax.Array) -> tuple[Batch, jax.Array]:
        """Edges for the dataset's structures; their labels came with them."""
        batch, neighbours = with_neighbours(inputs, self.cutoff, capacity)
        return batch, neighbours.overflow

    def reference_data(self, label) -> tuple[list[np.ndarray], np.ndarray, Batch]:
        """Atomic numbers and energies of (up to 512) training structures, and the first step's batch."""
        # Spread over the whole training set: a dataset is ordered by its labelling job's inputs (often one
        # system after another), so its first 512 structures can miss whole systems and their elements.
        spread = np.linspace(0, len(self.train_indices) - 1, min(512, len(self.train_indices))).astype(int)
        structures = self.dataset.get(self.train_indices[spread])
        inputs = self.inputs(0)
        batch, overflow = label(self.capacity(inputs), inputs, step_key(self.config.seed, 0))
        if bool(overflow):
            self.grow(inputs, None)
            batch, _ = label(self.capacity(inputs), inputs, step_key(self.config.seed, 0))
        return [s.numbers for s in structures], np.array([s.energy for s in structures], np.float64), batch

    def held_out(self, count: int) -> list[Structure]:
        return self.dataset.get(self.held_out_indices[:count])


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def _graph_numbers(batch: Batch) -> list[np.ndarray]:
    gi, z, atoms = np.asarray(batch.graph_index), np.asarray(batch.numbers), np.asarray(batch.atom_mask)
    return [z[(gi == g) & atoms] for g in np.flatnonzero(np.asarray(batch.graph_mask))]


@dataclasses.dataclass
class Distillation:
    """Everything a run needs that is not the training state: teacher, student, data and capacities.

    The data object is the only difference between the modes: `OnlineData` labels inside the step with the
    teacher, `OfflineData` reads labels from a dataset. Both give `labelled(capacity, teacher_params,
    inputs, key) -> (batch with edges and labels, overflow)`, and one jitted step does the rest.
    """

    config: Experiment
    teacher: Any  # None offline: the labels are in the dataset
    teacher_params: Any
    model: Any
    optimizer: optax.GradientTransformation
    data: Any  # OnlineData | OfflineData
    cutoff: float

    @classmethod
    def create(cls, config: Experiment) -> "Distillation":
        model = build_model(config.student)
        if config.dataset:
            cutoff = float(config.student.cutoff)
            data, teacher, teacher_params = OfflineData(config, cutoff), None, None
        else:
            teacher, teacher_params = load_teacher(config.teacher)
            cutoff = max(float(teacher.cutoff), float(config.student.cutoff))
            data = OnlineData(config, teacher, teacher_params, cutoff)
        return cls(config, teacher, teacher_params, model, make_optimizer(config), data, cutoff)

    @property
    def offline(self) -> bool:
        return isinstance(self.data, OfflineData)

    # --- data -------------------------------------------------------------------------------------
    def seed_batch(self, step: int, seed: int | None = None) -> Batch:
        """The inputs of `step` (seed structures online, the loader's batch offline)."""
        return self.data.inputs(step, seed)

    def step_key(self, step: int, seed: int | None = None) -> jax.Array:
        return step_key(self.config.seed if seed is None else seed, step)

    # --- the step -------------------------------------------------------------------------------------
    @functools.cached_property
    def train_step(self):
        """step(capacity, state, teacher_params, inputs, key) -> (state, metrics, overflow), jitted; the
        capacity is static (one compilation per capacity and input shape)."""
        weights = self.config.loss

        def loss_fn(params, batch):
            energy, forces, stress = energy_forces_stress(self.model, params, batch)
            return distillation_loss(energy, forces, stress, batch, batch.energy, batch.forces, batch.stress, weights)

        @functools.partial(jax.jit, static_argnums=0)
        def step(capacity, state: TrainState, teacher_params, inputs: Batch, key):
            batch, overflow = self.data.labelled(capacity, teacher_params, inputs, key)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
            # An overflowing step is not applied: the host grows capacities and recomputes it.
            new = jax.tree_util.tree_map(lambda old, upd: jnp.where(overflow, old, upd), state, new)
            return new, metrics, overflow

        return step

    def dispatch_step(self, state: TrainState, inputs: Batch, key) -> tuple[TrainState, dict, jax.Array]:
        """Start one training step at the current capacities; returns (new_state, metrics, overflow) without
        waiting for the device. An overflowing step returns `state` unchanged (see `apply_step`)."""
        return self.train_step(self.data.capacity(inputs), state, self.teacher_params, inputs, key)

    def apply_step(self, state: TrainState, inputs: Batch, key) -> tuple[TrainState, dict, bool]:
        """One training step; on overflow, grow the capacities and recompute the same step. grew: whether
        capacities changed."""
        new_state, metrics, overflow = self.dispatch_step(state, inputs, key)
        grew = False
        while bool(overflow):
            self.data.grow(inputs, key)
            grew = True
            new_state, metrics, overflow = self.dispatch_step(state, inputs, key)
        return new_state, metrics, grew

    # --- initial state ----------------------------------------------------------------------------------
    def initial_state(self) -> TrainState:
        """Student params with reference energies fitted by least squares on the first labels."""
        label = jax.jit(self.data.labelled, static_argnums=0)
        numbers, energies, batch = self.data.reference_data(
            lambda capacity, inputs, key: label(capacity, self.teacher_params, inputs, key))
        reference = fit_reference_energies(numbers, energies, self.config.student.elements)
        params = init_student(self.config.student, jax.random.key(self.config.seed), batch, reference)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32))


def run(config: Experiment, resume: bool = False, progress: bool = True, stop_after: int | None = None,
        job: Distillation | None = None, overwrite: bool = False) -> TrainState:
    """Train (or continue training) the run in `config.run_dir`; returns the final state.

    `resume`: continue from the run directory's last checkpoint (a fresh start if it has none).
    `overwrite`: start afresh in a run directory that holds another run's checkpoints, deleting them; without
    it (and without `resume`) such a directory is a FileExistsError, raised before any work.
    `stop_after` ends the job after that many steps of this call, as a kill would (after a checkpoint).
    `job`: a Distillation of `config` already made (its teacher loaded), to use again afterwards.
    """
    previous = checkpoint.latest_step(config.run_dir)
    if previous is not None and not resume:
        if not overwrite:
            raise FileExistsError(f"{config.run_dir} holds a run's checkpoints (up to step {previous}): resume it "
                                  "(--resume), start it again (--overwrite: deletes them) or choose another run "
                                  "directory (--run-dir)")
        for stale in ("checkpoints", "capacity"):
            shutil.rmtree(os.path.join(config.run_dir, stale), ignore_errors=True)
    os.makedirs(config.run_dir, exist_ok=True)
    save_config(config, os.path.join(config.run_dir, "config.json"))
    job = job or Distillation.create(config)
    mgr = checkpoint.manager(config.run_dir)
    metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
    start = 0
    if resume and previous is not None:
        start, state = checkpoint.restore(config.run_dir, state_template(config))
        _truncate_metrics(metrics_path, start)
        _load_capacity(job, start)
    else:
        state = job.initial_state()
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.name,
               disable=not progress, dynamic_ncols=True)
    inputs_iter = job.data.batches(start)
    with open(metrics_path, "a") as log:
        t0 = time.perf_counter()

        def record(done: int, state: TrainState, metrics: dict) -> bool:
            """Log and checkpoint a checked step; True when the job should stop after it."""
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, **{k: float(v) for k, v in metrics.items()},
                       "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4g}", F_rmse=f"{row['forces_rmse']:.3f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                # Capacities first: a checkpoint on disk always has the capacities it was trained with.
                _save_capacity(job, done)
                checkpoint.save(mgr, done, state)
            return stop_after is not None and done - start >= stop_after

        # Steps are dispatched ahead of reading their overflow flags (`steps_in_flight`). A step that
        # overflowed (rare: capacities grow) is redone at grown capacities and the steps after it again from
        # its result: the numbers are those of stepping one at a time.
        in_flight = steps_in_flight()
        pending = []  # dispatched, unchecked steps, oldest first: (step, state before it, inputs, key, outputs)
        stopped = False
        for step in bar:
            inputs, key = next(inputs_iter), job.step_key(step)
            before = pending[-1][4][0] if pending else state
            pending.append((step, before, inputs, key, job.dispatch_step(before, inputs, key)))
            while len(pending) > in_flight and not stopped:
                oldest = pending.pop(0)
                state, metrics, redone = _checked_step(job, oldest)
                stopped = record(oldest[0] + 1, state, metrics)  # what is still pending is dropped, as by a kill
                if redone:
                    pending = _redispatched(job, state, pending)
            if stopped:
                break
        while pending and not stopped:
            oldest = pending.pop(0)
            state, metrics, _ = _checked_step(job, oldest)
            record(oldest[0] + 1, state, metrics)
    if job.offline:
        write_json_atomic(os.path.join(config.run_dir, "loader.json"), job.data.loader.report())
    return state


def steps_in_flight() -> int:
    """How many training steps `run` dispatches before reading the oldest one's overflow flag.

    1 on accelerators: the host prepares and launches step k while the device computes step k-1 (reading
    the flag after every step leaves the device idle during every dispatch: the quickstart's steps took
    10.7 instead of 8.8 ms on an H200, bench/results/train-loop-h200.json). 0 on a CPU, where the two steps
    would share its cores (6-14 % slower there, 2 cores).
    """
    return 0 if jax.default_backend() == "cpu" else 1


def _checked_step(job: Distillation, dispatched) -> tuple[TrainState, dict, bool]:
    """A dispatched step's (state, metrics), recomputed by `apply_step` if it overflowed; redone: whether it was."""
    _, state_before, inputs, key, (new_state, metrics, overflow) = dispatched
    if not bool(overflow):
        return new_state, metrics, False
    new_state, metrics, _ = job.apply_step(state_before, inputs, key)
    return new_state, metrics, True


def _redispatched(job: Distillation, state: TrainState, pending: list) -> list:
    """The pending steps dispatched again, one after the other from `state` (they started from a discarded one)."""
    out = []
    for step, _, inputs, key, _ in pending:
        out.append((step, state, inputs, key, job.dispatch_step(state, inputs, key)))
        state = out[-1][4][0]
    return out


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so no step appears twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(rows))


# Capacities are kept with every checkpoint so that a resumed run pads exactly as the original did at that
# step (padding changes reduction shapes, hence float rounding); they are small static pytrees of ints,
# pickled atomically, one file per checkpointed step (the newest few are kept, like the checkpoints).
def _capacity_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "capacity", f"{step}.pkl")


def _save_capacity(job: Distillation, step: int, keep: int = 4) -> None:
    path = _capacity_path(job.config.run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bytes_atomic(path, pickle.dumps(job.data.capacity_state()))
    saved = sorted(int(n[:-4]) for n in os.listdir(os.path.dirname(path)) if n.endswith(".pkl"))
    for old in saved[:-keep]:
        os.remove(_capacity_path(job.config.run_dir, old))


def _load_capacity(job: Distillation, step: int) -> None:
    path = _capacity_path(job.config.run_dir, step)
    if os.path.exists(path):
        with open(path, "rb") as f:
            job.data.restore_capacity(pickle.load(f))


def held_out_structures(job: Distillation, count: int) -> list[Structure]:
    """The run's held-out structures: drawn like the training ones from another seed (online), or the
    dataset's structures kept out of training (offline)."""
    return job.data.held_out(count)


def structures_from_batch(batch: Batch, name: str = "") -> list[Structure]:
    positions, numbers = np.asarray(batch.positions, np.float64), np.asarray(batch.numbers)
    cell, pbc, gi = np.asarray(batch.cell, np.float64), np.asarray(batch.pbc), np.asarray(batch.graph_index)
    atom_mask = np.asarray(batch.atom_mask)
    out = []
    for g in np.flatnonzero(np.asarray(batch.graph_mask)):
        sel = (gi == g) & atom_mask
        periodic = bool(pbc[g].any())
        out.append(Structure(numbers[sel], positions[sel], cell[g] if periodic else np.zeros((3, 3)), pbc[g],
                             name=f"{name}/{g}"))
    return out


def write_held_out(job: Distillation, path: str) -> list[Structure]:
    structures = held_out_structures(job, job.config.held_out)
    write_structures(path, structures)
    return structures


def load_student(run_dir: str, step: int | None = None):
    """(student config, model, params) of a run, from its config.json and latest (or given) checkpoint."""
    from distiller.config import from_dict

    with open(os.path.join(run_dir, "config.json")) as f:
        config = from_dict(json.load(f))
    _, state = checkpoint.restore(run_dir, state_template(config), step)
    return config.student, build_model(config.student), state.params


def state_template(config: Experiment) -> TrainState:
    """A TrainState of the run's structure (shapes and dtypes) to restore a checkpoint into, made without the
    teacher: any batch gives the parameter shapes, and one atom of the student's first element will do."""
    z = config.student.elements[0]
    atom = Structure(np.array([z]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), name="probe")
    probe = jax.tree_util.tree_map(jnp.asarray, pad_structures([atom]))
    probe, _ = with_neighbours(probe, config.student.cutoff, nl.NeighbourCapacity(edges=1, bins=1, bin_size=2, reach=1))
    params = init_student(config.student, jax.random.key(0), probe)
    return TrainState(params, make_optimizer(config).init(params), jnp.zeros((), jnp.int32))
