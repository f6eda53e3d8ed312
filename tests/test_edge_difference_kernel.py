"""The edge difference with its fused transpose against the plain-JAX reference, in Pallas' interpreter (CPU).

Its forward is a gather; the kernels are its transpose (edge cotangents summed into atoms, + at senders and
- at receivers, by the CSR walks of `edges.graph`) and, for training on forces, that transpose's own VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import edge_difference
from pallas_kernels.edge_difference import edge_difference_reference
from pallas_kernels.edge_difference.pallas import edge_difference_pallas
from pallas_kernels.edges.edge_op import KernelConfig, PallasConfig
from pallas_kernels.edges.graph import edge_graph

TINY = KernelConfig(block_edges=4, block_atoms=4)  # many blocks per atom: the loops and masks all run
CONFIG = PallasConfig(forward=TINY, first=TINY, second=TINY, interpret=True)


def random_problem(seed, n_atoms=9, n_edges=40, columns=3, dtype=jnp.float32):
    """Unsorted padded edges: one crowded atom, atoms with no edges at either end, padding anywhere."""
    rng = np.random.default_rng(seed)
    receivers = rng.integers(0, n_atoms - 3, n_edges)
    receivers[: n_edges // 2] = 2  # far more edges than a block holds
    senders = rng.integers(1, n_atoms - 2, n_edges)  # atom 0 sends nothing, the last two neither
    edge_mask = rng.random(n_edges) < 0.8
    receivers[~edge_mask & (rng.random(n_edges) < 0.5)] = n_atoms - 1
    perm = rng.permutation(n_edges)
    return dict(values=jnp.asarray(rng.normal(size=(n_atoms, columns)), dtype),
                senders=jnp.asarray(senders[perm], jnp.int32), receivers=jnp.asarray(receivers[perm], jnp.int32),
                edge_mask=jnp.asarray(edge_mask[perm]),
                cotangent=jnp.asarray(rng.normal(size=(n_edges, columns)), dtype))


def call(fn, p, values=None, **kwargs):
    return fn(p["values"] if values is None else values, p["senders"], p["receivers"], p["edge_mask"], **kwargs)


pallas = functools.partial(edge_difference_pallas, config=CONFIG)


def transpose(fn, p, cotangent):
    """The position-gradient direction: the VJP of the difference, a sum of edge rows into atoms."""
    return jax.vjp(lambda v: call(fn, p, v), p["values"])[1](cotangent)[0]


def test_forward_and_transpose_match_reference():
    for seed, columns in ((0, 3), (1, 3), (2, 5)):
        p = random_problem(seed, columns=columns)
        out = call(pallas, p)
        np.testing.assert_array_equal(out, call(edge_difference_reference, p))
        assert np.all(np.asarray(out)[~np.asarray(p["edge_mask"])] == 0)
        dv = jax.jit(functools.partial(transpose, pallas, p))(p["cotangent"])
        np.testing.assert_allclose(dv, transpose(edge_difference_reference, p, p["cotangent"]), rtol=0, atol=1e-5)
        assert np.all(np.asarray(dv)[-2:] == 0)  # atoms on no edge get nothing


def test_second_order_matches_reference():
    """Training on forces differentiates the transpose: its VJP is the difference again, as a kernel."""
    p = random_problem(3)

    def loss(fn, cotangent):
        return jnp.sum(jnp.sin(transpose(fn, p, cotangent)) ** 2)

    grads = [jax.jit(jax.grad(functools.partial(loss, fn)))(p["cotangent"]) for fn in (pallas, edge_difference_reference)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-5)
    assert np.all(np.asarray(grads[0])[~np.asarray(p["edge_mask"])] == 0)


def test_check_grads_to_second_order():
    with jax.enable_x64(True):
        p = random_problem(4, n_atoms=6, n_edges=14, dtype=jnp.float64)
        check_grads(jax.jit(lambda v: jnp.sin(call(pallas, p, v))), (p["values"],), order=2, modes=("rev",))


def test_neighbour_list_layout_and_dispatch():
    """The student's path: edges sorted by receiver with padding last, the receiver walk taken as it is."""
    p = random_problem(5)
    mask = np.asarray(p["edge_mask"])
    receivers = np.asarray(p["receivers"])
    order = np.lexsort((np.arange(mask.size), np.where(mask, receivers, 99)))
    q = {k: (v[order] if k != "values" else v) for k, v in p.items()}
    n_atoms = p["values"].shape[0]
    graph = edge_graph(q["senders"], q["receivers"], q["edge_mask"], n_atoms, sorted_by_receiver=True)
    np.testing.assert_array_equal(graph.by_receiver.offsets, np.concatenate(
        [[0], np.cumsum(np.bincount(np.asarray(q["receivers"])[np.asarray(q["edge_mask"])], minlength=n_atoms))]))
    with_graph = functools.partial(edge_difference_pallas, graph=graph, config=CONFIG)
    np.testing.assert_allclose(transpose(with_graph, q, q["cotangent"]),
                               transpose(edge_difference_reference, q, q["cotangent"]), rtol=0, atol=1e-5)
    # On a CPU backend the "pallas" set is the reference itself, bit for bit.
    np.testing.assert_array_equal(transpose(functools.partial(edge_difference, kernel="pallas"), q, q["cotangent"]),
                                  transpose(edge_difference_reference, q, q["cotangent"]))


def test_bad_inputs_raise():
    p = random_problem(6)
    with pytest.raises(ValueError, match="equal-length"):
        edge_difference_pallas(p["values"], p["senders"][:-1], p["receivers"], p["edge_mask"], config=CONFIG)
    graph = edge_graph(p["senders"], p["receivers"], p["edge_mask"], 4)
    with pytest.raises(ValueError, match="graph is for 4 atoms"):
        call(pallas, p, graph=graph)
    with pytest.raises(ValueError, match="unknown kernel set"):
        call(functools.partial(edge_difference, kernel="cuda"), p)
