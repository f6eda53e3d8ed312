"""The bench scripts' inputs, checked before anything compiles: bench/md.py's systems (tilings) and launch settings,
and the device kind that names every results file."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from distiller.speed import kind_of
from distiller.structure import read_structures

ROOT = pathlib.Path(__file__).resolve().parents[1]


def bench_md():
    spec = importlib.util.spec_from_file_location("bench_md", ROOT / "bench" / "md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, kind", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", "cpu")])
def test_results_files_are_named_by_the_gpu_model_not_its_memory(name, kind):
    assert kind_of(name) == kind


def test_a_tiled_system_is_the_cell_repeated(structures_dir):
    md = bench_md()
    label, path, reps = md.system_spec("watertiny:2x1x3", str(structures_dir))
    assert label == "watertiny 2x1x3" and reps == (2, 1, 3) and path.endswith("watertiny.extxyz")
    cell = read_structures(path)[0]
    tiled = md.read_system(path, reps)
    assert tiled.n_atoms == 6 * cell.n_atoms
    np.testing.assert_allclose(tiled.cell, cell.cell * np.array([2, 1, 3])[:, None])
    np.testing.assert_array_equal(tiled.numbers[:cell.n_atoms], cell.numbers)
    assert md.system_spec("aspirin", str(structures_dir))[2] is None


@pytest.mark.parametrize("text", ["watertiny:2x1", "watertiny:0x1x1", "watertiny:2xAx1"])
def test_a_malformed_tiling_is_refused_by_name(text, structures_dir):
    with pytest.raises(SystemExit, match="a tiling is NAME:AxBxC"):
        bench_md().system_spec(text, str(structures_dir))


def test_a_molecule_is_not_tiled(structures_dir):
    md = bench_md()
    _, path, reps = md.system_spec("aspirin:2x2x2", str(structures_dir))
    with pytest.raises(SystemExit, match="not periodic"):
        md.read_system(path, reps)


def test_launch_settings_register_a_kernel_set_students_can_name():
    from pallas_kernels import KERNELS
    from pallas_kernels.edges.edge_op import KernelConfig

    md = bench_md()
    try:
        name, config = md.launch_spec("bench-e32=32,16,8,2/32,16,4,2,atom/16,16,4,1")
        assert name == "bench-e32" and "bench-e32" in KERNELS
        assert config["forward"] == {**vars(KernelConfig(32, 16, 8, 2))}
        assert config["first"]["layout"] == "atom" and config["second"]["num_stages"] == 1
        assert config["precision"] == "tf32x3"
        assert md.launch_spec("bench-e32=32,16,8,2/32,16,4,2/16,16,4,1/ieee")[1]["precision"] == "ieee"
    finally:
        KERNELS.pop("bench-e32", None)
    for bad in ("pallas=32,16,4,2/32,16,4,2/16,16,4,1", "e=32,16,4/32,16,4,2/16,16,4,1", "e=32,16,4,2/32,16,4,2",
                "e=33,16,4,2/32,16,4,2/16,16,4,1", "e=32,16,4,2/32,16,4,2/16,16,4,1/fp8"):
        with pytest.raises(SystemExit, match="--launch"):
            md.launch_spec(bad)


def test_a_row_that_blows_up_is_recorded_and_the_run_exits_non_zero(tmp_path, structures_dir, monkeypatch):
    """A student that blows up in MD is a row with its error (the run goes on to the next rows), and the run
    then exits non-zero naming it: a script running the bench must not read it as a success."""
    import json
    import sys

    md = bench_md()
    out = tmp_path / "md.json"
    monkeypatch.setattr(sys, "argv", [
        "md.py", "--teacher", "--students", "painn-8x1", "--readout-scale", "1000", "--dt", "20", "--steps", "20",
        "--chunk", "10", "--systems", "aspirin", "--replicas", "2", "--structures-dir", str(structures_dir),
        "--out", str(out)])
    with pytest.raises(SystemExit, match=r"1 of 1 rows failed .*aspirin x2 fresh painn student"):
        md.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["system"] == "aspirin x2" and "MD failed at step" in row["error"]


def test_ensemble_spread_puts_a_planted_error_in_the_quintile_where_the_members_disagree():
    """bench/ensemble_spread.py's table: a student wrong only on the atoms of largest spread loses accuracy in the
    top quintile alone, and the retained share of all atoms is the fidelity issue's 1 - ‖ΔF‖/‖F‖."""
    spec = importlib.util.spec_from_file_location("ensemble_spread", ROOT / "bench" / "ensemble_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(500, 3))
    spread = rng.uniform(0.1, 1.0, size=500)
    student = mean.copy()
    worst = spread > np.quantile(spread, 0.8)
    student[worst] += 0.3 * rng.normal(size=(int(worst.sum()), 3))
    rows = module.by_quantile(spread, student, mean)
    assert [r["atoms"] for r in rows] == [100] * 5
    assert all(r["accuracy_retained"] == 1.0 and r["error_mean"] == 0.0 for r in rows[:4])
    assert rows[4]["accuracy_retained"] < 0.9 and rows[4]["spread_mean"] > rows[3]["spread_mean"]
    overall = module.retained(student, mean)
    assert overall == 1.0 - np.linalg.norm(student - mean) / np.linalg.norm(mean) and 0.8 < overall < 0.95


def test_the_bench_student_options_give_a_run_its_own_kernels_unless_told(monkeypatch):
    """--kernel: a fresh student's (xla unless given); for --run, the run's own kernels unless --kernel names one
    (bench/md.py timed the trained aspirin student with XLA, the kernel it was trained with, before)."""
    import argparse

    import distiller.run_directory as run_directory
    from distiller.speed import add_student_arguments, student_from_arguments

    parser = argparse.ArgumentParser()
    add_student_arguments(parser)
    loaded = []
    monkeypatch.setattr(run_directory, "load_student", lambda run, kernel=None: loaded.append((run, kernel)) or "model")
    assert student_from_arguments(parser.parse_args(["--run", "runs/x"])) == "runs/x" and loaded == []
    assert student_from_arguments(parser.parse_args(["--run", "runs/x", "--kernel", "pallas"])) == "model"
    assert loaded == [("runs/x", "pallas")]
    assert student_from_arguments(parser.parse_args(["--architecture", "painn"])).kernel == "xla"
    assert student_from_arguments(parser.parse_args(["--kernel", "pallas"])).kernel == "pallas"


def test_contact_scan_moves_the_second_molecule_rigidly_to_each_distance_through_the_cell():
    """bench/contact_scan.py's path: two waters whose H atoms meet across a cell face; B's whole molecule (and
    nothing else) moves along the minimum-image line, keeping its shape, to each asked distance."""
    import ase.build

    from distiller.structure import Structure

    spec = importlib.util.spec_from_file_location("contact_scan", ROOT / "bench" / "contact_scan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    water = ase.build.molecule("H2O")  # O, H, H
    first = water.positions + [4.0, 4.0, 0.6]  # its H atoms near z = 0 ...
    second = water.positions * [1, 1, -1] + [4.0, 4.0, 6.6]  # ... this one's near z = 8: 1.04 Å across the face
    structure = Structure(numbers=np.array([8, 1, 1] * 2), positions=np.concatenate([first, second]),
                          cell=8.0 * np.eye(3), pbc=np.ones(3, bool), name="two waters")
    a, b = 1, 4  # an H of each
    start = np.linalg.norm(module.pair_vector(structure, a, b))
    assert start == pytest.approx(1.04, abs=0.01)  # through the face, not the 7 Å inside the cell
    assert module.molecule_of(structure, b) == [3, 4, 5]
    path = module.approach(structure, a, b, np.array([0.6, 1.0, 2.0]))
    for d, moved in zip([0.6, 1.0, 2.0], path):
        assert np.linalg.norm(module.pair_vector(moved, a, b)) == pytest.approx(d)
        np.testing.assert_array_equal(moved.positions[:3], structure.positions[:3])  # A's molecule stays
        shift = moved.positions[3:] - structure.positions[3:]
        np.testing.assert_allclose(shift, shift[:1].repeat(3, axis=0), atol=1e-12)  # rigid
        assert moved.energy is None and moved.forces is None


def test_force_parts_split_a_molecule_s_pull_from_its_internal_forces():
    """bench/force_parts.py: a force that moves two bonded atoms together is all 'moving' (in proportion to their
    masses); equal and opposite forces within the molecule are all 'rest'; molecules are the bonded groups."""
    import ase.build

    from distiller.structure import Structure

    spec = importlib.util.spec_from_file_location("force_parts", ROOT / "bench" / "force_parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    water = ase.build.molecule("H2O")
    positions = np.concatenate([water.positions, water.positions + [5.0, 0.0, 0.0]])
    structure = Structure(numbers=np.array([8, 1, 1] * 2), positions=positions, cell=np.zeros((3, 3)),
                          pbc=np.zeros(3, bool), name="two waters")
    molecule = module.diagnosis.molecules(structure)
    assert molecule.tolist() == [0, 0, 0, 1, 1, 1]
    mass = np.array([16.0, 1.0, 1.0] * 2)
    pull = np.zeros((6, 3))
    pull[:3] = np.array([16.0, 1.0, 1.0])[:, None] * [0.1, 0.0, 0.0]  # accelerates molecule 0 as a whole
    moving, rest = module.split(pull, molecule, mass)
    np.testing.assert_allclose(moving, pull, atol=1e-12)
    np.testing.assert_allclose(rest, 0.0, atol=1e-12)
    stretch = np.zeros((6, 3))
    stretch[3], stretch[4] = [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]  # within molecule 1: sums to zero
    moving, rest = module.split(stretch, molecule, mass)
    np.testing.assert_allclose(moving, 0.0, atol=1e-12)
    np.testing.assert_allclose(rest, stretch, atol=1e-12)
    parts = module.parts_report(pull + stretch, stretch, molecule, mass)  # a student wrong by `pull` alone
    assert parts["rest"]["accuracy_retained"] == pytest.approx(1.0)
    assert parts["moving"]["share_of_squared_error"] == pytest.approx(1.0)


def test_water_variants_are_valid_students_and_bad_sizes_are_refused_before_any_work(capsys, monkeypatch):
    """bench/water_variants.py: every variant is a PaiNN config (the angular ones with the embedding), and a bad
    --steps stops in the argument parser (no teacher loaded, nothing sampled)."""
    from distiller.students import PaiNNConfig

    spec = importlib.util.spec_from_file_location("water_variants", ROOT / "bench" / "water_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, fields in module.VARIANTS.items():
        config = PaiNNConfig(**fields)
        assert (config.angular_degree > 0) == ("angular" in name) and f"{config.features}x{config.layers}" in name
    monkeypatch.setattr(sys, "argv", ["water_variants.py", "--variants", "painn-64x3", "--steps", "0", "--out", "x"])
    with pytest.raises(SystemExit):
        module.main()
    assert "--steps and --batch must be positive" in capsys.readouterr().err
