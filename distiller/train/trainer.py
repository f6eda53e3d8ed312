"""Online distillation: one jitted step samples structures, asks the teacher, and updates the student.

Per step, inside one `jax.jit`:  seed batch → rattle and strain → neighbour list → teacher energies and
forces (FeNNol, in the same XLA program) → student energies and forces → loss → optax update.
Capacities (neighbour list, teacher preprocessing) are static; if a step overflows one, the step is not
applied: the host grows the capacity, re-jits, and recomputes the same step with the same key, so the
loss trajectory does not depend on when capacities grew. The data order depends only on (seed, step),
so a resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
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
        periodic = (batch.stress_mask | (jnp.any(batch.pbc, -1) & batch.graph_mask)).astype(energy.dtype)
        stress_mse = jnp.sum(periodic[:, None, None] * (stress - target_stress) ** 2) / jnp.maximum(9.0 * periodic.sum(), 1.0)
        loss = loss + weights.stress_weight * stress_mse
        metrics["stress_rmse"] = jnp.sqrt(stress_mse)
    metrics["loss"] = loss
    return loss, metrics


@dataclasses.dataclass
class Distillation:
    """Everything a run needs that is not the training state: teacher, student, seeds, capacities."""

    config: Experiment
    teacher: Any
    teacher_params: Any
    model: Any
    optimizer: optax.GradientTransformation
    seeds: list[Structure]
    shape: BatchShape
    cutoff: float
    nl_capacity: nl.NeighbourCapacity
    teacher_capacity: Any

    @classmethod
    def create(cls, config: Experiment) -> "Distillation":
        teacher, teacher_params = load_teacher(config.teacher)
        seeds = [s for path in config.structures for s in read_structures(path)]
        if not seeds:
            raise ValueError(f"experiment {config.name!r} has no seed structures")
        teacher.check(seeds)
        model = build_model(config.student)
        largest = sorted(seeds, key=lambda s: s.n_atoms)[-config.batch_size:]
        worst = [largest[-1]] * config.batch_size
        shape = BatchShape(atoms=nl.round_up(worst[0].n_atoms * config.batch_size + 1), graphs=config.batch_size + 1)
        cutoff = max(float(teacher.cutoff), float(config.student.cutoff))
        self = cls(config, teacher, teacher_params, model, make_optimizer(config), seeds, shape, cutoff, None, None)
        self.nl_capacity, self.teacher_capacity = self.measure_capacity(self.seed_batch(0), jax.random.key(0))
        return self

    # --- data -------------------------------------------------------------------------------------
    def seed_batch(self, step: int, seed: int | None = None) -> Batch:
        """The seed structures of `step`: a function of (seed, step) only, so resumes replay exactly."""
        rng = np.random.default_rng([self.config.seed if seed is None else seed, step])
        chosen = [self.seeds[k] for k in rng.integers(0, len(self.seeds), self.config.batch_size)]
        return jax.tree_util.tree_map(jnp.asarray, pad_structures(chosen, self.shape))

    def step_key(self, step: int, seed: int | None = None) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.config.seed if seed is None else seed), step)

    def sample(self, seeds: Batch, key: jax.Array) -> Batch:
        s = self.config.sampling
        return perturb(seeds, key, s.rattle, s.strain)

    # --- capacities ---------------------------------------------------------------------------------
    def measure_capacity(self, seeds: Batch, key: jax.Array):
        batch = self.sample(seeds, key)
        nl_capacity = allocate_neighbours(batch, self.cutoff)
        if self.nl_capacity is not None:
            nl_capacity = nl.NeighbourCapacity(*(max(a, b) for a, b in zip(nl_capacity, self.nl_capacity)))
        batch, _ = with_neighbours(batch, self.cutoff, nl_capacity)
        if self.teacher_capacity is None:
            return nl_capacity, self.teacher.capacity_for(batch)
        return nl_capacity, self.teacher.grow(self.teacher_capacity, batch)

    # --- the step -------------------------------------------------------------------------------------
    def labelled(self, seeds: Batch, key: jax.Array, nl_capacity, teacher_capacity, teacher_params):
        """Sample, build edges and ask the teacher: the part of the step before the student."""
        batch = self.sample(seeds, key)
        batch, neighbours = with_neighbours(batch, self.cutoff, nl_capacity)
        labels = self.teacher.apply(teacher_params, batch, teacher_capacity)
        batch = batch._replace(energy=jax.lax.stop_gradient(labels.energy),
                               forces=jax.lax.stop_gradient(labels.forces))
        return batch, neighbours.overflow | labels.overflow

    def step_fn(self):
        """The jitted training step for the current capacities."""
        nl_capacity, teacher_capacity, weights = self.nl_capacity, self.teacher_capacity, self.config.loss

        def loss_fn(params, batch):
            energy, forces, stress = energy_forces_stress(self.model, params, batch)
            return distillation_loss(energy, forces, stress, batch, batch.energy, batch.forces, batch.stress, weights)

        @jax.jit
        def step(state: TrainState, teacher_params, seeds: Batch, key):
            batch, overflow = self.labelled(seeds, key, nl_capacity, teacher_capacity, teacher_params)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
            # An overflowing step is not applied: the host grows capacities and recomputes it.
            new = jax.tree_util.tree_map(lambda old, upd: jnp.where(overflow, old, upd), state, new)
            return new, metrics, overflow

        return step

    # --- initial state ----------------------------------------------------------------------------------
    def initial_state(self) -> TrainState:
        """Student params with reference energies fitted by least squares on the teacher's first labels."""
        label = jax.jit(self.labelled, static_argnums=(2, 3))
        numbers, energies = [], []
        for step in range(max(4, 32 // self.config.batch_size)):
            batch, overflow = label(self.seed_batch(step), self.step_key(step), self.nl_capacity,
                                    self.teacher_capacity, self.teacher_params)
            if bool(overflow):
                self.nl_capacity, self.teacher_capacity = self.measure_capacity(self.seed_batch(step), self.step_key(step))
                batch, _ = label(self.seed_batch(step), self.step_key(step), self.nl_capacity,
                                 self.teacher_capacity, self.teacher_params)
            mask = np.asarray(batch.graph_mask)
            gi = np.asarray(batch.graph_index)
            z = np.asarray(batch.numbers)
            numbers += [z[(gi == g) & np.asarray(batch.atom_mask)] for g in np.flatnonzero(mask)]
            energies += list(np.asarray(batch.energy)[mask])
        reference = fit_reference_energies(numbers, np.asarray(energies), self.config.student.elements)
        params = init_student(self.config.student, jax.random.key(self.config.seed), batch, reference)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32))


