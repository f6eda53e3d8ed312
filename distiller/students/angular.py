"""Angular density invariants: a three-body embedding of each atom's neighbourhood, linear in its neighbours.

Per atom i, over edges j -> i within `cutoff` (r = r_ij, r̂ = r̂_ij), C radial channels that depend on the
neighbour's element, w_c(r, z_j) = envelope(r) · spline(r) @ coefficients[z_j, :, c], give the densities

    A_i[c, (a, b, k)] = Σ_j w_c(r, z_j) · sqrt(n! / (a! b! k!)) · x̂^a ŷ^b ẑ^k        (a + b + k = n ≤ degree)

and their rotation-invariant contractions, degree by degree,

    B_i[n, c, c'] = Σ_{a+b+k=n} A_i[c, abk] A_i[c', abk] = Σ_{j,k} w_c(r_ij) w_c'(r_ik) (r̂_ij · r̂_ik)^n.

So B holds every power cos^n θ_jik of the angles at i up to `degree`, weighted by the two distances: ANI's
angular terms (its teacher resolves angles with (1 + cos(θ − θ_s))^32 / 2^31, eight sections), but summed as
densities, so the cost is per edge and not per pair of edges. (r̂ · r̂')^n is the multinomial expansion of the
monomials' dot product, which is why the weights are sqrt(multinomial): no spherical harmonics are needed.

Why: PaiNN's vectors are l = 1, so one message sees an angle only as cos θ; in water 97 % of its squared force
error is within molecules (bench/results/force-parts-cpu-water.json), where the environment bends and stretches
each O–H. This embedding gives the first layer sharper angles to start from. B is invariant under rotations,
reflections, translations and permutations, smooth (C2) at the cutoff, and finite with finite derivatives of
any order (padding edges are masked before their unit vector is formed).

Cost: only the two highest degrees are summed over edges, (degree + 1)² monomials per edge and channel instead of
all (degree + 1)(degree + 2)(degree + 3)/6 (49 against 84 at degree 6). On the unit sphere a monomial of degree
n − 2 is the sum of three of degree n (x̂^a ŷ^b ẑ^k = x̂^a ŷ^b ẑ^k (x̂² + ŷ² + ẑ²)), so the lower degrees' densities
are fixed linear maps of the higher ones (`lowering_matrix`), applied per atom, not per edge.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cfconv.reference import envelope, spline_basis
from pallas_kernels.directional_cfconv.reference import edge_lengths_and_units


def degree_exponents(n: int) -> np.ndarray:
    """(M_n, 3) int: every (a, b, k) with a + b + k = n."""
    return np.array([(a, n - a - b, b) for a in range(n, -1, -1) for b in range(n - a + 1)], np.int32)


def monomial_exponents(degree: int) -> np.ndarray:
    """(M, 3) int: `degree_exponents(n)` for n = 0..degree, in that order."""
    return np.concatenate([degree_exponents(n) for n in range(degree + 1)])


def monomial_weights(exponents: np.ndarray) -> np.ndarray:
    """(M,) sqrt(n! / (a! b! k!)): Σ over one degree of the weighted monomials' products is (r̂ · r̂')^n."""
    return np.array([math.sqrt(math.factorial(sum(e)) / math.prod(math.factorial(int(x)) for x in e))
                     for e in exponents])


def lowering_matrix(n: int) -> np.ndarray:
    """(M_{n-2}, M_n): the weighted monomials of degree n − 2 as combinations of those of degree n, exact for unit
    vectors (monomial x^e = Σ_d x^(e + 2 d) for d = x, y, z; weights as `monomial_weights`)."""
    lower, upper = degree_exponents(n - 2), degree_exponents(n)
    column = {tuple(e): k for k, e in enumerate(upper)}
    w_lower, w_upper = monomial_weights(lower), monomial_weights(upper)
    out = np.zeros((len(lower), len(upper)))
    for row, e in enumerate(lower):
        for d in np.eye(3, dtype=np.int32):
            k = column[tuple(e + 2 * d)]
            out[row, k] = w_lower[row] / w_upper[k]
    return out


def monomials(units: jax.Array, degree: int, lowest: int = 0) -> jax.Array:
    """(E, 3) unit vectors -> (E, M) weighted monomials of `monomial_exponents(degree)`, of degrees >= lowest."""
    exponents = monomial_exponents(degree)
    exponents = exponents[exponents.sum(axis=1) >= lowest]
    # Powers by repeated products (not x**0, whose derivative at x = 0 is 0 · x^-1).
    powers = [jnp.ones_like(units)]
    for _ in range(degree):
        powers.append(powers[-1] * units)
    powers = jnp.stack(powers, axis=-1)  # (E, 3, degree + 1)
    columns = [powers[:, 0, a] * powers[:, 1, b] * powers[:, 2, k] for a, b, k in exponents]
    return jnp.stack(columns, axis=-1) * jnp.asarray(monomial_weights(exponents), units.dtype)


def degree_size(n: int) -> int:
    """How many monomials of degree n: (n + 1)(n + 2) / 2."""
    return (n + 1) * (n + 2) // 2


def all_degrees(top: jax.Array, degree: int) -> jax.Array:
    """(..., M) densities of degrees degree − 1 and degree (`monomials(units, degree, degree - 1)`) -> those of
    every degree 0..degree, in `monomial_exponents(degree)`'s order (`lowering_matrix`)."""
    low = max(degree - 1, 0)
    blocks = {low: top[..., :degree_size(low)], degree: top[..., top.shape[-1] - degree_size(degree):]}
    for n in range(degree, 1, -1):
        blocks[n - 2] = blocks[n] @ jnp.asarray(lowering_matrix(n).T, top.dtype)
    return jnp.concatenate([blocks[n] for n in range(degree + 1)], axis=-1)


