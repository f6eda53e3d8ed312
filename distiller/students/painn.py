"""PaiNN: an equivariant message-passing student with scalar and vector (l = 1) features (Schütt et al. 2021).

Each atom carries scalars s_i (F) and vectors v_i (3 × F, zero at the start). Per layer, over edges j -> i with
r̂ = (x_j − x_i)/r and the radial filter W(r) = envelope(r) · spline(r) (the cfconv filter, C2 at the cutoff):

    message:  (a, b, c)_ij = φ(s_j) ⊙ W(r_ij),  split into three F-blocks, φ = Dense(silu(Dense(s)))
              s_i += Σ_j a_ij / n̄                      v_i += Σ_j (b_ij ⊙ v_j + c_ij ⊙ r̂_ij) / n̄
    update:   u, w = U v_i, V v_i (feature mixing, no bias: rotations commute with it)
              (d, e, f) = MLP([s_i, |w|])
              v_i += d ⊙ u                              s_i += e ⊙ <u, w> + f
    energy:   E_i = Dense(silu(Dense(s_i^L))) + offset[element(i)]

With angular_degree > 0 the scalars start from the element embedding plus the atom's angular density
invariants (`distiller.students.angular`: every cos^n of the angles at the atom up to that degree, within
angular_cutoff), so the first message already sees three-body structure sharper than l = 1. That embedding is
plain JAX under either kernel setting.

Scalars only ever meet vectors through norms and dot products, so E is exactly invariant under rotations,
reflections, translations and permutations; forces and stress come from `distiller.derivatives`.

The three message sums are one `directional_cfconv` call over the edge vectors (its reference is the plain-JAX
definition; under kernel="pallas" the whole message is one fused kernel launch per pass, r and r̂ computed per
edge inside it, so the edge vectors' cotangent goes straight to the position gradient). Before the first
message v = 0, so b ⊙ v_j is exactly zero: the first layer passes vectors=None and the kernel skips that term
(its gathers, and in the force pass its cotangent reads and arithmetic) instead of computing zeros.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from distiller.students.angular import AngularEmbedding
from distiller.students.base import MessagePassingConfig, energy_readout, register
from pallas_kernels import directional_cfconv

# |w| = sqrt(|w|² + ε²): smooth at w = 0, where vectors start (sqrt's derivative there is infinite).
NORM_EPSILON = 1e-4


@register
@dataclasses.dataclass(frozen=True)
class PaiNNConfig(MessagePassingConfig):
    layers: int = 3  # message + update blocks
    angular_degree: int = 0  # highest power of cos θ in the angular embedding; 0: no angular embedding
    angular_channels: int = 8  # its radial channels (per neighbour element)
    angular_cutoff: float = 3.5  # Å, at most `cutoff` (ANI-1x's angular terms reach 3.5 Å)
    architecture = "painn"
    min_layers = 1

    def __post_init__(self):
        super().__post_init__()
        # The angular sizes only matter with the embedding on (a short-cutoff PaiNN keeps the default 3.5 Å).
        if self.angular_degree < 0 or self.angular_degree and (self.angular_channels < 1
                                                               or not 0 < self.angular_cutoff <= self.cutoff):
            raise ValueError(f"invalid PaiNNConfig angular embedding: angular_degree={self.angular_degree} (at "
                             f"least 0), angular_channels={self.angular_channels} (at least 1), angular_cutoff="
                             f"{self.angular_cutoff} (in (0, cutoff={self.cutoff}])")

    def network(self) -> nn.Module:
        return PaiNN(self)


def _norm(v: jax.Array) -> jax.Array:
    """(A, 3, F) -> (A, F): smooth vector norms (NORM_EPSILON)."""
    return jnp.sqrt(jnp.sum(v * v, axis=1) + NORM_EPSILON**2)


class Message(nn.Module):
    config: PaiNNConfig

    @nn.compact
    def __call__(self, s, v, vectors, senders, receivers, edge_mask):
        c = self.config
        F = c.features
        phi = nn.Dense(3 * F, name="phi_out")(nn.silu(nn.Dense(F, name="phi_hidden")(s)))
        phi_s, phi_v, phi_r = jnp.split(phi, 3, axis=-1)
        coefficients = self.param("filter", nn.initializers.normal(1.0), (c.n_rbf, 3, F))
        # (a, b, c) = φ ⊙ W: a on φ_s, b on φ_v ⊙ v_j (the three components sharing b's filter), c along r̂.
        # Before the first message v = 0, passed as None: b's term is exactly zero, so it is not computed at all.
        u = None if v is None else phi_v[:, None, :] * v
        ds, dv = directional_cfconv(phi_s, u, phi_r, vectors, senders, receivers, edge_mask,
                                    {"coefficients": coefficients}, cutoff=c.cutoff, kernel=c.kernel)
        dv = dv / c.avg_neighbours
        return s + ds / c.avg_neighbours, dv if v is None else v + dv


class Update(nn.Module):
    config: PaiNNConfig

    @nn.compact
    def __call__(self, s, v):
        F = self.config.features
        u = nn.Dense(F, use_bias=False, name="U")(v)
        w = nn.Dense(F, use_bias=False, name="V")(v)
        a = nn.Dense(3 * F, name="out")(nn.silu(nn.Dense(F, name="hidden")(jnp.concatenate([s, _norm(w)], -1))))
        a_vv, a_sv, a_ss = jnp.split(a, 3, axis=-1)
        return s + a_sv * jnp.sum(u * w, axis=1) + a_ss, v + a_vv[:, None, :] * u


class PaiNN(nn.Module):
    """(species, edge vectors, graph) -> per-atom energies in eV (distiller.students.base's interface)."""

    config: PaiNNConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask, atom_mask):
        c = self.config
        s = nn.Embed(len(c.elements), c.features, name="embedding")(species)
        if c.angular_degree:
            s = s + AngularEmbedding(c.angular_degree, c.angular_channels, c.angular_cutoff, c.n_rbf,
                                     len(c.elements), c.features, c.avg_neighbours, name="angular")(
                species, vectors, senders, receivers, edge_mask)
        v = None  # vectors start at 0: None lets the first message skip their (exactly zero) term
        for t in range(c.layers):
            s, v = Message(c, name=f"message_{t}")(s, v, vectors, senders, receivers, edge_mask)
            s, v = Update(c, name=f"update_{t}")(s, v)
        return energy_readout(self, s, species, len(c.elements))
