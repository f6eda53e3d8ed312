"""Any distiller energy model (a FeNNol teacher, a trained or fresh student) behind one pure interface.

A `Model` maps (params, Batch, capacity) to the energies of the batch's graphs in eV and an overflow flag.
`capacity` is the model's own static sizes beyond the neighbour list (FeNNol's preprocessing: filtered
pairs, angle triplets, atoms per element), None for models that have none (the student). The JAX-MD layer
(`distiller.md.potential`) builds on this and never needs to know which kind of model it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from distiller.batch import Batch
from distiller.structure import Structure


@dataclasses.dataclass(frozen=True)
class Model:
    """An energy model in eV and Å. Pure functions take `params` explicitly (jit closes over the model)."""

    name: str  # teacher spec or student run directory, for messages and provenance
    cutoff: float  # Å: the neighbour list must hold every pair closer than this (longer pairs are harmless)
    params: Any = dataclasses.field(compare=False, repr=False)
    # (params, batch, capacity) -> ((G,) energies in eV, () bool overflow); differentiable in batch.positions
    # and batch.cell.
    energies: Callable[[Any, Batch, Any], tuple[Any, Any]] = dataclasses.field(compare=False, repr=False)
    # batch (with edges) -> capacity with a margin, outside jit; None when the model has no capacities.
    capacity_for: Callable[..., Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    # (capacity, batch, margin) -> a capacity that fits `batch` and everything `capacity` fitted.
    grow: Callable[..., Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    # structures -> None, or StructureError naming the structure with an element the model does not know.
    check: Callable[[Sequence[Structure]], None] = dataclasses.field(default=lambda structures: None,
                                                                      compare=False, repr=False)
    origin: Any = dataclasses.field(default=None, compare=False, repr=False)  # the teacher, or the StudentConfig


def from_teacher(teacher, params=None) -> Model:
    """A JAX teacher (one with `member_energies`, e.g. FennolTeacher) as a Model; the ensemble mean energy."""
    if not hasattr(teacher, "member_energies"):
        raise TypeError(f"teacher {getattr(teacher, 'spec', teacher)!r} ({type(teacher).__name__}) has no pure JAX "
                        f"energy; MD, relaxation and Hessians need a JAX teacher such as fennol-pmc:ani1x, "
                        f"or a student")
    params = teacher.params if params is None else params

    def energies(params, batch, capacity):
        member, overflow = teacher.member_energies(params, batch, capacity)
        return jnp.mean(member, axis=0), overflow

    return Model(name=teacher.spec, cutoff=float(teacher.cutoff), params=params, energies=energies,
                 capacity_for=teacher.capacity_for, grow=teacher.grow,
                 check=teacher.check, origin=teacher)


def from_student(config, module, params, name: str = "student") -> Model:
    """A student (StudentConfig, its Flax module, its parameters) as a Model; it has no capacities."""
    from distiller.students import check, energy

    def energies(params, batch, capacity):
        return energy(module, params, batch), jnp.asarray(False)

    return Model(name=name, cutoff=float(config.cutoff), params=params, energies=energies,
                 check=lambda structures: check(config, structures), origin=config)


def load_model(spec_or_run_dir: str) -> Model:
    """A student run directory (holding config.json) or a teacher spec (`fennol-pmc:ani1x/0`, `fennol:PATH`)."""
    if os.path.isdir(spec_or_run_dir):
        if not os.path.isfile(os.path.join(spec_or_run_dir, "config.json")):
            raise FileNotFoundError(f"{spec_or_run_dir}: a directory but not a distiller run (no config.json)")
        from distiller.train.trainer import load_student

        config, module, params = load_student(spec_or_run_dir)
        return from_student(config, module, params, name=os.path.abspath(spec_or_run_dir))
    if spec_or_run_dir.startswith("fennol-pmc:"):
        return _pmc_model(spec_or_run_dir)
    from distiller.teachers.registry import load_teacher

    return from_teacher(*load_teacher(spec_or_run_dir))


@functools.lru_cache(maxsize=4)
def _pmc_model(spec: str) -> Model:
    """FeNNol-PMC teachers are loaded once per process: their files are checksummed, so a spec always means the
    same weights, and one Model object lets every MD, relaxation and sampler call share compilations."""
    from distiller.teachers.registry import load_teacher

    return from_teacher(*load_teacher(spec))


_WRAPPED: dict = {}  # (id(teacher), id(params)) -> (teacher, params, Model)


def as_model(model) -> Model:
    """Accept a Model, a spec or run directory, a (teacher, params) pair or a teacher that keeps its params.

    One teacher object with one params object always gives the same Model, so that calls passing the pair
    from `load_teacher` again and again share compilations (`distiller.md.potential.memoised` keys on it).
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(os.fspath(model))
    teacher, params = model if isinstance(model, tuple) and len(model) == 2 else (model, None)
    params = getattr(teacher, "params", None) if params is None else params
    key = (id(teacher), id(params))
    hit = _WRAPPED.get(key)
    if hit is not None and hit[0] is teacher and hit[1] is params:
        return hit[2]
    wrapped = from_teacher(teacher, params)
    _WRAPPED[key] = (teacher, params, wrapped)
    return wrapped
