"""The MD stability report (`distiller evaluate RUN --md FILE`): the failure criteria on hand-made trajectories,
the distributions and their L1 differences, and real MD with one ANI-1x member.

The MD tests share one compilation per dynamics: the member is loaded once per process (the FeNNol-PMC loader
keeps it), the student of the CLI's run is that same member (a student identical to its teacher must show no
difference at all), and the planted bond break runs the CLI test's dynamics on the same structure."""

import dataclasses
import json
import re

import ase.build
import numpy as np
import pytest

from distiller import stability
from distiller.cli import main
from distiller.config import Experiment
from distiller.load import load_model
from distiller.run_directory import RunDirectory
from distiller.stability import (Criteria, bond_failure, bond_geometry, contact_failure, find_bonds,
                                 l1_difference, minimum_image, pair_distance_distribution, radial_distribution,
                                 stability_report, structural_failure)
from distiller.structure import Structure, write_structures

TEACHER = "fennol-pmc:ani1x/0"
MD = ["--time-ps", "0.1", "--temperature", "500", "--dt", "0.5"]  # shared by the CLI and the planted bond break


def water_in_cell(length: float = 6.0, shift=(0.0, 0.0, 0.0)) -> Structure:
    """One water molecule in a cubic cell, its H atoms across the cell's faces when shifted there."""
    atoms = ase.build.molecule("H2O")
    positions = atoms.positions + np.asarray(shift)
    return Structure(numbers=np.array(atoms.numbers), positions=positions, cell=length * np.eye(3),
                     pbc=np.ones(3, bool), name="water")


# 1. Criteria on hand-made trajectories


def test_bonds_are_found_by_covalent_radii_and_across_cell_faces():
    molecule = Structure.from_ase(ase.build.molecule("CH3OH"), name="methanol")
    bonds = find_bonds(molecule)
    symbols = [f"{molecule.numbers[i]}-{molecule.numbers[j]}" for i, j in bonds.pairs]
    assert sorted(symbols) == sorted(["6-8", "6-1", "6-1", "6-1", "8-1"])  # no H...H, no O...H of the methyl
    wrapped = water_in_cell(shift=(-0.2, -0.5, 0.0))  # an H at negative x: across the face from the O
    wrapped = wrapped.replace(positions=wrapped.positions % 6.0)
    bonds = find_bonds(wrapped)
    assert bonds.pairs.tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(bonds.length, find_bonds(water_in_cell()).length, atol=1e-9)
    assert bonds.angles.tolist() == [[1, 0, 2]]
    _, angles = bond_geometry(wrapped.positions[None], wrapped, bonds)
    assert angles["H-O-H"][0, 0] == pytest.approx(ase.build.molecule("H2O").get_angle(1, 0, 2))  # minimum image


def test_a_stretched_bond_fails_at_its_first_frame_and_a_wrapped_atom_does_not():
    water = water_in_cell(shift=(3.0, 3.0, 3.0))
    bonds = find_bonds(water)
    frames = np.repeat(water.positions[None], 5, axis=0)
    frames[1, 1] += 6.0 * np.array([1.0, 0.0, 0.0])  # a lattice jump: the same bond
    stretched = water.positions[1] + 0.6 * (water.positions[1] - water.positions[0])  # 1.6x
    frames[3:, 1] = stretched
    k, cause = bond_failure(frames, water, bonds)
    assert k == 3
    assert cause.startswith("bond O0-H1 stretched to 1.55 Å, 1.60x its start 0.97 Å (limit 1.5x)"), cause
    assert bond_failure(frames[:3], water, bonds) is None
    assert bond_failure(frames, water, bonds, max_stretch=1.7) is None


def test_contacts_are_found_through_cell_faces_and_after_large_moves():
    cell = 8.0 * np.eye(3)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(4) * 2.0 + 0.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    structure = Structure(numbers=np.full(len(grid), 8), positions=grid, cell=cell, pbc=np.ones(3, bool), name="grid")
    frames = grid[None] + rng.normal(0, 0.05, (40, len(grid), 3))
    # atom 5 runs 30 Å along x between the rows of atoms: the chunk is split until the pair search reaches little
    frames[:, 5] += np.linspace(0, 30, 40)[:, None] * np.array([1.0, 0.0, 0.0]) + np.array([0.0, 1.0, 0.0])
    # at frame 33, atom 0 (x = 0.2) meets atom 48 (x = 7.9) through the x = 0 face
    frames[33, 48] = [7.9, 0.5, 0.5]
    frames[33, 0] = [0.2, 0.6, 0.5]
    frames = frames % 8.0

    def brute_force(frames):
        for k, positions in enumerate(frames):
            d = minimum_image(positions[:, None] - positions[None], cell)
            np.fill_diagonal(d, np.inf)
            if d.min() < 0.5:
                return k
        return None

    found = contact_failure(frames, structure, 0.5)
    assert found is not None and found[0] == brute_force(frames) == 33
    assert found[1] == f"atoms O0 and O48 are {np.hypot(0.3, 0.1):.2f} Å apart (limit 0.5 Å)"
    assert contact_failure(np.delete(frames, 33, axis=0), structure, 0.5) is None
    # whichever comes first: the contact, or a broken bond
    molecule = Structure.from_ase(ase.build.molecule("H2O"), name="water")
    trajectory = np.repeat(molecule.positions[None], 3, axis=0)
    trajectory[2, 2] = trajectory[2, 1] + np.array([0.0, 0.0, 0.4])  # H2 onto H1: a contact
    assert structural_failure(trajectory, molecule, find_bonds(molecule), Criteria())[0] == 2
    assert structural_failure(trajectory[:2], molecule, find_bonds(molecule), Criteria()) is None


