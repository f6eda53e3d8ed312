"""PaiNN's whole message as one fused Pallas (Triton) kernel per pass, with exact derivatives of every order.

    directional_cfconv_pallas(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask,
                              filter_params, *, cutoff, graph=None, config=None) -> ((A, F), (A, 3, F))

Computes `reference.directional_cfconv_reference`. One `edges.edge_op` pass walks the edges grouped by
receiver; per block of edges the body (`DirectionalConvBody`) computes the length and unit vector from the edge
vector, the spline basis and envelope once, the three filters from their (K, F) coefficients held on chip,
and from the sender's five gathered rows (scalars, the three vector components, along) the four output rows
(scalar; x, y, z), summed into the receiving atoms: the whole PaiNN message in one launch, where the
reference (and PaiNN before this kernel) was a cfconv of four F-blocks plus an XLA gather and segment sum
with (E, F) and (E, 3, F) arrays in memory.

vectors=None (all vector inputs zero: PaiNN's first layer) builds the body without the W_1 term
(`with_vectors=False`): two node inputs (scalars, along) and two filters, so no pass gathers the three zero
rows, reads their cotangents or computes the term (with them, that layer's force pass, `edge_op_d1_r`, took
5.8 ms of an 11.9 ms PaiNN 64x3 MD step on 12,000 atoms of water on the H200).

Inputs are separate (A, F) rows, not PaiNN's (A, 3, F) tensor and not one (A, 5F) row: Triton blocks have
power-of-two sides, and 5F = 320 columns at F = 64 would be padded to 512; five rows of F are padded to
nothing. The three filters are three globals for the same reason (the vector components share W_1 instead of
repeating its columns, as the reference's cfconv does).

Derivatives are edge_op's generic ones (`VJPBody`, any order): the first-order pass walks the sender order
when the features are differentiated (their cotangents land on senders) and the receiver order when only the
edge vectors are (the first layer's force pass, whose inputs do not depend on positions); the edge vectors'
cotangent (E, 3) and the coefficients' ride along. cfconv's hand-written symmetric transpose (one receiver
pass for the first derivative on lists closed under reversal; the twin's r̂ is -r̂) is not written for this
body: PaiNN's force pass needs the sender sort anyway, for `edge_difference`'s transpose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.cfconv.pallas import default_config
from pallas_kernels.cfconv.reference import envelope, spaced_bsplines, spline_spacing
from pallas_kernels.directional_cfconv.reference import check_shapes
from pallas_kernels.edges.chunks import FEATURE_CHUNK, feature_chunks
from pallas_kernels.edges.edge_op import EdgeOp, PallasConfig, apply, block_size, dot_precision
from pallas_kernels.edges.graph import EdgeGraph, graph_for


@dataclasses.dataclass(frozen=True)
class DirectionalConvBody:
    """Per edge j -> i with r = |v|, r̂ = v / r:  W_0(r) s_j  and, per d,  W_1(r) u_j,d + W_2(r) q_j r̂_d.

    Globals (C_0, C_1, C_2), each (K, F); nodes (s, u_x, u_y, u_z, q) read at the sender; edges (v_x, v_y,
    v_z). Node outputs (scalar, x, y, z), summed into the receiver. With `with_vectors` False the u are all
    zero and left out: globals (C_0, C_2), nodes (s, q), no W_1 term. Every lane the kernel runs the body on
    holds a real edge's data (lanes past a run are another real edge's, padding edges are never visited), so
    r > 0 and the sqrt and divisions are finite with all their derivatives.
    """

    cutoff: float
    spacing: float  # the spline's knot spacing h (cfconv.reference.spline_spacing)
    precision: str  # "highest"/"ieee" (exact float32) or "tf32x3"
    with_vectors: bool  # False: the u are all zero, so they are no inputs and their W_1 term is not computed

    def __call__(self, glob, nodes, edges, valid, want):
        del valid  # every output is per edge: the kernel masks them
        want_s, *want_v = want[0]
        if not (want_s or any(want_v)):
            return (None,) * 4, (), ()
        if self.with_vectors:
            (c_s, c_v, c_q), (s, *u, q) = glob, nodes
        else:
            (c_s, c_q), (s, q) = glob, nodes
        r = jnp.sqrt(sum(e * e for e in edges))
        env = envelope(r, self.cutoff)[:, None]
        basis = spaced_bsplines(r, self.spacing, c_s.shape[0])
        weight = lambda c: env * jnp.dot(basis, c, precision=dot_precision(self.precision))  # noqa: E731
        out_s = weight(c_s) * s if want_s else None
        out_v = [None] * 3
        if any(want_v):
            w_v = weight(c_v) if self.with_vectors else None
            w_q = weight(c_q) * q

            def component(d):  # W_2 q r̂_d, plus W_1 u_d unless the u are all zero
                along = w_q * (edges[d] / r)[:, None]
                return along if w_v is None else w_v * u[d] + along

            out_v = [component(d) if w else None for d, w in enumerate(want_v)]
        return (out_s, *out_v), (), ()


def directional_cfconv_pallas(scalars: jax.Array, vectors: jax.Array | None, along: jax.Array,
                              edge_vectors: jax.Array, senders: jax.Array, receivers: jax.Array,
                              edge_mask: jax.Array, filter_params: dict, *, cutoff: float,
                              graph: EdgeGraph | None = None, config: PallasConfig | None = None,
                              feature_chunk: int = FEATURE_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`directional_cfconv_reference` (same arguments, same result to float32 rounding) as fused Pallas kernels.

    vectors: None when all zero: the kernels then neither gather those rows nor compute their term.

    graph: `edge_graph(senders, receivers, edge_mask, n_atoms)`, computed once per neighbour-list update and
      shared by all layers; built here when None (any edge order is fine then).
    config: launch settings (`PallasConfig`); None uses cfconv's `default_config` for the four output rows'
      width (4F: the same per-edge row traffic as the reference's cfconv of four F-blocks).
    feature_chunk: more features than this run as one launch per chunk of this many (`edges.chunks`).
    """
    check_shapes(scalars, vectors, along, edge_vectors, senders, receivers, edge_mask, filter_params)
    n_atoms, n_features = scalars.shape
    graph = graph_for(graph, senders, receivers, edge_mask, n_atoms)
    coefficients = filter_params["coefficients"]
    chunks = feature_chunks(n_features, feature_chunk)
    if len(chunks) > 1:
        outs = [directional_cfconv_pallas(scalars[:, c], None if vectors is None else vectors[:, :, c], along[:, c],
                                          edge_vectors, senders, receivers, edge_mask,
                                          {"coefficients": coefficients[:, :, c]}, cutoff=cutoff, graph=graph,
                                          config=config, feature_chunk=feature_chunk) for c in chunks]
        return tuple(jnp.concatenate(parts, axis=-1) for parts in zip(*outs))
    config = default_config(4 * n_features) if config is None else config
    n_basis = coefficients.shape[0]
    # Triton blocks have power-of-two sides (dots at least 16): zero rows and columns contribute nothing.
    f_pad, k_pad = block_size(n_features), block_size(n_basis)
    # Without vectors (all zero) the three vector rows and filter 1 are not kernel inputs at all.
    rows, filters = (scalars, along), (0, 2)
    if vectors is not None:
        rows, filters = (scalars, vectors[:, 0], vectors[:, 1], vectors[:, 2], along), (0, 1, 2)
    glob = tuple(_pad(coefficients[:, k], (k_pad, f_pad)) for k in filters)
    nodes = tuple(_pad(x, (n_atoms, f_pad)) for x in rows)
    launch = config.launch()
    body = DirectionalConvBody(float(cutoff), spline_spacing(cutoff, n_basis), launch.precision,
                               with_vectors=vectors is not None)
    op = EdgeOp(body, node_sides=("s",) * len(nodes), out_sides=("r",) * 4, n_glob=len(glob), n_edge=3,
                n_edge_out=0, n_glob_out=0)
    (out_s, out_x, out_y, out_z), _, _ = apply(op, launch, graph, glob, nodes,
                                               tuple(edge_vectors[:, d] for d in range(3)))
    return out_s[:, :n_features], jnp.stack([out_x, out_y, out_z], axis=1)[:, :, :n_features]


def _pad(x: jax.Array, shape) -> jax.Array:
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])
