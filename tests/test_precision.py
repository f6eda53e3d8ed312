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

from distiller.capacity import make_batch
from distiller.config import Experiment
from distiller.derivatives import predictions
from distiller.structure import read_structures
from distiller.students import SchNetConfig, init_params, student_model

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
    config = SchNetConfig(cutoff=4.0, features=16, layers=1)
    batch, _ = make_batch([watertiny], config.cutoff)
    return student_model(config, init_params(config, jax.random.key(0), batch)), batch


def md_chunk_jaxpr(model, structure):
    """The jaxpr of one `distiller.md.simulate` chunk (NVE: integrator, shift, forces, list update)."""
    from distiller.md.simulate import Dynamics, _integration, _quiet, masses

    neighbor_fn, init_fn, run_chunk, _ = _integration(model, structure, Dynamics("nve"), log_every=2)
    R = jnp.asarray(structure.positions, jnp.float32)
    nbrs = neighbor_fn.allocate(R)
    with _quiet():  # as simulate() runs it: JAX-MD's float64 kinetic-energy sums warn without x64
        state = init_fn(jax.random.key(0), R, jnp.asarray(masses(structure), jnp.float32), neighbor=nbrs)
        return jax.make_jaxpr(run_chunk, static_argnums=2)(state, nbrs, 1)


def test_the_check_finds_a_default_precision_product():
    a = jnp.ones((3, 3))
    assert len(loose_products(jax.make_jaxpr(lambda a: jax.grad(lambda a: jnp.sum(jnp.tanh(a @ a)))(a))(a))) == 3
    assert not loose_products(jax.make_jaxpr(lambda a: jnp.matmul(a, a, precision="highest"))(a))


def test_teacher_md_chunk(watertiny):
    from distiller.load import load_model

    assert loose_products(md_chunk_jaxpr(load_model(TEACHER), watertiny)) == []


def test_student_md_chunk_and_forces_and_stress(watertiny, student):
    model, batch = student
    assert loose_products(md_chunk_jaxpr(model, watertiny)) == []
    stressed = jax.make_jaxpr(lambda p, b: predictions(model, p, b, stress=True))(model.params, batch)
    assert loose_products(stressed) == []


def test_labelling_program(watertiny):
    """What the Predictor runs (labelling, evaluation, the calculator): neighbour list, teacher with stress."""
    from distiller import capacity as capacities
    from distiller.batch import pad_structures
    from distiller.predict import batch_predictions
    from distiller.teachers.registry import load_teacher

    teacher = load_teacher(TEACHER)
    batch = jax.tree.map(jnp.asarray, pad_structures([watertiny]))
    capacity = capacities.allocate(teacher, batch, teacher.cutoff)
    program = jax.make_jaxpr(batch_predictions.__wrapped__, static_argnums=(0, 3, 4, 5))(
        teacher, teacher.params, batch, capacity, teacher.cutoff, True)
    assert loose_products(program) == []


def test_online_training_step(structures_dir):
    """The whole online step: rattle and strain, neighbour list, teacher with stress, student, loss, update."""
    from distiller.config import LossConfig
    from distiller.train.step import Distillation

    config = Experiment(name="precision", teacher=TEACHER, structures=(str(structures_dir / "watertiny.extxyz"),),
                        student=SchNetConfig(cutoff=4.0, features=16, layers=1), batch_size=1,
                        loss=LossConfig(stress_weight=1.0))
    job = Distillation.create(config)
    state = job.initial_state()
    inputs = job.seed_batch(0)
    program = jax.make_jaxpr(job.train_step.__wrapped__, static_argnums=0)(
        job.data.capacity(inputs), state, job.teacher_params, inputs, job.step_key(0), job.shift)
    assert loose_products(program) == []
