"""SchNet: an invariant message-passing student (continuous-filter convolutions), the fastest architecture.

    h_i^0   = embedding[element(i)]
    h_i^t+1 = h_i^t + Dense(silu(Dense( cfconv(Dense(h^t), r) / avg_neighbours )))_i        (t < layers)
    E_i     = Dense(silu(Dense(h_i^L))) + offset[element(i)]

The network only ever sees interatomic distances, so the energy is exactly invariant under rotations,
reflections, translations and permutations; each cfconv filter is a learned cubic spline of the distance
(see pallas_kernels.cfconv.reference), and the envelope in cfconv makes it C2 at the cutoff.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from distiller.students.base import StudentConfig, edge_lengths, register
from pallas_kernels import cfconv
from pallas_kernels.cfconv import MIN_BASIS


@register
@dataclasses.dataclass(frozen=True)
class SchNetConfig(StudentConfig):
    features: int = 64
    layers: int = 2  # interaction blocks
    n_rbf: int = 16  # cubic B-splines spanning [0, cutoff] (the filter's radial basis), at least 4
    avg_neighbours: float = 10.0  # messages are divided by this fixed constant so initial layers stay O(1)
    architecture = "schnet"

    def __post_init__(self):
        super().__post_init__()
        if self.features < 1 or self.layers < 0 or self.n_rbf < MIN_BASIS or not self.avg_neighbours > 0:
            raise ValueError(f"invalid SchNetConfig sizes: features={self.features}, layers={self.layers}, "
                             f"n_rbf={self.n_rbf} (at least {MIN_BASIS}), avg_neighbours={self.avg_neighbours}")

    def network(self) -> nn.Module:
        return SchNet(self)


class InteractionBlock(nn.Module):
    """SchNet's interaction: atom-wise Dense, continuous-filter convolution, atom-wise MLP, residual."""

    config: SchNetConfig

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
    """(species, edge vectors, graph) -> per-atom energies in eV (distiller.students.base's interface)."""

    config: SchNetConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask, atom_mask):
        c = self.config
        lengths = edge_lengths(vectors, edge_mask)
        h = nn.Embed(len(c.elements), c.features, name="embedding")(species)
        for t in range(c.layers):
            h = InteractionBlock(c, name=f"interaction_{t}")(h, lengths, senders, receivers, edge_mask)
        h = nn.silu(nn.Dense(max(c.features // 2, 1), name="readout_hidden")(h))
        # A learned per-element correction to the fitted reference energies (small: float32 is exact enough).
        offset = self.param("element_offsets", nn.initializers.zeros, (len(c.elements),))
        return nn.Dense(1, name="readout")(h)[:, 0] + offset[species]
