"""The training step: labels (online teacher or dataset), student predictions, loss terms and an optax update,
one jitted function.

Capacities (neighbour list, teacher preprocessing) are static arguments; if a step overflows one, the step is
not applied: `apply_step` grows the capacity and recomputes the same step with the same key, so the loss
trajectory does not depend on when capacities grew. A label source with a state between steps (MD sampling's
replica pool, `TrainState.pool`) advances it in the step first (`advance`); an overflowing step leaves it as it
was too, and the pool is checkpointed with the optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distiller import reference as references
from distiller.batch import Batch
from distiller.capacity import until_fits
from distiller.config import Experiment, MDSampling
from distiller.derivatives import predictions
from distiller.model import EnergyModel
from distiller.reference import ReferenceEnergies
from distiller.run_directory import RunDirectory, params_template
from distiller.students import init_params, student_model
from distiller.teachers.registry import load_teacher
from distiller.train.labels import DatasetLabels, OnlineTeacher, step_key
from distiller.train.losses import loss_terms, needs_hvp, needs_stress, total_loss
from distiller.train.md_sampling import MDSampler, Pool
from distiller.train.schedules import Plateau


class TrainState(NamedTuple):
    params: Any  # the weights the optimiser moves
    opt_state: Any
    step: jax.Array
    ema: Any  # their exponential moving average: the student evaluated and exported
    plateau: Plateau = Plateau()  # the learning rate's reduce-on-plateau scale, set by the loop at validations
    pool: Any = None  # the label source's state between steps: MD sampling's replicas (md_sampling.Pool), or None


def checkpoint_items(state: TrainState) -> tuple:
    """What a checkpoint's item "optimizer" holds of a state (item "params" is its EMA): the trained weights,
    optimizer state, step, plateau and, for a label source with a state, its pool."""
    return (state.params, state.opt_state, state.step, state.plateau) + (() if state.pool is None else (state.pool,))


def from_checkpoint(ema: Any, optimizer: tuple) -> TrainState:
    """The TrainState of a checkpoint's items (`checkpoint_items`' inverse), in arrays not committed to a device, as
    a fresh run's are: a step already compiled for the run (a resume in the same process) is not compiled again."""
    params, opt_state, step, plateau, *pool = optimizer
    state = TrainState(params, opt_state, step, ema, Plateau(*plateau), Pool(*pool[0]) if pool else None)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)


