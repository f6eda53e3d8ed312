"""The fused Pallas cfconv against the plain-JAX reference, on the CPU through Pallas' interpreter.

Same kernels as on the GPU (only the launch differs), tiny sizes and tiny blocks so that an atom has many
more edges than a block and the loops, masks and padding paths all run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distiller.capacity import make_batch
from distiller.derivatives import predictions
from distiller.structure import read_structures
from distiller.students import PaiNNConfig, SchNetConfig, init_params, student_model
from pallas_kernels import KERNELS, cfconv, pallas_set
from pallas_kernels.cfconv import cfconv_reference
from pallas_kernels.cfconv.pallas import cfconv_pallas
from pallas_kernels.edges.edge_op import KernelConfig, PallasConfig
from pallas_kernels.edges.graph import edge_graph
from arrays import assert_close

CUTOFF = 3.0
TINY = KernelConfig(block_edges=4, block_atoms=4)  # flat layout: one loop over a program's 4 atoms' edges
CONFIG = PallasConfig(forward=TINY, first=TINY, second=TINY, interpret=True)
TINY_ATOM = KernelConfig(block_edges=4, block_atoms=3, layout="atom")  # the per-atom loop
CONFIG_ATOM = PallasConfig(forward=TINY_ATOM, first=TINY_ATOM, second=TINY_ATOM, interpret=True)


def random_problem(seed, n_atoms=9, n_edges=48, features=12, n_rbf=6, dtype=jnp.float32):
    """A padded, unsorted edge list: one crowded atom, atoms with no edges, padding edges anywhere.

    Features (12) and basis functions (6) are not powers of two, so the kernel's zero padding is exercised too.
    """
    rng = np.random.default_rng(seed)
    receivers = rng.integers(0, n_atoms - 3, n_edges)  # the last 3 atoms receive nothing...
    receivers[: 3 * n_edges // 5] = 1  # ... and atom 1 receives far more edges than a block holds
    senders = rng.integers(0, n_atoms - 1, n_edges)  # ... and the last atom sends nothing either
    edge_mask = rng.random(n_edges) < 0.8
    # Padding edges: some in the neighbour list's convention (last atom), some anywhere.
    receivers[~edge_mask & (rng.random(n_edges) < 0.5)] = n_atoms - 1
    perm = rng.permutation(n_edges)  # unsorted
    lengths = rng.uniform(0.3, CUTOFF * 1.15, n_edges)  # some beyond the cutoff: exactly zero weight
    lengths[~edge_mask] = 0.0
    params = {"coefficients": rng.normal(size=(n_rbf, features))}
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    return dict(features=jnp.asarray(rng.normal(size=(n_atoms, features)), dtype),
                lengths=jnp.asarray(lengths[perm], dtype), senders=jnp.asarray(senders[perm], jnp.int32),
                receivers=jnp.asarray(receivers[perm], jnp.int32), edge_mask=jnp.asarray(edge_mask[perm]),
                params=params)


def call(fn, p, features=None, lengths=None, params=None, **kwargs):
    return fn(p["features"] if features is None else features, p["lengths"] if lengths is None else lengths,
              p["senders"], p["receivers"], p["edge_mask"], p["params"] if params is None else params,
              cutoff=CUTOFF, **kwargs)


def pallas(*args, config=CONFIG, **kwargs):
    return cfconv_pallas(*args, config=config, **kwargs)


def test_edge_graph_groups_unsorted_edges():
    p = random_problem(0)
    n_atoms = p["features"].shape[0]
    graph = edge_graph(p["senders"], p["receivers"], p["edge_mask"], n_atoms)
    mask = np.asarray(p["edge_mask"])
    for order, centres, far in ((graph.by_receiver, p["receivers"], p["senders"]),
                                (graph.by_sender, p["senders"], p["receivers"])):
        centres, far, perm = np.asarray(centres), np.asarray(far), np.asarray(order.perm)
        offsets = np.asarray(order.offsets)
        assert sorted(perm.tolist()) == list(range(mask.size))
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(centres[mask],
                                                                                         minlength=n_atoms))]))
        for i in range(n_atoms):  # atom i owns exactly its real edges, in their original (stable) order
            run = perm[offsets[i]:offsets[i + 1]]
            np.testing.assert_array_equal(run, np.flatnonzero(mask & (centres == i)))
            np.testing.assert_array_equal(np.asarray(order.other)[offsets[i]:offsets[i + 1]], far[run])
        assert not mask[perm[offsets[-1]:]].any()  # padding edges after every atom's run


@pytest.mark.parametrize("config", [CONFIG, CONFIG_ATOM], ids=["flat", "atom"])
def test_forward_matches_reference(config):
    for seed in range(3):
        p = random_problem(seed)
        out = call(pallas, p, config=config)
        assert_close(out, call(cfconv_reference, p))
        assert np.all(np.asarray(out)[-3:] == 0)  # atoms with no edges
    # A graph computed once and passed in gives the same numbers.
    graph = edge_graph(p["senders"], p["receivers"], p["edge_mask"], p["features"].shape[0])
    np.testing.assert_array_equal(call(pallas, p, graph=graph, config=config), out)


def neighbour_list_problem(seed, n_atoms=9, n_pairs=24, features=12, n_rbf=6, n_padding=7, dtype=jnp.float32):
    """An edge list laid out as distiller's neighbour lists are: every pair in both directions with one length,
    real edges sorted by receiver, padding edges after them pointing at the last atom. One crowded atom,
    atoms with no edges, self-image pairs (i <- i). Lengths are per pair (`pair_lengths`, indexed by `pair`),
    so derivatives perturb both directions of a pair alike, as moving atoms does.
    """
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n_atoms - 3, n_pairs), rng.integers(0, n_atoms - 3, n_pairs)
    a[: n_pairs // 2] = 1  # atom 1 has far more edges than a block holds
    receivers, senders = np.concatenate([a, b]), np.concatenate([b, a])
    pair = np.concatenate([np.arange(n_pairs)] * 2)
    order = np.argsort(receivers, kind="stable")
    receivers, senders, pair = receivers[order], senders[order], pair[order]
    pad = np.full(n_padding, n_atoms - 1)
    return dict(features=jnp.asarray(rng.normal(size=(n_atoms, features)), dtype),
                pair_lengths=jnp.asarray(rng.uniform(0.3, CUTOFF * 1.15, n_pairs), dtype),
                pair=jnp.asarray(np.concatenate([pair, np.zeros(n_padding, int)]), jnp.int32),
                senders=jnp.asarray(np.concatenate([senders, pad]), jnp.int32),
                receivers=jnp.asarray(np.concatenate([receivers, pad]), jnp.int32),
                edge_mask=jnp.asarray(np.arange(2 * n_pairs + n_padding) < 2 * n_pairs),
                params={"coefficients": jnp.asarray(rng.normal(size=(n_rbf, features)), dtype)})


def call_pairs(fn, p, features, pair_lengths, params):
    lengths = jnp.where(p["edge_mask"], pair_lengths[p["pair"]], 0.0)
    return fn(features, lengths, p["senders"], p["receivers"], p["edge_mask"], params, cutoff=CUTOFF)


def symmetric_pallas(*args, **kwargs):
    """The student's path: receiver order taken as it is, first derivative by the symmetric transpose."""
    senders, receivers, edge_mask = args[2:5]
    graph = edge_graph(senders, receivers, edge_mask, args[0].shape[0], sorted_by_receiver=True)
    return cfconv_pallas(*args, graph=graph, config=CONFIG, symmetric=True, **kwargs)