# 2. Distributions


def test_an_ideal_gas_has_g_of_one_and_l1_measures_the_difference():
    rng = np.random.default_rng(1)
    cell = 10.0 * np.eye(3)
    numbers = np.array([8] * 40 + [1] * 80)
    structure = Structure(numbers=numbers, positions=rng.uniform(0, 10, (120, 3)), cell=cell, pbc=np.ones(3, bool),
                          name="gas")
    frames = rng.uniform(0, 10, (100, 120, 3))
    r, g = radial_distribution(frames, structure, 4.9, 49)
    assert sorted(g) == ["H-H", "H-O", "O-O"]
    for name, values in g.items():
        assert np.mean(values[5:]) == pytest.approx(1.0, abs=0.03), name
    # beyond half the cell (another pair search): every image within r_max, the same counts below half the cell
    _, far = radial_distribution(frames[:2], structure, 7.0, 70)
    _, near = radial_distribution(frames[:2], structure, 4.9, 49)
    for name in g:
        np.testing.assert_allclose(far[name][:49], near[name], rtol=1e-12)
        assert np.mean(far[name][49:]) == pytest.approx(1.0, abs=0.1)
    width = r[1] - r[0]
    assert l1_difference(g["H-H"], g["H-H"], width) == 0.0
    p = np.array([0.0, 1.0, 0.0])
    assert l1_difference(np.array([1.0, 0.0, 0.0]), p, 1.0) == 2.0
    assert l1_difference(p, np.zeros(3), 1.0) is None

    molecule = Structure.from_ase(ase.build.molecule("CH4"), name="methane")
    r, p = pair_distance_distribution(molecule.positions[None], molecule, 5.0, 500)
    assert sorted(p) == ["C-H", "H-H"]
    assert np.sum(p["H-H"]) * (r[1] - r[0]) == pytest.approx(1.0)
    assert r[np.argmax(p["C-H"])] == pytest.approx(1.09, abs=0.01)


# 3. Real MD: the teacher against itself through the command line, a planted bond break, a huge time step


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER)


@pytest.fixture
def run_dir(tmp_path, monkeypatch, teacher):
    """A run directory whose teacher is the ANI-1x member and whose 'student' is that member itself."""
    path = tmp_path / "run"
    RunDirectory(path).write_config(Experiment(name="member-as-student", teacher=TEACHER, run_dir=str(path)))
    monkeypatch.setattr(stability, "load_student", lambda run_dir, kernel=None: teacher)
    return path


