"""Static capacities and the one overflow-grow-redo loop.

Everything with a data-dependent size has a static capacity and an overflow flag (jax-md's pattern): the
neighbour list (edges, bins, atoms per bin, image reach) and a model's own sizes (FeNNol's preprocessing). A
computation that overflows is not to be used: the host grows the capacity (a new compilation) and computes the
same thing again. `until_fits` is that loop, for every caller (MD, relaxation, labelling, training, prediction).

`Capacity` holds both sizes of a model evaluation; `allocate` measures them for a batch (outside jit) and
`grow` enlarges them after an overflow to fit what the batch needed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import jax
import jax.numpy as jnp

from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape, allocate_neighbours, pad_structures, with_neighbours
from distiller.model import EnergyModel
from distiller.structure import Structure

MAX_GROWTHS = 8  # each growth fits what the computation measured; more than a few means a bug
MARGIN = 1.25

T = TypeVar("T")
C = TypeVar("C")


class CapacityError(RuntimeError):
    """Capacities that still overflow after MAX_GROWTHS growths."""


def until_fits(compute: Callable[[C], tuple[T, Any]], capacity: C, grow: Callable[[C, T, int], C], *,
               what: str, describe: Callable[[C], str] = repr) -> tuple[T, C, int]:
    """compute(capacity) -> (result, overflow); while overflow, capacity = grow(capacity, result, attempt) and
    compute again. Returns (result, capacity, growths). `what` names the computation in the error, `describe`
    its capacity."""
    for attempt in range(MAX_GROWTHS + 1):
        result, overflow = compute(capacity)
        if not bool(overflow):
            return result, capacity, attempt
        if attempt == MAX_GROWTHS:
            raise CapacityError(f"{what}: capacities still overflow after {attempt} growths ({describe(capacity)})")
        capacity = grow(capacity, result, attempt)
    raise AssertionError("unreachable")


class Capacity(NamedTuple):
    """The static sizes of one model evaluation on batches of one shape (hashable: a jit static argument)."""

    neighbours: nl.NeighbourCapacity
    model: Any = None  # the model's own (None for models without)


# The batch with its edges, jitted once per shape, cutoff and capacity (capacities are measured on complete edges).
_with_edges = jax.jit(lambda batch, cutoff, capacity: with_neighbours(batch, cutoff, capacity)[0],
                      static_argnums=(1, 2))


def allocate(model: EnergyModel | None, batch: Batch, cutoff: float, margin: float = MARGIN,
             previous: Capacity | None = None) -> Capacity:
    """Capacities that hold `batch` (padded, edges not needed) with `margin`, and everything `previous` held.

    model: whose own capacity to measure too (None, or a model without capacities: neighbours only)."""
    batch = jax.tree.map(jnp.asarray, batch)
    extra = None if previous is None else previous.neighbours
    neighbours = allocate_neighbours(batch, cutoff, margin, extra=extra)
    if model is None or model.capacity_for is None:
        return Capacity(neighbours)
    with_edges = _with_edges(batch, float(cutoff), neighbours)
    if previous is None or previous.model is None:
        return Capacity(neighbours, model.capacity_for(with_edges, margin))
    return Capacity(neighbours, model.grow(previous.model, with_edges, margin))


def grow(model: EnergyModel | None, capacity: Capacity, batch: Batch, cutoff: float, needed=None,
         margin: float = MARGIN) -> Capacity:
    """After an overflow: capacities that fit `batch` (what its neighbour list `needed`, if known, and the
    model's sizes measured on its complete edges) and everything `capacity` fitted."""
    neighbours = capacity.neighbours if needed is None else nl.grow(capacity.neighbours, needed, margin)
    return allocate(model, batch, cutoff, margin, previous=Capacity(neighbours, capacity.model))


def make_batch(structures: Sequence[Structure], cutoff: float, shape: BatchShape | None = None,
               capacity: nl.NeighbourCapacity | None = None) -> tuple[Batch, nl.NeighbourCapacity]:
    """Pad structures and build their edges (host side); `capacity` grows until nothing overflows."""
    batch = jax.tree.map(jnp.asarray, pad_structures(structures, shape))
    if capacity is None:
        capacity = allocate_neighbours(batch, cutoff)

    def build(capacity):
        out, neighbours = with_neighbours(batch, cutoff, capacity)
        return (out, neighbours.needed), neighbours.overflow

    (out, _), capacity, _ = until_fits(build, capacity, lambda c, result, _: nl.grow(c, result[1]),
                                       what="neighbour list")
    return out, capacity
