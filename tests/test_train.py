"""Training: the jitted online-distillation step learns, resumes exactly, and feeds evaluation and the ASE
calculator; a student architecture registered from outside the package trains like the built-in ones."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from distiller.calculator import Calculator
from distiller.capacity import Capacity
from distiller.cli import main as cli
from distiller.config import (Experiment, LossConfig, OptimizerConfig, SamplingConfig, ValidationConfig, apply_override,
                              from_dict, parse_duration, to_dict)
from distiller.run_directory import RunDirectory, load_student
from distiller.structure import read_structures
from distiller.students import SchNetConfig
from distiller.train import loop
from distiller.train.loop import run, write_held_out
from distiller.train.step import Distillation


def latest_step(run_dir):
    return RunDirectory(run_dir).latest_step()


def small_config(structures_dir, run_dir, steps=8, seed=0):
    # Seed 0's first step draws two water boxes, the batch that needs the largest capacities: the overflow
    # test's grown capacities are then the other tests' (their step compiled already: one compilation of the
    # step there instead of three with seed 3).
    return Experiment(
        name="test",
        teacher="fennol-pmc:ani1x/0",
        structures=(str(structures_dir / "aspirin.extxyz"), str(structures_dir / "watertiny.extxyz")),
        sampling=SamplingConfig(rattle=0.05, strain=0.02),
        student=SchNetConfig(cutoff=4.0, features=16, layers=1, n_rbf=8),
        loss=LossConfig(energy_weight=1.0, forces_weight=10.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, final_learning_rate=1e-3),
        steps=steps, batch_size=2, seed=seed, run_dir=str(run_dir), checkpoint_every=4, log_every=1, held_out=3,
    )


def metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, structures_dir):
    # One seed molecule keeps the per-step loss comparable across steps; 80 steps is where learning shows.
    run_dir = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(
        small_config(structures_dir, run_dir, steps=80, seed=3),
        structures=(str(structures_dir / "aspirin.extxyz"),),
        student=SchNetConfig(cutoff=4.0, features=16, layers=2, n_rbf=8),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=10, final_learning_rate=1e-3),
    )
    job = Distillation.create(config)  # kept for the tests that go on with the run (compiled already)
    return config, job, run(config, progress=False, job=job)


def test_training_lowers_the_loss(trained):
    config, _, state = trained
    rows = metrics(pathlib.Path(config.run_dir))
    assert [r["step"] for r in rows] == list(range(1, 81))
    first, last = rows[:10], rows[-10:]
    assert np.mean([r["loss"] for r in last]) < 0.7 * np.mean([r["loss"] for r in first])
    assert np.mean([r["accuracy_retained"] for r in last]) > np.mean([r["accuracy_retained"] for r in first]) + 0.15
    assert int(state.step) == 80 and latest_step(config.run_dir) == 80


def test_resume_after_a_stop_continues_identically(tmp_path, structures_dir, monkeypatch):
    """Stopped with a step in flight (as on GPUs) and resumed, the run is the one stepped one at a time."""
    whole = small_config(structures_dir, tmp_path / "whole")
    stopped = small_config(structures_dir, tmp_path / "stopped")
    job = Distillation.create(whole)  # for both fresh runs (the resume makes its own, as a new process would)
    monkeypatch.setattr(loop, "steps_in_flight", lambda: 0)
    final = run(whole, progress=False, job=job)
    monkeypatch.setattr(loop, "steps_in_flight", lambda: 1)
    run(stopped, progress=False, stop_after=5, job=job)  # stops after step 5: the last checkpoint is step 4
    assert latest_step(stopped.run_dir) == 4
    resumed = run(stopped, resume=True, progress=False)
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 9)), "each step logged exactly once"
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    for x, y in zip(jax.tree.leaves((final.params, final.ema)), jax.tree.leaves((resumed.params, resumed.ema))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_validation_averages_and_time_limit_resume_exactly(tmp_path, structures_dir):
    """A run stopped by its time limit (after its first step) and resumed is the uninterrupted run: the same
    metrics (validation of the averaged weights included), trained and averaged weights, and best student."""
    validation = ValidationConfig(structures=(str(structures_dir / "aspirin.extxyz"),), every=4)
    base = dataclasses.replace(small_config(structures_dir, tmp_path / "whole"), validation=validation)
    job = Distillation.create(base)  # for both fresh runs (the resume makes its own, as a new process would)
    final = run(base, progress=False, job=job)
    stopped = dataclasses.replace(base, run_dir=str(tmp_path / "stopped"))
    run(dataclasses.replace(stopped, time_limit=1e-9), progress=False, job=job)
    assert latest_step(stopped.run_dir) == 1  # the time limit checkpoints the step it stops at
    resumed = run(stopped, resume=True, progress=False)
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    assert [r["step"] for r in a if "val_forces_rmse" in r] == [4, 8]
    for x, y in zip(jax.tree.leaves((final.params, final.ema)), jax.tree.leaves((resumed.params, resumed.ema))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(final.params), jax.tree.leaves(final.ema)))
    best = RunDirectory(base.run_dir).read_best()
    assert best == RunDirectory(stopped.run_dir).read_best()
    assert best["forces_rmse"] == min(r["val_forces_rmse"] for r in a if "val_forces_rmse" in r)
    step, best_params = RunDirectory(stopped.run_dir).restore_best(final.ema)
    assert step == best["step"]
    for x, y in zip(jax.tree.leaves(load_student(stopped.run_dir).params), jax.tree.leaves(best_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the best student is what is loaded


def test_hessian_vector_product_loss_trains_online(tmp_path, structures_dir):
    """(Offline, on products stored by `distiller label --hvp K`: tests/test_label_hvp.py.)"""
    config = dataclasses.replace(small_config(structures_dir, tmp_path / "hvp", steps=2),
                                 structures=(str(structures_dir / "aspirin.extxyz"),),
                                 loss=LossConfig(energy_weight=1.0, forces_weight=10.0, hvp_weight=1.0))
    run(config, progress=False)
    rows = metrics(tmp_path / "hvp")
    assert all(np.isfinite(r["hvp_rmse"]) and r["hvp_rmse"] > 0.1 for r in rows)  # eV/Å²: a random student's


def test_overflowing_steps_are_redone_as_when_stepping_one_at_a_time(tmp_path, structures_dir, monkeypatch):
    """A step whose neighbour list overflows is redone at grown capacities, and with a step in flight (as on
    GPUs) the one dispatched after it again: the result, with no step in flight and with one, is bit for bit
    that of `apply_step` one at a time. (One Distillation for the three: its compilations are shared.)"""
    config = small_config(structures_dir, tmp_path / "run")
    initial_state = Distillation.initial_state

    def with_tiny_capacity(job):  # every step's list overflows until the capacities grow
        state = initial_state(job)
        capacity = job.data.capacity_state()
        job.data.restore_capacity(Capacity(capacity.neighbours._replace(edges=16), capacity.model))
        return state

    monkeypatch.setattr(Distillation, "initial_state", with_tiny_capacity)
    job = Distillation.create(config)
    finals = []
    for in_flight in (0, 1):
        monkeypatch.setattr(loop, "steps_in_flight", lambda: in_flight)
        run_dir = tmp_path / f"in-flight-{in_flight}"
        finals.append(run(dataclasses.replace(config, run_dir=str(run_dir)), progress=False, job=job))
        assert job.data.capacity_state().neighbours.edges > 16
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))

    state = job.initial_state()  # tiny capacities again
    inputs = job.data.batches(0)
    for step in range(8):
        state, _, _ = job.apply_step(state, next(inputs), job.step_key(step))
    for final in finals:
        for x, y in zip(jax.tree_util.tree_leaves(final.params), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_fresh_run_never_overwrites_checkpoints_unasked(trained, tmp_path, structures_dir):
    config, _, _ = trained
    with pytest.raises(FileExistsError, match="up to step 80.*--resume.*--overwrite"):
        run(config, progress=False)
    assert latest_step(config.run_dir) == 80  # nothing touched
    again = small_config(structures_dir, tmp_path / "again")  # the resume tests' config: compiled already
    job = Distillation.create(again)
    run(again, progress=False, stop_after=2, job=job)
    run(again, progress=False, overwrite=True, job=job)  # the demo's way: start again, old checkpoints deleted
    assert [r["step"] for r in metrics(tmp_path / "again")] == list(range(1, 9))
    assert latest_step(again.run_dir) == 8


def test_evaluate_writes_report_and_plot(trained, tmp_path):
    config, job, state = trained
    held_out = tmp_path / "held_out.extxyz"
    structures = write_held_out(job, str(held_out))
    assert len(structures) == 3
    cli(["evaluate", config.run_dir, "--structures", str(held_out), "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    summary = report["summary"]
    for key in ("energy_mae_per_atom", "forces_mae", "forces_rmse", "forces_cosine", "accuracy_retained"):
        assert np.isfinite(summary[key])
    assert summary["structures"] == 3 and len(report["structures"]) == 3
    assert -1.0 < summary["accuracy_retained"] < 1.0
    assert (tmp_path / "eval" / "parity.png").stat().st_size > 10_000
    student = load_student(config.run_dir)
    assert student.source == config.student and student.reference == RunDirectory(config.run_dir).read_reference()
    for x, y in zip(jax.tree_util.tree_leaves(student.params), jax.tree_util.tree_leaves(state.ema)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_calculator_finite_differences_match_the_trained_students_forces(trained, structures_dir):
    """Central differences (5e-3 Å) of the calculator's energy against its forces, on a trained student: the
    energies are float64 totals whose model part is float32-exact, so differences of 1e-2 eV mean something."""
    config, _, _ = trained
    atoms = read_structures(structures_dir / "aspirin.extxyz")[0].to_ase()
    atoms.calc = Calculator(config.run_dir)
    forces = atoms.get_forces()
    h, worst = 5e-3, 0.0
    for atom in range(0, len(atoms), 4):
        for k in range(3):
            energies = []
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.calc = atoms.calc
                moved.positions[atom, k] += sign * h
                energies.append(moved.get_potential_energy())
            worst = max(worst, abs(-(energies[0] - energies[1]) / (2 * h) - forces[atom, k]))
    assert np.abs(forces).max() > 0.5 and worst < 5e-3, worst


def test_config_overrides_and_round_trip(structures_dir, tmp_path):
    config = small_config(structures_dir, tmp_path)
    changed = apply_override(apply_override(config, "student.features=8"), "optimizer.learning_rate=1")
    assert changed.student.features == 8 and changed.optimizer.learning_rate == 1.0
    assert from_dict(json.loads(json.dumps(to_dict(changed)))) == changed
    with pytest.raises(KeyError, match="no field 'featurs'"):
        apply_override(config, "student.featurs=8")
    with_validation = dataclasses.replace(config, validation=ValidationConfig(structures=("a.xyz",), every=5))
    assert from_dict(json.loads(json.dumps(to_dict(with_validation)))) == with_validation
    assert apply_override(config, "student.architecture=painn").student.architecture == "painn"


def test_bad_training_settings_are_clear_errors():
    assert parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="a duration is a positive number"):
        parse_duration("ten minutes")
    with pytest.raises(ValueError, match="validation.every=10 needs validation.structures"):
        ValidationConfig(every=10)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        OptimizerConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="loss.hvp_weight must be >= 0"):
        LossConfig(hvp_weight=-1.0)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        Experiment(name="x", steps=0)


def test_a_validation_structure_the_student_cannot_take_is_refused_before_anything_is_written(tmp_path,
                                                                                              structures_dir):
    copper = tmp_path / "copper.extxyz"
    copper.write_text("1\nLattice=\"3.6 0 0 0 3.6 0 0 0 3.6\" Properties=species:S:1:pos:R:3 pbc=\"T T T\"\n"
                      "Cu 0 0 0\n")
    config = dataclasses.replace(small_config(structures_dir, tmp_path / "run"),
                                 validation=ValidationConfig(structures=(str(copper),), every=4))
    with pytest.raises(ValueError, match="copper.extxyz"):
        run(config, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
