"""Students: small, fast, exactly invariant and energy-conserving models trained to imitate a teacher."""

from distiller.students.energy import (atom_energies, build_model, edge_lengths, energy, energy_forces,
                                       energy_forces_stress, fit_reference_energies, init_student)
from distiller.students.schnet import InteractionBlock, SchNet, StudentConfig, check

__all__ = ["StudentConfig", "SchNet", "InteractionBlock", "check", "build_model", "atom_energies", "edge_lengths",
           "energy", "energy_forces", "energy_forces_stress", "fit_reference_energies", "init_student"]
