"""Fused edge operations whose reverse-mode derivatives are again fused edge operations.

An `EdgeOp` is one pass of per-edge arithmetic over a graph (see `graph.py`):

    inputs   globals  g (small arrays, held on chip: filter weights, cotangents of global outputs)
             nodes    n_k (A, F_k), each read at one end of the edge: the receiver ("r") or the sender ("s")
             edges    e_j (E,), per-edge scalars (edge lengths, cotangents of edge outputs)
    outputs  node outputs (A, F_o), each summed over the edges into one end ("r" or "s")
             edge outputs (E,), one scalar per edge (0 on padding edges)
             global outputs, summed over all real edges (parameter gradients)

`body(glob, nodes, edges, valid, want)` does the per-edge arithmetic on a block of edges (node inputs as
(B, F_k) rows, edge inputs as (B,)); `want` names the outputs to compute, unwanted ones come back as None.
Node and edge outputs are per edge (the kernel drops lanes past the end of its run); global outputs are already
summed over the block, with lanes where `valid` is False contributing nothing.

Reverse mode is closed in this family. The cotangent of a node output is a node array read at that output's
end; of an edge output, an edge array; of a global output, a global. Per edge, `jax.vjp` of the body maps
those to cotangents of the edge's inputs, which land on the same ends the inputs were read from: so the VJP
of an EdgeOp is an EdgeOp (`VJPBody`) with receivers and senders keeping their roles, and a node input read
at the sender gets its cotangent from a pass that walks the sender order (gather <-> scatter). The VJP of
the VJP is built the same way, so every order is differentiable, and every pass recomputes its edge
intermediates from the inputs instead of storing them.

The one Pallas kernel (`_pass`) walks one order. Program p owns `block_atoms` consecutive atoms, whose
runs of edges are contiguous in that order. In the "flat" layout (the default) it loops once over that
whole stretch in blocks of `block_edges` (full blocks, so Triton can pipeline the next block's loads behind
this one's arithmetic), gathers the far ends' rows, runs the body, and sums each block's node outputs into
its atoms' rows with a one-hot product. The "atom" layout loops per atom instead and reduces in registers
(simpler; slower on the H200). Per-edge outputs are written at their canonical position, global outputs as
one partial sum per program (summed by XLA afterwards). Every program writes only its own rows: no atomics,
and the sums are deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.edges.graph import EdgeGraph, EdgeOrder

SIDES = ("r", "s")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one pass: edges per inner block, atoms per program, Triton warps and stages."""

    block_edges: int = 32
    block_atoms: int = 16
    num_warps: int = 4
    num_stages: int = 1
    layout: str = "flat"  # "flat": one loop over the program's edges; "atom": a loop per atom

    def __post_init__(self):
        if self.block_edges < 1 or self.block_edges & (self.block_edges - 1):
            raise ValueError(f"block_edges must be a power of two, got {self.block_edges}")
        if self.layout not in ("flat", "atom"):
            raise ValueError(f"layout must be 'flat' or 'atom', got {self.layout!r}")
        if self.layout == "flat" and self.block_atoms & (self.block_atoms - 1):
            raise ValueError(f"block_atoms must be a power of two for the flat layout, got {self.block_atoms}")
        if self.block_atoms < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"invalid KernelConfig {self}")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Static launch settings: one KernelConfig per derivative depth (the last one serves deeper ones)."""

    configs: tuple[KernelConfig, ...]
    interpret: bool
    precision: str = "highest"  # of the kernel's own products (the flat layout's one-hot sums)

    def at(self, depth: int) -> KernelConfig:
        return self.configs[min(depth, len(self.configs) - 1)]


@dataclasses.dataclass(frozen=True)
class EdgeOp:
    """Static description of a fused edge operation (hashable: it keys the jit and custom_vjp caches)."""

    body: Callable  # frozen dataclass with __call__(glob, nodes, edges, valid, want)
    node_sides: tuple[str, ...]  # end each node input is read at
    out_sides: tuple[str, ...]  # end each node output is summed into
    n_glob: int
    n_edge: int
    n_edge_out: int
    n_glob_out: int
    depth: int = 0  # 0 for a primal op, k for its k-th VJP (selects the KernelConfig)


PRECISIONS = ("ieee", "tf32x3")


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """How to launch the kernels: per derivative depth (forward, first VJP, second VJP) and dot precision.

    precision: "ieee" (plain float32 FMA) or "tf32x3" (float32-accurate split products on tensor cores);
    both agree with the reference to float32 rounding. The interpreter (CPU) always uses exact float32.
    interpret: None = interpret exactly when JAX's default backend is the CPU.
    """

    # Tuned on the H200 for cfconv at waterhuge size, 64 features (bench/results/kernels-h200.json,
    # docs/kernels.md); the edge difference runs with the same settings.
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


def apply(op: EdgeOp, launch: Launch, graph: EdgeGraph, glob, nodes, edges):
    """Run `op`: returns (node_outputs, edge_outputs, global_outputs), tuples in the op's order."""
    return _differentiable(op, launch)(graph, tuple(glob), tuple(nodes), tuple(edges))