def check_pool(job: "Distillation", step: int, state: TrainState, checkpoint: int | None) -> None:
    """MD sampling: an MDFailure if a replica blew up in the advance of `step` (`checkpoint`: the last one
    written, None if none), naming the replica, its seed structure, the step and the cause."""
    if state.pool is not None:
        kept = "no checkpoint was written" if checkpoint is None else f"the last checkpoint (step {checkpoint}) is kept"
        job.data.check(state.pool, f"training step {step}", f"training stopped, {kept}")


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """The average after optimiser step `step` (1, 2, ...): decay min(decay, (1 + t) / (10 + t)), so early
    averages are not dominated by the random initial weights."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def make_optimizer(config: Experiment) -> optax.GradientTransformation:
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=opt.learning_rate * 0.01, peak_value=opt.learning_rate,
        warmup_steps=max(opt.warmup_steps, 1), decay_steps=max(config.steps, opt.warmup_steps + 1),
        end_value=opt.final_learning_rate,
    )
    return optax.chain(optax.clip_by_global_norm(opt.gradient_clip),
                       optax.adamw(schedule, weight_decay=opt.weight_decay))


@dataclasses.dataclass
class Distillation:
    """Everything a run needs that is not the training state: teacher, student, labels and capacities.

    The label source is the only difference between the modes: `OnlineTeacher` labels inside the step with the
    teacher (`MDSampler`: frames of teacher MD run in the step), `DatasetLabels` reads labels from a dataset.
    `reference` is the student's reference energies, set by `initial_state` (fitted) or by `use_reference` (a
    resumed run's).
    """

    config: Experiment
    teacher: EnergyModel | None  # None offline: the labels are in the dataset
    data: Any  # OnlineTeacher | MDSampler | DatasetLabels
    optimizer: optax.GradientTransformation
    reference: ReferenceEnergies | None = None
    shift: Any = None  # (MAX_Z + 1,) float32: labels' energies relative to the teacher -> to the student

    @classmethod
    def create(cls, config: Experiment) -> "Distillation":
        if config.dataset:
            data, teacher = DatasetLabels(config, float(config.student.cutoff)), None
        else:
            teacher = load_teacher(config.teacher)
            source = MDSampler if isinstance(config.sampling, MDSampling) else OnlineTeacher
            data = source(config, teacher, config.student.cutoff)
        return cls(config, teacher, data, make_optimizer(config))

    @property
    def offline(self) -> bool:
        return isinstance(self.data, DatasetLabels)

    @property
    def run(self) -> RunDirectory:
        return RunDirectory(self.config.run_dir)

    @property
    def teacher_params(self) -> Any:
        return None if self.teacher is None else self.teacher.params

    def student(self, params: Any = None) -> EnergyModel:
        return student_model(self.config.student, params, self.reference or references.ZERO,
                             name=f"student of {self.config.name}")

    def use_reference(self, reference: ReferenceEnergies) -> None:
        self.reference = reference
        self.shift = self.data.shift(reference)
        if self.offline:
            self.data.use_reference(reference)

    # --- data -------------------------------------------------------------------------------------
    def seed_batch(self, step: int, seed: int | None = None) -> Batch:
        """The inputs of `step` (seed structures online, the loader's batch offline)."""
        return self.data.inputs(step, seed)

    def step_key(self, step: int, seed: int | None = None) -> jax.Array:
        return step_key(self.config.seed if seed is None else seed, step)

    # --- the step -----------------------------------------------------------------------------------
    @functools.cached_property
    def train_step(self):
        """step(capacity, state, teacher_params, inputs, key, shift) -> (state, metrics, overflow), jitted; the
        capacity is static (one compilation per capacity and input shape). `shift`: the labels' per-element
        reference shift (labels.py)."""
        terms = loss_terms(self.config.loss)
        stress, hvp = needs_stress(terms), needs_hvp(terms)
        student = student_model(self.config.student)  # its energies do not involve its reference energies

        def loss_fn(params, batch, fraction):
            return total_loss(terms, predictions(student, params, batch, stress=stress, directions=batch.directions),
                              batch, fraction)

        @functools.partial(jax.jit, static_argnums=0)
        def step(capacity, state: TrainState, teacher_params, inputs: Batch, key, shift):
            inputs, pool, moved_overflow, sampling = self.data.advance(capacity, teacher_params, state.pool, inputs,
                                                                       key)
            batch, overflow = self.data.labelled(capacity, teacher_params, inputs, key, shift, stress, hvp)
            overflow = overflow | moved_overflow
            fraction = state.step / self.config.steps  # of the run, for the loss weights that ramp
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, fraction)
            # Before clipping: the loop stops at the first step where it is not finite (a diverging run).
            gradient_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            metrics = {**metrics, **sampling, "gradient_norm": gradient_norm, "lr_scale": state.plateau.scale}
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            # Scaling adamw's updates scales its learning rate (weight decay included).
            updates = jax.tree.map(lambda u: state.plateau.scale * u, updates)
            params = optax.apply_updates(state.params, updates)
            ema = ema_update(state.ema, params, state.step + 1, self.config.optimizer.ema_decay)
            new = TrainState(params, opt_state, state.step + 1, ema, state.plateau, pool)
            # An overflowing step is not applied: the host grows capacities and recomputes it.
            new = jax.tree.map(lambda old, upd: jnp.where(overflow, old, upd), state, new)
            return new, metrics, overflow

        return step

    def dispatch_step(self, state: TrainState, inputs: Batch, key) -> tuple[TrainState, dict, jax.Array]:
        """Start one training step at the current capacities; returns (new_state, metrics, overflow) without
        waiting for the device. An overflowing step returns `state` unchanged (see `apply_step`)."""
        return self.train_step(self.data.capacity(inputs), state, self.teacher_params, inputs, key, self.shift)

    def apply_step(self, state: TrainState, inputs: Batch, key) -> tuple[TrainState, dict, bool]:
        """One training step; on overflow, grow the capacities and recompute the same step. grew: whether
        capacities changed."""
        def compute(_):  # dispatch_step reads the label source's current capacity
            new_state, metrics, overflow = self.dispatch_step(state, inputs, key)
            return (new_state, metrics), overflow

        def grow(capacity, result, attempt):
            self.data.grow(inputs, key, state.pool)
            return self.data.capacity(inputs)

        (new_state, metrics), _, growths = until_fits(compute, self.data.capacity(inputs), grow,
                                                      what=f"{self.config.name}: training step")
        return new_state, metrics, growths > 0

    # --- initial state ------------------------------------------------------------------------------
    def initial_state(self) -> TrainState:
        """Student params, and its reference energies fitted by least squares on the first labels; the label
        source's state (MD sampling: its replicas, equilibrated)."""
        no_shift = jnp.zeros(references.MAX_Z + 1, jnp.float32)  # labels relative to the teacher's reference
        label = jax.jit(lambda capacity, inputs, key: self.data.labelled(
            capacity, self.teacher_params, inputs, key, no_shift), static_argnums=0)
        pool = self.data.initial_pool(self.teacher_params)
        numbers, energies, batch = self.data.reference_data(label, pool)
        prior = references.ZERO if self.teacher is None else self.teacher.reference
        self.use_reference(references.fit(numbers, energies, self.config.student.elements, prior))
        params = init_params(self.config.student, jax.random.key(self.config.seed), batch)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32), params, Plateau(), pool)

    def state_template(self) -> TrainState:
        """A TrainState of the run's structure (shapes and dtypes) to restore a checkpoint into."""
        params = params_template(self.config.student)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32), params, Plateau(),
                          self.data.pool_template())