def test_symmetric_transpose_matches_reference_to_second_order():
    p = neighbour_list_problem(7)
    args = (p["features"], p["pair_lengths"], p["params"])
    # The dispatcher's entry is this path; on the CPU it is the reference unless asked to interpret.
    assert_close(call_pairs(pallas_set(PallasConfig(interpret=True)).cfconv, p, *args),
                 call_pairs(cfconv_reference, p, *args))
    assert_close(call_pairs(symmetric_pallas, p, *args), call_pairs(cfconv_reference, p, *args))

    def scalar(fn, *a):
        out = call_pairs(fn, p, *a)
        return jnp.sum(out * jnp.sin(out))

    def force_loss(fn, features, pair_lengths, params):
        d_features, d_lengths = jax.grad(lambda f, r: jnp.sum(jnp.tanh(call_pairs(fn, p, f, r, params))),
                                         argnums=(0, 1))(features, pair_lengths)
        return jnp.sum(d_lengths**2) + jnp.sum(jnp.cos(d_features))

    for quantity, rtol in ((scalar, 2e-5), (force_loss, 5e-5)):
        grads = [jax.jit(jax.grad(functools.partial(quantity, fn), argnums=(0, 1, 2)))(*args)
                 for fn in (symmetric_pallas, cfconv_reference)]
        assert_close(grads[0], grads[1], rtol=rtol)
    # Energy and forces (first derivatives only) walk the receiver order alone: no sort in the program.
    hlo = jax.jit(jax.grad(functools.partial(scalar, symmetric_pallas), argnums=(0, 1))).lower(
        *args).compile().as_text()
    assert "sort" not in hlo.lower()  # (the general path, edge_graph without the promise, has two)


