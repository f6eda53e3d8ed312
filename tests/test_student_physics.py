"""Physics of the student: invariances, conservative forces, smooth cutoff, extensivity, stress, references.

Every check runs on a randomly initialised student whose weights are scaled up, so that interactions move
energies by electron-volts and forces are O(1) eV/Å (a fresh init would pass most checks trivially).
Finite-difference checks run in float64 (`jax.enable_x64` around the evaluation only).
"""

from __future__ import annotations

from functools import partial

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.fd import calculate_numerical_stress
from scipy.interpolate import BSpline

from distiller import neighbours as nl
from distiller.batch import BatchShape, binning_cell, make_batch
from distiller.structure import Structure, StructureError, closest_pair, read_structures
from distiller.students import (StudentConfig, build_model, check, energy, energy_forces, energy_forces_stress,
                                fit_reference_energies, init_student)
from pallas_kernels import cfconv
from pallas_kernels.cfconv import cfconv_reference, envelope, spline_basis

CONFIG = StudentConfig(cutoff=5.0, features=32, layers=2, n_rbf=16, elements=(1, 6, 7, 8))
MODEL = build_model(CONFIG)
EFS = jax.jit(partial(energy_forces_stress, MODEL))
ENERGY = jax.jit(partial(energy, MODEL))
# Compilation dominates the run time, so (almost) every batch has one padded shape and one neighbour list:
# its cutoff reaches beyond the student's, as in training when the teacher's cutoff is larger.
SHAPE = BatchShape(atoms=128, graphs=6)
NL_CUTOFF = CONFIG.cutoff + 1.0
CAPACITY = nl.NeighbourCapacity(edges=12288, bins=64, bin_size=128, reach=2)  # make_batch grows it if needed


# --- fixtures and helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aspirin(structures_dir):
    return read_structures(structures_dir / "aspirin.extxyz")[0]


@pytest.fixture(scope="module")
def water(structures_dir):
    return read_structures(structures_dir / "watertiny.extxyz")[0]


@pytest.fixture(scope="module")
def crystal():
    """A small triclinic H/C/N/O cell, thinner than the cutoff (many periodic images)."""
    rng = np.random.default_rng(7)
    cell = np.array([[4.1, 0.0, 0.0], [0.9, 3.8, 0.0], [-0.6, 0.7, 4.3]])
    while True:
        frac = rng.random((5, 3))
        s = Structure(numbers=np.array([1, 1, 6, 7, 8], np.int32), positions=frac @ cell, cell=cell,
                      pbc=np.ones(3, bool), name="random crystal")
        if closest_pair(s)[2] > 1.0:
            return s.validated()


@pytest.fixture(scope="module")
def batch_of():
    def build(structures, cutoff=NL_CUTOFF):
        return make_batch(structures, cutoff, shape=SHAPE, capacity=CAPACITY)[0]

    return build


@pytest.fixture(scope="module")
def params(batch_of, aspirin):
    """Random student weights, scaled so that the interactions matter."""
    p = init_student(CONFIG, jax.random.key(0), batch_of([aspirin]), reference_energies=[-0.6, -1.1, -1.4, -1.7])
    rng = np.random.default_rng(1)

    def scramble(path, x):
        name = jax.tree_util.keystr(path)
        if "reference_energies" in name:
            return x
        std = 1.0 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.3  # weights: unit gain; biases: non-zero
        if "readout" in name:
            std *= 3.0
        return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(scramble, p)


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


def split(structures, e, f, s):
    n = np.cumsum([0] + [st.n_atoms for st in structures])
    return (np.asarray(e)[: len(structures)], [np.asarray(f)[a:b] for a, b in zip(n[:-1], n[1:])],
            np.asarray(s)[: len(structures)])


def evaluate(params, batch, structures):
    """Energies, forces and stresses per structure (float32)."""
    return split(structures, *EFS(params, batch))