# ----------------------------------------------------------------------------------------------- reverse mode


@dataclasses.dataclass(frozen=True)
class VJPBody:
    """Per-edge VJP of `parent.body`: outputs the cotangents of the parent inputs flagged in `wanted`.

    Inputs are the parent's inputs followed by the cotangents flagged in `present` (node cotangents are read
    at the end their output is summed into, edge cotangents per edge, global ones are globals).
    """

    parent: EdgeOp
    wanted: tuple  # (globals, nodes, edges): tuples of bool, parent inputs whose cotangent is computed
    present: tuple  # (nodes, edges, globals): tuples of bool, parent outputs with a nonzero cotangent

    def __call__(self, glob, nodes, edges, valid, want):
        par = self.parent
        wg, wn, we = self.wanted
        pn, pe, pg = self.present
        glob_p, glob_ct = glob[:par.n_glob], glob[par.n_glob:]
        nodes_p, nodes_ct = nodes[:len(par.node_sides)], nodes[len(par.node_sides):]
        edges_p, edges_ct = edges[:par.n_edge], edges[par.n_edge:]
        # Parent inputs to differentiate: those whose cotangent is one of this pass's wanted outputs.
        kn = [k for k, w in zip(_where(wn), want[0]) if w]
        ke = [k for k, w in zip(_where(we), want[1]) if w]
        kg = [k for k, w in zip(_where(wg), want[2]) if w]

        def parent(dn, de, dg):
            n, e, g = list(nodes_p), list(edges_p), list(glob_p)
            for ks, vs, full in ((kn, dn, n), (ke, de, e), (kg, dg, g)):
                for k, v in zip(ks, vs):
                    full[k] = v
            on, oe, og = par.body(tuple(g), tuple(n), tuple(e), valid, self.present)
            return (tuple(o for o, p in zip(on, pn) if p), tuple(o for o, p in zip(oe, pe) if p),
                    tuple(o for o, p in zip(og, pg) if p))

        primals = (tuple(nodes_p[k] for k in kn), tuple(edges_p[k] for k in ke), tuple(glob_p[k] for k in kg))
        _, vjp = jax.vjp(parent, *primals)
        # Lanes past the atom's run hold real (finite) data of another edge: zero their cotangents.
        cts = (tuple(jnp.where(valid[:, None], c, 0) for c in nodes_ct),
               tuple(jnp.where(valid, c, 0) for c in edges_ct), tuple(glob_ct))
        dn, de, dg = vjp(cts)
        return (_scatter(dn, want[0]), _scatter(de, want[1]), _scatter(dg, want[2]))


def vjp_op(op: EdgeOp, wanted: tuple, present: tuple) -> EdgeOp:
    """The EdgeOp computing the cotangents `wanted` of `op`'s inputs from its output cotangents `present`."""
    wg, wn, we = wanted
    pn, pe, pg = present
    return EdgeOp(body=VJPBody(op, wanted, present),
                  node_sides=op.node_sides + tuple(s for s, p in zip(op.out_sides, pn) if p),
                  out_sides=tuple(s for s, w in zip(op.node_sides, wn) if w),
                  n_glob=op.n_glob + sum(pg), n_edge=op.n_edge + sum(pe),
                  n_edge_out=sum(we), n_glob_out=sum(wg), depth=op.depth + 1)


