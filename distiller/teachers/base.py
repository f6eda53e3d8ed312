"""What every teacher gives: energies, forces and (for periodic cells) stress, in eV and Å.

Teachers convert their own units once, at this edge. A JAX teacher (FeNNol) also exposes a pure
`apply(params, batch)` that runs inside a jitted loss; any teacher can label host-side structures.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import jax

from distiller.structure import Structure


class TeacherOutput(NamedTuple):
    energy: jax.Array  # (G,) eV, zero on padding graphs
    forces: jax.Array  # (A, 3) eV/Å, zero on padding atoms
    energy_spread: jax.Array  # (G,) eV, standard deviation across ensemble members (zeros for one model)
    overflow: jax.Array  # () bool: a fixed capacity was too small; the numbers are not to be used


class Teacher(Protocol):
    spec: str  # how the teacher was named, e.g. "fennol-pmc:ani1x"
    cutoff: float  # Å
    elements: frozenset[int]  # atomic numbers the teacher knows

    def check(self, structures: Sequence[Structure]) -> None:
        """Raise StructureError naming the structure and element the teacher cannot handle."""

    def label(self, structures: Sequence[Structure]) -> list[Structure]:
        """The structures with energy, forces (and stress for periodic cells) filled in, eV and Å."""
