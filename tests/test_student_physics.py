"""Physics of the SchNet student beyond the energy-model contract (tests/test_contract.py): its cfconv
reference, the C2 envelope at the cutoff, reference energies, unknown elements.

Every check runs on a randomly initialised student whose weights are scaled up, so that interactions move
energies by electron-volts and forces are O(1) eV/Å (a fresh init would pass most checks trivially).
Finite-difference checks run in float64 (`jax.enable_x64` around the evaluation only).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import BSpline

from distiller import neighbours as nl
from distiller import reference as references
from distiller.batch import BatchShape, binning_cell
from distiller.capacity import make_batch
from distiller.derivatives import predictions
from distiller.predict import Predictor
from distiller.reference import ZERO, ReferenceEnergies
from distiller.structure import Structure, StructureError
from distiller.students import SchNetConfig, init_params, student_model
from pallas_kernels import cfconv
from pallas_kernels.cfconv import cfconv_reference, envelope, spline_basis

CONFIG = SchNetConfig(cutoff=5.0, features=32, layers=2, n_rbf=16, elements=(1, 6, 7, 8))
REFERENCE = ReferenceEnergies.of({1: -0.6, 6: -1.1, 7: -1.4, 8: -1.7})
# Compilation dominates the run time, so (almost) every batch has one padded shape and one neighbour list:
# its cutoff reaches beyond the student's, as in training when the teacher's cutoff is larger.
SHAPE = BatchShape(atoms=128, graphs=6)
NL_CUTOFF = CONFIG.cutoff + 1.0
CAPACITY = nl.NeighbourCapacity(edges=12288, bins=64, bin_size=128, reach=2)  # make_batch grows it if needed


# --- fixtures and helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_of():
    def build(structures, cutoff=NL_CUTOFF):
        return make_batch(structures, cutoff, shape=SHAPE, capacity=CAPACITY)[0]

    return build


@pytest.fixture(scope="module")
def params(batch_of, aspirin):
    """Random student weights, scaled so that the interactions matter."""
    p = init_params(CONFIG, jax.random.key(0), batch_of([aspirin]))
    rng = np.random.default_rng(1)

    def scramble(path, x):
        name = jax.tree_util.keystr(path)
        if "element_offsets" in name:
            return x  # constant per-atom shifts: nothing to test here (and no draw, so the others stay as tuned)
        std = 1.0 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.3  # weights: unit gain; biases: non-zero
        if "readout" in name:
            std *= 3.0
        return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(scramble, p)


STUDENT = student_model(CONFIG, reference=REFERENCE)
EFS = jax.jit(lambda params, batch: predictions(STUDENT, params, batch, stress=True))


def to64(tree):
    """Floating leaves as float64 (call inside `jax.enable_x64(True)`)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x, np.float64)) if np.issubdtype(np.asarray(x).dtype, np.floating)
        else jnp.asarray(x), tree)


def as64(batch, structures):
    """A float32 batch with float64 positions and cells taken from the structures (inside `enable_x64`).

    The neighbour list stays the float32 one (built outside x64, so it compiles once): integer shifts are
    the same at either precision.
    """
    positions = np.zeros(batch.positions.shape, np.float64)
    positions[: sum(s.n_atoms for s in structures)] = np.concatenate([s.positions for s in structures])
    cell = np.asarray(batch.cell, np.float64).copy()
    for g, s in enumerate(structures):
        cell[g] = binning_cell(s)
    return to64(batch._replace(positions=positions, cell=cell))


# --- the cfconv reference --------------------------------------------------------------------------------

