"""cfconv as one fused Pallas (Triton) kernel per pass, with exact derivatives of every order.

    cfconv_pallas(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff,
                  graph=None, config=None) -> (A, F)

Computes `reference.cfconv_reference`. Walking the edges grouped by receiver (CSR, see `edges/graph.py`), per
block of edges the kernel evaluates the spline basis, the envelope and the filter (its (K, F) coefficients
held on chip), gathers the senders' feature rows, multiplies, and sums into the receiving atoms' rows: no (E, F)
array is ever written. Gradients are `edge_op`'s: the cotangent for the features walks the edges grouped
by sender (the transpose pass), edge lengths and filter weights get theirs in the same pass, and each pass
recomputes the filter instead of storing it. The VJP of that pass is again an edge op, which is what
training on forces differentiates. With `symmetric=True` (full neighbour lists, the student's path) the
first derivative is one receiver-order pass instead (`SymmetricTransposeBody`).

On CPU the same kernels run through Pallas' interpreter (tests); on GPU they lower to Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.edges.chunks import FEATURE_CHUNK, feature_chunks
from pallas_kernels.edges.edge_op import (EdgeOp, Launch, PallasConfig, StaticValue, apply, block_size,
                                         dot_precision, primal_values)
from pallas_kernels.edges.graph import EdgeGraph, graph_for
from pallas_kernels.cfconv.reference import envelope, spaced_bsplines, spline_spacing

DEFAULT_CONFIG = PallasConfig()


def default_config(n_features: int) -> PallasConfig:
    """DEFAULT_CONFIG, with edge blocks shrunk for wide features so block_edges x features stays at or below
    the tuned 64-feature setting (shared memory for the VJP passes grows with it: at 64 features, 128-edge
    blocks already asked for 280 KB of the H200's 227 KB). Only the 64-feature setting has been timed.
    """
    scale = block_size(n_features) // 64
    if scale <= 1:
        return DEFAULT_CONFIG
    shrink = lambda c: dataclasses.replace(c, block_edges=max(16, c.block_edges // scale))  # noqa: E731
    return dataclasses.replace(DEFAULT_CONFIG, forward=shrink(DEFAULT_CONFIG.forward),
                               first=shrink(DEFAULT_CONFIG.first), second=shrink(DEFAULT_CONFIG.second))


@dataclasses.dataclass(frozen=True)
class FilterConvBody:
    """Per edge: envelope(r) * (spline_basis(r) @ coefficients) * features[sender], summed into the receiver.

    Globals (coefficients,); nodes (features,) read at the sender; edges (lengths,).
    """

    cutoff: float
    spacing: float  # the spline's knot spacing h (reference.spline_spacing)
    precision: str  # "highest"/"ieee" (exact float32) or "tf32x3"

    def radial(self, r: jax.Array, n_basis: int) -> tuple[jax.Array, jax.Array]:
        """(B,) lengths -> envelope (B,) and spline basis (B, K)."""
        return envelope(r, self.cutoff), spaced_bsplines(r, self.spacing, n_basis)

    def weight(self, coefficients: jax.Array, r: jax.Array) -> jax.Array:
        """(B,) lengths -> (B, F) envelope(r) * filter(r)."""
        env, basis = self.radial(r, coefficients.shape[0])
        return env[:, None] * jnp.dot(basis, coefficients, precision=dot_precision(self.precision))

    def __call__(self, glob, nodes, edges, valid, want):
        del valid  # every output is per edge: the kernel masks them
        if not want[0][0]:
            return (None,), (), ()
        (coefficients,), (x,), (r,) = glob, nodes, edges
        return (self.weight(coefficients, r) * x,), (), ()


@dataclasses.dataclass(frozen=True)
class SymmetricTransposeBody:
    """The first-order VJP of `FilterConvBody` in one receiver-order pass, for edge lists closed under reversal.

    The features' cotangent lands on senders: dx[j] = sum over edges e with sender j of w(r_e) ct[receiver e].
    When every edge i <- j has a twin j <- i of the same length (a full neighbour list), that is the sum over
    the edges e' with *receiver* j of w(r_e') ct[sender e']: the forward pass with ct for x. So the pass that
    computes the lengths' and coefficients' cotangents (which need ct at the receiver and x at the sender) also
    computes dx, walking the receiver order, and energy+forces never need the sender sort. (Twins' lengths
    agree to float32 rounding, so dx does too.) Deeper derivatives of this body are `edge_op`'s generic ones.

    Globals (coefficients,); nodes (x at the sender, [ct at the sender, when dx is wanted,] ct at the receiver);
    edges (lengths,). Outputs, each only if `wanted`: node dx (at the receiver), edge dr, global dcoefficients.
    """

    conv: FilterConvBody
    wanted: tuple[bool, bool, bool]  # cotangents of (coefficients, features, lengths)

    def __call__(self, glob, nodes, edges, valid, want):
        (coefficients,), (r,) = glob, edges
        x_far, ct_self = nodes[0], nodes[-1]
        want_c, want_x, want_r = self.wanted
        precision = dot_precision(self.conv.precision)
        node_out = edge_out = glob_out = ()
        if want_x:
            node_out = (self.conv.weight(coefficients, r) * nodes[1] if want[0][0] else None,)
        need_r = want_r and want[1][0]
        need_c = want_c and want[2][0]
        dc = dr = None
        if need_r or need_c:
            # out = env(r) (B(r) @ C) * x, so with u = ct * x:  dC = (env B)^T u  and
            # dr = sum_F u (env' B + env B') @ C = sum_K (u @ C^T)_K (env' B_K + env B'_K): one (B, F) x (F, K)
            # product for dr (reverse mode through `weight` would take two, this pass is the forces' hot loop).
            u = jnp.where(valid[:, None], ct_self * x_far, 0.0)  # lanes past the run add nothing to dC
            radial = functools.partial(self.conv.radial, n_basis=coefficients.shape[0])
            if need_r:
                (env, basis), (d_env, d_basis) = jax.jvp(radial, (r,), (jnp.ones_like(r),))
                u_c = jax.lax.dot_general(u, coefficients, (((1,), (1,)), ((), ())), precision=precision)
                dr = jnp.sum(u_c * (d_env[:, None] * basis + env[:, None] * d_basis), axis=1)
            else:
                env, basis = radial(r)
            if need_c:
                dc = jax.lax.dot_general(env[:, None] * basis, u, (((0,), (0,)), ((), ())), precision=precision)
        if want_r:
            edge_out = (dr,)
        if want_c:
            glob_out = (dc,)
        return node_out, edge_out, glob_out


@functools.lru_cache(maxsize=None)
def _symmetric(op: EdgeOp, launch: Launch):
    """`op` (the forward cfconv) with `SymmetricTransposeBody` as its VJP, as a function (graph, c, x, r)."""

    @jax.custom_vjp
    def conv(graph, coefficients, x, lengths):
        (out,), _, _ = apply(op, launch, graph, (coefficients,), (x,), (lengths,))
        return out

    def fwd(graph, coefficients, x, lengths):
        perturbed = (coefficients.perturbed, x.perturbed, lengths.perturbed)
        graph, coefficients, x, lengths = primal_values((graph, coefficients, x, lengths))
        # Through `conv`: an outer derivative of this rule meets the symmetric VJP again.
        return conv(graph, coefficients, x, lengths), (graph, coefficients, x, lengths, StaticValue(perturbed))

    def bwd(res, ct):
        graph, coefficients, x, lengths, perturbed = res
        wanted = perturbed.value
        if isinstance(ct, SymbolicZero) or not any(wanted):
            return None, None, None, None
        want_c, want_x, want_r = wanted
        # ct is read at the sender only for dx (the forces' pass of a first layer, whose x is constant, skips it).
        nodes, sides = ((x, ct, ct), ("s", "s", "r")) if want_x else ((x, ct), ("s", "r"))
        transpose = EdgeOp(SymmetricTransposeBody(op.body, wanted), node_sides=sides,
                           out_sides=("r",) if want_x else (), n_glob=1, n_edge=1, n_edge_out=int(want_r),
                           n_glob_out=int(want_c), depth=op.depth + 1)
        dn, de, dg = apply(transpose, launch, graph, (coefficients,), nodes, (lengths,))
        return (None, dg[0] if want_c else None, dn[0] if want_x else None, de[0] if want_r else None)

    conv.defvjp(fwd, bwd, symbolic_zeros=True)
    return conv


def cfconv_pallas(features: jax.Array, lengths: jax.Array, senders: jax.Array, receivers: jax.Array,
                  edge_mask: jax.Array, filter_params: dict, *, cutoff: float, graph: EdgeGraph | None = None,
                  config: PallasConfig | None = None, symmetric: bool = False,
                  feature_chunk: int = FEATURE_CHUNK) -> jax.Array:
    """`cfconv_reference` (same arguments, same result to float32 rounding) as fused Pallas kernels.

    graph: `edge_graph(senders, receivers, edge_mask, n_atoms)`, computed once per neighbour-list update and
      shared by all layers; built here when None (any edge order is fine then).
    config: launch settings (`PallasConfig`); None uses `default_config(features)`.
    symmetric: the caller promises the edge list is closed under reversal with equal lengths (every real
      edge i <- j has a real twin j <- i), as distiller's neighbour lists are; the first derivative then walks
      the receiver order only (`SymmetricTransposeBody`). A broken promise gives wrong gradients.
    feature_chunk: more features than this run as one launch per chunk of this many (`edges.chunks`).
    """
    n_atoms, n_features = features.shape
    if lengths.shape != edge_mask.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and edge_mask {edge_mask.shape} must be equal-length vectors")
    graph = graph_for(graph, senders, receivers, edge_mask, n_atoms)
    coefficients = filter_params["coefficients"]
    chunks = feature_chunks(n_features, feature_chunk)
    if len(chunks) > 1:
        return jnp.concatenate([cfconv_pallas(features[:, c], lengths, senders, receivers, edge_mask,
                                              {"coefficients": coefficients[:, c]}, cutoff=cutoff, graph=graph,
                                              config=config, symmetric=symmetric, feature_chunk=feature_chunk)
                                for c in chunks], axis=-1)
    config = default_config(n_features) if config is None else config
    n_basis = coefficients.shape[0]
    spacing = spline_spacing(cutoff, n_basis)
    # Triton blocks have power-of-two sides (and dots at least 16): pad features and basis functions with
    # zeros, which contribute exactly nothing (zero coefficient rows and feature columns).
    f_pad, k_pad = block_size(n_features), block_size(n_basis)
    coefficients = _pad(coefficients, (k_pad, f_pad))
    x = _pad(features, (n_atoms, f_pad))
    launch = config.launch()
    body = FilterConvBody(float(cutoff), spacing, launch.precision)
    op = EdgeOp(body, node_sides=("s",), out_sides=("r",), n_glob=1, n_edge=1, n_edge_out=0, n_glob_out=0)
    if symmetric:
        out = _symmetric(op, launch)(graph, coefficients, x, lengths)
    else:
        (out,), _, _ = apply(op, launch, graph, (coefficients,), (x,), (lengths,))
    return out[:, :n_features]


def _pad(x: jax.Array, shape) -> jax.Array:
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])
