"""Loss terms: small objects over named targets, each comparing the student's predictions with the labels.

A term names its `target`: a field of both `distiller.derivatives.Predictions` (what the student computes) and
`Batch` (the labels, energies relative to the student's reference energies). It returns its mean-square error
and the metrics it reports; the loss is Σ weight · term, a weight being a `Ramp` over the run (constant unless
the LossConfig gives its final value). A new term (e.g. on Hessian-vector products) is one
class here and one line in `loss_terms` (as `HessianVectorProducts` is).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from distiller.batch import Batch
from distiller.config import LossConfig
from distiller.derivatives import Predictions
from distiller.train.schedules import Ramp


@dataclasses.dataclass(frozen=True)
class EnergyPerAtom:
    """Mean over graphs of the squared energy error per atom, (eV/atom)²."""

    weight: Ramp
    target: ClassVar[str] = "energy"

    def __call__(self, predicted: Predictions, batch: Batch) -> tuple[jax.Array, dict]:
        graphs = batch.graph_mask.astype(predicted.energy.dtype)
        per_atom = (predicted.energy - batch.energy) / jnp.maximum(batch.n_atoms, 1)
        mse = jnp.sum(graphs * per_atom**2) / jnp.maximum(graphs.sum(), 1.0)
        return mse, {"energy_rmse_per_atom": jnp.sqrt(mse)}


@dataclasses.dataclass(frozen=True)
class Forces:
    """Mean over atoms and components of the squared force error, (eV/Å)²."""

    weight: Ramp
    target: ClassVar[str] = "forces"

    def __call__(self, predicted: Predictions, batch: Batch) -> tuple[jax.Array, dict]:
        atoms = batch.atom_mask.astype(predicted.forces.dtype)[:, None]
        n = 3.0 * jnp.maximum(jnp.sum(atoms), 1.0)
        error = (predicted.forces - batch.forces) * atoms
        mse = jnp.sum(error**2) / n
        retained = 1.0 - jnp.sqrt(jnp.sum(error**2) / jnp.maximum(jnp.sum((batch.forces * atoms) ** 2), 1e-12))
        return mse, {"forces_rmse": jnp.sqrt(mse), "forces_mae": jnp.sum(jnp.abs(error)) / n,
                     "accuracy_retained": retained}


@dataclasses.dataclass(frozen=True)
class Stress:
    """Mean over labelled graphs (periodic cells whose teacher gave a stress) and components, (eV/Å³)²."""

    weight: Ramp
    target: ClassVar[str] = "stress"

    def __call__(self, predicted: Predictions, batch: Batch) -> tuple[jax.Array, dict]:
        labelled = (batch.stress_mask & batch.graph_mask).astype(predicted.stress.dtype)
        squared = labelled[:, None, None] * (predicted.stress - batch.stress) ** 2
        mse = jnp.sum(squared) / jnp.maximum(9.0 * labelled.sum(), 1.0)
        return mse, {"stress_rmse": jnp.sqrt(mse)}


@dataclasses.dataclass(frozen=True)
class HessianVectorProducts:
    """Mean over atoms and components of the squared error of H·v along the batch's random unit directions (one
    per structure, new every step), (eV/Å²)²: the teacher's curvature, which energies and forces only sample
    at points. Online, the teacher's H·v is computed in the step along a new direction; offline, it is one of the
    K products stored with the structure (`distiller label --hvp K`), picked by the step's key."""

    weight: Ramp
    target: ClassVar[str] = "hvp"

    def __call__(self, predicted: Predictions, batch: Batch) -> tuple[jax.Array, dict]:
        atoms = batch.atom_mask.astype(predicted.hvp.dtype)[:, None]
        error = (predicted.hvp - batch.hvp) * atoms
        mse = jnp.sum(error**2) / (3.0 * jnp.maximum(jnp.sum(atoms), 1.0))
        return mse, {"hvp_rmse": jnp.sqrt(mse)}


def loss_terms(config: LossConfig) -> tuple:
    """The terms an experiment's LossConfig asks for. Energy and forces always (their metrics are the run's
    record, whatever their weights); stress and H·v only when weighed at some step (they cost derivatives)."""
    weight = lambda name: Ramp(getattr(config, f"{name}_weight"), getattr(config, f"{name}_weight_final"),
                               config.weight_ramp)
    terms = [EnergyPerAtom(weight("energy")), Forces(weight("forces"))]
    if config.weighs("stress"):
        terms.append(Stress(weight("stress")))
    if config.weighs("hvp"):
        terms.append(HessianVectorProducts(weight("hvp")))
    return tuple(terms)


def needs_stress(terms) -> bool:
    return any(term.target == "stress" for term in terms)


def needs_hvp(terms) -> bool:
    return any(term.target == "hvp" for term in terms)


def total_loss(terms, predicted: Predictions, batch: Batch, fraction=0.0) -> tuple[jax.Array, dict]:
    """(Σ weight · term at `fraction` (step / steps) of the run, every term's metrics, "loss" and the weights
    that ramp, as `<target>_weight`)."""
    loss, metrics = 0.0, {}
    for term in terms:
        value, reported = term(predicted, batch)
        weight = term.weight.at(fraction)
        loss = loss + weight * value
        metrics.update(reported)
        if term.weight.ramps:
            metrics[f"{term.target}_weight"] = weight
    metrics["loss"] = loss
    return loss, metrics
