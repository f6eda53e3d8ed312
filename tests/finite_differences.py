"""Central finite differences of an energy, for the tests of forces and stress (torch teachers, the contract suite).

One `label` call takes the structure and every displaced and strained copy of it, so a teacher's batching is
exercised too and a module pays for one model call, not one per copy.
"""

from typing import Callable, Sequence

import numpy as np

from distiller.structure import Structure


def strained(s: Structure, strain: np.ndarray) -> Structure:
    """The structure with its cell and positions deformed by 1 + strain (positions as row vectors)."""
    deformation = np.eye(3) + strain
    return s.replace(positions=s.positions @ deformation, cell=s.cell @ deformation)


def displaced(structure: Structure, components: Sequence[tuple[int, int]], strains: Sequence[tuple[int, int]],
              h: float) -> list[Structure]:
    """The copies whose energies' central differences are the derivatives: +h and -h along each (atom, axis) of
    `components` (Å), then +h and -h of each symmetric strain ε_ij of `strains` (ε_ij = ε_ji = h/2 off the
    diagonal, so that dE/dh = V σ_ij)."""
    out = []
    for atom, axis in components:
        for sign in (1, -1):
            positions = structure.positions.copy()
            positions[atom, axis] += sign * h
            out.append(structure.replace(positions=positions))
    for i, j in strains:
        for sign in (1, -1):
            e = np.zeros((3, 3))
            e[i, j] = e[j, i] = sign * h / 2 if i != j else sign * h
            out.append(strained(structure, e))
    return out


def central_slopes(energies: Sequence[float], h: float) -> np.ndarray:
    """(E(+h) - E(-h)) / 2h of each pair of `displaced`'s copies, in their order."""
    return np.asarray(energies, np.float64).reshape(-1, 2) @ np.array([1.0, -1.0]) / (2 * h)


def energy_differences(label: Callable[[Sequence[Structure]], list[Structure]], structure: Structure,
                       components: Sequence[tuple[int, int]], strains: Sequence[tuple[int, int]],
                       h: float) -> tuple[Structure, np.ndarray, np.ndarray]:
    """(the structure labelled, -dE/dx for each (atom, axis) of `components` (eV/Å), (1/V) dE/dε_ij for each
    (i, j) of `strains` (eV/Å³, ε symmetric)), the derivatives as central differences of `label`'s energy with
    step h (Å, strain): what the labelled forces and stress (ASE's sign) must equal."""
    exact, *others = label([structure, *displaced(structure, components, strains, h)])
    slopes = central_slopes([s.energy for s in others], h)
    volume = abs(np.linalg.det(structure.cell))
    return exact, -slopes[:len(components)], slopes[len(components):] / volume
