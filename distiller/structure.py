"""One atomic structure on the host: numbers, positions (Å), cell, pbc and optional labels (eV, Å).

Everything that enters distiller passes through `Structure.validated`, so bad input fails here, once,
with the structure's name in the message, before it can reach a jitted function.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import ase
import ase.io
import numpy as np

from distiller.files import replaced
MIN_DISTANCE = 0.1  # Å; closer atoms are a broken structure, not chemistry.


class StructureError(ValueError):
    """A structure that distiller refuses, named in the message."""


@dataclasses.dataclass(frozen=True)
class Structure:
    """An atomic structure. `cell` rows are lattice vectors; labels are eV, eV/Å and eV/Å³."""

    numbers: np.ndarray  # (n,) int
    positions: np.ndarray  # (n, 3) Å
    cell: np.ndarray  # (3, 3) Å, rows are lattice vectors
    pbc: np.ndarray  # (3,) bool
    name: str = ""
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None  # (3, 3), the strain derivative of the energy over the volume
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Hessian-vector-product labels (`distiller label --hvp K`): K unit displacement directions (each has norm 1
    # over the 3n components) and the teacher's H·v along each, eV/Å² (distiller.derivatives' convention).
    directions: np.ndarray | None = None  # (K, n, 3)
    hvp: np.ndarray | None = None  # (K, n, 3)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def periodic(self) -> bool:
        return bool(np.any(self.pbc))

    def replace(self, **changes) -> "Structure":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_ase(cls, atoms: ase.Atoms, name: str = "") -> "Structure":
        energy = forces = stress = None
        calc = atoms.calc
        if calc is not None and getattr(calc, "results", None):
            results = calc.results
            energy = float(results["energy"]) if "energy" in results else None
            forces = np.asarray(results["forces"], np.float64) if "forces" in results else None
            if "stress" in results:
                # ASE stores Voigt stress (xx, yy, zz, yz, xz, xy) in eV/Å³.
                stress = voigt_to_matrix(np.asarray(results["stress"], np.float64))
        return cls(
            numbers=np.asarray(atoms.numbers, np.int32),
            positions=np.asarray(atoms.positions, np.float64),
            cell=np.asarray(atoms.cell.array, np.float64),
            pbc=np.asarray(atoms.pbc, bool),
            name=name,
            energy=energy,
            forces=forces,
            stress=stress,
            info=dict(atoms.info),
        )

    def to_ase(self) -> ase.Atoms:
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        atoms.info.update(self.info)
        results = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces
        if self.stress is not None:
            results["stress"] = matrix_to_voigt(self.stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def tiled(self, reps: Sequence[int]) -> "Structure":
        """This cell repeated reps[0] x reps[1] x reps[2] times along its cell vectors, named "NAME AxBxC" (labels
        dropped: they are the cell's). Only periodic directions repeat: a molecule, or a slab along its vacuum, is
        refused."""
        reps = tuple(int(n) for n in reps)
        label = self.name or "<unnamed structure>"
        if len(reps) != 3 or min(reps) < 1:
            raise StructureError(f"{label}: a tiling is three positive integers, got {reps}")
        if any(n > 1 and not p for n, p in zip(reps, self.pbc)):
            raise StructureError(f"{label}: not periodic along every repeated direction (pbc {self.pbc.tolist()}): "
                                 "only periodic cells are tiled")
        atoms = self.to_ase()
        atoms.calc = None
        return Structure.from_ase(atoms.repeat(reps), name=tiled_name(label, reps))

    def validated(self) -> "Structure":
        """Return self if it is a structure distiller can compute on; raise StructureError otherwise."""
        label = self.name or "<unnamed structure>"
        if self.n_atoms == 0:
            raise StructureError(f"{label}: empty structure (no atoms)")
        if self.positions.shape != (self.n_atoms, 3):
            raise StructureError(f"{label}: positions have shape {self.positions.shape}, expected ({self.n_atoms}, 3)")
        if not np.all(np.isfinite(self.positions)):
            bad = np.flatnonzero(~np.all(np.isfinite(self.positions), axis=1))
            raise StructureError(f"{label}: non-finite (NaN or inf) positions at atoms {bad[:10].tolist()}")
        if np.any(self.numbers <= 0) or np.any(self.numbers > 118):
            raise StructureError(f"{label}: atomic numbers must lie in 1..118, got {sorted(set(self.numbers.tolist()))}")
        if self.periodic:
            if not np.all(np.isfinite(self.cell)):
                raise StructureError(f"{label}: non-finite cell")
            volume = abs(np.linalg.det(self.cell))
            lengths = np.linalg.norm(self.cell, axis=1)
            if np.any(lengths[self.pbc] < 1e-6) or volume < 1e-6 * max(float(np.prod(lengths)), 1e-12):
                raise StructureError(f"{label}: singular cell (volume {volume:.3g} Å³) for a periodic structure")
        i, j, d = closest_pair(self)
        if d < MIN_DISTANCE:
            raise StructureError(f"{label}: atoms {i} and {j} are {d:.3g} Å apart (< {MIN_DISTANCE} Å)")
        return self


def closest_pair(structure: Structure, cutoff: float = MIN_DISTANCE * 1.01) -> tuple[int, int, float]:
    """The two closest atoms (periodic images included) and their distance if below `cutoff`; (-1, -1, inf)
    if none is."""
    from ase.neighborlist import neighbor_list

    atoms = ase.Atoms(numbers=structure.numbers, positions=structure.positions, cell=structure.cell, pbc=structure.pbc)
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    if len(d) == 0:
        return -1, -1, float("inf")
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def voigt_to_matrix(voigt: np.ndarray) -> np.ndarray:
    if voigt.shape == (3, 3):
        return voigt
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def matrix_to_voigt(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix)
    return np.array([m[0, 0], m[1, 1], m[2, 2], m[1, 2], m[0, 2], m[0, 1]])


def parse_tiling(text: str) -> tuple[int, int, int]:
    """'2x2x2' -> (2, 2, 2), for `Structure.tiled`; anything but three positive integers is a ValueError."""
    try:
        reps = tuple(int(n) for n in text.split("x"))
    except ValueError:
        reps = ()
    if len(reps) != 3 or min(reps) < 1:
        raise ValueError(f"a tiling is AxBxC with positive integers, e.g. 2x2x2, got {text!r}")
    return reps


def tiled_name(name: str, reps: Sequence[int]) -> str:
    """The name of `name` tiled reps[0] x reps[1] x reps[2] times: "waterhuge 2x2x2" (`Structure.tiled`'s)."""
    return f"{name} {'x'.join(map(str, reps))}"


def parse_tiled_name(text: str) -> tuple[str, tuple[int, int, int] | None]:
    """'waterhuge:2x2x2' -> ("waterhuge", (2, 2, 2)), 'aspirin' -> ("aspirin", None): a structure's name with an
    optional tiling (the bench scripts' NAME[:AxBxC]); a malformed tiling is parse_tiling's ValueError."""
    name, colon, tiling = text.partition(":")
    return name, parse_tiling(tiling) if colon else None


def read_structures(path: str | os.PathLike, index: str | int = ":", validate: bool = True) -> list[Structure]:
    """Read every structure of an ASE-readable file, each named `file.ext:i` and validated (unless not
    `validate`: then the caller validates them, e.g. to set the bad ones aside)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        images = ase.io.read(path, index=index)
    except Exception as err:  # ASE raises many kinds; all mean "this file is unreadable".
        raise StructureError(f"{path}: cannot read structures ({type(err).__name__}: {err})") from err
    if isinstance(images, ase.Atoms):
        images = [images]
    base = os.path.basename(path)
    structures = [Structure.from_ase(a, name=f"{base}:{k}") for k, a in enumerate(images)]
    return [s.validated() for s in structures] if validate else structures


def write_structures(path: str | os.PathLike, structures: Iterable[Structure]) -> None:
    """Write structures (with their labels) to an extxyz file, atomically."""
    path = os.fspath(path)
    with replaced(path) as tmp:
        ase.io.write(tmp, [s.to_ase() for s in structures], format="extxyz")


def as_structures(items: Sequence[Structure | ase.Atoms]) -> list[Structure]:
    """Accept Structures or ase.Atoms; name unnamed ones by their index."""
    out = []
    for k, item in enumerate(items):
        s = item if isinstance(item, Structure) else Structure.from_ase(item, name=f"structure {k}")
        out.append(s if s.name else s.replace(name=f"structure {k}"))
    return out
