"""Evaluation metrics: stress is compared where the teacher gave it, and only there."""

import numpy as np
from ase import units

from distiller.evaluate import compare
from distiller.structure import Structure


def labelled(stress, shift: float, periodic: bool) -> Structure:
    rng = np.random.default_rng(0)
    cell = 6.0 * np.eye(3) if periodic else np.zeros((3, 3))
    return Structure(numbers=np.array([8, 1, 1]), positions=rng.uniform(0, 5, (3, 3)), cell=cell,
                     pbc=np.array([periodic] * 3), energy=-10.0 + shift, forces=np.ones((3, 3)) + shift,
                     stress=stress)


def test_compare_reports_stress_of_stressed_structures_only():
    teacher_stress = np.diag([0.01, 0.02, 0.03])
    error = np.full((3, 3), 0.001)
    teacher = [labelled(teacher_stress, 0.0, True), labelled(None, 0.0, False)]
    student = [labelled(teacher_stress + error, 0.1, True), labelled(None, 0.1, False)]
    summary = compare(student, teacher)["summary"]
    assert summary["stressed_structures"] == 1
    assert np.isclose(summary["stress_rmse"], 0.001)
    assert np.isclose(summary["stress_rmse_gpa"], 0.001 / units.GPa)
    expected = 1.0 - np.sqrt(9 * 0.001**2 / np.sum(teacher_stress**2))
    assert np.isclose(summary["stress_accuracy_retained"], expected)
    assert np.isclose(summary["accuracy_retained"], 0.9)  # forces 1.0 against 1.1

    molecules = compare(student[1:], teacher[1:])["summary"]
    assert not any(k.startswith("stress") for k in molecules)
