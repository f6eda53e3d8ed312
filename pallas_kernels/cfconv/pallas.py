"""cfconv as one fused Pallas (Triton) kernel per pass, with exact derivatives of every order.

    cfconv_pallas(features, lengths, senders, receivers, edge_mask, filter_params, *, cutoff,
                  graph=None, config=None) -> (A, F)

Computes `reference.cfconv_reference`. Walking the edges grouped by receiver (CSR, see `graph.py`), per
block of edges the kernel evaluates the Gaussian basis, the envelope and the filter MLP (its weights held
on chip), gathers the senders' feature rows, multiplies, and sums into the receiving atoms' rows: no (E, F)
array is ever written. Gradients are `edge_op`'s: the cotangent for the features walks the edges grouped
by sender (the transpose pass), edge lengths and filter weights get theirs in the same pass, and each pass
recomputes the filter instead of storing it. The VJP of that pass is again an edge op, which is what
training on forces differentiates.

On CPU the same kernels run through Pallas' interpreter (tests); on GPU they lower to Triton.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.cfconv.edge_op import EdgeOp, KernelConfig, Launch, apply, dot_precision
from pallas_kernels.cfconv.graph import EdgeGraph, edge_graph
from pallas_kernels.cfconv.reference import envelope

PRECISIONS = ("ieee", "tf32x3")


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """How to launch the kernels: per derivative depth (forward, first VJP, second VJP) and dot precision.

    precision: "ieee" (plain float32 FMA) or "tf32x3" (float32-accurate split products on tensor cores);
    both agree with the reference to float32 rounding. The interpreter (CPU) always uses exact float32.
    interpret: None = interpret exactly when JAX's default backend is the CPU.
    """

    # Tuned on the H200 at waterhuge size, 64 features (bench/results/kernels-h200.json, docs/kernels.md).
    forward: KernelConfig = KernelConfig(block_edges=64, block_atoms=16, num_warps=4, num_stages=2)
    first: KernelConfig = KernelConfig(block_edges=32, block_atoms=16, num_warps=4, num_stages=2)
    second: KernelConfig = KernelConfig(block_edges=32, block_atoms=16, num_warps=4, num_stages=1)
    precision: str = "tf32x3"
    interpret: bool | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def launch(self) -> Launch:
        interpret = jax.default_backend() == "cpu" if self.interpret is None else self.interpret
        configs = (self.forward, self.first, self.second)
        if not interpret:
            for c in configs:  # Triton's dot needs every side >= 16
                if c.block_edges < 16 or (c.layout == "flat" and c.block_atoms < 16):
                    raise ValueError(f"on the GPU, blocks need block_edges >= 16 (and block_atoms >= 16 for the "
                                     f"flat layout), got {c}")
        return Launch(configs, interpret, "highest" if interpret else self.precision)


DEFAULT_CONFIG = PallasConfig()


def default_config(n_features: int) -> PallasConfig:
    """DEFAULT_CONFIG, with edge blocks shrunk for wide features so block_edges x features stays at or below
    the tuned 64-feature setting (shared memory for the VJP passes grows with it: at 64 features, 128-edge
    blocks already asked for 280 KB of the H200's 227 KB). Only the 64-feature setting has been timed.
    """
    scale = _block_size(n_features) // 64
    if scale <= 1:
        return DEFAULT_CONFIG
    shrink = lambda c: dataclasses.replace(c, block_edges=max(16, c.block_edges // scale))  # noqa: E731
    return dataclasses.replace(DEFAULT_CONFIG, forward=shrink(DEFAULT_CONFIG.forward),
                               first=shrink(DEFAULT_CONFIG.first), second=shrink(DEFAULT_CONFIG.second))


@dataclasses.dataclass(frozen=True)
class FilterConvBody:
    """Per edge: envelope(r) * filter(rbf(r)) * features[sender], summed into the receiver (EdgeOp body).

    Globals (w1, b1, w2, b2, centers, gamma); nodes (features,) read at the sender; edges (lengths,).
    """

    cutoff: float
    precision: str  # "highest"/"ieee" (exact float32) or "tf32x3"

    def __call__(self, glob, nodes, edges, valid, want):
        del valid  # every output is per edge: the kernel masks them
        if not want[0][0]:
            return (None,), (), ()
        w1, b1, w2, b2, centers, gamma = glob
        (x,), (r,) = nodes, edges
        prec = dot_precision(self.precision)
        rbf = jnp.exp(-gamma * (r[:, None] - centers[None, :]) ** 2)
        hidden = jax.nn.silu(jnp.dot(rbf, w1, precision=prec) + b1)
        weight = envelope(r, self.cutoff)[:, None] * (jnp.dot(hidden, w2, precision=prec) + b2)
        return (weight * x,), (), ()


def cfconv_pallas(features: jax.Array, lengths: jax.Array, senders: jax.Array, receivers: jax.Array,
                  edge_mask: jax.Array, filter_params: dict, *, cutoff: float, graph: EdgeGraph | None = None,
                  config: PallasConfig | None = None) -> jax.Array:
    """`cfconv_reference` (same arguments, same result to float32 rounding) as fused Pallas kernels.

    graph: `edge_graph(senders, receivers, edge_mask, n_atoms)`, computed once per neighbour-list update and
      shared by all layers; built here when None (any edge order is fine then).
    config: launch settings (`PallasConfig`); None uses `default_config(features)`.
    """
    n_atoms, n_features = features.shape
    config = default_config(n_features) if config is None else config
    if lengths.shape != edge_mask.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and edge_mask {edge_mask.shape} must be equal-length vectors")
    if graph is None:
        graph = edge_graph(senders, receivers, edge_mask, n_atoms)
    elif graph.n_atoms != n_atoms or graph.n_edges != lengths.shape[0]:
        raise ValueError(f"graph is for {graph.n_atoms} atoms and {graph.n_edges} edges, the inputs have "
                         f"{n_atoms} and {lengths.shape[0]}")
    p = filter_params
    centers = p["centers"]
    n_rbf = centers.shape[0]
    # The Gaussians' width comes from the centers' spacing, as in the reference, and is not differentiated.
    spacing = jax.lax.stop_gradient((centers[-1] - centers[0]) / (n_rbf - 1))
    gamma = jnp.reshape(0.5 / spacing**2, (1,))
    # Triton blocks have power-of-two sides (and dots at least 16): pad features and Gaussians with zeros,
    # which contribute exactly nothing (silu(0) = 0 hidden units, zero feature columns, zero w1 rows).
    f_pad, r_pad = _block_size(n_features), _block_size(n_rbf)
    w1 = _pad(p["w1"], (r_pad, f_pad))
    b1, b2 = _pad(p["b1"], (f_pad,)), _pad(p["b2"], (f_pad,))
    w2 = _pad(p["w2"], (f_pad, f_pad))
    centers = jnp.concatenate([centers, jnp.broadcast_to(centers[-1:], (r_pad - n_rbf,))])
    x = _pad(features, (n_atoms, f_pad))
    launch = config.launch()
    body = FilterConvBody(float(cutoff), launch.precision)
    op = EdgeOp(body, node_sides=("s",), out_sides=("r",), n_glob=6, n_edge=1, n_edge_out=0, n_glob_out=0)
    (out,), _, _ = apply(op, launch, graph, (w1, b1, w2, b2, centers, gamma.astype(lengths.dtype)), (x,),
                         (lengths,))
    return out[:, :n_features]


def _block_size(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _pad(x: jax.Array, shape) -> jax.Array:
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])