def test_cli_teacher_against_itself_writes_the_report_with_no_failure_and_no_difference(
        run_dir, structures_dir, capsys, monkeypatch):
    source = structures_dir / "aspirin.extxyz"
    assert main(["evaluate", str(run_dir), "--md", str(source), *MD, "--quiet"]) == 0
    out = run_dir / "stability" / "aspirin"
    report = json.loads((out / "stability.json").read_text())  # strict JSON (no NaN)
    assert report["command"].startswith(f"distiller evaluate {run_dir} --md {source}")
    summary = report["summary"]
    assert summary["failure"] is None and summary["nve_failure"] is None and summary["teacher_failure"] is None
    assert summary["time_to_failure_ps"] is None and summary["simulated_ps"] == pytest.approx(0.1)
    # NVE starts, for both, where the teacher's NVT ended (its last kept frame), not from the file's structure.
    assert report["md"]["nve_from"] == "the teacher's NVT frame at step 200 (0.1 ps)"
    assert summary["distribution"] == "pair-distance"  # a molecule
    assert abs(summary["drift_meV_per_atom_ps"]) < 5.0
    assert summary["drift_meV_per_atom_ps"] == summary["teacher_drift_meV_per_atom_ps"]
    distributions = report["distributions"]
    assert sorted(distributions["pairs"]) == ["C-C", "C-H", "C-O", "H-H", "H-O", "O-O"]
    assert sorted(distributions["bond_lengths"]) == ["C-C", "C-H", "C-O", "H-O"]
    assert "C-C-C" in distributions["angles"] and distributions["frames"]["student"] >= 10
    for kind in ("pairs", "bond_lengths", "angles"):
        assert all(v["l1"] == 0.0 for v in distributions[kind].values()), kind  # the same seed, the same model
    temperatures = [m["nvt"]["mean_temperature_K"] for m in report["models"].values()]
    assert 200 < temperatures[0] == temperatures[1] < 800
    for name in ("temperature.png", "rdf.png", "bonds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "without failure" in capsys.readouterr().out
    # Called again (as after a stop), the report takes every finished MD run back from OUT/runs/: nothing is
    # integrated, and the report is the same.
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "student-nve.npz", "student-nvt.npz", "teacher-nve.npz", "teacher-nvt.npz"]

    def integrated(*args, **kwargs):
        raise AssertionError("a kept MD run was integrated again")

    monkeypatch.setattr(stability, "run_trajectory", integrated)
    collected = run_dir / "stability-rows.json"
    assert main(["evaluate", str(run_dir), "--md", str(source), *MD, "--quiet", "--collect", str(collected),
                 "--name", "member"]) == 0
    again = json.loads((out / "stability.json").read_text())
    assert again["summary"] == summary and again["models"] == report["models"]
    assert again["distributions"] == distributions
    [row] = json.loads(collected.read_text())  # issue 13's row of the report
    assert (row["student"], row["system"], row["temperature_K"], row["dt_fs"]) == ("member", "aspirin", 500.0, 0.5)
    assert row["time_to_failure_ps"] is None and row["simulated_ps"] == summary["simulated_ps"]
    assert row["rdf_l1"] == 0.0 and row["bond_length_l1"]["C-H"] == 0.0 and "--collect" in row["command"]


def test_nve_starts_from_the_teacher_s_last_nvt_frame_unless_it_failed(aspirin):
    moved = aspirin.positions + 0.01
    nvt = stability.Trajectory(np.zeros((3, 6)), np.stack([aspirin.positions, moved]), np.array([0, 400]), None, 1.0)
    start, what = stability._nve_start(aspirin, nvt, dt=0.5)
    np.testing.assert_array_equal(start.positions, moved)
    assert what == "the teacher's NVT frame at step 400 (0.2 ps)" and start.energy is None
    assert start.numbers.tolist() == aspirin.numbers.tolist()
    failed = nvt._replace(failure={"step": 410, "line": "MD failed"})
    start, what = stability._nve_start(aspirin, failed, dt=0.5)
    assert start is aspirin and what.startswith("the structure")


def test_collected_rows_are_one_per_student_system_and_temperature(tmp_path):
    path = str(tmp_path / "stability-h200.json")
    stability.collect_stability(path, {"student": "w", "system": "waterbox", "temperature_K": 300.0, "rdf_l1": 0.5})
    stability.collect_stability(path, {"student": "a", "system": "aspirin", "temperature_K": 500.0, "rdf_l1": 0.1})
    stability.collect_stability(path, {"student": "a", "system": "aspirin", "temperature_K": 300.0, "rdf_l1": 0.2})
    collected = stability.collect_stability(path, {"student": "w", "system": "waterbox", "temperature_K": 300.0,
                                                   "rdf_l1": 0.02})
    assert json.loads(open(path).read()) == collected
    assert [(e["system"], e["temperature_K"], e["rdf_l1"]) for e in collected] == [
        ("aspirin", 500.0, 0.1), ("aspirin", 300.0, 0.2), ("waterbox", 300.0, 0.02)]


def test_a_kept_run_is_taken_back_only_with_its_own_settings(tmp_path, teacher, aspirin):
    trajectory = stability.Trajectory(np.arange(12.0).reshape(2, 6), np.ones((1, aspirin.n_atoms, 3)),
                                      np.array([0]), {"step": 3, "line": "MD failed"}, 1.5)
    dynamics = stability.Dynamics("nvt", temperature=300.0, dt=0.5, thermostat="langevin", friction=0.01)
    settings = dict(log_every=10, chunk=100, seed=0, criteria=Criteria(), stride=1)
    fingerprint = stability.run_fingerprint(teacher, aspirin, dynamics, 200, **settings)
    path = str(tmp_path / "kept" / "student-nvt.npz")
    stability.save_trajectory(path, trajectory, fingerprint)
    back = stability.load_trajectory(path, fingerprint)
    assert back.failure == trajectory.failure and back.wall_s == 1.5
    assert all(np.array_equal(a, b) for a, b in zip(back[:3], trajectory[:3]))
    moved = Structure(numbers=aspirin.numbers, positions=aspirin.positions + 1e-3, cell=aspirin.cell,
                      pbc=aspirin.pbc, name=aspirin.name)
    others = [stability.run_fingerprint(teacher, aspirin, dynamics, 400, **settings),
              stability.run_fingerprint(teacher, aspirin, dynamics, 200, **{**settings, "seed": 1}),
              stability.run_fingerprint(teacher, moved, dynamics, 200, **settings),
              stability.run_fingerprint(teacher, aspirin, dataclasses.replace(dynamics, temperature=310.0), 200,
                                        **settings)]
    assert len({fingerprint, *others}) == 5
    assert all(stability.load_trajectory(path, other) is None for other in others)
    assert stability.load_trajectory(str(tmp_path / "none.npz"), fingerprint) is None


