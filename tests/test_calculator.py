"""The student as an ASE calculator: the numbers of `predict`, stress by ASE's own finite strain."""

import jax
import numpy as np
from ase.calculators.fd import calculate_numerical_stress

from distiller.batch import make_batch
from distiller.structure import read_structures
from distiller.students import StudentConfig, build_model, init_student
from distiller.students.calculator import StudentCalculator
from distiller.students.predict import predict


def test_calculator_matches_predict_and_ase_numerical_stress(structures_dir):
    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    config = StudentConfig(cutoff=3.5, features=8, layers=1, n_rbf=6)
    probe, _ = make_batch([water], config.cutoff)
    # No reference energies: the float32 total stays small, so finite strain resolves the stress.
    params = init_student(config, jax.random.key(1), probe)
    model = build_model(config)
    atoms = water.to_ase()
    atoms.calc = StudentCalculator(config, model, params)
    (expected,) = predict(config, model, params, [water])
    assert np.isclose(atoms.get_potential_energy(), expected.energy)
    assert np.allclose(atoms.get_forces(), expected.forces)
    numerical = calculate_numerical_stress(atoms, eps=1e-3, force_consistent=False)
    assert np.allclose(atoms.get_stress(), numerical, rtol=2e-2, atol=2e-2 * np.abs(numerical).max())