def test_symmetric_transpose_check_grads_to_second_order():
    with jax.enable_x64(True):
        p = neighbour_list_problem(8, n_atoms=6, n_pairs=7, features=4, n_rbf=5, n_padding=3, dtype=jnp.float64)
        f = jax.jit(functools.partial(call_pairs, symmetric_pallas, p))
        check_grads(f, (p["features"], p["pair_lengths"], p["params"]), order=2, modes=("rev",))


def first_order(fn, p):
    """Gradients of a nonlinear scalar of the output with respect to features, lengths and all parameters."""
    def scalar(features, lengths, params):
        out = call(fn, p, features, lengths, params)
        return jnp.sum(out * jnp.sin(out))

    return jax.jit(jax.grad(scalar, argnums=(0, 1, 2)))(p["features"], p["lengths"], p["params"])


def force_loss(fn, p, features, lengths, params):
    """What training on forces differentiates: a loss of the first derivatives (edge lengths, features)."""
    def energy(features, lengths):
        out = call(fn, p, features, lengths, params)
        return jnp.sum(jnp.tanh(out))

    d_features, d_lengths = jax.grad(energy, argnums=(0, 1))(features, lengths)
    return jnp.sum(d_lengths**2) + jnp.sum(jnp.cos(d_features))


def test_first_and_second_order_match_reference():
    p = random_problem(4)
    assert_close(first_order(pallas, p), first_order(cfconv_reference, p))
    assert_close(first_order(functools.partial(pallas, config=CONFIG_ATOM), p), first_order(cfconv_reference, p))
    # Second order: gradient of the force-like loss w.r.t. parameters, features and lengths.
    second = [jax.jit(jax.grad(lambda *a: force_loss(fn, p, *a), argnums=(0, 1, 2)))(
        p["features"], p["lengths"], p["params"]) for fn in (pallas, cfconv_reference)]
    assert_close(second[0], second[1], rtol=5e-5)
    # Padding edges get exactly zero gradient.
    d_lengths = np.asarray(second[0][1])
    assert np.all(d_lengths[~np.asarray(p["edge_mask"])] == 0)


def test_check_grads_to_second_order():
    # float64 so finite differences are sharp.
    with jax.enable_x64(True):
        p = random_problem(5, n_atoms=5, n_edges=14, features=4, n_rbf=5, dtype=jnp.float64)

        @jax.jit  # compiled once: check_grads evaluates it and its derivatives many times
        def f(features, lengths, params):
            return call(pallas, p, features, lengths, params)

        check_grads(f, (p["features"], p["lengths"], p["params"]), order=2, modes=("rev",))


def test_student_pallas_kernel_is_the_reference_on_cpu():
    # Not the interpreter (orders of magnitude slower): the reference itself, bit for bit.
    p = neighbour_list_problem(9)
    args = (p["features"], p["pair_lengths"], p["params"])
    np.testing.assert_array_equal(call_pairs(functools.partial(cfconv, kernel="pallas"), p, *args),
                                  call_pairs(cfconv_reference, p, *args))


