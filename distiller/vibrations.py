"""Harmonic vibrations of a structure from its Hessian: normal modes and their frequencies.

The modes are eigenvectors of the mass-weighted Hessian M^-1/2 H M^-1/2; an eigenvalue λ in eV/(Å² amu) is the
angular frequency squared, reported as a wavenumber ħω / (hc) in cm⁻¹ (imaginary modes as negative numbers).
"""

from __future__ import annotations

import numpy as np
from ase import units

from distiller.structure import Structure, StructureError

# ħ·sqrt(eV / (Å² amu)) in eV: ASE's conversion (ase.vibrations), then eV -> cm⁻¹.
_EV_PER_SQRT_EIGENVALUE = units._hbar * 1e10 / np.sqrt(units._e * units._amu)


def _rigid_motions(structure: Structure) -> int:
    """How many modes are rigid motions: 3 for a periodic cell, 5 for a linear molecule, else 6."""
    if structure.periodic:
        return 3
    centred = structure.positions - structure.positions.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    return 5 if structure.n_atoms > 1 and singular[1] < 1e-2 else 6


def _mass_weighted(structure: Structure, hessian: np.ndarray):
    n = structure.n_atoms
    n_zero = _rigid_motions(structure)
    if hessian.shape != (3 * n, 3 * n):
        raise ValueError(f"{structure.name}: a Hessian of shape {hessian.shape} for {n} atoms (needs {(3 * n, 3 * n)})")
    if 3 * n <= n_zero:
        raise StructureError(f"{structure.name}: {n} atom(s) have no vibrational modes")
    from distiller.md.simulate import masses

    scale = 1.0 / np.sqrt(np.repeat(masses(structure), 3))
    eigenvalues, vectors = np.linalg.eigh(hessian * scale[:, None] * scale[None, :])
    keep = np.sort(np.argsort(np.abs(eigenvalues))[n_zero:])  # the rigid motions have the smallest |λ|
    return eigenvalues[keep], vectors[:, keep], scale


def vibrational_modes(structure: Structure, hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(directions (M, N, 3) unit Cartesian vectors, force constants (M,) eV/Å²) of the non-zero modes.

    Modes are eigenvectors e of the mass-weighted Hessian M^-1/2 H M^-1/2 (eigenvalue λ); the Cartesian
    direction is u = M^-1/2 e normalised, and its force constant u·H·u/|u|² = λ/|M^-1/2 e|². The modes with the
    smallest |λ| (6 for molecules, 5 for linear ones, 3 for periodic cells) are rigid motions and are dropped.
    """
    eigenvalues, vectors, scale = _mass_weighted(structure, hessian)
    u = vectors * scale[:, None]
    norm2 = np.sum(u**2, axis=0)
    directions = (u / np.sqrt(norm2)).T.reshape(-1, structure.n_atoms, 3)
    return directions, eigenvalues / norm2


def frequencies(structure: Structure, hessian: np.ndarray) -> np.ndarray:
    """(M,) harmonic wavenumbers in cm⁻¹ of the non-rigid modes, ascending; an unstable mode (λ < 0) is given as
    −|ν|. `hessian`: (3N, 3N) eV/Å² (distiller.md.minimize.hessian)."""
    eigenvalues, _, _ = _mass_weighted(structure, hessian)
    return np.sign(eigenvalues) * _EV_PER_SQRT_EIGENVALUE * np.sqrt(np.abs(eigenvalues)) / units.invcm
