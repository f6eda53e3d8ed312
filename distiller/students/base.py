"""What every student architecture shares: its config's common part, and how a network becomes an energy model.

An architecture is a Flax module over edge vectors,

    network(species, vectors, senders, receivers, edge_mask, atom_mask) -> (A,) per-atom energies in eV

(species: row of each atom's element in `config.elements`; vectors: (E, 3) x[sender] − x[receiver] + shift·cell,
zero on padding edges; energies relative to the student's reference energies, zero on padding atoms), and a
frozen config subclassing `StudentConfig` whose `network()` builds it. Geometry (positions, cells, strain) stays
outside the network, so every architecture gets forces and stress from `distiller.derivatives`, and exact
per-graph sums from `batch.graph_sum`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distiller.batch import Batch, graph_sum
from distiller.model import EnergyModel, ModelEnergies
from distiller.precision import full_precision_scope
from distiller.reference import MAX_Z, ZERO, ReferenceEnergies
from pallas_kernels import check_kernel
from pallas_kernels.cfconv import MIN_BASIS


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The fields every student has; architectures subclass it with their own (all hashable: Flax modules keep
    their config as a static attribute). `architecture` is the registered name, stored in config.json."""

    cutoff: float = 5.0  # Å; the neighbour list given to the student must reach at least this far
    elements: tuple[int, ...] = (1, 6, 7, 8)  # atomic numbers the student knows (H, C, N, O: ANI-1x's)
    kernel: str = "xla"  # edge kernels: "xla" or "pallas" (pallas_kernels.dispatch)
    architecture: ClassVar[str] = ""

    def __post_init__(self):
        # Configs also arrive from JSON and `--set`, so normalise and validate here, once.
        elements = tuple(int(z) for z in np.atleast_1d(np.asarray(self.elements)))
        object.__setattr__(self, "elements", elements)
        if not elements or len(set(elements)) != len(elements) or not all(1 <= z <= MAX_Z for z in elements):
            raise ValueError(f"{type(self).__name__}.elements must be distinct atomic numbers in 1..{MAX_Z}, got "
                             f"{elements}")
        if not self.cutoff > 0:
            raise ValueError(f"{type(self).__name__}.cutoff must be positive, got {self.cutoff}")
        check_kernel(self.kernel)

    def network(self) -> nn.Module:
        """The architecture's Flax module for this config."""
        raise NotImplementedError(f"{type(self).__name__} is not a student architecture (subclass StudentConfig)")

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    def element_table(self) -> np.ndarray:
        """(MAX_Z + 1,) int32: row of each atomic number in the per-element tables, -1 where unknown."""
        table = np.full(MAX_Z + 1, -1, np.int32)
        table[list(self.elements)] = np.arange(len(self.elements), dtype=np.int32)
        return table


@dataclasses.dataclass(frozen=True)
class MessagePassingConfig(StudentConfig):
    """The sizes every message-passing architecture here has (SchNet, PaiNN): atom features, layers, the radial
    filter's spline functions and the fixed message normalisation."""

    features: int = 64
    layers: int = 2  # interaction blocks
    n_rbf: int = 16  # cubic B-splines spanning [0, cutoff] (the filter's radial basis), at least 4
    avg_neighbours: float = 10.0  # messages are divided by this fixed constant so initial layers stay O(1)
    min_layers: ClassVar[int] = 0

    def __post_init__(self):
        super().__post_init__()
        if (self.features < 1 or self.layers < self.min_layers or self.n_rbf < MIN_BASIS
                or not self.avg_neighbours > 0):
            raise ValueError(f"invalid {type(self).__name__} sizes: features={self.features}, layers={self.layers} "
                             f"(at least {self.min_layers}), n_rbf={self.n_rbf} (at least {MIN_BASIS}), "
                             f"avg_neighbours={self.avg_neighbours}")