@jax.tree_util.register_pytree_node_class
class StaticValue:
    """Static data carried through custom_vjp residuals (a pytree with no leaves)."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, _):
        return cls(value)


@functools.lru_cache(maxsize=None)
def _differentiable(op: EdgeOp, launch: Launch):
    @jax.custom_vjp
    def run(graph, glob, nodes, edges):
        return _run(op, launch, graph, glob, nodes, edges)

    def fwd(graph, glob, nodes, edges):
        value = primal_values
        # Which inputs are being differentiated: the VJP computes cotangents for those alone (with symbolic
        # zeros, e.g. forces in MD never compute filter-weight gradients).
        perturbed = tuple(tuple(p.perturbed for p in group) for group in (glob, nodes, edges))
        graph, glob, nodes, edges = value(graph), value(glob), value(nodes), value(edges)
        # Through `run`, not `_run`: when an outer derivative differentiates this rule, the kernel it meets
        # is again the custom_vjp function (Pallas kernels have no JVP of their own here).
        return run(graph, glob, nodes, edges), (graph, glob, nodes, edges, StaticValue(perturbed))

    def bwd(res, cts):
        graph, glob, nodes, edges, perturbed = res
        wanted = perturbed.value
        present = tuple(tuple(not isinstance(c, SymbolicZero) for c in group) for group in cts)
        zero = (None, (None,) * len(glob), (None,) * len(nodes), (None,) * len(edges))
        if not any(map(any, wanted)) or not any(map(any, present)):
            return zero
        given = [tuple(c for c, p in zip(group, flags) if p) for group, flags in zip(cts, present)]
        dn, de, dg = apply(vjp_op(op, wanted, present), launch, graph, glob + given[2], nodes + given[0],
                           edges + given[1])
        return (None, _scatter(dg, wanted[0]), _scatter(dn, wanted[1]), _scatter(de, wanted[2]))

    run.defvjp(fwd, bwd, symbolic_zeros=True)
    return run


def primal_values(tree):
    """The values of a custom_vjp(symbolic_zeros=True) rule's CustomVJPPrimal leaves (`.perturbed` says which
    inputs are differentiated)."""
    return jax.tree_util.tree_map(lambda p: p.value, tree, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def _where(flags):
    return [k for k, f in enumerate(flags) if f]


def _scatter(values, flags):
    """Values for the True flags, in order -> tuple with None at the False flags."""
    values = iter(values)
    return tuple(next(values) if f else None for f in flags)


# ------------------------------------------------------------------------------------------------- the passes


def _run(op: EdgeOp, launch: Launch, graph: EdgeGraph, glob, nodes, edges):
    """All passes of `op`: one per end that receives node outputs; edge/global outputs ride on the first."""
    n_atoms, n_edges = graph.n_atoms, graph.n_edges
    node_shapes, glob_shapes = _output_shapes(op, glob, nodes, edges)
    dtype = jnp.result_type(*(x.dtype for x in (*glob, *nodes, *edges)))
    extras = op.n_edge_out + op.n_glob_out > 0
    primary = "r" if ("r" in op.out_sides or "s" not in op.out_sides) else "s"
    node_out = [None] * len(op.out_sides)
    edge_out = [None] * op.n_edge_out
    glob_out = [None] * op.n_glob_out
    for side in SIDES:
        node_want = tuple(s == side for s in op.out_sides)
        extra = extras and side == primary
        if not any(node_want) and not extra:
            continue
        want = (node_want, (extra,) * op.n_edge_out, (extra,) * op.n_glob_out)
        if n_edges == 0:  # nothing to walk: sums are zero
            on = tuple(jnp.zeros((n_atoms, f), dtype) for f, w in zip(node_shapes, node_want) if w)
            oe = tuple(jnp.zeros((0,), dtype) for _ in range(op.n_edge_out) if extra)
            og = tuple(jnp.zeros(s, dtype) for s in glob_shapes if extra)
        else:
            order = graph.by_receiver if side == "r" else graph.by_sender
            on, oe, og = _pass(op, launch, order, side, want, glob, nodes, edges, node_shapes, glob_shapes,
                               n_atoms, dtype)
        for k, v in zip(_where(node_want), on):
            node_out[k] = v
        if extra:
            edge_out = [jnp.where(graph.edge_mask, v, 0) for v in oe]  # never visited: zero, not garbage
            glob_out = list(og)
    return tuple(node_out), tuple(edge_out), tuple(glob_out)


def _output_shapes(op: EdgeOp, glob, nodes, edges):
    block = 16
    want = ((True,) * len(op.out_sides), (True,) * op.n_edge_out, (True,) * op.n_glob_out)
    avals = (tuple(jax.ShapeDtypeStruct(g.shape, g.dtype) for g in glob),
             tuple(jax.ShapeDtypeStruct((block, n.shape[1]), n.dtype) for n in nodes),
             tuple(jax.ShapeDtypeStruct((block,), e.dtype) for e in edges),
             jax.ShapeDtypeStruct((block,), jnp.bool_))
    on, _, og = jax.eval_shape(lambda g, n, e, v: op.body(g, n, e, v, want), *avals)
    return tuple(o.shape[1] for o in on), tuple(o.shape for o in og)


def _pass(op: EdgeOp, launch: Launch, order: EdgeOrder, side: str, want, glob, nodes, edges, node_shapes,
          glob_shapes, n_atoms: int, dtype):
    cfg = launch.at(op.depth)
    be, ba = cfg.block_edges, cfg.block_atoms
    n_prog = -(-n_atoms // ba)
    is_self = tuple(s == side for s in op.node_sides)
    n_glob, n_nodes, n_edges_in = len(glob), len(nodes), len(edges)
    out_f = [f for f, w in zip(node_shapes, want[0]) if w]
    n_eo = sum(want[1])
    g_shapes = [s for s, w in zip(glob_shapes, want[2]) if w]
    n_edge_slots = order.perm.shape[0] + 1
    flat = cfg.layout == "flat"
    reduce_prec = dot_precision(launch.precision)

    def kernel(offsets_ref, perm_ref, other_ref, *refs):
        glob_refs = refs[:n_glob]
        node_refs = refs[n_glob:n_glob + n_nodes]
        edge_refs = refs[n_glob + n_nodes:n_glob + n_nodes + n_edges_in]
        outs = refs[n_glob + n_nodes + n_edges_in:]
        node_out_refs, edge_out_refs, glob_out_refs = outs[:len(out_f)], outs[len(out_f):len(out_f) + n_eo], \
            outs[len(out_f) + n_eo:]
        p = pl.program_id(0)
        g = tuple(r[...] for r in glob_refs)
        lanes = jnp.arange(be, dtype=jnp.int32)

        def edge_block(k, end, centre, g_acc):
            """Body on positions k (B,) of the order (valid below `end`); per-edge node outputs back."""
            valid = k < end
            k = jnp.where(valid, k, 0)  # keep every address in bounds
            eid = perm_ref[k]
            far = other_ref[k]
            n_in = tuple((r[centre] if centre.ndim else jnp.broadcast_to(r[centre][None, :], (be, r.shape[1])))
                         if s else r[far] for r, s in zip(node_refs, is_self))
            e_in = tuple(r[eid] for r in edge_refs)
            on, oe, og = op.body(g, n_in, e_in, valid, want)
            # Lanes past the run write to the spare slot E, never onto a real edge (an interpreted masked
            # scatter is a read-modify-write, so a duplicate index could restore a stale value).
            slot = jnp.where(valid, eid, n_edge_slots - 1)
            for r, o in zip(edge_out_refs, [o for o in oe if o is not None]):
                plgpu.store(r.at[slot], o, mask=valid)
            g_acc = tuple(acc + o for acc, o in zip(g_acc, [o for o in og if o is not None]))
            return valid, [o for o in on if o is not None], g_acc

        g0 = tuple(jnp.zeros(s, dtype) for s in g_shapes)
        first = p * ba
        if flat:
            # One loop over the program's whole run of positions (its atoms' runs back to back), so blocks
            # are full and the loads of the next block can be issued while this one computes. Each lane's
            # atom is found from the runs' ends; the block's node outputs are summed into the program's
            # atoms with a one-hot product (exact: the one-hot factor is 0 or 1).
            atoms = first + jnp.arange(ba, dtype=jnp.int32)
            ends = offsets_ref[jnp.minimum(atoms + 1, n_atoms)]
            start, stop = offsets_ref[first], offsets_ref[jnp.minimum(first + ba, n_atoms)]
            rows = jnp.arange(ba, dtype=jnp.int32)

            def block(c, carry):
                n_acc, g_acc = carry
                k = start + c * be + lanes
                local = jnp.sum((k[:, None] >= ends[None, :]).astype(jnp.int32), axis=1)
                centre = jnp.minimum(first + local, n_atoms - 1)
                valid, on, g_acc = edge_block(k, stop, centre, g_acc)
                onehot = ((local[None, :] == rows[:, None]) & valid[None, :]).astype(dtype)
                n_acc = tuple(acc + jnp.dot(onehot, o, precision=reduce_prec) for acc, o in zip(n_acc, on))
                return n_acc, g_acc

            n0 = tuple(jnp.zeros((ba, f), dtype) for f in out_f)
            n_acc, g_acc = jax.lax.fori_loop(0, (stop - start + be - 1) // be, block, (n0, g0))
            # Rows past the last atom go to the spare row A (sliced off below), never onto a real atom.
            dest = jnp.where(atoms < n_atoms, atoms, n_atoms)[:, None]
            for r, acc in zip(node_out_refs, n_acc):
                r[dest, jnp.arange(acc.shape[1], dtype=jnp.int32)[None, :]] = acc
        else:
            # One atom at a time: its run in blocks, summed in registers.
            def atom(a, g_acc):
                start, end = offsets_ref[a], offsets_ref[a + 1]

                def block(c, carry):
                    n_acc, g_acc = carry
                    valid, on, g_acc = edge_block(start + c * be + lanes, end, a, g_acc)
                    n_acc = tuple(acc + jnp.sum(jnp.where(valid[:, None], o, 0), axis=0) for acc, o in zip(n_acc, on))
                    return n_acc, g_acc

                n0 = tuple(jnp.zeros((f,), dtype) for f in out_f)
                n_acc, g_acc = jax.lax.fori_loop(0, (end - start + be - 1) // be, block, (n0, g_acc))
                for r, acc in zip(node_out_refs, n_acc):
                    r[a] = acc
                return g_acc

            g_acc = jax.lax.fori_loop(first, jnp.minimum(first + ba, n_atoms), atom, g0)
        for r, acc in zip(glob_out_refs, g_acc):
            r[p] = acc

    out_shape = ([jax.ShapeDtypeStruct((n_atoms + 1, f), dtype) for f in out_f]
                 + [jax.ShapeDtypeStruct((n_edge_slots,), dtype) for _ in range(n_eo)]
                 + [jax.ShapeDtypeStruct((n_prog, *s), dtype) for s in g_shapes])
    params = {} if launch.interpret else {"compiler_params": _triton_params(cfg)}
    outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(n_prog,), interpret=launch.interpret,
                          name=f"edge_op_d{op.depth}_{side}", **params)(
        order.offsets, order.perm, order.other, *glob, *nodes, *edges)
    outs = list(outs)
    on = tuple(o[:-1] for o in outs[:len(out_f)])
    oe = tuple(o[:-1] for o in outs[len(out_f):len(out_f) + n_eo])
    og = tuple(jnp.sum(o, axis=0) for o in outs[len(out_f) + n_eo:])
    return on, oe, og


def block_size(n: int) -> int:
    """The power of two >= max(n, 16) that a Triton block side of n columns is padded to (dots need 16)."""
    return max(16, 1 << (n - 1).bit_length())


def dot_precision(name: str):
    """float32-exact products: plain FMA ("ieee"/"highest") or three TF32 tensor-core products ("tf32x3")."""
    if name == "tf32x3":
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if name in ("ieee", "highest"):
        return jax.lax.Precision.HIGHEST
    raise ValueError(f"unknown dot precision {name!r}")


def _triton_params(cfg: KernelConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
