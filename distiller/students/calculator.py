"""A trained student as an ASE calculator (energy, forces, stress), for ASE's MD, optimisers and tools."""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from distiller.structure import Structure, matrix_to_voigt
from distiller.students.predict import predict


class StudentCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, config, model, params, **kwargs):
        super().__init__(**kwargs)
        self.config, self.model, self.params = config, model, params

    @classmethod
    def from_run(cls, run_dir: str, **kwargs) -> "StudentCalculator":
        from distiller.train.trainer import load_student

        return cls(*load_student(run_dir), **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        (out,) = predict(self.config, self.model, self.params, [Structure.from_ase(self.atoms, name="ase atoms")])
        self.results = {"energy": out.energy, "free_energy": out.energy, "forces": out.forces}
        if out.stress is not None:
            self.results["stress"] = matrix_to_voigt(out.stress)
        elif "stress" in properties:
            self.results["stress"] = np.zeros(6)
