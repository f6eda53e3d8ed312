"""Any ASE calculator as a teacher (`ase:module.Class` specs, or `ase_model(calculator)`), host-only."""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np

from distiller.model import EnergyModel
from distiller.reference import MAX_Z
from distiller.structure import Structure, StructureError, voigt_to_matrix
from distiller.teachers.host import host_model


def ase_labeller(calculator: Any, name: str):
    """structures -> the structures labelled one by one by `calculator` (ASE's units are eV and Å)."""
    def label(structures: Sequence[Structure]) -> list[Structure]:
        out = []
        for s in structures:
            atoms = s.to_ase()
            atoms.calc = calculator
            try:
                energy = float(atoms.get_potential_energy())
                forces = np.asarray(atoms.get_forces(), np.float64)
                stress = voigt_to_matrix(np.asarray(atoms.get_stress(), np.float64)) if s.periodic else None
            except Exception as err:
                raise StructureError(f"{s.name}: teacher {name} failed ({type(err).__name__}: {err})") from err
            out.append(s.replace(energy=energy, forces=forces, stress=stress))
        return out

    return label


def ase_model(calculator: Any, name: str = "ase", elements: frozenset[int] = frozenset(range(1, MAX_Z + 1)),
              cutoff: float = 0.0) -> EnergyModel:
    """An ASE calculator as an EnergyModel. `elements`: what it can take (all by default); `cutoff`: its range,
    where known (informative: it builds its own neighbours)."""
    return host_model(name, ase_labeller(calculator, name), cutoff=cutoff, elements=elements, source=calculator)


def load_ase(spec: str, **kwargs) -> EnergyModel:
    """`ase:ase.calculators.emt.EMT` → ase_model(EMT()); keyword arguments go to the calculator."""
    path = spec.split(":", 1)[1]
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import ASE calculator {path!r} from spec {spec!r}") from err
    return ase_model(cls(**kwargs), name=spec)