def run(config: Experiment, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> TrainState:
    """Train (or continue training) the run in `config.run_dir`; returns the final state.

    `stop_after` ends the job after that many steps of this call, as a kill would (after a checkpoint).
    """
    os.makedirs(config.run_dir, exist_ok=True)
    save_config(config, os.path.join(config.run_dir, "config.json"))
    job = Distillation.create(config)
    state = job.initial_state()
    mgr = checkpoint.manager(config.run_dir)
    metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
    start = 0
    if resume and checkpoint.latest_step(config.run_dir) is not None:
        start, state = checkpoint.restore(config.run_dir, state)
        _truncate_metrics(metrics_path, start)
        _load_capacity(job)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    _save_capacity(job)
    step_fn = job.step_fn()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.name,
               disable=not progress, dynamic_ncols=True)
    with open(metrics_path, "a") as log:
        t0 = time.perf_counter()
        for step in bar:
            seeds, key = job.seed_batch(step), job.step_key(step)
            new_state, metrics, overflow = step_fn(state, job.teacher_params, seeds, key)
            while bool(overflow):
                job.nl_capacity, job.teacher_capacity = job.measure_capacity(seeds, key)
                _save_capacity(job)
                step_fn = job.step_fn()
                new_state, metrics, overflow = step_fn(state, job.teacher_params, seeds, key)
            state = new_state
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, **{k: float(v) for k, v in metrics.items()},
                       "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4g}", F_rmse=f"{row['forces_rmse']:.3f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint.save(mgr, done, state)
            if stop_after is not None and done - start >= stop_after:
                break
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so no step appears twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


# Capacities are kept with the run so that a resumed run pads exactly as the original did (padding changes
# reduction shapes, hence float rounding); they are small static pytrees of ints, pickled atomically.
def _save_capacity(job: Distillation) -> None:
    path = os.path.join(job.config.run_dir, "capacity.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump((job.nl_capacity, job.teacher_capacity), f)
    os.replace(path + ".tmp", path)


def _load_capacity(job: Distillation) -> None:
    path = os.path.join(job.config.run_dir, "capacity.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            job.nl_capacity, job.teacher_capacity = pickle.load(f)


def held_out_structures(job: Distillation, count: int) -> list[Structure]:
    """Structures drawn like the training ones but from another seed: the run's held-out set."""
    sample = jax.jit(job.sample)
    out: list[Structure] = []
    step = 0
    while len(out) < count:
        seeds = job.seed_batch(step, seed=job.config.seed + 10_007)
        batch = sample(seeds, job.step_key(step, seed=job.config.seed + 10_007))
        out += structures_from_batch(batch, name=f"held-out {step}")
        step += 1
    return out[:count]


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
    model = build_model(config.student)
    # Any batch gives the parameter shapes; one atom of the student's first element will do.
    z = config.student.elements[0]
    atom = Structure(np.array([z]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), name="probe")
    probe = jax.tree_util.tree_map(jnp.asarray, pad_structures([atom]))
    probe, _ = with_neighbours(probe, config.student.cutoff, nl.NeighbourCapacity(edges=1, bins=1, bin_size=2, reach=1))
    params = init_student(config.student, jax.random.key(0), probe)
    like = TrainState(params, make_optimizer(config).init(params), jnp.zeros((), jnp.int32))
    _, state = checkpoint.restore(run_dir, like, step)
    return config.student, model, state.params
