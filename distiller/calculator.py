"""Any distiller energy model as an ASE calculator: energy, forces and (periodic cells) stress.

    atoms.calc = Calculator("runs/quickstart")          # a trained student
    atoms.calc = Calculator("fennol-pmc:ani1x")         # or any teacher spec, or a loaded EnergyModel

It evaluates through one `Predictor`, which compiles once per padded shape (atom counts are bucketed), so ASE's
own MD, optimisers and tools run at the model's speed after the first call. Energies are float64 totals (the
reference part added exactly, distiller.reference), so finite differences through the calculator are meaningful.
Stress of a structure without a periodic cell raises ASE's PropertyNotImplementedError.
"""

from __future__ import annotations

import os

from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.structure import Structure, matrix_to_voigt


class Calculator(AseCalculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: EnergyModel | str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.model = as_model(model)
        self.predictor = Predictor(self.model)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "stress" in properties and not any(self.atoms.pbc):
            raise PropertyNotImplementedError("stress needs a periodic cell; these atoms have pbc = "
                                              f"{self.atoms.pbc.tolist()}")
        (out,) = self.predictor([Structure.from_ase(self.atoms, name="ase atoms")])
        self.results = {"energy": out.energy, "free_energy": out.energy, "forces": out.forces}
        if out.stress is not None:
            self.results["stress"] = matrix_to_voigt(out.stress)
