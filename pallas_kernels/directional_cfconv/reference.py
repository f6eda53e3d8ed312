"""PaiNN's message, in plain JAX: continuous-filter convolutions of scalar and vector features plus the term
along the edge direction. The definition every kernel must match.

    directional_cfconv_reference(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask,
                                 filter_params, *, cutoff) -> (out_scalars (A, F), out_vectors (A, 3, F))

Per real edge e = j -> i, with r = |edge_vectors[e]|, r̂ = edge_vectors[e] / r and three radial filters
W_k(r) = envelope(r) * (spline_basis(r) @ coefficients[:, k]) (cfconv's filter, `cfconv.reference`):

    out_scalars[i]    += W_0(r) * scalars[j]
    out_vectors[i, d] += W_1(r) * vectors[j, d] + W_2(r) * along[j] * r̂_d          (d = x, y, z)

vectors=None means all vector inputs are zero (PaiNN's first layer, before any message): the W_1 term is
then left out, not computed from zeros, and kernels neither read those rows nor do that arithmetic.

Why edge vectors, not lengths and unit vectors: r and r̂ are both functions of the one (E, 3) input, so the
kernel computes them per edge and its derivative is the edge vectors' cotangent itself, which goes straight
into the position gradient (`edge_difference`'s transpose); with lengths and unit vectors as two inputs,
their cotangents would have to be combined into the vectors' by E-sized XLA arrays on every force pass.

Why one operation for all three sums: they share the edge, its radial basis and envelope, and the sender's
rows, so one pass over the edges does them all (one kernel launch per pass for the whole message, each
sender's row gathered once, no (E, F) array written).

This reference is the computation PaiNN did before the kernel existed, op for op: a cfconv over
[scalars, vectors_x, vectors_y, vectors_z] (the vector components sharing W_1) and a gather and segment sum
for the direction term, so a PaiNN student's numbers under kernel="xla" did not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cfconv.reference import cfconv_reference, envelope, radial_filter


def edge_lengths_and_units(edge_vectors: jax.Array, edge_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(E, 3) -> lengths (E,) and unit vectors (E, 3), both 0 on padding edges, with finite gradients there.

    Padding edges join an atom to itself (v = 0), where d|v|/dv is 0/0: the where-before-sqrt keeps that NaN
    out of the backward pass (the same as `distiller.students.base.edge_lengths`).
    """
    d2 = jnp.sum(edge_vectors**2, axis=-1)
    lengths = jnp.where(edge_mask, jnp.sqrt(jnp.where(edge_mask, d2, 1.0)), 0.0)
    return lengths, edge_vectors / jnp.where(edge_mask, lengths, 1.0)[:, None]


def check_shapes(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params) -> None:
    """ValueError naming the argument whose shape does not fit the others (before any work)."""
    if scalars.ndim != 2:
        raise ValueError(f"scalars must be (atoms, features), got {scalars.shape}")
    n_atoms, n_features = scalars.shape
    coefficients = filter_params["coefficients"]
    for name, x, shape in (("vectors", vectors, (n_atoms, 3, n_features)), ("along", along, (n_atoms, n_features)),
                           ("edge_vectors", edge_vectors, (edge_mask.shape[0], 3)),
                           ("senders", senders, edge_mask.shape), ("receivers", receivers, edge_mask.shape),
                           ("filter coefficients", coefficients, (coefficients.shape[0], 3, n_features))):
        if name == "vectors" and x is None:  # all zero: no array to check
            continue
        if x.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} to match scalars {scalars.shape} and "
                             f"edge_mask {edge_mask.shape}, got {x.shape}")


def directional_cfconv_reference(scalars: jax.Array, vectors: jax.Array | None, along: jax.Array,
                                 edge_vectors: jax.Array, senders: jax.Array, receivers: jax.Array,
                                 edge_mask: jax.Array, filter_params: dict, *, cutoff: float
                                 ) -> tuple[jax.Array, jax.Array]:
    """PaiNN's three message sums over a padded edge list (the reference for every kernel).

    Args:
      scalars: (A, F) float32, per-atom features convolved into the scalar output (filter 0).
      vectors: (A, 3, F), per-atom vector features convolved component by component (filter 1); None when
        they are all zero (the W_1 term is left out; coefficients[:, 1] is then unused, its gradient 0).
      along: (A, F), per-atom features sent along the edge direction (filter 2).
      edge_vectors: (E, 3) in Å, x[sender] - x[receiver] (+ cell shift). Padding edges may hold anything
        finite (the student gives them 0); edges at or beyond `cutoff` contribute exactly 0.
      senders, receivers: (E,) int32; edge e carries atom senders[e]'s rows to atom receivers[e]. Kernels may
        rely on distiller's neighbour-list layout (`dispatch.py`); this reference does not.
      edge_mask: (E,) bool, False on padding edges.
      filter_params: dict with coefficients (K, 3, F), K >= 4: the three filters' spline coefficients.
      cutoff: static, Å.

    Returns:
      (A, F) and (A, 3, F), the sums of the module docstring. Rotating the edge vectors rotates the vector
      output and leaves the scalar one unchanged (given rotated `vectors`). Differentiable to any order, with
      gradients exactly 0 for padding edges.
    """
    check_shapes(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params)
    n_atoms, n_features = scalars.shape
    coefficients = filter_params["coefficients"]
    lengths, unit = edge_lengths_and_units(edge_vectors, edge_mask)
    # The cfconv's F-blocks: the scalars with W_0, then each vector component with W_1 (none if all zero).
    blocks, filters = [scalars], [coefficients[:, 0]]
    if vectors is not None:
        blocks.append(vectors.reshape(n_atoms, 3 * n_features))
        filters += [coefficients[:, 1]] * 3
    conv = cfconv_reference(jnp.concatenate(blocks, axis=-1), lengths, senders, receivers, edge_mask,
                            {"coefficients": jnp.concatenate(filters, axis=-1)}, cutoff=cutoff)
    weight = envelope(lengths, cutoff)[:, None] * radial_filter(lengths, {"coefficients": coefficients[:, 2]}, cutoff)
    messages = jnp.where(edge_mask[:, None], weight * along[senders], 0.0)[:, None, :] * unit[:, :, None]
    out_vectors = jax.ops.segment_sum(messages, receivers, num_segments=n_atoms)
    if vectors is not None:
        out_vectors = conv[:, n_features:].reshape(n_atoms, 3, n_features) + out_vectors
    return conv[:, :n_features], out_vectors
