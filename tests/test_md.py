"""JAX-MD integration: the potential against direct evaluation, overflow handling, NVE energy conservation
with the teacher, and the `distiller md` command's files."""

import json

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from flax.core import FrozenDict

from distiller import neighbours as nl
from distiller.batch import BatchShape, pad_structures, with_neighbours
from distiller.capacity import make_batch
from distiller.cli import main
from distiller.derivatives import predictions
from distiller.load import load_model
from distiller.md import Dynamics, Relaxer, energy_drift, potential, simulate
from distiller.structure import read_structures
from distiller.students import SchNetConfig, init_params, student_model
from distiller.teachers.fennol import FennolCapacity

TEACHER = "fennol-pmc:ani1x/0"


@pytest.fixture(scope="module")
def watertiny(structures_dir):
    return read_structures(structures_dir / "watertiny.extxyz")[0]


SKIN = 0.5


@pytest.fixture(scope="module")
def student(watertiny):
    """A fresh (untrained) small student: MD machinery does not care what the weights are, and it compiles fast.
    `direct(structure, capacity)` evaluates it as training and prediction do: a padded batch whose neighbour
    list is built from scratch at the structure's positions (with the MD list's cutoff and capacity, so that
    jit reuses the MD list's compilation; the student ignores pairs beyond its cutoff)."""
    config = SchNetConfig(cutoff=4.0, features=16, layers=1)
    batch, _ = make_batch([watertiny], config.cutoff + SKIN, BatchShape(watertiny.n_atoms + 1, 2))
    model = student_model(config, init_params(config, jax.random.key(0), batch), name="fresh student")
    compute = jax.jit(lambda params, batch: predictions(model, params, batch))

    def direct(structure, capacity):
        padded = jax.tree.map(jnp.asarray, pad_structures([structure], BatchShape(structure.n_atoms + 1, 2)))
        batch, found = with_neighbours(padded, config.cutoff + SKIN, capacity)
        assert not bool(found.overflow)
        out = compute(model.params, batch)
        return float(out.energy[0]), np.asarray(out.forces[: structure.n_atoms])

    return model, direct