def test_a_planted_bond_break_stops_the_model_at_its_step_and_names_the_bond(teacher, aspirin):
    """Real MD of aspirin at 500 K (the CLI test's program, no new compilation) with bonds planted to break at
    1.05x their start length: the first logged step past it is the failure, and nothing after it is computed.
    (A planted geometry, two H atoms at 0.7 Å, fails the same way at step 10, 'bond H18-H20 stretched to
    2.51 Å', but needs a program of its own: 20 s more.)"""
    criteria = Criteria(max_stretch=1.05)
    result = stability_report(teacher, teacher, aspirin, time_ps=0.1, temperature=500, dt=0.5, nve_ps=0,
                              criteria=criteria)
    failure = result.report["models"]["student"]["nvt"]["failure"]
    assert failure["criterion"] == "bond" and re.fullmatch(
        r"bond [CHO]\d+-[CHO]\d+ stretched to \d\.\d\d Å, 1\.\d\dx its start \d\.\d\d Å \(limit 1\.05x\)",
        failure["cause"]), failure
    trajectory = result.trajectories["student nvt"]
    bonds = find_bonds(aspirin)
    step = failure["step"]
    assert 0 < step < 200 and trajectory.rows[-1, 0] == failure["last_step"] == step - 10
    assert bond_failure(trajectory.frames, aspirin, bonds, 1.05) is None  # the kept frames are all sane
    assert result.report["summary"]["time_to_failure_ps"] == pytest.approx(step * 0.5e-3)
    assert result.report["summary"]["failure"] == failure["line"]
    assert result.report["criteria"]["max_stretch"] == 1.05


def test_a_huge_time_step_is_a_temperature_runaway_and_stops_the_model(teacher, aspirin):
    result = stability_report(teacher, teacher, aspirin, time_ps=0.2, temperature=300, dt=20, nve_ps=0)
    failure = result.report["models"]["student"]["nvt"]["failure"]
    assert failure["criterion"] == "safety" and failure["cause"].startswith("temperature "), failure
    assert failure["line"].startswith(f"student nvt on {aspirin.name}: MD failed at step {failure['step']} "
                                      f"({20 * failure['step']} fs)")
    rows = result.trajectories["student nvt"].rows
    assert rows[-1, 0] < failure["step"] and np.all(rows[:, 2] < 5000)
    assert "nve" not in result.report["models"]["student"]


def test_bad_input_fails_before_anything_is_written(run_dir, tmp_path, structures_dir, capsys):
    silane = tmp_path / "silane.extxyz"
    write_structures(silane, [Structure.from_ase(ase.build.molecule("SiH4"), name="silane")])
    aspirin = str(structures_dir / "aspirin.extxyz")
    cases = [
        (["--md", str(tmp_path / "missing.extxyz")], 1, "structure file not found"),
        (["--md", str(silane)], 1, "contains element Si"),
        (["--md", aspirin, "--index", "3"], 1, "holds 1 structures; index 3 does not exist"),
        (["--md", aspirin, "--time-ps", "0"], 2, "--time-ps must be a number > 0"),
        (["--md", aspirin, "--structures", aspirin], 2, "one of them"),
        (["--structures", aspirin, "--time-ps", "1"], 2, "--time-ps: only with --md"),
        (["--structures", aspirin, "--collect", "x.json"], 2, "--collect: only with --md"),
        (["--md", aspirin, "--collect", str(tmp_path / "no" / "x.json")], 2, "needs a .json file in an existing"),
        (["--md", aspirin, "--name", "x"], 2, "--name: the student's name in a --collect list"),
    ]
    for options, code, message in cases:
        assert main(["evaluate", str(run_dir), *options, "--quiet"]) == code, options
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and message in error, (options, error)
    assert not (run_dir / "stability").exists()
    with pytest.raises(ValueError, match="max_stretch"):
        Criteria(max_stretch=1.0)
