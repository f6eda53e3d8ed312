"""Any ASE calculator as a teacher, for offline labelling (`ase:module.Class` specs or an instance)."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Sequence

import numpy as np

from distiller.structure import Structure, StructureError, voigt_to_matrix


@dataclasses.dataclass
class AseTeacher:
    """Labels structures one by one with an ASE calculator (already in eV and Å by ASE's convention)."""

    calculator: Any
    spec: str = "ase"
    cutoff: float = 0.0
    elements: frozenset[int] = frozenset(range(1, 119))

    def check(self, structures: Sequence[Structure]) -> None:
        for s in structures:
            s.validated()
            unknown = sorted(set(s.numbers.tolist()) - self.elements)
            if unknown:
                raise StructureError(f"{s.name}: elements {unknown} unknown to teacher {self.spec}")

    def label(self, structures: Sequence[Structure]) -> list[Structure]:
        self.check(structures)
        out = []
        for s in structures:
            atoms = s.to_ase()
            atoms.calc = self.calculator
            try:
                energy = float(atoms.get_potential_energy())
                forces = np.asarray(atoms.get_forces(), np.float64)
                stress = voigt_to_matrix(np.asarray(atoms.get_stress(), np.float64)) if s.periodic else None
            except Exception as err:
                raise StructureError(f"{s.name}: teacher {self.spec} failed ({type(err).__name__}: {err})") from err
            out.append(s.replace(energy=energy, forces=forces, stress=stress))
        return out


def load_ase(spec: str, **kwargs) -> AseTeacher:
    """`ase:ase.calculators.emt.EMT` → AseTeacher(EMT()); keyword arguments go to the calculator."""
    path = spec.split(":", 1)[1]
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import ASE calculator {path!r} from spec {spec!r}") from err
    return AseTeacher(cls(**kwargs), spec=spec)
