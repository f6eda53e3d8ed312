"""PaiNN's fused message kernel (`directional_cfconv`) against its plain-JAX reference, in Pallas' interpreter.

Same kernels as on the GPU (only the launch differs); tiny blocks so that an atom has many more edges than a
block and the loops, masks and padding paths all run. Derivatives to second order are what training on forces
differentiates: the edge vectors' cotangent (the position gradient) and the features' and coefficients'.
vectors=None (all zero: PaiNN's first layer) is checked against zero vectors, in numbers and kernel inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distiller.capacity import make_batch
from distiller.derivatives import predictions
from distiller.structure import read_structures
from distiller.students import PaiNNConfig, init_params, painn, student_model
from pallas_kernels import KERNELS, directional_cfconv, pallas_set
from pallas_kernels.directional_cfconv import directional_cfconv_reference
from pallas_kernels.directional_cfconv.pallas import directional_cfconv_pallas
from pallas_kernels.edges.edge_op import KernelConfig, PallasConfig
from arrays import assert_close
from pallas_kernels.edges.graph import edge_graph

CUTOFF = 3.0
TINY = KernelConfig(block_edges=4, block_atoms=4)  # flat layout: one loop over a program's 4 atoms' edges
CONFIG = PallasConfig(forward=TINY, first=TINY, second=TINY, interpret=True)
TINY_ATOM = KernelConfig(block_edges=4, block_atoms=3, layout="atom")  # the per-atom loop
CONFIG_ATOM = PallasConfig(forward=TINY_ATOM, first=TINY_ATOM, second=TINY_ATOM, interpret=True)
INPUTS = ("scalars", "vectors", "along", "edge_vectors", "params")


def random_problem(seed, n_atoms=9, n_edges=40, features=6, n_rbf=6, dtype=jnp.float32):
    """A padded, unsorted edge list: one crowded atom, atoms with no edges, padding edges anywhere holding
    arbitrary vectors, some edges beyond the cutoff. Features (6) and basis size (6) are not powers of two."""
    rng = np.random.default_rng(seed)
    receivers = rng.integers(0, n_atoms - 3, n_edges)  # the last 3 atoms receive nothing...
    receivers[: n_edges // 2] = 1  # ... and atom 1 far more edges than a block holds
    senders = rng.integers(0, n_atoms - 1, n_edges)  # the last atom sends nothing either
    edge_mask = rng.random(n_edges) < 0.8
    receivers[~edge_mask & (rng.random(n_edges) < 0.5)] = n_atoms - 1
    directions = rng.normal(size=(n_edges, 3))
    lengths = rng.uniform(0.4, CUTOFF * 1.15, n_edges)
    edge_vectors = directions / np.linalg.norm(directions, axis=1, keepdims=True) * lengths[:, None]
    perm = rng.permutation(n_edges)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return dict(scalars=normal(n_atoms, features), vectors=normal(n_atoms, 3, features),
                along=normal(n_atoms, features), edge_vectors=jnp.asarray(edge_vectors[perm], dtype),
                params={"coefficients": normal(n_rbf, 3, features)},
                senders=jnp.asarray(senders[perm], jnp.int32), receivers=jnp.asarray(receivers[perm], jnp.int32),
                edge_mask=jnp.asarray(edge_mask[perm]))


def call(fn, p, *inputs, **kwargs):
    """fn on p's graph with the five differentiable inputs (p's own where not given)."""
    scalars, vectors, along, edge_vectors, params = inputs or tuple(p[k] for k in INPUTS)
    return fn(scalars, vectors, along, edge_vectors, p["senders"], p["receivers"], p["edge_mask"], params,
              cutoff=CUTOFF, **kwargs)


def pallas(*args, config=CONFIG, **kwargs):
    return directional_cfconv_pallas(*args, config=config, **kwargs)


@pytest.mark.parametrize("config", [CONFIG, CONFIG_ATOM], ids=["flat", "atom"])
def test_forward_matches_reference(config):
    for seed in range(2):
        p = random_problem(seed)
        out = call(pallas, p, config=config)
        assert_close(out, call(directional_cfconv_reference, p))
        assert all(np.all(np.asarray(o)[-3:] == 0) for o in out)  # atoms with no edges
        assert np.abs(np.asarray(out[1])).max() > 1e-2  # not trivially zero


def test_rotating_the_inputs_rotates_the_vector_output_only():
    p = random_problem(2)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))  # a rotation or a reflection
    q = jnp.asarray(q, jnp.float32)
    rotated = (p["scalars"], jnp.einsum("de,aef->adf", q, p["vectors"]), p["along"], p["edge_vectors"] @ q.T,
               p["params"])
    (s, v), (s_rot, v_rot) = call(pallas, p), call(pallas, p, *rotated)
    assert_close(s_rot, s, rtol=1e-5)
    assert_close(v_rot, jnp.einsum("de,aef->adf", q, v), rtol=1e-5)


def scalar(fn, p, *inputs):
    """A nonlinear scalar of both outputs (every output row's cotangent differs)."""
    s, v = call(fn, p, *inputs)
    return jnp.sum(s * jnp.sin(s)) + jnp.sum(jnp.tanh(v) * jnp.cos(v[:, ::-1]))


def force_loss(fn, p, *inputs):
    """What training on forces differentiates: a loss of the first derivatives (edge vectors, features)."""
    d_scalars, d_vectors, _, d_edge_vectors = jax.grad(lambda *a: scalar(fn, p, *a, inputs[-1]), argnums=(0, 1, 2, 3))(
        *inputs[:-1])
    return jnp.sum(d_edge_vectors**2) + jnp.sum(jnp.cos(d_scalars)) + jnp.sum(d_vectors**3)


def both_orders(fn, p):
    """Gradients of a scalar of the outputs, and of a loss of those gradients (second order: its edge-vector
    part is the Hessian in the edge vectors times the gradient, the HVP of a force loss), w.r.t. all inputs."""
    everything = tuple(range(len(INPUTS)))

    @jax.jit  # one program per kernel: its compile is most of the time
    def grads(*inputs):
        return tuple(jax.grad(functools.partial(quantity, fn, p), argnums=everything)(*inputs)
                     for quantity in (scalar, force_loss))

    return grads(*(p[k] for k in INPUTS))


def test_first_and_second_order_match_reference():
    p = random_problem(3)
    (first, second), (first_ref, second_ref) = (both_orders(fn, p) for fn in (pallas, directional_cfconv_reference))
    assert_close(first, first_ref, rtol=2e-5)
    assert_close(second, second_ref, rtol=5e-5)
    for grads in (first, second):
        assert np.all(np.asarray(grads[3])[~np.asarray(p["edge_mask"])] == 0)  # padding edges: exactly 0


def fixed_vectors(fn, vectors):
    """fn with its vectors argument replaced by `vectors` (None: all zero) whatever it is given."""
    return lambda scalars, _, *rest, **kwargs: fn(scalars, vectors, *rest, **kwargs)


@pytest.mark.parametrize("fn", [directional_cfconv_reference, pallas], ids=["reference", "pallas"])
def test_no_vectors_is_zero_vectors(fn):
    """vectors=None (PaiNN's first layer) computes what all-zero vectors do in the reference: outputs, first
    and second derivatives w.r.t. the other inputs; filter 1's coefficients (unused) get exactly 0."""
    p = random_problem(7)
    without = fixed_vectors(fn, None)
    with_zeros = fixed_vectors(directional_cfconv_reference, jnp.zeros_like(p["vectors"]))
    out = call(without, p)
    assert_close(out, call(with_zeros, p), rtol=1e-6)
    assert np.abs(np.asarray(out[1])).max() > 1e-2  # the along term is there
    (first, second), (first_zeros, second_zeros) = both_orders(without, p), both_orders(with_zeros, p)
    assert_close(first, first_zeros, rtol=2e-5)  # as the kernel against the reference above
    assert_close(second, second_zeros, rtol=5e-5)
    for grads in (first, second):
        assert np.all(np.asarray(grads[4]["coefficients"])[:, 1] == 0)
        assert np.abs(np.asarray(grads[4]["coefficients"])[:, 2]).max() > 1e-2


def pallas_call_inputs(fn, *args) -> list[int]:
    """The number of inputs of each Pallas kernel launched by fn(*args), in its jaxpr (nested ones included)."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield len(eqn.invars)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_no_vectors_are_no_kernel_inputs():
    """With vectors=None no pass reads the three vector rows or filter 1: the forward pass and the first
    layer's force pass (the edge vectors' cotangent alone) each have 4 inputs fewer than with zero vectors."""
    p = random_problem(8)

    def energy(vectors):  # a scalar of the outputs, as a function of the edge vectors alone
        return lambda x: scalar(fixed_vectors(pallas, vectors), p, p["scalars"], None, p["along"], x, p["params"])

    with_zeros, without = (pallas_call_inputs(jax.grad(energy(v)), p["edge_vectors"])
                           for v in (jnp.zeros_like(p["vectors"]), None))
    assert len(with_zeros) == 2 and without == [n - 4 for n in with_zeros]  # forward, force pass


def test_painn_first_message_without_vectors_keeps_energies_and_forces(structures_dir, monkeypatch):
    """PaiNN's first message gets v = None and passes vectors=None; a student whose messages all get v as an
    array (zeros at first: the computation before) has the same energies and forces under kernel="xla", to
    float32 rounding (W_0 is now a product of F columns, not 4F)."""
    structures = read_structures(str(structures_dir / "watertiny.extxyz"))
    config = PaiNNConfig(features=8, n_rbf=6, layers=2, cutoff=3.0)
    batch, _ = make_batch(structures, config.cutoff)
    model = student_model(config)
    params = init_params(config, jax.random.key(0), batch)
    given = []  # per traced message: were its vectors None?

    def recorded(scalars, vectors, *args, **kwargs):
        given.append(vectors is None)
        return directional_cfconv(scalars, vectors, *args, **kwargs)

    class ZeroVectorsMessage(painn.Message):
        def __call__(self, s, v, *args):
            return super().__call__(s, jnp.zeros((s.shape[0], 3, s.shape[1]), s.dtype) if v is None else v, *args)

    monkeypatch.setattr(painn, "directional_cfconv", recorded)
    energy_forces = lambda: jax.jit(lambda params: predictions(model, params, batch)[:2])(params)  # noqa: E731
    e_none, f_none = energy_forces()
    assert given == [True, False]  # one trace: the first layer's message alone had no vectors
    monkeypatch.setattr(painn, "Message", ZeroVectorsMessage)
    e_zeros, f_zeros = energy_forces()
    assert given[2:] == [False, False]
    assert_close(e_none, e_zeros, rtol=1e-6)
    assert_close(f_none, f_zeros, rtol=1e-5)
    assert np.abs(np.asarray(f_none)).max() > 1e-3


def test_student_pallas_kernel_is_the_reference_on_cpu():
    # Not the interpreter (orders of magnitude slower): the reference itself, bit for bit.
    p = random_problem(5)
    for a, b in zip(call(functools.partial(directional_cfconv, kernel="pallas"), p),
                    call(directional_cfconv_reference, p)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_raise_before_any_work():
    p = random_problem(6)
    bad = dict(p, vectors=p["vectors"][:, :2])
    for fn in (directional_cfconv_reference, pallas):
        with pytest.raises(ValueError, match=r"vectors must have shape \(9, 3, 6\)"):
            call(fn, bad)
    with pytest.raises(ValueError, match="edge_vectors must have shape"):
        call(pallas, p, *(p[k] for k in INPUTS[:3]), p["edge_vectors"][:, :2], p["params"])
    with pytest.raises(ValueError, match="filter coefficients must have shape"):
        call(directional_cfconv_reference, p, *(p[k] for k in INPUTS[:4]), {"coefficients": jnp.ones((6, 2, 6))})
    with pytest.raises(ValueError, match="graph is for 4 atoms"):
        call(pallas, p, graph=edge_graph(p["senders"], p["receivers"], p["edge_mask"], 4))


def test_painn_with_pallas_kernel_matches_xla_on_a_periodic_box(structures_dir, monkeypatch):
    """Energy, forces and stress of a 2-layer PaiNN on the 81-atom water box: the message and the edge
    vectors' difference in the interpreter (the first layer's force pass walks the receiver order, the
    second's the sender order) against kernel="xla", same parameters."""
    monkeypatch.setitem(KERNELS, "pallas-interpreted", pallas_set(PallasConfig(interpret=True)))
    structures = read_structures(str(structures_dir / "watertiny.extxyz"))
    results = {}
    for kernel in ("xla", "pallas-interpreted"):
        config = PaiNNConfig(features=8, n_rbf=6, layers=2, cutoff=3.0, kernel=kernel)
        batch, _ = make_batch(structures, config.cutoff)
        model = student_model(config)
        params = init_params(config, jax.random.key(0), batch)
        results[kernel] = jax.jit(lambda params: predictions(model, params, batch, stress=True)[:3])(params)
    (e_x, f_x, s_x), (e_p, f_p, s_p) = results["xla"], results["pallas-interpreted"]
    assert bool(np.asarray(batch.pbc)[0].all())  # (the second graph is the batch's padding)
    assert_close(e_p, e_x, rtol=1e-6)
    assert_close(f_p, f_x, rtol=1e-5)
    assert_close(s_p, s_x, rtol=1e-5)
    assert np.abs(np.asarray(f_x)).max() > 1e-3  # forces are not trivially zero


@pytest.mark.parametrize("vectors", ["given", "none"])
def test_wide_features_in_chunks_match_reference_to_second_order(vectors):
    """Features wider than the chunk run as one launch per chunk (6 features in chunks of 4 and 2), with and
    without the vector inputs; outputs and derivatives to second order are the reference's."""
    p = random_problem(11)
    fns = [functools.partial(pallas, feature_chunk=4), directional_cfconv_reference]
    if vectors == "none":
        fns = [fixed_vectors(fn, None) for fn in fns]
    assert_close(call(fns[0], p), call(fns[1], p))
    (first, second), (first_ref, second_ref) = (both_orders(fn, p) for fn in fns)
    assert_close(first, first_ref, rtol=2e-5)
    assert_close(second, second_ref, rtol=5e-5)