def random_orthogonal(seed: int, proper: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return q


def transformed(s: Structure, rotation=np.eye(3), translation=np.zeros(3), permutation=None) -> Structure:
    perm = np.arange(s.n_atoms) if permutation is None else permutation
    return s.replace(numbers=s.numbers[perm], positions=s.positions[perm] @ rotation + translation,
                     cell=s.cell @ rotation)


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
        StudentConfig(kernel="nope")
    with pytest.raises(ValueError, match="elements"):
        StudentConfig(elements=(1, 1, 8))


# --- invariance ------------------------------------------------------------------------------------------

def test_the_random_student_is_not_trivial(params, batch_of, aspirin):
    batch = batch_of([aspirin])
    e, f, _ = evaluate(params, batch, [aspirin])
    rms = float(np.sqrt(np.mean(f[0] ** 2)))
    assert 0.1 < rms < 100.0, rms
    isolated, _, _ = evaluate(params, batch._replace(edge_mask=jnp.zeros_like(batch.edge_mask)), [aspirin])
    assert abs(e[0] - isolated[0]) > 0.1  # interactions, not only per-atom terms, carry energy


@pytest.mark.parametrize("name", ["aspirin", "crystal"])
def test_invariance_and_force_covariance(params, batch_of, name, request):
    s = request.getfixturevalue(name)
    perm = np.random.default_rng(3).permutation(s.n_atoms)
    cases = [
        ("rotation", random_orthogonal(1, proper=True), np.zeros(3), None),
        ("reflection", random_orthogonal(2, proper=False), np.zeros(3), None),
        ("translation", np.eye(3), np.array([3.7, -11.2, 0.45]), None),
        ("permutation", np.eye(3), np.zeros(3), perm),
    ]
    structures = [s] + [transformed(s, rot, shift, p) for _, rot, shift, p in cases]
    energies, forces, _ = evaluate(params, batch_of(structures), structures)
    scale = np.abs(forces[0]).max()
    np.testing.assert_allclose(energies, energies[0], rtol=1e-5, atol=1e-5)
    for (label, rot, _, p), f in zip(cases, forces[1:]):
        expected = forces[0] @ rot
        if p is not None:
            expected = expected[p]
        np.testing.assert_allclose(f, expected, atol=2e-5 * scale, err_msg=label)


# --- conservative forces -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aspirin", "crystal"])
def test_forces_are_minus_the_energy_gradient(params, batch_of, name, request):
    s = request.getfixturevalue(name)
    batch32 = batch_of([s])  # the list reaches 1 Å beyond the cutoff: no pair crosses it under h
    with jax.enable_x64(True):
        p64, batch = to64(params), as64(batch32, [s])
        _, forces, _ = EFS(p64, batch)
        rng = np.random.default_rng(0)
        h = 1e-4
        for atom, k in zip(rng.integers(0, s.n_atoms, 6), rng.integers(0, 3, 6)):
            step = jnp.zeros_like(batch.positions).at[atom, k].set(h)
            plus = ENERGY(p64, batch._replace(positions=batch.positions + step))[0]
            minus = ENERGY(p64, batch._replace(positions=batch.positions - step))[0]
            np.testing.assert_allclose(-float(plus - minus) / (2 * h), float(forces[atom, k]), rtol=1e-6, atol=1e-8)


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
            e, f, _ = EFS(to64(params), as64(batch, structures))
            return float(e[0]), np.asarray(f[:3])

    e_far, f_far = efs(30.0)
    parts = [trimer(30.0, slice(0, 2)), trimer(30.0, slice(2, 3))]
    batch = batch_of(parts)
    with jax.enable_x64(True):
        e_parts = np.asarray(ENERGY(to64(params), as64(batch, parts)))
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


# --- batching and extensivity --------------------------------------------------------------------------------

def test_batched_equals_alone_and_padding_is_inert(params, batch_of, aspirin, water, crystal):
    structures = [aspirin, water, crystal]
    batch = batch_of(structures)
    e, f, s = EFS(params, batch)
    n = sum(x.n_atoms for x in structures)
    assert np.all(np.asarray(e)[3:] == 0.0) and np.all(np.asarray(f)[n:] == 0.0) and np.all(np.asarray(s)[3:] == 0.0)
    energies, forces, stresses = split(structures, e, f, s)
    e2, f2 = jax.jit(partial(energy_forces, MODEL))(params, batch)  # the stress-free variant agrees
    np.testing.assert_allclose(np.asarray(e2), np.asarray(e), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f2), np.asarray(f), rtol=1e-5, atol=1e-6)
    for k, st in enumerate(structures):
        e1, f1, s1 = evaluate(params, batch_of([st]), [st])
        np.testing.assert_allclose(energies[k], e1[0], rtol=1e-6, atol=1e-5, err_msg=st.name)
        np.testing.assert_allclose(forces[k], f1[0], atol=1e-5 * np.abs(f1[0]).max(), err_msg=st.name)
        np.testing.assert_allclose(stresses[k], s1[0], atol=1e-5 * np.abs(s1[0]).max() + 1e-9, err_msg=st.name)
    # A neighbour list cut exactly at the student's cutoff (and its own bucketed shape) changes nothing.
    exact = batch_of(structures, cutoff=CONFIG.cutoff)
    np.testing.assert_allclose(np.asarray(EFS(params, exact)[0])[:3], energies, rtol=1e-6, atol=1e-5)
    # Gradients for training (through the forces) are finite despite zero-length padding edges.
    loss = lambda p: jnp.sum(EFS(p, batch)[1] ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_supercell_is_extensive(params, batch_of, water):
    big = Structure.from_ase(water.to_ase().repeat((2, 2, 2)), name="watertiny x 2x2x2")
    big_batch, _ = make_batch([big], NL_CUTOFF, capacity=CAPACITY._replace(edges=8 * CAPACITY.edges))
    (e_cell,), (f_cell,), (s_cell,) = evaluate(params, batch_of([water]), [water])
    (e_big,), (f_big,), (s_big,) = evaluate(params, big_batch, [big])
    np.testing.assert_allclose(e_big / 8.0, e_cell, rtol=2e-6, atol=1e-5)
    for image in np.asarray(f_big).reshape(8, water.n_atoms, 3):  # ase's repeat: whole copies, in order
        np.testing.assert_allclose(image, f_cell, atol=2e-5 * np.abs(f_cell).max())
    np.testing.assert_allclose(s_big, s_cell, atol=2e-5 * np.abs(s_cell).max())


# --- stress ---------------------------------------------------------------------------------------------------

class _StudentCalculator(Calculator):
    """The float64 student as an ASE calculator, so that ASE's own finite-strain stress judges ours."""

    implemented_properties = ["energy", "free_energy"]

    def __init__(self, params, batch_of):
        super().__init__()
        self.params, self.batch_of = params, batch_of

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        structures = [Structure.from_ase(self.atoms)]
        batch = self.batch_of(structures)
        with jax.enable_x64(True):
            e = float(ENERGY(to64(self.params), as64(batch, structures))[0])
        self.results = {"energy": e, "free_energy": e}


@pytest.mark.parametrize("name", ["water", "crystal"])
def test_stress_matches_ase_finite_strain(params, batch_of, name, request):
    s = request.getfixturevalue(name)
    batch = batch_of([s])
    with jax.enable_x64(True):
        stress = np.asarray(EFS(to64(params), as64(batch, [s]))[2][0])
    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    atoms.calc = _StudentCalculator(params, batch_of)
    expected = calculate_numerical_stress(atoms, eps=1e-5, voigt=False, force_consistent=False)
    assert np.abs(expected).max() > 1e-4  # eV/Å³: the check has something to check
    np.testing.assert_allclose(stress, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)  # rotation invariance makes the virial symmetric


def test_stress_is_zero_without_a_cell(params, batch_of, aspirin):
    _, _, s = evaluate(params, batch_of([aspirin]), [aspirin])
    assert np.all(s == 0.0)


# --- reference energies and element checks --------------------------------------------------------------------

def test_fit_reference_energies_recovers_per_element_energies():
    rng = np.random.default_rng(0)
    elements = (1, 6, 7, 8, 9)  # F never occurs: its reference must come out 0
    true = np.array([-13.6, -1029.8, -1484.9, -2041.3])
    numbers = [rng.choice([1, 6, 7, 8], size=rng.integers(1, 30)) for _ in range(25)]
    energies = [sum(true[[1, 6, 7, 8].index(z)] for z in n) for n in numbers]
    fitted = fit_reference_energies(numbers, energies, elements)
    np.testing.assert_allclose(fitted, [*true, 0.0], rtol=1e-10)
    # Water only: H and O cannot be told apart, but the fit still reproduces every energy exactly.
    waters = [np.array([8, 1, 1] * k) for k in (1, 2, 5)]
    e_w = [k * (true[3] + 2 * true[0]) for k in (1, 2, 5)]
    fw = fit_reference_energies(waters, e_w, elements)
    assert fw[1] == fw[2] == fw[4] == 0.0
    np.testing.assert_allclose([fw[3] + 2 * fw[0]] * 3, np.array(e_w) / [1, 2, 5], rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[16\]"):
        fit_reference_energies([np.array([1, 16])], [1.0], elements)
    with pytest.raises(ValueError, match="2 structures but 1 energies"):
        fit_reference_energies([np.array([1]), np.array([8])], [1.0], elements)


def test_reference_energies_set_the_isolated_atom_energies(batch_of, aspirin):
    batch = batch_of([aspirin])
    reference = np.array([-13.6, -1029.8, -1484.9, -2041.3])
    with pytest.raises(ValueError, match="reference_energies"):
        init_student(CONFIG, jax.random.key(3), batch, reference_energies=reference[:3])
    p = init_student(CONFIG, jax.random.key(3), batch, reference_energies=reference)
    np.testing.assert_allclose(np.asarray(p["params"]["reference_energies"]), reference, rtol=1e-6)
    # The fitted offsets are what the untrained student predicts, up to its (small) learned part.
    e, _, _ = EFS(p, batch)
    composition = sum(reference[CONFIG.elements.index(z)] for z in aspirin.numbers)
    assert abs(float(e[0]) - composition) < 0.01 * abs(composition)


def test_unknown_elements_fail_loudly(params, batch_of, aspirin):
    sulfur = aspirin.replace(numbers=np.where(aspirin.numbers == 8, 16, aspirin.numbers).astype(np.int32),
                             name="aspirin with S")
    with pytest.raises(StructureError, match="aspirin with S.*16"):
        check(CONFIG, [aspirin, sulfur])
    check(CONFIG, [aspirin])
    e, f, _ = evaluate(params, batch_of([aspirin, sulfur]), [aspirin, sulfur])
    assert np.isfinite(e[0]) and np.all(np.isfinite(f[0]))
    assert np.isnan(e[1]) and np.any(np.isnan(f[1]))  # in jit: NaN, never a plausible wrong number
