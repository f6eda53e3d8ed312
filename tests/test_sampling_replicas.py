"""Teacher MD sampling of many trajectories as one program, with a host teacher labelling all of them in one
call per step.

The teacher is ASE's EMT through `distiller.teachers.ase_teacher` (a real host teacher: its numbers are EMT's),
its `label` wrapped only to count how many structures each host call carries. Periodic copper cells of 4 atoms
keep a step cheap; the trajectories are short, so the batched program and the one-by-one runs agree to float32
rounding (the promise of `simulate_replicas`)."""

import dataclasses

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.emt import EMT

from distiller.batch import BatchShape, pad_structures
from distiller.data.sampling import MDConfig, sample
from distiller.md import MDFailure
from distiller.structure import Structure
from distiller.teachers.ase_teacher import ase_labeller
from distiller.teachers.host import host_model

CONFIG = MDConfig(count=3, temperature=600.0, interval=5, equilibration=10, chunk=25, replicas=3)


class CountingEMT:
    """EMT as a host teacher that records the number of structures of every `label` call."""

    def __init__(self):
        self.calls: list[int] = []
        labeller = ase_labeller(EMT(), "emt")

        def label(structures):
            self.calls.append(len(structures))
            return labeller(structures)

        self.label = labeller
        self.model = host_model("emt", label, cutoff=0.0, elements=frozenset({13, 29}))


@pytest.fixture(scope="module")
def emt():
    return CountingEMT()


@pytest.fixture(scope="module")
def copper():
    return Structure.from_ase(ase.build.bulk("Cu", "fcc", a=3.61, cubic=True), name="copper")