def test_envelope_is_one_at_zero_and_c2_zero_at_cutoff():
    rc = 5.0

    @jax.jit
    def value_and_derivatives(r):
        f = lambda x: envelope(x, rc)
        return f(r), jax.vmap(jax.grad(f))(r), jax.vmap(jax.grad(jax.grad(f)))(r)

    with jax.enable_x64(True):
        # 0; just inside the cutoff, where f ~ (rc - r)^3, f' ~ (rc - r)^2, f'' ~ rc - r; at and beyond it.
        r = jnp.array([0.0, rc * (1 - 1e-5), rc, rc + 1e-9, rc + 1.0, 50.0])
        f, d1, d2 = (np.asarray(a) for a in value_and_derivatives(r))
        inside, _, _ = value_and_derivatives(jnp.linspace(0.0, rc, 200))
    assert f[0] == 1.0 and d1[0] == 0.0
    assert abs(f[1]) < 1e-12 and abs(d1[1]) < 1e-6 and abs(d2[1]) < 1e-3
    assert np.all(f[2:] == 0.0) and np.all(d1[2:] == 0.0) and np.all(d2[2:] == 0.0)
    assert np.all(np.diff(np.asarray(inside)) <= 1e-15)  # monotone from 1 down to 0


def _numpy_cfconv(features, lengths, senders, receivers, mask, fp, cutoff):
    """The docstring's formula, atom by atom and edge by edge, in float64 numpy (scipy's B-splines)."""
    coefficients = np.asarray(fp["coefficients"], np.float64)
    n_basis = coefficients.shape[0]
    h = cutoff / (n_basis - 3)
    basis = [BSpline.basis_element(h * (np.arange(5) + k - 3), extrapolate=False) for k in range(n_basis)]
    out = np.zeros(features.shape, np.float64)
    for e in range(len(lengths)):
        r = float(lengths[e])
        if not mask[e] or r >= cutoff:
            continue
        x = r / cutoff
        env = 1 - 28 * x**6 + 48 * x**7 - 21 * x**8  # p = 6
        w = np.nan_to_num([b(r) for b in basis]) @ coefficients
        out[receivers[e]] += env * w * features[senders[e]]
    return out


def test_spline_basis_is_a_local_partition_of_unity():
    # Why the filter can be any smooth function of r at its knot resolution: on [0, cutoff] the basis sums
    # to 1, is nonnegative, and at most 4 functions are nonzero at any r (what keeps the kernel's work small).
    with jax.enable_x64(True):
        r = jnp.linspace(0.0, 4.0, 2001)
        b = np.asarray(spline_basis(r, 4.0, 11))
        db, d2b = (np.asarray(jax.vmap(jax.jacfwd(f))(r)) for f in (
            lambda x: spline_basis(x[None], 4.0, 11)[0],
            jax.jacfwd(lambda x: spline_basis(x[None], 4.0, 11)[0])))
    np.testing.assert_allclose(b.sum(axis=1), 1.0, atol=1e-12)
    assert b.min() >= 0.0 and (b > 0).sum(axis=1).max() <= 4
    # C2: first and second derivatives have no jumps between neighbouring sample points (h = 0.5 here).
    assert np.abs(np.diff(db, axis=0)).max() < 0.05 and np.abs(np.diff(d2b, axis=0)).max() < 0.1
    with pytest.raises(ValueError, match="at least 4"):
        spline_basis(r, 4.0, 3)


