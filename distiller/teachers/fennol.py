"""FeNNol (FENNIX) models, one or an ensemble, as a pure and jittable energy model in eV and Å.

FeNNol's public `energy_and_forces` / `preprocess` keep a mutable preprocessing state and build the
neighbour list in numpy, so they cannot run inside jit. This module uses FeNNol's pieces that are pure:

* the base graph is *ours*: the Batch's edges (distiller's neighbour list, cutoff >= the teacher's) are
  rewritten in FeNNol's convention instead of running FeNNol's GraphGenerator;
* the remaining preprocessing layers (GraphFilter, GraphAngularExtension, SpeciesIndexer, ...) run through
  their jittable `process(state, inputs)` with static states -- their capacities -- that `capacity_for`
  measures outside jit with the layers' own numpy `__call__`; every overflow flag they raise is OR-ed into
  the model's overflow, and `grow` re-allocates;
* the model itself is `FENNIX._total_energy_raw` (the modules' `apply` plus the energy-term sum), whose
  per-atom energies distiller sums per graph itself (`batch.graph_sum`, exact).

Reference energies: FeNNol's per-element constant energy terms (ANI's self-energies, CHEMICAL_CONSTANT modules:
-2046 eV for O) are left out of the jitted model and become the model's float64 `reference`
(distiller.reference); what the model computes in float32 is the rest (about -3 eV per water atom).

FeNNol quirks handled here (found by experiment with FeNNol 2026.6):
* padding edges are index = n_atoms (gathers fill, scatters drop) with d12 = cutoff^2; distiller's padding
  edges point at a real (padding) atom, so they are rewritten;
* the cosine switch's default float exponent 1.0 gives NaN second derivatives near every cutoff; models
  are rebuilt with the integer exponent 1 (same numbers), see `_integer_exponent`;
* GraphAngularExtension needs max_neigh * n_atoms >= edges of its graph, enforced at trace time.

Ensembles share one architecture: their variables are stacked along a leading axis and the energy is
vmapped over it; the model's energy is the members' mean (`ModelEnergies.energy`).

Units: FeNNol models work in Å and in their `energy_unit` (Hartree for ANI). Energies are converted once,
here, with FeNNol's own multiplier (`au.get_multiplier("eV") / au.get_multiplier(energy_unit)`, for
Hartree 27.211386024367243 eV, the same number as `ase.units.Hartree`), so that the results equal
FeNNol's `energy_and_forces(..., unit="eV")`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import chemical_symbols
from flax.core import FrozenDict

from distiller import batch as batching
from distiller import neighbours as nl
from distiller.batch import Batch
from distiller.model import EnergyModel, ModelEnergies
from distiller.precision import HIGHEST, full_precision_scope
from distiller.reference import MAX_Z, ReferenceEnergies


class ModelFileError(ValueError):
    """A model file that exists but cannot be read as a FeNNol model."""


# --------------------------------------------------------------------------------------------------
# Capacities


@dataclasses.dataclass(frozen=True)
class FennolCapacity:
    """Static sizes of FeNNol's preprocessing after the base graph (hashable: a jit static argument).

    One FeNNol state per preprocessing layer after the GraphGenerator, in the chain's order, with FeNNol's
    own keys: GraphFilter "npairs" (edges of the filtered graph), GraphAngularExtension "nangles" and
    "max_neigh" (angle triplets, neighbours per atom), SpeciesIndexer "sizes" ({Z: atoms of that element}).
    """

    layer_states: tuple[FrozenDict, ...]

    def __str__(self) -> str:
        parts = []
        for state in self.layer_states:
            items = []
            for key, value in state.items():
                if key in ("nblist_mult_size", "add_neigh", "add_atoms", "add_atoms_margin"):
                    continue
                if isinstance(value, (dict, FrozenDict)):
                    value = "{" + ", ".join(f"{chemical_symbols[z]}: {n}" for z, n in value.items()) + "}"
                items.append(f"{key}={value}")
            parts.append("(" + ", ".join(items) + ")")
        return "FennolCapacity" + "".join(parts)


def _merge_states(a: FrozenDict, b: FrozenDict) -> FrozenDict:
    """Key-wise maximum of two layer states (nested dicts key by key); other values are taken from b."""
    out = dict(a)
    for key, value in b.items():
        old = out.get(key)
        if isinstance(value, (dict, FrozenDict)):
            merged = dict(old or {})
            for k, v in value.items():
                merged[k] = max(int(merged.get(k, 0)), int(v))
            out[key] = FrozenDict(merged)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and old is not None:
            out[key] = max(int(old), int(value))
        else:
            out[key] = value
    return FrozenDict(out)


def _plain(value):
    """numpy scalars (FeNNol's states hold np.int64) -> Python numbers, so that states hash and print cleanly."""
    if isinstance(value, (dict, FrozenDict)):
        return FrozenDict({_plain(k): _plain(v) for k, v in value.items()})
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# --------------------------------------------------------------------------------------------------
# Loading


def read_fnx(path: str | os.PathLike):
    """Load one FeNNol model file; a missing file, an unreadable one or one with non-finite parameters is an
    error naming the file."""
    from fennol import FENNIX

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FeNNol model file not found: {path}")
    try:
        model = FENNIX.load(path)
    except Exception as err:  # msgpack, KeyError, flax...: all mean "this is not a usable .fnx file".
        raise ModelFileError(
            f"{path}: not a readable FeNNol model file (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from err
    # A .fnx holds no checksum: damaged bytes inside a weight array decode. Non-finite values at least are
    # certainly damage (the sha256 recorded by datasets and runs catches the rest when a file changes).
    for name, value in _parameters(model.variables).items():
        if not np.all(np.isfinite(np.asarray(value))):
            raise ModelFileError(f"{path}: parameter {name} has non-finite values: the file is corrupt")
    return model


def _parameters(variables) -> dict[str, Any]:
    """A model's variables by their path ("params/energy/H/Layer_1/kernel")."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
    return {"/".join(str(getattr(k, "key", k)) for k in keys): v for keys, v in leaves}


def _check_shapes(model, path: str) -> None:
    """The file's parameters are those its architecture builds (names and shapes), found without computing."""
    inputs, _ = model.reinitialize_preprocessing()  # FeNNol's dummy system, as its own initialisation uses
    abstract = jax.eval_shape(model.modules.init, jax.random.PRNGKey(0), inputs)  # traced, not compiled
    expected = {k: tuple(v.shape) for k, v in _parameters(abstract).items()}
    found = {k: tuple(np.shape(v)) for k, v in _parameters(model.variables).items()}
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise ModelFileError(f"{path}: parameter {name} has shape {found.get(name, 'missing')}, its architecture "
                                 f"needs {expected.get(name, 'none')}: the file is corrupt or inconsistent")


_SUPPORTED_LAYERS = ("GraphFilter", "GraphAngularExtension", "SpeciesIndexer")


def _check_supported(model, path: str) -> None:
    from fennol.models.preprocessing import GraphGenerator

    layers = model.preprocessing.layers
    if model.cutoff is None or not isinstance(layers[0], GraphGenerator):
        raise ModelFileError(f"{path}: model has no radial graph (cutoff); distiller needs one")
    if layers[0].k_space:
        raise ModelFileError(f"{path}: k-space graphs are not supported by distiller's FeNNol teacher")
    if model.use_atom_padding:
        raise ModelFileError(f"{path}: atom padding models are not supported")
    for layer in layers[1:]:
        name = type(layer).__name__
        if name not in _SUPPORTED_LAYERS or getattr(layer, "k_space", False):
            raise ModelFileError(
                f"{path}: preprocessing layer {name} is not supported (supported: {', '.join(_SUPPORTED_LAYERS)})"
            )
    if not model.energy_terms:
        raise ModelFileError(f"{path}: model has no energy terms, it is not a potential energy model")


def _integer_exponent(switch_params) -> dict | None:
    """Switch parameters with the cosine switch's default exponent 1.0 made the integer 1, or None if n/a.

    FeNNol computes the cosine switch as `(0.5 cos(pi d / rc) + 0.5) ** p` with p = 1.0 by default. For a
    float exponent JAX's pow rule differentiates as p * x ** (p - 1), whose own derivative is 0 * x ** -1:
    NaN wherever the switch is exactly 0 in float32, i.e. for any distance within ~3e-4 Å of a cutoff
    (padding entries sit exactly there). The integer exponent takes JAX's integer_pow rule: the same values,
    finite derivatives of every order, so Hessian-vector products work.
    """
    params = dict(switch_params or {})
    if str(params.get("switch_type", "cosine")).lower() != "cosine" or params.get("trainable", False):
        return None
    if params.get("p") is not None and float(params["p"]) != 1.0:
        return None
    return {**params, "p": 1}


def _constant_terms(model) -> list[str]:
    """The energy terms that are per-element constants (FeNNol's CHEMICAL_CONSTANT modules)."""
    modules = model._input_args["modules"]
    return [t for t in model.energy_terms
            if str(modules.get(t, {}).get("module_name", modules.get(t, {}).get("FID", ""))).upper()
            == "CHEMICAL_CONSTANT"]


def _constant_table(model, variables, term: str) -> np.ndarray:
    """(MAX_Z + 1,) float64 values of a CHEMICAL_CONSTANT term, in the model's energy unit, for one member."""
    from fennol.utils.periodic_table import PERIODIC_TABLE_REV_IDX

    params = variables.get("params", {}).get(term, {})
    if "constant" in params:  # trainable: the member's own (float32) values
        values = np.asarray(params["constant"], np.float64)
    else:
        value = model._input_args["modules"][term]["value"]
        if not hasattr(value, "items"):
            raise ModelFileError(f"{term}: constant energy term of kind {type(value).__name__} is not supported")
        values = np.zeros(MAX_Z + 1)
        for symbol, v in value.items():
            values[int(PERIODIC_TABLE_REV_IDX[symbol])] = float(v)
    table = np.zeros(MAX_Z + 1)
    table[: min(len(values), MAX_Z + 1)] = values[: MAX_Z + 1]
    return table


def _with_integer_switches(model, energy_terms):
    """The same model (same variables and numbers) rebuilt with integer cosine-switch exponents, computing only
    `energy_terms`."""
    from fennol import FENNIX

    args = copy.deepcopy(model._input_args)
    graph_config = {}
    base = _integer_exponent(model.preprocessing.layers[0].switch_params)
    if base is not None:
        graph_config["switch_params"] = base
    for name, params in args["preprocessing"].items():
        kind = str(params.get("FID", params.get("module_name", name))).upper()
        if kind == "GRAPH_FILTER":
            switch = _integer_exponent(params.get("switch_params"))
            if switch is not None:
                params["switch_params"] = switch
    return FENNIX(**args, variables=model.variables, energy_terms=list(energy_terms), graph_config=graph_config)


def _architecture(model) -> tuple:
    """What must agree between ensemble members: everything but the weights' values."""
    args = model._input_args
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), model.variables)
    return (repr(args["cutoff"]), repr(args["modules"]), repr(args["preprocessing"]), args["energy_unit"],
            repr(model.energy_terms), repr(jax.tree_util.tree_structure(model.variables)), repr(shapes))


