"""Host-side prediction with any energy model: structures in, labelled structures out (eV, eV/Å, eV/Å³).

    predictor = Predictor(model)                 # a teacher or a student
    labelled = predictor(structures)             # energy (float64 total), forces, stress of periodic ones
    labelled = predictor(structures, params)     # with other weights (a training run's), same compilations
    labelled = Predictor(teacher, hvp=True)(structures_with_directions)   # also H·v along their `directions`

JAX models: structures go into size buckets (`neighbours.round_up` of their atom counts); a bucket's structures
are padded into batches of one shape (at most `max_atoms` atoms and `max_structures` structures), so jit
compiles once per shape, and `batch_predictions` (neighbour list and model in one XLA program) runs on each.
Capacities are kept per shape (`capacities`, picklable: a restarted labelling job pads and sizes exactly as the
uninterrupted one), measured the first time a shape is seen and grown when a batch overflows. All batches of a
call are dispatched before the first result is read, so the host pads the next while the device computes.

Host-only models (PyTorch, ASE) label with their own `label`, `max_atoms` at a time. With `hvp`, a JAX model
also gives every structure the H·v along each of its K `directions` (eV/Å², `derivatives.hessian_vector_product`,
in the same program as its labels); a host-only model, with first derivatives only, is refused.

Every result is checked (one structure back per structure, finite numbers, the right shapes): a teacher that
returns NaN is an error naming the structure, never a label.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller import capacity as capacities
from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape, bucket_shape, group_by_atoms, pad_structures, unpad_atoms, with_neighbours
from distiller.derivatives import Predictions, hessian_vector_product, predictions
from distiller.model import EnergyModel
from distiller.structure import Structure, StructureError


@functools.partial(jax.jit, static_argnames=("model", "capacity", "cutoff", "stress"))
def batch_predictions(model: EnergyModel, params: Any, batch: Batch, capacity: capacities.Capacity, cutoff: float,
                      stress: bool) -> tuple[Predictions, jax.Array]:
    """The batch's neighbour list (at `cutoff`, at least the model's) and the model's predictions on it, in one
    XLA program; the overflow flag covers both. Returns (predictions, what the neighbour list needed). A batch
    with K `directions` (K, A, 3) also gets H·v along each, as `hvp` (K, A, 3), one direction after another (the
    memory of one forward-over-reverse pass)."""
    batch, neighbours = with_neighbours(batch, cutoff, capacity.neighbours)
    out = predictions(model, params, batch, capacity.model, stress=stress)
    if batch.directions is not None:
        hvp = jax.lax.map(lambda v: hessian_vector_product(model, params, batch, capacity.model, v), batch.directions)
        out = out._replace(hvp=hvp)
    return out._replace(overflow=out.overflow | neighbours.overflow), neighbours.needed


class Predictor:
    """Labels structures with `model`, compiled once per padded shape (see the module docstring)."""

    def __init__(self, model: EnergyModel, *, max_atoms: int = 4096, max_structures: int | None = None,
                 hvp: bool = False):
        if max_atoms < 1 or (max_structures is not None and max_structures < 1):
            raise ValueError(f"max_atoms ({max_atoms}) and max_structures ({max_structures}) must be >= 1")
        if hvp and model.host_only:
            raise ValueError(f"teacher {model.name} is computed outside JAX and has first derivatives only: "
                             f"Hessian-vector products need a JAX model (a FeNNol teacher, e.g. fennol-pmc:ani1x)")
        self.model, self.max_atoms, self.max_structures = model, int(max_atoms), max_structures
        self.hvp = hvp  # whether structures' H·v along their `directions` are computed too
        self.capacities: dict[BatchShape, capacities.Capacity] = {}
        self.shapes_seen: set[BatchShape] = set()
        self.grown = 0  # capacity growths (each one a recompilation), for summaries

    def __call__(self, structures: Sequence[Structure], params: Any = None) -> list[Structure]:
        """`structures` labelled by the model, with `params` (JAX models; default: the model's own); with `hvp`,
        each structure's K `directions` (the same K for all) give its `hvp`, and `hvp` is None otherwise."""
        # A structure's H·v from elsewhere (a dataset's teacher) is never passed on as this model's.
        structures = [s.validated().replace(hvp=None) for s in structures]
        self.model.check(structures)
        if not structures:
            return []
        if self.model.host_only:
            if params is not None:
                raise TypeError(f"{self.model.name} is computed outside JAX and takes no parameters")
            out = [t for group in group_by_atoms(structures, self.max_atoms) for t in self.model.label(group)]
        else:
            out = self._predict(structures, self.model.params if params is None else params)
        return checked(self.model.name, structures, out)

    # -- JAX models ---------------------------------------------------------------------------------------
    def shape(self, bucket: int, count: int) -> BatchShape:
        """The padded shape of batches of `count` (or fewer) structures of at most `bucket` atoms."""
        most = self.max_structures or count
        return bucket_shape(bucket, min(nl.round_up(count), most), self.max_atoms)

    def _predict(self, structures: list[Structure], params: Any) -> list[Structure]:
        # A call straddling size buckets is labelled bucket by bucket: small structures are not padded to the
        # large ones' shape.
        buckets = np.array([nl.round_up(s.n_atoms) for s in structures])
        directions = len(structures[0].directions) if self.hvp and structures[0].directions is not None else 0
        if self.hvp and not directions:
            raise ValueError(f"structure '{structures[0].name}': no directions to take H·v along")
        out: list[Structure | None] = [None] * len(structures)
        flights = []
        for bucket in np.unique(buckets):
            members = np.flatnonzero(buckets == bucket)
            shape = self.shape(int(bucket), len(members))
            self.shapes_seen.add(shape)
            step = shape.graphs - 1
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                group = [structures[k] for k in chunk]
                batch = jax.tree.map(jnp.asarray, pad_structures(group, shape, hvp=directions))
                capacity = self._capacity(shape, batch)
                flights.append((chunk, group, shape, batch, self._dispatch(params, batch, capacity)))
        for chunk, group, shape, batch, flight in flights:
            for k, s in zip(chunk, self._collect(params, group, shape, batch, flight)):
                out[k] = s
        return out  # type: ignore[return-value]

    @property
    def cutoff(self) -> float:
        return float(self.model.cutoff)

    def _capacity(self, shape: BatchShape, batch: Batch) -> capacities.Capacity:
        """The shape's capacities, measured on this batch the first time the shape is seen."""
        if shape not in self.capacities:
            self.capacities[shape] = capacities.allocate(self.model, batch, self.cutoff)
        return self.capacities[shape]

    def _dispatch(self, params: Any, batch: Batch, capacity: capacities.Capacity):
        stress = bool(np.any(np.asarray(batch.pbc)[np.asarray(batch.graph_mask)]))
        return batch_predictions(self.model, params, batch, capacity, self.cutoff, stress)

    def _collect(self, params: Any, group: list[Structure], shape: BatchShape, batch: Batch, flight) -> list[Structure]:
        def compute(capacity):
            result = flight if capacity is self.capacities[shape] else self._dispatch(params, batch, capacity)
            return result, result[0].overflow

        def grow(capacity, result, attempt):
            self.grown += 1
            return capacities.grow(self.model, capacity, batch, self.cutoff, needed=result[1],
                                   margin=capacities.MARGIN + 0.25 * attempt)

        (out, _), capacity, _ = capacities.until_fits(compute, self.capacities[shape], grow,
                                                      what=f"{self.model.name} on a batch of {shape}")
        self.capacities[shape] = capacity  # later batches of the shape start from what this one needed
        energy = self.model.total_energies(group, np.asarray(out.energy, np.float64)[:len(group)])
        spread = np.asarray(out.spread, np.float64)
        stress = np.asarray(out.stress, np.float64)
        forces = unpad_atoms(batch, np.asarray(out.forces, np.float64))
        # (K, A, 3) -> per structure (K, n, 3)
        hvp = None if out.hvp is None else [np.swapaxes(h, 0, 1) for h in
                                            unpad_atoms(batch, np.swapaxes(np.asarray(out.hvp, np.float64), 0, 1))]
        labelled = []
        for g, s in enumerate(group):
            info = {**s.info, "energy_spread": float(spread[g])} if self.model.n_members > 1 else s.info
            labelled.append(s.replace(energy=float(energy[g]), forces=forces[g],
                                      stress=stress[g] if s.periodic else None, info=info,
                                      hvp=None if hvp is None else hvp[g]))
        return labelled


def checked(name: str, structures: Sequence[Structure], labelled: Sequence[Structure]) -> list[Structure]:
    """Refuse labels that cannot be right: a missing structure, wrong shapes, non-finite numbers."""
    if len(labelled) != len(structures):
        raise RuntimeError(f"{name} returned {len(labelled)} structures for {len(structures)}")
    for s, t in zip(structures, labelled):
        problem = None
        if t.energy is None or not np.isfinite(t.energy):
            problem = f"energy {t.energy}"
        elif t.forces is None or np.shape(t.forces) != (s.n_atoms, 3) or not np.all(np.isfinite(t.forces)):
            problem = "missing, misshapen or non-finite forces"
        elif t.stress is not None and (np.shape(t.stress) != (3, 3) or not np.all(np.isfinite(t.stress))):
            problem = "misshapen or non-finite stress"
        elif t.n_atoms != s.n_atoms or not np.array_equal(t.numbers, s.numbers):
            problem = "a different structure back"
        elif t.hvp is not None and (np.shape(t.hvp) != np.shape(t.directions) or not np.all(np.isfinite(t.hvp))):
            problem = "misshapen or non-finite Hessian-vector products"
        if problem:
            raise StructureError(f"structure '{s.name}': {name} gave {problem}")
    return list(labelled)