def test_cfconv_reference_matches_the_formula_and_masks_padding():
    rng = np.random.default_rng(0)
    A, E, F, R, rc = 7, 40, 4, 6, 3.0
    features = rng.normal(size=(A, F)).astype(np.float32)
    receivers = np.sort(rng.integers(0, A - 1, E)).astype(np.int32)
    senders = rng.integers(0, A - 1, E).astype(np.int32)
    lengths = rng.uniform(0.5, 3.6, E).astype(np.float32)  # some beyond the cutoff
    mask = rng.random(E) < 0.8
    lengths[~mask] = 0.0  # padding edges: zero length, pointing at the last atom
    senders[~mask] = receivers[~mask] = A - 1
    fp = {"coefficients": rng.normal(size=(R, F))}
    fp32 = {k: jnp.asarray(v, jnp.float32) for k, v in fp.items()}
    args = (jnp.asarray(features), jnp.asarray(lengths), jnp.asarray(senders), jnp.asarray(receivers),
            jnp.asarray(mask))
    out = jax.jit(partial(cfconv_reference, cutoff=rc))(*args, fp32)
    expected = _numpy_cfconv(features, lengths, senders, receivers, mask, fp, rc)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    assert np.all(np.asarray(out)[A - 1] == 0.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(partial(cfconv, cutoff=rc, kernel="xla"))(*args, fp32)),
                                  np.asarray(out))

    def loss(lengths):
        return jnp.sum(cfconv_reference(args[0], lengths, *args[2:], fp32, cutoff=rc) ** 2)

    g = np.asarray(jax.jit(jax.grad(loss))(args[1]))
    assert np.all(np.isfinite(g))
    assert np.all(g[~mask] == 0.0) and np.all(g[lengths >= rc] == 0.0)
    assert np.any(g[mask & (lengths < rc)] != 0.0)


def test_unknown_kernel_is_a_clear_value_error():
    with pytest.raises(ValueError, match="unknown kernel set 'nope'.*xla"):
        cfconv(jnp.zeros((2, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
               jnp.ones(1, bool), {}, cutoff=5.0, kernel="nope")
    with pytest.raises(ValueError, match="unknown kernel set"):
        SchNetConfig(kernel="nope")
    with pytest.raises(ValueError, match="elements"):
        SchNetConfig(elements=(1, 1, 8))
    with pytest.raises(ValueError, match="n_rbf"):
        SchNetConfig(n_rbf=3)


def test_the_random_student_is_not_trivial(params, batch_of, aspirin):
    batch = batch_of([aspirin])
    out = EFS(params, batch)
    rms = float(np.sqrt(np.mean(np.asarray(out.forces)[: aspirin.n_atoms] ** 2)))
    assert 0.1 < rms < 100.0, rms
    isolated = EFS(params, batch._replace(edge_mask=jnp.zeros_like(batch.edge_mask)))
    assert abs(float(out.energy[0] - isolated.energy[0])) > 0.1  # interactions, not only per-atom terms


# --- the cutoff ------------------------------------------------------------------------------------------

def test_energy_and_forces_are_smooth_across_the_cutoff(params, batch_of):
    """An H atom walks away from an O-H pair: its last neighbour crosses the cutoff (C2 envelope)."""
    rc = CONFIG.cutoff

    def trimer(r, keep=slice(None)):
        # O at the origin, H bonded at +0.96 Å, the other H at distance r from O (r + ~0.96 from the bonded H).
        positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-r, 0.2, 0.0]])
        positions[2] *= r / np.linalg.norm(positions[2])
        return Structure(np.array([8, 1, 1], np.int32)[keep], positions[keep], np.zeros((3, 3)), np.zeros(3, bool),
                         name=f"r={r}")

    def efs(r):
        structures = [trimer(r)]
        batch = batch_of(structures)  # the list reaches beyond the student's cutoff
        with jax.enable_x64(True):
            out = EFS(to64(params), as64(batch, structures))
            return float(out.energy[0]), np.asarray(out.forces[:3])

    e_far, f_far = efs(30.0)
    parts = [trimer(30.0, slice(0, 2)), trimer(30.0, slice(2, 3))]
    batch = batch_of(parts)
    with jax.enable_x64(True):
        e_parts = np.asarray(EFS(to64(params), as64(batch, parts)).energy)
    np.testing.assert_allclose(e_far, e_parts[0] + e_parts[1], rtol=0, atol=1e-10)
    # Beyond the cutoff (but inside the neighbour list) the edge is there and contributes exactly nothing.
    e_out, f_out = efs(rc + 1e-3)
    assert e_out == e_far and np.array_equal(f_out, f_far)
    # Inside: E - E_far ~ h^3 and the walking atom's force ~ h^2 (halving h divides them by 8 and 4).
    de, df = [], []
    for h in [0.2, 0.1, 0.05, 0.025]:
        e, f = efs(rc - h)
        de.append(abs(e - e_far))
        df.append(np.linalg.norm(f[2]))
    assert de[0] > 1e-5 and df[0] > 1e-4, (de, df)
    for a, b in zip(de[:-1], de[1:]):
        assert 5.5 < a / b < 11.0, de
    for a, b in zip(df[:-1], df[1:]):
        assert 3.0 < a / b < 5.5, df