def test_bad_inputs_raise():
    p = random_problem(6)
    with pytest.raises(ValueError, match="precision"):
        PallasConfig(precision="tf32")
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(block_edges=24)
    with pytest.raises(ValueError, match="block_edges >= 16"):
        PallasConfig(forward=TINY, interpret=False).launch()
    graph = edge_graph(p["senders"], p["receivers"], p["edge_mask"], 4)
    with pytest.raises(ValueError, match="graph is for 4 atoms"):
        call(pallas, p, graph=graph)


@pytest.fixture(scope="module")
def aspirin(structures_dir):
    return read_structures(str(structures_dir / "aspirin.extxyz"))


@pytest.mark.parametrize("architecture", [SchNetConfig, PaiNNConfig])
def test_student_with_pallas_kernel_matches_xla(aspirin, monkeypatch, architecture):
    """Energies, forces and training gradients (forces inside the loss: second order) agree: every edge kernel
    of each student (cfconv and the edge vectors' difference) in the interpreter."""
    results = {}
    # The student's "pallas" entry with the kernels interpreted (on the CPU it would otherwise be the reference).
    monkeypatch.setitem(KERNELS, "pallas-interpreted", pallas_set(PallasConfig(interpret=True)))
    for kernel in ("xla", "pallas-interpreted"):
        # PaiNN's every block has the same kernels: one layer checks them, at half the interpreter's time.
        config = architecture(features=16, n_rbf=8, layers=1 if architecture is PaiNNConfig else 2, cutoff=4.0,
                              kernel=kernel)
        batch, _ = make_batch(aspirin, config.cutoff)
        model = student_model(config)
        params = init_params(config, jax.random.key(0), batch)

        def loss(params):
            energy, forces = predictions(model, params, batch)[:2]
            return jnp.sum((energy + 3.0) ** 2) + jnp.sum((forces - 0.1) ** 2)

        energy, forces = jax.jit(lambda params: predictions(model, params, batch)[:2])(params)
        results[kernel] = (energy, forces, jax.jit(jax.grad(loss))(params))
    xla, pal = results["xla"], results["pallas-interpreted"]
    assert_close(pal[0], xla[0], rtol=1e-6)
    assert_close(pal[1], xla[1], rtol=1e-5)
    assert np.abs(np.asarray(xla[1])).max() > 1e-3  # forces are not trivially zero
    for a, b in zip(jax.tree.leaves(pal[2]), jax.tree.leaves(xla[2])):
        assert_close(a, b, rtol=2e-5)


def test_wide_features_in_chunks_match_reference_to_second_order():
    """Features wider than the chunk run as one launch per chunk (12 features in chunks of 5, 5, 2: one
    narrower than the others), on both the general and the symmetric path; derivatives to second order."""
    chunked = functools.partial(pallas, feature_chunk=5)
    p = random_problem(5)
    assert_close(call(chunked, p), call(cfconv_reference, p))
    assert_close(first_order(chunked, p), first_order(cfconv_reference, p))
    second = [jax.jit(jax.grad(lambda *a: force_loss(fn, p, *a), argnums=(0, 1, 2)))(
        p["features"], p["lengths"], p["params"]) for fn in (chunked, cfconv_reference)]
    assert_close(second[0], second[1], rtol=5e-5)
    q = neighbour_list_problem(9)
    args = (q["features"], q["pair_lengths"], q["params"])
    symmetric_chunked = functools.partial(symmetric_pallas, feature_chunk=5)
    assert_close(call_pairs(symmetric_chunked, q, *args), call_pairs(cfconv_reference, q, *args))
    grads = [jax.jit(jax.grad(lambda f, r, c, fn=fn: jnp.sum(jnp.sin(call_pairs(fn, q, f, r, c))),
                              argnums=(0, 1, 2)))(*args) for fn in (symmetric_chunked, cfconv_reference)]
    assert_close(grads[0], grads[1], rtol=2e-5)