def angular_invariants(densities: jax.Array, degree: int) -> jax.Array:
    """(A, C, M) densities -> (A, (degree + 1) · C (C + 1) / 2) invariants B[n, c, c'] for c <= c'."""
    upper = np.triu_indices(densities.shape[1])
    blocks, start = [], 0
    for n in range(degree + 1):
        block = densities[:, :, start:start + degree_size(n)]
        blocks.append(jnp.einsum("acm,adm->acd", block, block)[:, upper[0], upper[1]])
        start += degree_size(n)
    return jnp.concatenate(blocks, axis=-1)


class AngularEmbedding(nn.Module):
    """(species, edge vectors, graph) -> (A, features): each atom's angular invariants through a small MLP."""

    degree: int
    channels: int
    cutoff: float
    n_rbf: int
    n_elements: int
    features: int
    avg_neighbours: float

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask):
        lengths, units = edge_lengths_and_units(vectors, edge_mask)
        coefficients = self.param("radial", nn.initializers.normal(1.0), (self.n_elements, self.n_rbf, self.channels))
        basis = spline_basis(lengths, self.cutoff, self.n_rbf) * envelope(lengths, self.cutoff)[:, None]  # (E, K)
        by_element = jnp.einsum("ek,zkc->ezc", basis, coefficients)  # (E, Z, C): Z is small, a gather is not
        weights = jnp.take_along_axis(by_element, species[senders][:, None, None], axis=1)[:, 0]  # (E, C)
        # / sqrt(n̄), not / n̄: B is quadratic in the densities, and with / n̄ its entries were ~0.01 on water
        # (most neighbours within 3.5 Å sit where the envelope is small). A student built so trained worse than
        # plain PaiNN (bench/water_variants.py, watertiny: per-atom energy errors of 35-55 meV at steps 200-300,
        # against 13-28 without the embedding); with / sqrt(n̄), 20 meV at step 300 and 3 at 800.
        weights = jnp.where(edge_mask[:, None], weights, 0.0) / jnp.sqrt(self.avg_neighbours)
        top = monomials(units, self.degree, max(self.degree - 1, 0))  # (E, (degree + 1)²): the two highest degrees
        terms = weights[:, :, None] * top[:, None, :]  # (E, C, (degree + 1)²)
        densities = all_degrees(jax.ops.segment_sum(terms, receivers, num_segments=species.shape[0]), self.degree)
        b = angular_invariants(densities, self.degree)
        # Zero output weights at the start: the student begins as plain PaiNN and takes the angles in as they help.
        hidden = nn.silu(nn.Dense(self.features, name="hidden")(b))
        return nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="out")(hidden)