# --- reference energies and element checks --------------------------------------------------------------------

def test_fit_reference_energies_recovers_per_element_energies():
    rng = np.random.default_rng(0)
    elements = (1, 6, 7, 8, 9)  # F never occurs: its reference keeps the prior (0)
    true = {1: -13.6, 6: -1029.8, 7: -1484.9, 8: -2041.3}
    numbers = [rng.choice([1, 6, 7, 8], size=rng.integers(1, 30)) for _ in range(25)]
    energies = [sum(true[z] for z in n) for n in numbers]
    fitted = references.fit(numbers, energies, elements)
    np.testing.assert_allclose(fitted.table[[1, 6, 7, 8, 9]], [*true.values(), 0.0], rtol=1e-10)
    # Water only: H and O cannot be told apart; the fit reproduces every energy and otherwise stays at the prior.
    waters = [np.array([8, 1, 1] * k) for k in (1, 2, 5)]
    e_w = [k * (true[8] + 2 * true[1] + 0.3) for k in (1, 2, 5)]
    prior = ReferenceEnergies.of(true)
    fw = references.fit(waters, e_w, elements, prior=prior)
    np.testing.assert_allclose(fw.energies(waters), e_w, rtol=1e-12)
    assert fw.table[6] == true[6] and fw.table[9] == 0.0
    np.testing.assert_allclose(fw.table[[1, 8]], [true[1] + 0.12, true[8] + 0.06], atol=1e-9)  # closest to it
    with pytest.raises(ValueError, match=r"\[16\]"):
        references.fit([np.array([1, 16])], [1.0], elements)
    with pytest.raises(ValueError, match="2 structures but 1 energies"):
        references.fit([np.array([1]), np.array([8])], [1.0], elements)


def test_reference_energies_are_added_exactly(aspirin, params):
    """Public energies are the float64 reference part plus the float32 model part: aspirin with ANI-sized
    per-element energies is resolved to float32 of the small part, not to float32 of -17,000 eV (2 meV)."""
    large = ReferenceEnergies.of({1: -13.6, 6: -1029.8, 7: -1484.9, 8: -2041.3})
    small, big = (Predictor(student_model(CONFIG, params, reference))([aspirin])[0] for reference in (ZERO, large))
    assert big.energy - small.energy == pytest.approx(large.energy(aspirin.numbers), abs=1e-9)
    np.testing.assert_array_equal(big.forces, small.forces)
    assert abs(small.energy) < 200  # the model part


def test_unknown_elements_fail_loudly(params, batch_of, aspirin):
    sulfur = aspirin.replace(numbers=np.where(aspirin.numbers == 8, 16, aspirin.numbers).astype(np.int32),
                             name="aspirin with S")
    with pytest.raises(StructureError, match="aspirin with S.*S \\(Z=16\\)"):
        STUDENT.check([aspirin, sulfur])
    STUDENT.check([aspirin])
    out = EFS(params, batch_of([aspirin, sulfur]))
    e, f = np.asarray(out.energy), np.asarray(out.forces)
    assert np.isfinite(e[0]) and np.all(np.isfinite(f[: aspirin.n_atoms]))
    assert np.isnan(e[1]) and np.any(np.isnan(f[aspirin.n_atoms:2 * aspirin.n_atoms]))  # never a plausible number