def test_potential_matches_direct_evaluation(watertiny, student):
    """energy_fn(R, neighbor) and its gradient equal the student evaluated from scratch: at the list's own
    positions, after small moves inside the skin (no rebuild), with atoms wrapped by lattice vectors, and in a
    strained cell passed as `cell=`."""
    model, direct = student
    neighbor_fn, energy_fn = potential(model, watertiny, dr_threshold=SKIN)
    value_and_force = jax.jit(lambda R, nbrs, cell: jax.value_and_grad(energy_fn)(R, neighbor=nbrs, cell=cell))
    R0 = jnp.asarray(watertiny.positions, jnp.float32)
    nbrs = neighbor_fn.allocate(R0)
    assert not bool(nbrs.did_buffer_overflow)
    cell = jnp.asarray(watertiny.cell, jnp.float32)

    moved = watertiny.positions + np.random.default_rng(0).normal(0, 0.05, watertiny.positions.shape)
    unmoved = nbrs.update(jnp.asarray(moved, jnp.float32), cell=cell)
    np.testing.assert_array_equal(unmoved.reference_position, nbrs.reference_position)  # inside the skin

    wrapped = watertiny.positions.copy()
    wrapped[:20] += watertiny.cell[0]
    wrapped[40:60] -= watertiny.cell[1] + watertiny.cell[2]

    deform = np.eye(3) + np.array([[0.03, 0.01, 0.0], [0.01, -0.02, 0.0], [0.0, 0.0, 0.01]])
    strained = watertiny.replace(positions=watertiny.positions @ deform, cell=watertiny.cell @ deform)
    strained_cell = jnp.asarray(strained.cell, jnp.float32)
    strained_list = nbrs.update(jnp.asarray(strained.positions, jnp.float32), cell=strained_cell)
    assert not bool(strained_list.did_buffer_overflow)

    cases = [(watertiny, nbrs, cell), (watertiny.replace(positions=moved), nbrs, cell),
             (watertiny.replace(positions=wrapped), nbrs, cell), (strained, strained_list, strained_cell)]
    for structure, neighbours, c in cases:
        energy, gradient = value_and_force(jnp.asarray(structure.positions, jnp.float32), neighbours, c)
        expected_energy, expected_forces = direct(structure, nbrs.capacity)
        np.testing.assert_allclose(float(energy), expected_energy, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(-np.asarray(gradient), expected_forces, atol=2e-4)


def test_neighbour_overflow_is_redone(watertiny, student):
    """A deliberately tiny neighbour capacity overflows; the run re-allocates, redoes the chunk and ends exactly
    where a run with a measured capacity ends."""
    model, _ = student
    neighbor_fn, _ = potential(model, watertiny)
    tiny = nl.NeighbourCapacity(edges=16, bins=1, bin_size=4, reach=1)
    assert bool(neighbor_fn.allocate(jnp.asarray(watertiny.positions, jnp.float32), capacity=tiny).did_buffer_overflow)

    dynamics = Dynamics("nve", temperature=300.0, dt=0.5)
    small = list(simulate(model, watertiny, dynamics, 40, log_every=5, chunk=20, capacity=tiny))
    measured = list(simulate(model, watertiny, dynamics, 40, log_every=5, chunk=20))
    assert sum(r.redone for r in small) >= 1
    assert sum(r.redone for r in measured) == 0
    assert [r.step.tolist() for r in small] == [[0], [5, 10, 15, 20], [25, 30, 35, 40]]
    for a, b in zip(small, measured):
        np.testing.assert_allclose(a.position, b.position, atol=1e-5)
        np.testing.assert_allclose(a.potential, b.potential, rtol=1e-6, atol=1e-4)


def test_relaxer_lowers_energy_in_a_strained_cell(watertiny, student):
    model, direct = student
    deform = np.eye(3) * 1.02
    cell = watertiny.cell @ deform
    start = watertiny.positions @ deform
    relaxer = Relaxer(model, watertiny, chunk=10)
    positions, largest, steps = relaxer(start, cell, steps=30)
    assert steps == 30 and np.isfinite(largest)
    capacity = relaxer.neighbor_fn.allocate(jnp.asarray(start, jnp.float32), cell=jnp.asarray(cell)).capacity
    e_start, _ = direct(watertiny.replace(positions=start, cell=cell), capacity)
    e_end, f_end = direct(watertiny.replace(positions=positions, cell=cell), capacity)
    assert e_end < e_start
    np.testing.assert_allclose(largest, np.max(np.linalg.norm(f_end, axis=1)), rtol=1e-3)


def test_md_and_relaxation_far_from_the_origin_match_them_near_it(watertiny, student):
    """float32 resolves positions 1e4 Å from the origin to 1e-3 Å: MD and FIRE run near the origin (moved there by
    whole lattice vectors), and the relaxer hands the positions back where they were given."""
    model, _ = student
    lattice = 1000 * watertiny.cell.sum(axis=0)  # ~1.6e4 Å away
    far = watertiny.replace(positions=watertiny.positions + lattice)
    dynamics = Dynamics("nve", temperature=300.0, dt=0.5)
    near_run, far_run = (list(simulate(model, s, dynamics, 10, log_every=10, chunk=10)) for s in (watertiny, far))
    for a, b in zip(near_run, far_run):
        np.testing.assert_allclose(b.position, a.position, atol=1e-5)
        np.testing.assert_allclose(b.force, a.force, atol=1e-5)
    relaxer = Relaxer(model, watertiny, chunk=10)
    near_positions, _, _ = relaxer(watertiny.positions, steps=10)
    far_positions, _, _ = relaxer(far.positions, steps=10)
    np.testing.assert_allclose(far_positions - lattice, near_positions, atol=1e-5)


def test_dynamics_and_arguments_are_checked(watertiny, student):
    with pytest.raises(ValueError, match="ensemble"):
        Dynamics(ensemble="npt")
    with pytest.raises(ValueError, match="thermostat"):
        Dynamics(ensemble="nvt", thermostat="berendsen")
    with pytest.raises(ValueError, match="multiple of log_every"):
        next(simulate(student[0], watertiny, Dynamics(), 15, log_every=10))


def test_cli_nve_on_watertiny_conserves_energy(tmp_path, structures_dir, record_property):
    """`distiller md` with one ANI-1x member, NVE at 300 K, 0.5 fs, 300 steps: the thermo log and trajectory
    are complete and consistent, and the energy drift is small."""
    source = structures_dir / "watertiny.extxyz"
    out = tmp_path / "md"
    assert main(["md", "--model", TEACHER, "--structure", str(source), "--ensemble", "nve", "--temperature", "300",
                 "--dt", "0.5", "--steps", "300", "--log-every", "5", "--write-every", "50", "--chunk", "100",
                 "--out", str(out), "--quiet"]) == 0
    n = 81

    rows = np.loadtxt(out / "thermo.log")
    assert rows.shape == (61, 6)
    step, time_fs, temperature, potential_energy, kinetic, total = rows.T
    np.testing.assert_array_equal(step, np.arange(0, 301, 5))
    np.testing.assert_allclose(time_fs, step * 0.5)
    np.testing.assert_allclose(total, potential_energy + kinetic, atol=2e-3)
    np.testing.assert_allclose(temperature, 2 * kinetic / (3 * n * units.kB), rtol=1e-4)
    assert temperature[0] == pytest.approx(300.0, abs=0.01)
    assert 150 < temperature.min() and temperature.max() < 450

    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert [int(a.info["step"]) for a in frames] == [0, 50, 100, 150, 200, 250, 300]
    for a, row in zip(frames, rows[::10]):
        assert a.get_potential_energy() == pytest.approx(row[3], abs=1e-3)
        assert 0.5 * np.sum(a.get_momenta() ** 2 / a.get_masses()[:, None]) == pytest.approx(row[4], rel=1e-4)
        np.testing.assert_allclose(a.cell.array, read_structures(source)[0].cell)
        fractional = a.get_scaled_positions(wrap=False)
        assert fractional.min() > -1e-4 and fractional.max() < 1 + 1e-4  # periodic_general wraps into the cell

    summary = json.loads((out / "md.json").read_text())
    assert summary["chunks_redone"] == 0 and summary["ns_per_day"] > 0
    drift = energy_drift(rows, n)
    assert summary["drift_meV_per_atom_ps"] == pytest.approx(drift, rel=1e-2, abs=1e-2)  # log has 6 decimals
    excursion = np.max(np.abs(total - total[0])) / n * 1000
    # Kept with the test's report (junit XML: `pytest --junit-xml`), not printed through pytest's capture.
    record_property("drift_meV_per_atom_ps", round(float(drift), 4))
    record_property("largest_excursion_meV_per_atom", round(float(excursion), 4))
    assert abs(drift) < 5.0, f"energy drift {drift:.3f} meV/atom/ps"
    assert excursion < 2.0, f"total energy moved by {excursion:.3f} meV/atom"

    # Refused (exit code 1, a one-line error) before anything is touched.
    assert main(["md", "--model", TEACHER, "--structure", str(source), "--steps", "10", "--out", str(out),
                 "--quiet"]) == 1
    assert np.loadtxt(out / "thermo.log").shape == (61, 6)


def test_teacher_capacity_overflow_is_flagged_and_grown(watertiny):
    """FeNNol's own capacities (filtered pairs, angle triplets) set just above what the structure needs: the
    list's update flags the overflow when the water is compressed (sticky, like the neighbour overflow), and a
    re-allocation from the overflowed list fits the compressed configuration."""
    model = load_model(TEACHER)
    teacher = model.source
    neighbor_fn, _ = potential(model, watertiny)
    R = jnp.asarray(watertiny.positions, jnp.float32)
    list_capacity = neighbor_fn.allocate(R).capacity
    # The batch as the MD list sees it (shape, cutoff with skin and capacity as in MD: jit reuses that compilation).
    batch, _ = make_batch([watertiny], teacher.cutoff + 0.5, BatchShape(watertiny.n_atoms + 1, 2), list_capacity)
    need = teacher.measure(batch)
    states = []
    for needed, roomy in zip(need.layer_states, model.capacity_for(batch, 1.25).layer_states):
        state = dict(roomy)
        for key, slack in (("npairs", 2), ("nangles", 8)):
            if key in state:
                state[key] = needed[key] + slack
        states.append(FrozenDict(state))
    tight = FennolCapacity(tuple(states))

    nbrs = neighbor_fn.allocate(R, model_capacity=tight)
    update = jax.jit(lambda nbrs, R: nbrs.update(R))
    assert not bool(update(nbrs, R).did_buffer_overflow)
    centre = R.mean(axis=0)
    squeezed = centre + 0.93 * (R - centre)  # denser in the middle of the same cell: more pairs and angles
    flagged = update(nbrs, squeezed)
    assert bool(flagged.model_overflow) and not bool(flagged.overflow)
    assert bool(update(flagged, R).did_buffer_overflow)  # sticky
    grown = neighbor_fn.allocate(R, previous=flagged, also=[squeezed])
    assert not bool(update(grown, squeezed).did_buffer_overflow)


def test_md_speed_traces_one_more_chunk_outside_the_timed_ones(tmp_path, structures_dir):
    """bench/md.py's and `distiller profile --md`'s row: one ANI-1x member on watertiny, chunks of 10 steps (one
    compiles, one is timed, one is traced)."""
    from distiller.speed import md_speed

    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    row = md_speed(load_model(TEACHER), water, 1, 10, 10, 0.5, "watertiny", trace=str(tmp_path / "trace"))
    assert row["chunks_timed"] == 1 and row["steps"] == 10 and row["ms_per_step"] > 0
    profile = row["profile"]
    assert profile["steps"] == 10 and profile["chunk_redone"] is False and profile["wall_ms_per_step"] > 0
    assert profile["trace"].startswith(str(tmp_path / "trace")) and profile["trace"].endswith("perfetto_trace.json.gz")


def test_md_speed_at_a_thin_skin_rebuilds_more_and_integrates_the_same_trajectory(structures_dir):
    """bench/md.py --skins: the skin changes which pairs the list holds and how often it is rebuilt, never the
    forces, so NVE from the same velocities ends at the same temperature (watertiny, 20 steps: a 0.05 Å skin
    rebuilds every few steps, the default 0.5 Å not at all)."""
    from distiller.speed import md_speed

    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    model = load_model(TEACHER)
    thin, default = (md_speed(model, water, 1, 10, 10, 0.5, "watertiny", skin=skin) for skin in (0.05, None))
    assert thin["skin_A"] == 0.05 and default["skin_A"] == 0.5
    assert abs(thin["final_temperature_K"] - default["final_temperature_K"]) < 1e-3
    assert abs(thin["final_temperature_K"] - 300.0) > 1.0  # it moved: the comparison is not of the start
