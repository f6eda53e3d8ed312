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

from distiller.students.base import MessagePassingConfig, edge_lengths, energy_readout, register
from pallas_kernels import cfconv


@register
@dataclasses.dataclass(frozen=True)
class SchNetConfig(MessagePassingConfig):
    architecture = "schnet"

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
        return energy_readout(self, h, species, len(c.elements))
