"""Molecular dynamics, relaxation and Hessians with JAX-MD for any distiller energy model (teacher or student).

    model = load_model("fennol-pmc:ani1x/0")            # or a student run directory (distiller.load)
    displacement_fn, shift_fn = space(structure)
    neighbor_fn, energy_fn = potential(model, structure)  # JAX-MD's conventions; see distiller.md.potential
    for records in simulate(model, structure, Dynamics("nvt", temperature=300), steps=1000): ...
    for records in simulate_replicas(model, [structure] * 8, Dynamics("nvt"), 1000, temperatures=ladder): ...

`distiller md` (distiller.md.run.run_md) writes a trajectory and a thermo log from the command line (one per
replica with `--replicas N`).
"""

from distiller.md.minimize import Relaxer, hessian, relax
from distiller.md.potential import NeighbourList, potential, space
from distiller.md.simulate import (Dynamics, MDFailure, Records, Safety, energy_drift, frames, simulate,
                                   simulate_each, simulate_replicas, thermo)

__all__ = ["NeighbourList", "potential", "space", "Dynamics", "MDFailure", "Records", "Safety", "energy_drift",
           "frames", "simulate", "simulate_each", "simulate_replicas", "thermo", "Relaxer", "hessian", "relax"]
