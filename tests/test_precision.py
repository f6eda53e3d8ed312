"""Every float32 matrix product distiller traces asks for full precision (distiller.precision).

GPUs run float32 matrix products as TF32 unless told otherwise; on an H200 that made ANI-1x NVE MD of waterbox
heat from 300 K to 3675 K in 0.5 ps. A CPU computes full float32 whatever the precision says, so the guard
here is on the traced programs: no dot_general in them may be left at the default precision. The programs
are the ones that run: JAX-MD integration chunks (teacher and student), labelling and the training step.
"""


import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

from distiller.batch import make_batch
from distiller.config import Experiment
from distiller.structure import read_structures
from distiller.students import StudentConfig, build_model, energy_forces_stress, init_student

TEACHER = "fennol-pmc:ani1x/0"


def loose_products(jaxpr) -> list[str]:
    """dot_generals of a (closed) jaxpr and all its sub-jaxprs whose precision is not HIGHEST on both sides."""
    found = []
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            precision = eqn.params.get("precision")
            if precision is None or any(p != jax.lax.Precision.HIGHEST for p in precision):
                found.append(f"{eqn.primitive.name} {[v.aval for v in eqn.invars]} precision={precision}")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    found += loose_products(sub)
    return found


@pytest.fixture(scope="module")
def watertiny(structures_dir):
    return read_structures(structures_dir / "watertiny.extxyz")[0]


@pytest.fixture(scope="module")
def student(watertiny):
    config = StudentConfig(cutoff=4.0, features=16, layers=1)
    batch, _ = make_batch([watertiny], config.cutoff)
    return config, build_model(config), init_student(config, jax.random.key(0), batch), batch


def md_chunk_jaxpr(model, structure):
    """The jaxpr of one `distiller.md.simulate` chunk (NVE: integrator, shift, forces, list update)."""
    from distiller.md.simulate import Dynamics, _integration, masses

    neighbor_fn, init_fn, run_chunk, _ = _integration(model, structure, Dynamics("nve"), log_every=2)
    R = jnp.asarray(structure.positions, jnp.float32)
    nbrs = neighbor_fn.allocate(R)
    state = init_fn(jax.random.key(0), R, jnp.asarray(masses(structure), jnp.float32), neighbor=nbrs)
    return jax.make_jaxpr(run_chunk, static_argnums=2)(state, nbrs, 1)


def test_the_check_finds_a_default_precision_product():
    a = jnp.ones((3, 3))
    assert len(loose_products(jax.make_jaxpr(lambda a: jax.grad(lambda a: jnp.sum(jnp.tanh(a @ a)))(a))(a))) == 3
    assert not loose_products(jax.make_jaxpr(lambda a: jnp.matmul(a, a, precision="highest"))(a))


def test_teacher_md_chunk(watertiny):
    from distiller.md import load_model

    assert loose_products(md_chunk_jaxpr(load_model(TEACHER), watertiny)) == []


def test_student_md_chunk_and_forces_and_stress(watertiny, student):
    from distiller.md import from_student

    config, module, params, batch = student
    assert loose_products(md_chunk_jaxpr(from_student(config, module, params), watertiny)) == []
    assert loose_products(jax.make_jaxpr(lambda p, b: energy_forces_stress(module, p, b))(params, batch)) == []


def test_labelling_program(watertiny):
    from distiller import label
    from distiller.batch import allocate_neighbours
    from distiller.teachers.registry import load_teacher

    teacher, params = load_teacher(TEACHER)
    batch, _ = make_batch([watertiny], teacher.cutoff)
    nl_capacity = allocate_neighbours(batch, teacher.cutoff)
    teacher_capacity = teacher.capacity_for(label._with_edges(batch, teacher.cutoff, nl_capacity))
    program = jax.make_jaxpr(label._teacher_labels.__wrapped__, static_argnums=(0, 3, 4))(
        teacher, params, batch, nl_capacity, teacher_capacity)
    assert loose_products(program) == []


def test_online_training_step(structures_dir):
    """The whole online step: rattle and strain, neighbour list, teacher with stress, student, loss, update."""
    from distiller.config import LossConfig
    from distiller.train.trainer import Distillation

    config = Experiment(name="precision", teacher=TEACHER, structures=(str(structures_dir / "watertiny.extxyz"),),
                        student=StudentConfig(cutoff=4.0, features=16, layers=1), batch_size=1,
                        loss=LossConfig(stress_weight=1.0))
    job = Distillation.create(config)
    state = job.initial_state()
    inputs = job.seed_batch(0)
    program = jax.make_jaxpr(job.train_step.__wrapped__, static_argnums=0)(
        job.data.capacity(inputs), state, job.teacher_params, inputs, job.step_key(0))
    assert loose_products(program) == []
