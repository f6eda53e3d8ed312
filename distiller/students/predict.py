"""Host-side prediction with a student: structures in, labelled structures out (eV, eV/Å, eV/Å³)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from distiller import batch as batching
from distiller.structure import Structure
from distiller.students.energy import energy_forces_stress
from distiller.students.schnet import StudentConfig, check


def predict(config: StudentConfig, model, params, structures: Sequence[Structure], max_atoms: int = 4096) -> list[Structure]:
    """The structures labelled by the student. All chunks share one padded shape, so jit compiles once."""
    structures = [s.validated() for s in structures]
    check(config, structures)
    groups = batching.group_by_atoms(structures, max_atoms)
    if not groups:
        return []
    shape = batching.shape_for_groups(groups)
    compute = jax.jit(lambda p, b: energy_forces_stress(model, p, b))
    out, capacity = [], None
    for group in groups:
        batch, capacity = batching.make_batch(group, config.cutoff, shape, capacity)
        energy, forces, stress = (np.asarray(x, np.float64) for x in compute(params, batch))
        for g, (s, f) in enumerate(zip(group, batching.unpad_atoms(batch, forces))):
            out.append(s.replace(energy=float(energy[g]), forces=f, stress=stress[g] if s.periodic else None))
    return out
