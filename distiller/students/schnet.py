"""The student: an invariant SchNet-style message-passing network (continuous-filter convolutions).

    h_i^0   = embedding[element(i)]
    h_i^t+1 = h_i^t + Dense(silu(Dense( cfconv(Dense(h^t), r) / avg_neighbours )))_i        (t < layers)
    E_i     = Dense(silu(Dense(h_i^L))) + reference_energy[element(i)]

The network only ever sees interatomic distances, so the energy is exactly invariant under rotations,
reflections, translations and permutations; each cfconv filter is a learned cubic spline of the distance
(see pallas_kernels.cfconv.reference), the envelope in cfconv makes it C2 at the cutoff, and
forces/stress come from differentiating it (see `energy.py`). The module maps a graph (numbers, edge
lengths) to per-atom energies; geometry (positions, cell, strain) stays outside, in `energy.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from distiller.structure import Structure, StructureError
from pallas_kernels import cfconv, check_kernel
from pallas_kernels.cfconv import MIN_BASIS

MAX_Z = 118


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Hyper-parameters of the student (hashable: the Flax module keeps it as a static attribute)."""

    cutoff: float = 5.0  # Å; the neighbour list given to the student must reach at least this far
    features: int = 64
    layers: int = 2  # interaction blocks
    n_rbf: int = 16  # cubic B-splines spanning [0, cutoff] (the filter's radial basis), at least 4
    elements: tuple[int, ...] = (1, 6, 7, 8)  # atomic numbers the student knows (H, C, N, O: ANI-1x's)
    kernel: str = "xla"  # edge kernels (cfconv, edge vectors): "xla" or "pallas", see pallas_kernels.dispatch
    avg_neighbours: float = 10.0  # messages are divided by this fixed constant so initial layers stay O(1)

    def __post_init__(self):
        # Configs also arrive from JSON and `--set`, so normalise and validate here, once.
        elements = tuple(int(z) for z in np.atleast_1d(np.asarray(self.elements)))
        object.__setattr__(self, "elements", elements)
        if not elements or len(set(elements)) != len(elements) or not all(1 <= z <= MAX_Z for z in elements):
            raise ValueError(f"StudentConfig.elements must be distinct atomic numbers in 1..{MAX_Z}, got {elements}")
        if not self.cutoff > 0:
            raise ValueError(f"StudentConfig.cutoff must be positive, got {self.cutoff}")
        if self.features < 1 or self.layers < 0 or self.n_rbf < MIN_BASIS or not self.avg_neighbours > 0:
            raise ValueError(f"invalid StudentConfig sizes: features={self.features}, layers={self.layers}, "
                             f"n_rbf={self.n_rbf}, avg_neighbours={self.avg_neighbours}")
        check_kernel(self.kernel)

    def element_table(self) -> np.ndarray:
        """(MAX_Z + 1,) int32: row of each atomic number in the per-element tables, -1 where unknown."""
        table = np.full(MAX_Z + 1, -1, np.int32)
        table[list(self.elements)] = np.arange(len(self.elements), dtype=np.int32)
        return table


def check(config: StudentConfig, structures: Sequence[Structure]) -> None:
    """Raise StructureError naming the first structure with an element the student does not know."""
    known = set(config.elements)
    for k, s in enumerate(structures):
        unknown = sorted(set(np.asarray(s.numbers).tolist()) - known)
        if unknown:
            raise StructureError(f"{s.name or f'structure {k}'}: elements {unknown} are unknown to the student "
                                 f"(it knows {list(config.elements)})")


class InteractionBlock(nn.Module):
    """SchNet's interaction: atom-wise Dense, continuous-filter convolution, atom-wise MLP, residual."""

    config: StudentConfig

    @nn.compact
    def __call__(self, h, lengths, senders, receivers, edge_mask):
        c = self.config
        # The basis sums to 1 with ~4 nonzero terms of size <= 2/3, so unit-variance coefficients start every
        # filter at about unit size at every r.
        filter_params = {"coefficients": self.param("filter", nn.initializers.normal(1.0), (c.n_rbf, c.features))}
        x = nn.Dense(c.features, use_bias=False, name="in2f")(h)
        x = cfconv(x, lengths, senders, receivers, edge_mask, filter_params, cutoff=c.cutoff, kernel=c.kernel)
        x = x / c.avg_neighbours
        x = nn.Dense(c.features, name="f2out")(x)
        x = nn.Dense(c.features, name="dense")(nn.silu(x))
        return h + x


class SchNet(nn.Module):
    """Graph (numbers, edge lengths) -> per-atom energies in eV; zero on padding atoms.

    An atom with an element outside `config.elements` makes its graph's energy and forces NaN (never a silently
    wrong number); call `check(config, structures)` on the host for a readable error before that can happen.
    """

    config: StudentConfig

    @nn.compact
    def __call__(self, numbers, lengths, senders, receivers, edge_mask, atom_mask):
        c = self.config
        row = jnp.asarray(c.element_table())[numbers]
        known = row >= 0
        row = jnp.maximum(row, 0)
        h = nn.Embed(len(c.elements), c.features, name="embedding")(row)
        for t in range(c.layers):
            h = InteractionBlock(c, name=f"interaction_{t}")(h, lengths, senders, receivers, edge_mask)
        h = nn.silu(nn.Dense(max(c.features // 2, 1), name="readout_hidden")(h))
        e = nn.Dense(1, name="readout")(h)[:, 0]
        reference = self.param("reference_energies", nn.initializers.zeros, (len(c.elements),))
        e = e + reference[row]
        # NaN (by multiplication, so that forces and gradients are NaN too) for real atoms of unknown elements.
        e = e * jnp.where(known | ~atom_mask, 1.0, jnp.nan).astype(e.dtype)
        return jnp.where(atom_mask, e, 0.0)