def rattled(structure, n, stdev=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return [structure.replace(positions=structure.positions + rng.normal(0.0, stdev, structure.positions.shape),
                              name=f"{structure.name} {k}") for k in range(n)]


def test_vmapped_callback_labels_every_replica_in_one_call(emt, copper):
    """Under vmap the host gets all replicas at once: one `label` call per evaluation (energy, or energy and
    its derivative together), and each replica's energy, forces and stress equal its own unbatched call's."""
    structures = rattled(copper, 3)
    structures[2] = structures[2].replace(cell=structures[2].cell * 1.02, positions=structures[2].positions * 1.02)
    batches = [jax.tree.map(jnp.asarray, pad_structures([s], BatchShape(atoms=5, graphs=2))) for s in structures]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

    def energy(positions, cell, batch):
        return jnp.sum(emt.model.energies(None, batch._replace(positions=positions, cell=cell)).energy)

    emt.calls.clear()
    energies = jax.jit(jax.vmap(lambda b: emt.model.energies(None, b).energy))(stacked)
    assert emt.calls == [3]
    emt.calls.clear()
    d_positions, d_cell = jax.jit(jax.vmap(jax.grad(energy, argnums=(0, 1))))(stacked.positions, stacked.cell,
                                                                            stacked)
    assert emt.calls == [3]  # the custom_jvp's one evaluation, batched

    for k, (s, b) in enumerate(zip(structures, batches)):
        alone = emt.label([s])[0]
        np.testing.assert_allclose(energies[k, 0], emt.model.energies(None, b).energy[0], rtol=1e-6)
        np.testing.assert_allclose(energies[k, 0], alone.energy, rtol=1e-5)
        np.testing.assert_allclose(energies[k, 1], 0.0)  # the padding graph
        np.testing.assert_allclose(-d_positions[k, :4], alone.forces, atol=1e-5)
        np.testing.assert_allclose(d_positions[k, 4], 0.0)  # the padding atom
        # dE/dcell gives back the stress: V sigma = X^T dE/dX + cell^T dE/dcell (host.py's docstring)
        x = np.asarray(b.positions[:4], np.float64)
        virial = x.T @ np.asarray(d_positions[k, :4]) + np.asarray(b.cell[0]).T @ np.asarray(d_cell[k, 0])
        np.testing.assert_allclose(virial / abs(np.linalg.det(s.cell)), alone.stress, atol=2e-5)
    assert np.ptp(np.asarray(energies[:, 0])) > 0.01  # the replicas are different structures


def test_batched_md_sampling_is_the_one_by_one_sampling(emt, copper):
    """Two seeds of one atom count, three replicas each: one program of six trajectories gives what running them
    one after the other gives (frames to float32 rounding, names and provenance exactly, order seed, replica,
    step), with one teacher call per evaluation for all six instead of six. (Seeds of other elements and cells
    share a program too, `simulate_replicas`' own tests show; one cell here keeps this to two compilations.)"""
    seeds = [copper, rattled(copper, 1, stdev=0.1)[0].replace(name="rattled")]
    emt.calls.clear()
    one_by_one = sample(seeds, dataclasses.replace(CONFIG, parallel=1), emt.model, key=3)
    single_calls = list(emt.calls)
    emt.calls.clear()
    batched = sample(seeds, CONFIG, emt.model, key=3)

    assert set(single_calls) == {1} and set(emt.calls) == {6}
    assert len(emt.calls) <= len(single_calls) / 6 + 2  # one batched call per step of all six
    assert len(batched) == len(one_by_one) == 2 * 3 * 3
    for old, new in zip(one_by_one, batched):
        assert new.name == old.name
        p_old, p_new = dict(old.info["provenance"]), dict(new.info["provenance"])
        assert p_old.pop("params")["parallel"] == 1 and p_new.pop("params")["parallel"] == 64
        assert p_new == p_old
        np.testing.assert_allclose(new.positions, old.positions, atol=2e-5)
        np.testing.assert_array_equal(new.numbers, old.numbers)
    assert [(c.name.split("|")[0], c.info["provenance"]["replica"], c.info["provenance"]["step"],
             c.info["provenance"]["sample"]) for c in batched] == \
        [(seed, r, step, 3 * r + n) for seed in ("copper", "rattled") for r in range(3)
         for n, step in enumerate((15, 20, 25))]
    moved = [np.abs(c.positions - batched[0].positions).max() for c in batched[3:9:3]]
    assert min(moved) > 0.01  # replicas and seeds are distinct trajectories


def test_a_temperature_ladder_runs_as_one_program_trajectory_for_trajectory(emt, copper):
    """MDConfig(temperature=(T0, T1), replicas=2): four trajectories of one seed, replica t * 2 + r at rung t, in
    one program whose temperatures are arguments; each is what its own program at its rung gives (float32
    rounding), and each frame names its rung."""
    ladder = dataclasses.replace(CONFIG, temperature=(300.0, 1200.0), replicas=2)
    emt.calls.clear()
    batched = sample([copper], ladder, emt.model, key=4)
    assert set(emt.calls) == {4}  # one program, one host call per evaluation for all four
    one_by_one = sample([copper], dataclasses.replace(ladder, parallel=1), emt.model, key=4)
    assert len(batched) == len(one_by_one) == 4 * 3
    for old, new in zip(one_by_one, batched):
        assert new.name == old.name and new.info["provenance"]["replica"] == old.info["provenance"]["replica"]
        np.testing.assert_allclose(new.positions, old.positions, atol=2e-5)
    assert [c.info["provenance"]["temperature_K"] for c in batched] == [300.0] * 6 + [1200.0] * 6
    assert batched[0].info["provenance"]["params"]["temperature"] == (300.0, 1200.0)
    # The hot rung moves the atoms further from their lattice sites than the cold one (minimum image: a cubic cell).
    side = np.diag(copper.cell)
    displacement = [np.abs(d - side * np.round(d / side)).max() for d in (c.positions - copper.positions
                                                                          for c in batched)]
    assert min(displacement[6:]) > max(displacement[:6])
    with pytest.raises(ValueError, match=r"MDConfig.temperature: a ladder needs at least one temperature"):
        MDConfig(temperature=())
    with pytest.raises(ValueError, match=r"MDConfig.temperature must be >= 0, got -1.0"):
        MDConfig(temperature=(300.0, -1.0))


def test_a_blow_up_names_its_seed_and_replica(emt, copper):
    """A seed whose atoms nearly overlap explodes in the program it shares with a sane seed: the error names
    that seed and its replica (not the program's index of the trajectory). Six trajectories of copper's cell:
    the previous test's program."""
    squeezed = copper.replace(positions=copper.positions.copy(), name="squeezed")
    squeezed.positions[1] = squeezed.positions[0] + np.array([0.75, 0.75, 0.0])  # 1.06 Å from atom 0
    with pytest.raises(MDFailure, match=r"^squeezed \(MD replica 0 with emt\): MD failed at step") as failure:
        sample([copper, squeezed], CONFIG, emt.model, key=0)
    assert failure.value.replica == 0
