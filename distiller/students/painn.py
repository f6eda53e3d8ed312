"""PaiNN: an equivariant message-passing student with scalar and vector (l = 1) features (Schütt et al. 2021).

Each atom carries scalars s_i (F) and vectors v_i (3 × F, zero at the start). Per layer, over edges j -> i with
r̂ = (x_j − x_i)/r and the radial filter W(r) = envelope(r) · spline(r) (the cfconv filter, C2 at the cutoff):

    message:  (a, b, c)_ij = φ(s_j) ⊙ W(r_ij),  split into three F-blocks, φ = Dense(silu(Dense(s)))
              s_i += Σ_j a_ij / n̄                      v_i += Σ_j (b_ij ⊙ v_j + c_ij ⊙ r̂_ij) / n̄
    update:   u, w = U v_i, V v_i (feature mixing, no bias: rotations commute with it)
              (d, e, f) = MLP([s_i, |w|])
              v_i += d ⊙ u                              s_i += e ⊙ <u, w> + f
    energy:   E_i = Dense(silu(Dense(s_i^L))) + offset[element(i)]

Scalars only ever meet vectors through norms and dot products, so E is exactly invariant under rotations,
reflections, translations and permutations; forces and stress come from `distiller.derivatives`.

Two of the three message sums (a and b ⊙ v_j) are continuous-filter convolutions of per-atom features, so they
run as one `cfconv` call (the fused Pallas kernel under kernel="pallas"); the direction term c ⊙ r̂ depends on
the edge, not only on the sender, and stays a plain-JAX gather and segment sum.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from distiller.students.base import MessagePassingConfig, edge_lengths, energy_readout, register
from pallas_kernels import cfconv
from pallas_kernels.cfconv import envelope, radial_filter

# |w| = sqrt(|w|² + ε²): smooth at w = 0, where vectors start (sqrt's derivative there is infinite).
NORM_EPSILON = 1e-4


@register
@dataclasses.dataclass(frozen=True)
class PaiNNConfig(MessagePassingConfig):
    layers: int = 3  # message + update blocks
    architecture = "painn"
    min_layers = 1

    def network(self) -> nn.Module:
        return PaiNN(self)


def _norm(v: jax.Array) -> jax.Array:
    """(A, 3, F) -> (A, F): smooth vector norms (NORM_EPSILON)."""
    return jnp.sqrt(jnp.sum(v * v, axis=1) + NORM_EPSILON**2)


class Message(nn.Module):
    config: PaiNNConfig

    @nn.compact
    def __call__(self, s, v, lengths, unit, senders, receivers, edge_mask):
        c, n_atoms = self.config, s.shape[0]
        F = c.features
        phi = nn.Dense(3 * F, name="phi_out")(nn.silu(nn.Dense(F, name="phi_hidden")(s)))
        phi_s, phi_v, phi_r = jnp.split(phi, 3, axis=-1)
        coefficients = self.param("filter", nn.initializers.normal(1.0), (c.n_rbf, 3, F))
        # a and b ⊙ v_j: one cfconv over [φ_s, φ_v v_x, φ_v v_y, φ_v v_z], the vector components sharing b's filter.
        x = jnp.concatenate([phi_s, (phi_v[:, None, :] * v).reshape(n_atoms, 3 * F)], axis=-1)
        conv_filter = {"coefficients": jnp.concatenate([coefficients[:, 0]] + [coefficients[:, 1]] * 3, axis=-1)}
        conv = cfconv(x, lengths, senders, receivers, edge_mask, conv_filter, cutoff=c.cutoff, kernel=c.kernel)
        ds, dv = conv[:, :F], conv[:, F:].reshape(n_atoms, 3, F)
        # c ⊙ r̂: the filter times the sender's features, along the edge's direction.
        weight = envelope(lengths, c.cutoff)[:, None] * radial_filter(lengths, {"coefficients": coefficients[:, 2]},
                                                                      c.cutoff)
        along = jnp.where(edge_mask[:, None], weight * phi_r[senders], 0.0)[:, None, :] * unit[:, :, None]
        dv = dv + jax.ops.segment_sum(along, receivers, num_segments=n_atoms)
        return s + ds / c.avg_neighbours, v + dv / c.avg_neighbours


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
        lengths = edge_lengths(vectors, edge_mask)
        unit = vectors / jnp.where(edge_mask, lengths, 1.0)[:, None]  # 0 on padding edges (v = 0 there)
        s = nn.Embed(len(c.elements), c.features, name="embedding")(species)
        v = jnp.zeros((s.shape[0], 3, c.features), s.dtype)
        for t in range(c.layers):
            s, v = Message(c, name=f"message_{t}")(s, v, lengths, unit, senders, receivers, edge_mask)
            s, v = Update(c, name=f"update_{t}")(s, v)
        return energy_readout(self, s, species, len(c.elements))
