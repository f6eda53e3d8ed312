"""The energy model: what every teacher and every student is.

An `EnergyModel` maps (params, Batch with edges, capacity) to the energies of the batch's graphs, per ensemble
member, relative to its per-element reference energies (`distiller.reference`), plus an overflow flag:

    out = model.energies(model.params, batch, capacity)      # pure and jittable
    out.energy     # (G,) eV: the ensemble mean (the model's energy), float32, relative to model.reference
    out.members    # (M, G) eV, one row per member (M = 1 for a single model)
    out.overflow   # () bool: a static capacity was too small; recompute with `model.grow`d capacities
    E_total = model.reference.energy(numbers) + float(out.energy[g])     # float64, on the host

`energies` is differentiable in `batch.positions` and `batch.cell`; forces, stress, virials and Hessians are
derived from it once, for every model, in `distiller.derivatives`. `capacity` is the model's own static sizes
beyond the neighbour list (FeNNol's preprocessing), None for models without any; `capacity_for` measures
them outside jit and `grow` enlarges them after an overflow.

Host-only teachers (PyTorch, ASE calculators) also have `label`: structures in, labelled structures out, on
the host, in float64. Their `energies` is a `jax.pure_callback` into the same labelling whose derivative is the
teacher's own forces and stress (first derivatives only), so MD and in-jit use work with them too.

Models compare by identity (a jit static argument must never mistake one model for another with other
functions): load a model once and pass that object around to share compilations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import chemical_symbols

from distiller.batch import Batch
from distiller.reference import ZERO, ReferenceEnergies
from distiller.structure import Structure, StructureError


class ModelEnergies(NamedTuple):
    members: jax.Array  # (M, G) eV relative to the model's reference; 0 on padding graphs
    overflow: jax.Array  # () bool

    @property
    def energy(self) -> jax.Array:
        """(G,) the model's energy: the ensemble mean."""
        return jnp.mean(self.members, axis=0)

    @property
    def spread(self) -> jax.Array:
        """(G,) standard deviation across members (zeros for one model)."""
        if self.members.shape[0] == 1:
            return jnp.zeros_like(self.members[0])
        return jnp.std(self.members, axis=0)


EnergiesFn = Callable[[Any, Batch, Any], ModelEnergies]
LabelFn = Callable[[Sequence[Structure]], list]


@dataclasses.dataclass(frozen=True, eq=False)
class EnergyModel:
    """An energy model in eV and Å (see the module docstring). Pure functions take `params` explicitly."""

    name: str  # teacher spec or student run directory, for messages and provenance
    cutoff: float  # Å: the edges given to `energies` must include every pair closer than this
    elements: frozenset[int]  # atomic numbers the model knows
    energies: EnergiesFn = dataclasses.field(repr=False)
    params: Any = dataclasses.field(default=None, repr=False)
    reference: ReferenceEnergies = ZERO
    n_members: int = 1
    # (batch with edges, margin) -> capacity, outside jit; None when the model has no capacities of its own.
    capacity_for: Callable[[Batch, float], Any] | None = dataclasses.field(default=None, repr=False)
    # (capacity, batch with edges, margin) -> a capacity that fits `batch` and everything `capacity` fitted.
    grow: Callable[[Any, Batch, float], Any] | None = dataclasses.field(default=None, repr=False)
    # Host-only models: structures -> the structures labelled (energy, forces, stress where periodic), float64.
    label: LabelFn | None = dataclasses.field(default=None, repr=False)
    # Checks beyond the elements (e.g. periodicity a teacher does not support): structures -> None or raise.
    check_more: Callable[[Sequence[Structure]], None] | None = dataclasses.field(default=None, repr=False)
    # What implements the model (a FennolTeacher, an OrbTeacher, a student's config...), for provenance.
    source: Any = dataclasses.field(default=None, repr=False)

    @property
    def host_only(self) -> bool:
        """True for models computed outside JAX (first derivatives only, through their own forces)."""
        return self.label is not None

    def check(self, structures: Sequence[Structure]) -> None:
        """Raise StructureError naming the first structure this model cannot take (an unknown element...)."""
        for k, s in enumerate(structures):
            unknown = sorted(set(np.asarray(s.numbers).tolist()) - self.elements)
            if unknown:
                z = unknown[0]
                symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"
                raise StructureError(f"structure '{s.name or k}' contains element {symbol} (Z={z}) which "
                                     f"{self.name} does not know (knows {_element_list(self.elements)})")
        if self.check_more is not None:
            self.check_more(structures)

    def total_energies(self, structures: Sequence[Structure], energies) -> np.ndarray:
        """float64 totals: the reference part of each structure plus its model energy (relative to it)."""
        return self.reference.energies([s.numbers for s in structures]) + np.asarray(energies, np.float64)


def _element_list(elements: frozenset[int]) -> str:
    zs = sorted(elements)
    if len(zs) > 10 and zs == list(range(zs[0], zs[-1] + 1)):
        return f"Z = {zs[0]}..{zs[-1]}"
    return ", ".join(chemical_symbols[z] for z in zs)
