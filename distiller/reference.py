"""Per-element reference energies: the large, composition-only part of every energy, kept in float64.

A model's total energy is  E = Σ_atoms ref[Z_atom] + E_model,  where `ref` is a `ReferenceEnergies` table
(eV per atom of each element, float64, on the host) and `E_model` is what the model computes in float32 inside
jit. The reference part holds hundreds of eV per atom (ANI-1x's self-energies: −2046 eV for O); summed in
float32 it alone would cost aspirin 2 meV of resolution and a 19,200-atom water box tens of meV per atom.
Kept out of the jitted sums, it is added exactly on the host, so public energies are as precise as float32
makes the (small) model part.

Inside jit, labels and predictions meet relative to one reference: `rebase` gives the per-atom float32
difference of two tables (a few eV at most), so a teacher's energy can be compared with a student's.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

MAX_Z = 118


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceEnergies:
    """eV per atom for each atomic number 0..MAX_Z (0 where the table says nothing), float64."""

    table: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(MAX_Z + 1))

    def __post_init__(self):
        table = np.array(self.table, np.float64).reshape(-1)
        if table.shape != (MAX_Z + 1,) or not np.all(np.isfinite(table)):
            raise ValueError(f"reference energies must be {MAX_Z + 1} finite numbers (Z = 0..{MAX_Z}), got shape "
                             f"{table.shape}")
        table.flags.writeable = False
        object.__setattr__(self, "table", table)

    @classmethod
    def of(cls, energies: Mapping[int, float]) -> "ReferenceEnergies":
        """From {Z: eV}; elements not named get 0."""
        table = np.zeros(MAX_Z + 1)
        for z, e in energies.items():
            if not 1 <= int(z) <= MAX_Z:
                raise ValueError(f"reference energy for atomic number {z}: outside 1..{MAX_Z}")
            table[int(z)] = float(e)
        return cls(table)

    def __eq__(self, other) -> bool:
        return isinstance(other, ReferenceEnergies) and np.array_equal(self.table, other.table)

    def __hash__(self) -> int:
        return hash(self.table.tobytes())

    def energy(self, numbers) -> float:
        """Σ_atoms ref[Z] in float64, eV."""
        return float(np.sum(self.table[np.asarray(numbers, np.int64)]))

    def energies(self, numbers_per_structure: Sequence) -> np.ndarray:
        return np.array([self.energy(n) for n in numbers_per_structure], np.float64)

    def minus(self, other: "ReferenceEnergies") -> np.ndarray:
        """(MAX_Z + 1,) float64 table of self − other: what converts energies relative to `self` into energies
        relative to `other` (add it per atom)."""
        return self.table - other.table

    def to_dict(self) -> dict[str, float]:
        """{"Z": eV} for the non-zero entries (JSON keys are strings)."""
        return {str(z): float(e) for z, e in enumerate(self.table) if e != 0.0}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> "ReferenceEnergies":
        return cls.of({int(z): e for z, e in data.items()})

    def __repr__(self) -> str:
        return f"ReferenceEnergies({self.to_dict()})"


ZERO = ReferenceEnergies()


def fit(numbers_per_structure: Sequence[np.ndarray], energies, elements: Sequence[int],
        prior: ReferenceEnergies = ZERO) -> ReferenceEnergies:
    """Per-element energies (eV) that best explain `energies` as sums over atoms: least squares on counts.

    The fit is of the energies' departure from `prior` (e.g. the teacher's own reference energies): an element
    of `elements` absent from the data keeps its prior value, and where the data cannot tell elements apart
    (only water and aspirin: H and O always 2:1) the solution closest to the prior is taken, not an arbitrary
    split (H at -831 eV). Raises ValueError for mismatched lengths, non-finite energies or elements outside
    `elements`.
    """
    elements = [int(z) for z in elements]
    energies = np.asarray(energies, np.float64).reshape(-1)
    if len(numbers_per_structure) != energies.shape[0]:
        raise ValueError(f"{len(numbers_per_structure)} structures but {energies.shape[0]} energies")
    if energies.shape[0] == 0:
        raise ValueError("fitting reference energies needs at least one structure")
    if not np.all(np.isfinite(energies)):
        raise ValueError(f"non-finite energies at structures {np.flatnonzero(~np.isfinite(energies))[:10].tolist()}")
    counts = np.zeros((energies.shape[0], len(elements)), np.float64)
    column = {z: k for k, z in enumerate(elements)}
    for s, numbers in enumerate(numbers_per_structure):
        zs, n = np.unique(np.asarray(numbers, np.int64), return_counts=True)
        unknown = sorted(set(zs.tolist()) - set(column))
        if unknown:
            raise ValueError(f"structure {s} has elements {unknown} outside {elements}")
        counts[s, [column[z] for z in zs.tolist()]] = n
    base = prior.table[np.asarray(elements)]
    present = counts.sum(axis=0) > 0
    solution, *_ = np.linalg.lstsq(counts[:, present], energies - counts @ base, rcond=None)
    fitted = base.copy()
    fitted[present] += solution
    return ReferenceEnergies.of(dict(zip(elements, fitted.tolist())))