def _model_elements(model) -> frozenset[int]:
    """Elements every species-aware module of the model knows (intersection); all elements if none says."""
    from fennol.utils.periodic_table import PERIODIC_TABLE_REV_IDX

    known = None
    for params in model._input_args["modules"].values():
        lists = []
        order = params.get("species_order")
        if isinstance(order, str):
            lists.append([s.strip() for s in order.split(",")])
        elif order is not None:
            lists.append(list(order))
        if isinstance(params.get("hidden_neurons"), (dict, FrozenDict)):
            lists.append(list(params["hidden_neurons"].keys()))
        for symbols in lists:
            numbers = frozenset(int(PERIODIC_TABLE_REV_IDX[s]) for s in symbols)
            known = numbers if known is None else known & numbers
    return known if known is not None else frozenset(range(1, 119))


def load_fennol(paths: Sequence[str | os.PathLike], spec: str) -> EnergyModel:
    """One model or an ensemble (same architecture) as an EnergyModel; params stacked along a member axis."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"teacher {spec}: no model files given")
    models = [read_fnx(p) for p in paths]
    _check_supported(models[0], paths[0])
    _check_shapes(models[0], paths[0])  # once: the other members must have the same shapes
    reference = _architecture(models[0])
    for path, model in zip(paths[1:], models[1:]):
        if _architecture(model) != reference:
            raise ModelFileError(f"{path}: architecture differs from {paths[0]}; ensemble members must share it")
    from fennol.utils.atomic_units import au

    params = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[m.variables for m in models])
    constants = _constant_terms(models[0])
    scale = float(au.get_multiplier("eV") / au.get_multiplier(models[0].energy_unit))
    # (M, MAX_Z + 1) eV: each member's constant per-element energy; the mean is the reference (float64), and
    # the members' deviations from it (zero for ANI-1x) stay in the jitted energies.
    member_constants = np.array([sum((_constant_table(m, m.variables, t) for t in constants), np.zeros(MAX_Z + 1))
                                 for m in models]) * scale
    model = _with_integer_switches(models[0], [t for t in models[0].energy_terms if t not in constants])
    teacher = FennolTeacher(
        spec=spec,
        cutoff=float(model.preprocessing.layers[0].cutoff),
        elements=_model_elements(model),
        n_members=len(models),
        energy_scale=scale,
        paths=tuple(paths),
        model=model,
        constant_deviation=member_constants - member_constants.mean(axis=0),
    )
    return EnergyModel(name=spec, cutoff=teacher.cutoff, elements=teacher.elements, energies=teacher.member_energies,
                       params=params, reference=ReferenceEnergies(member_constants.mean(axis=0)),
                       n_members=teacher.n_members, capacity_for=teacher.capacity_for, grow=teacher.grow,
                       source=teacher)


# --------------------------------------------------------------------------------------------------
# The teacher


@dataclasses.dataclass(frozen=True)
class FennolTeacher:
    """How a FeNNol model or ensemble computes (its EnergyModel's `energies`, capacities and provenance). Pure
    functions take `params` (from `load_fennol`'s model) explicitly. Equality and hash ignore the arrays and the
    model object."""

    spec: str
    cutoff: float  # Å, of the base graph
    elements: frozenset[int]
    n_members: int
    energy_scale: float  # model energy unit -> eV
    paths: tuple[str, ...] = ()
    model: Any = dataclasses.field(default=None, compare=False, repr=False)  # fennol.FENNIX (first member)
    # (M, MAX_Z + 1) eV: each member's constant per-element energy minus the reference (their mean).
    constant_deviation: Any = dataclasses.field(default=None, compare=False, repr=False)

    # ---- pure, jittable ------------------------------------------------------------------------

    def _inputs(self, batch: Batch) -> dict:
        """FeNNol's input dict for the batch, its base graph made from the Batch's edges.

        Our edge e: receiver i (centre), sender j, vector x[j] - x[i] + shifts[e] @ cell[graph(i)].
        FeNNol's: vector x[edge_dst] - x[edge_src] + pbc_shifts @ cells[batch_index[edge_src]], and padding
        edges have both indices = n_atoms (out of range, so gathers fill and scatters drop) and d12 = cutoff^2.
        Edges at or beyond the teacher's cutoff become padding: FeNNol's switch would zero them anyway
        (GraphProcessor masks distances >= cutoff) but they would cost capacity downstream.
        """
        positions, cell = batch.positions, batch.cell
        n_atoms = positions.shape[0]
        graph_key = self.model.preprocessing.layers[0].graph_key
        offset = jnp.einsum("ek,ekl->el", batch.shifts, cell[batch.graph_index[batch.receivers]], precision=HIGHEST)
        vec = positions[batch.senders] - positions[batch.receivers] + offset
        # d12 only selects edges (GraphFilter); FeNNol's processors recompute distances differentiably.
        d12 = jax.lax.stop_gradient(jnp.sum(vec**2, axis=-1))
        keep = batch.edge_mask & (d12 < self.cutoff**2)
        graph = {
            "edge_src": jnp.where(keep, batch.receivers, n_atoms).astype(jnp.int32),
            "edge_dst": jnp.where(keep, batch.senders, n_atoms).astype(jnp.int32),
            "d12": jnp.where(keep, d12, self.cutoff**2),
            "pbc_shifts": jnp.where(keep[:, None], jnp.round(batch.shifts), 0).astype(jnp.int32),
            "overflow": jnp.asarray(False),
        }
        # Cells for every graph (FeNNol wants all or none): a non-periodic graph has the Batch's identity cell
        # and zero shifts, which adds nothing to its vectors.
        return {
            "species": jnp.where(batch.atom_mask, batch.numbers, 0).astype(jnp.int32),
            "coordinates": positions,
            "natoms": batch.n_atoms.astype(jnp.int32),
            "batch_index": batch.graph_index.astype(jnp.int32),
            "true_atoms": batch.atom_mask,
            "true_sys": batch.graph_mask,
            "cells": cell,
            "reciprocal_cells": batching.cell_inverse(cell),
            graph_key: graph,
        }

    def _preprocess(self, inputs: dict, capacity: FennolCapacity) -> tuple[dict, jax.Array]:
        """FeNNol's remaining preprocessing layers at fixed capacity, and whether any of them overflowed."""
        from fennol.models.preprocessing import GraphAngularExtension

        layers = self.model.preprocessing.layers[1:]
        if len(capacity.layer_states) != len(layers):
            raise ValueError(f"teacher {self.spec}: capacity has {len(capacity.layer_states)} layer states, "
                             f"the model has {len(layers)} preprocessing layers after the graph")
        n_atoms = inputs["species"].shape[0]
        for layer, state in zip(layers, capacity.layer_states):
            if isinstance(layer, GraphAngularExtension):
                # FeNNol's dense (atom, neighbour) table must hold every edge slot of its graph.
                n_edges = inputs[layer.graph_key]["edge_src"].shape[0]
                need = max(int(state["max_neigh"]), -(-n_edges // n_atoms), 1)
                state = FrozenDict({**state, "max_neigh": need})
            inputs = layer.process(state, inputs)
        overflow = jnp.asarray(False)
        for key, value in inputs.items():
            if key.endswith("overflow"):
                overflow = overflow | jnp.asarray(value, bool)
            elif isinstance(value, dict):
                for k, v in value.items():
                    if k.endswith("overflow"):
                        overflow = overflow | jnp.asarray(v, bool)
        return inputs, overflow

    def member_energies(self, params, batch: Batch, capacity: FennolCapacity) -> ModelEnergies:
        """(M, G) energies in eV of every member relative to the reference, and the overflow flag;
        differentiable in batch.positions and batch.cell."""
        def one(variables, deviation):
            _, out = self.model._total_energy_raw(variables, inputs)
            # FeNNol's own sum is a float32 scatter-add; the per-atom energies are summed exactly instead.
            atoms = out["atomic_energies"] * self.energy_scale + deviation[inputs["species"]]
            energy = batching.graph_sum(atoms, batch)
            if isinstance(out.get("system_energies"), jax.Array):
                energy = energy + out["system_energies"] * self.energy_scale
            return energy

        with full_precision_scope():  # FeNNol's products too, not TF32 on GPUs (distiller.precision)
            inputs, overflow = self._preprocess(self._inputs(batch), capacity)
            deviation = jnp.asarray(np.asarray(self.constant_deviation, np.float32))
            energies = jax.vmap(one)(params, deviation)
        return ModelEnergies(jnp.where(batch.graph_mask[None], energies, 0.0), overflow)

    # ---- host side ------------------------------------------------------------------------------

    def _host_inputs(self, batch: Batch) -> dict:
        return jax.tree.map(np.asarray, self._inputs(batch))

    def measure(self, batch: Batch) -> FennolCapacity:
        """What this batch needs, without margin, from FeNNol's own numpy preprocessing (`layer.__call__`)."""
        from fennol.models.preprocessing import GraphAngularExtension, GraphFilter, SpeciesIndexer

        present = set(np.asarray(batch.numbers)[np.asarray(batch.atom_mask)].tolist())
        if present - self.elements:
            unknown = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in sorted(present - self.elements))
            raise ValueError(f"batch contains {unknown}, unknown to teacher {self.spec}; check structures first")
        inputs = self._host_inputs(batch)
        states = []
        for layer in self.model.preprocessing.layers[1:]:
            # Start from empty states that add no margin of FeNNol's own: the result is the exact need.
            if isinstance(layer, GraphFilter):
                state = FrozenDict({"npairs": 1, "nblist_mult_size": 1.0})
            elif isinstance(layer, GraphAngularExtension):
                state = FrozenDict({"nangles": 1, "nblist_mult_size": 1.0, "max_neigh": 1, "add_neigh": 0})
            elif isinstance(layer, SpeciesIndexer):
                state = FrozenDict({"sizes": FrozenDict({}), "add_atoms": 0, "add_atoms_margin": 0})
            else:  # excluded at load time
                raise NotImplementedError(type(layer).__name__)
            state, inputs = layer(state, inputs)
            inputs = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, inputs)
            states.append(_plain(state))
        return FennolCapacity(tuple(states))

    def capacity_for(self, batch: Batch, margin: float = 1.25) -> FennolCapacity:
        """Capacity for this batch (and others like it) with room to spare (outside jit)."""
        from fennol.models.preprocessing import GraphAngularExtension, GraphFilter, SpeciesIndexer

        n_atoms = batch.positions.shape[0]
        needed = self.measure(batch)
        states = []
        for layer, state in zip(self.model.preprocessing.layers[1:], needed.layer_states):
            state = dict(state)
            if isinstance(layer, GraphFilter):
                state["npairs"] = nl.round_up(math.ceil(state["npairs"] * margin))
            elif isinstance(layer, GraphAngularExtension):
                state["nangles"] = nl.round_up(math.ceil(state["nangles"] * margin))
                max_neigh = int(state["max_neigh"])
                state["max_neigh"] = max_neigh + max(2, math.ceil(max_neigh * (margin - 1)))
            elif isinstance(layer, SpeciesIndexer):
                # Every element the model knows gets a slot list (so that a new element overflows rather
                # than being unhandled), sized by its count with margin, never beyond the atom capacity.
                counts = state["sizes"]
                state["sizes"] = FrozenDict({
                    z: min(n_atoms, max(1, math.ceil(counts.get(z, 0) * margin) + 1)) for z in sorted(self.elements)
                })
            states.append(FrozenDict(state))
        return FennolCapacity(tuple(states))

    def grow(self, capacity: FennolCapacity, batch: Batch, margin: float = 1.25) -> FennolCapacity:
        """A capacity that fits `batch` (after an overflow) and everything `capacity` fitted."""
        fresh = self.capacity_for(batch, margin)
        return FennolCapacity(tuple(_merge_states(a, b) for a, b in zip(capacity.layer_states, fresh.layer_states)))