def energy_readout(module: nn.Module, h: jax.Array, species: jax.Array, n_elements: int) -> jax.Array:
    """(A, F) features -> (A,) per-atom energies: Dense(silu(Dense(h))) plus a learned per-element offset on top of
    the fitted reference energies (small: float32 is exact enough). Called inside `module`'s compact method, whose
    parameters it adds (readout_hidden, readout, element_offsets)."""
    hidden = nn.silu(nn.Dense(max(h.shape[-1] // 2, 1), name="readout_hidden")(h))
    offset = module.param("element_offsets", nn.initializers.zeros, (n_elements,))
    return nn.Dense(1, name="readout")(hidden)[:, 0] + offset[species]


_ARCHITECTURES: dict[str, type[StudentConfig]] = {}


def register(config_class: type[StudentConfig]) -> type[StudentConfig]:
    """Class decorator: make `config_class.architecture` a student architecture (for config.json and --set)."""
    if not issubclass(config_class, StudentConfig) or not config_class.architecture:
        raise TypeError(f"{config_class.__name__}: a student architecture is a StudentConfig subclass with a name")
    _ARCHITECTURES[config_class.architecture] = config_class
    return config_class


def edge_lengths(vectors: jax.Array, edge_mask: jax.Array) -> jax.Array:
    """|v| on real edges, 0 on padding edges, with finite gradients everywhere.

    Padding edges join an atom to itself (v = 0), where d|v|/dv is 0/0; the where-before-sqrt keeps that
    NaN out of the backward pass (a where after the sqrt would still multiply 0 by NaN).
    """
    d2 = jnp.sum(vectors**2, axis=-1)
    safe = jnp.where(edge_mask, d2, 1.0)
    return jnp.where(edge_mask, jnp.sqrt(safe), 0.0)


def _network_inputs(config: StudentConfig, batch: Batch):
    """(species, known): each atom's element row (0 where unknown) and whether its element is known."""
    row = jnp.asarray(config.element_table())[batch.numbers]
    return jnp.maximum(row, 0), row >= 0


def atom_energies(config: StudentConfig, params: Any, batch: Batch) -> jax.Array:
    """(A,) per-atom energies in eV relative to the reference, 0 on padding atoms.

    A real atom of an element outside `config.elements` gets NaN (by multiplication, so that its graph's forces
    and gradients are NaN too: never a silently wrong number); `EnergyModel.check` refuses such structures on
    the host first."""
    species, known = _network_inputs(config, batch)
    vectors = batch.edge_vectors(kernel=config.kernel)
    with full_precision_scope():  # not TF32 on GPUs (distiller.precision)
        e = config.network().apply(params, species, vectors, batch.senders, batch.receivers, batch.edge_mask,
                                   batch.atom_mask)
    e = e * jnp.where(known | ~batch.atom_mask, 1.0, jnp.nan).astype(e.dtype)
    return jnp.where(batch.atom_mask, e, 0.0)


def student_model(config: StudentConfig, params: Any = None, reference: ReferenceEnergies = ZERO,
                  name: str = "student") -> EnergyModel:
    """The student as an EnergyModel (no capacities of its own). `params` may be None where the caller passes
    them to `energies` (training)."""
    def energies(params, batch: Batch, capacity=None) -> ModelEnergies:
        return ModelEnergies(graph_sum(atom_energies(config, params, batch), batch)[None], jnp.asarray(False))

    return EnergyModel(name=name, cutoff=float(config.cutoff), elements=frozenset(config.elements),
                       energies=energies, params=params, reference=reference, source=config)


def init_params(config: StudentConfig, key: jax.Array, batch: Batch) -> Any:
    """Random parameters for `config` (shapes from `batch`, a batch with edges)."""
    species, _ = _network_inputs(config, batch)
    vectors = batch.edge_vectors(kernel=config.kernel)
    # jit: one compilation instead of hundreds of eager dispatches.
    return jax.jit(config.network().init)(key, species, vectors, batch.senders, batch.receivers, batch.edge_mask,
                                          batch.atom_mask)
