"""The energy-model contract, checked on every model distiller has: the FeNNol teacher (one member and the
ensemble), every registered student architecture (random weights, scaled up so that interactions move
energies by electron-volts) and Orb (the real architecture, random weights, float64).

    invariance        rotations, reflections, translations, permutations leave E alone and rotate F
    conservative      F = -dE/dx against float64 central differences of the energy
    stress            sigma = (1/V) dE/d(eps) against float64 finite strain; symmetric
    cutoff            E is continuous where a neighbour crosses the model's cutoff
    extensive         alone = in a batch = per cell of a supercell, and E/N of large tilings (exact sums)
    calculator        the ASE calculator gives the numbers of the pure functions

Finite differences run in float64: JAX models under `jax.enable_x64` (weights and batch cast), Orb with its
float64 precision. Each check batches its structures (displaced copies included) into one call, and the force
and stress checks share theirs (one float64 program per model), so a model compiles a few shapes only. Orb costs seconds per structure on a CPU, so it gets the lighter variant of each
check (fewer structures and components; a 2-atom Si crystal where the others take watertiny), and it is not
rotation invariant: its architecture learns that from
augmented data, random weights have none (translations and permutations it must respect).
"""

from __future__ import annotations

import functools
import zlib

import ase.build

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError

from distiller import capacity as capacities
from distiller import neighbours as nl
from distiller.batch import BatchShape, pad_structures, with_neighbours
from distiller.calculator import Calculator
from distiller.derivatives import predictions
from distiller.predict import Predictor, batch_predictions
from distiller.reference import ReferenceEnergies
from distiller.structure import Structure
from distiller.students import architectures, config_class, init_params, student_model
from distiller.teachers.registry import load_teacher
from finite_differences import central_slopes, displaced

ORB = "orb:random/orb-v3-conservative?precision=float64"
# PaiNN with its angular embedding (three-body densities within 3.5 Å) is checked as a model of its own.
ANGULAR = "painn?angular_degree=4&angular_channels=4"
MODELS = ["fennol-pmc:ani1x/0", "fennol-pmc:ani1x", *[f"student:{name}" for name in architectures()],
          f"student:{ANGULAR}", ORB]
# Per-element energies of ANI's size: the tilings test that they stay out of float32 sums.
REFERENCE = ReferenceEnergies.of({1: -13.6, 6: -1029.8, 7: -1484.9, 8: -2041.3})


def random_student(spec: str, structure: Structure):
    """'ARCHITECTURE[?field=int&...]': a random student of that architecture (with those integer fields)."""
    architecture, _, fields = spec.partition("?")
    fields = {k: int(v) for k, v in (f.split("=") for f in fields.split("&") if f)}
    config = config_class(architecture)(cutoff=5.0, elements=(1, 6, 7, 8), **fields)
    batch, _ = capacities.make_batch([structure], config.cutoff)
    params = init_params(config, jax.random.key(0), batch)

    def scramble(path, x):  # weights of gain 1.5, non-zero biases: a fresh init would pass most checks trivially
        rng = np.random.default_rng([1, zlib.crc32(jax.tree_util.keystr(path).encode())])  # per leaf: stable
        std = 1.5 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.3
        return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

    return student_model(config, jax.tree_util.tree_map_with_path(scramble, params), REFERENCE,
                         name=f"random {spec} student")


@pytest.fixture(scope="module")
def crystal():
    """Diamond Si in its 2-atom cell, sheared and rattled (nonzero forces and shear stress): the periodic structure
    of the light checks (Orb takes ~10 s per float64 watertiny on a CPU, a fraction of one for this)."""
    si = Structure.from_ase(ase.build.bulk("Si", "diamond", a=5.43), name="Si2")
    strain = np.eye(3) + np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.01], [0.015, 0.0, 0.005]])
    positions = si.positions @ strain + np.random.default_rng(1).normal(0.0, 0.05, si.positions.shape)
    return si.replace(positions=positions, cell=si.cell @ strain)


@pytest.fixture
def periodic(model, request):
    """watertiny; for light models the Si crystal."""
    return request.getfixturevalue("crystal" if light(model) else "water")


@pytest.fixture(scope="module", params=MODELS)
def model(request, aspirin):
    if request.param.startswith("student:"):
        yield random_student(request.param.split(":", 1)[1], aspirin)
    else:
        yield load_teacher(request.param)
    jax.clear_caches()  # a model's ~10 compiled shapes map memory the next model needs (tests/conftest.py)


@functools.lru_cache(maxsize=None)
def predictor(model) -> Predictor:
    return Predictor(model)


def labelled(model, structures):
    return predictor(model)(structures)


def energies64(model, structures: list[Structure]) -> np.ndarray:
    """float64 total energies of `structures` (any sizes, molecules and cells mixed), in one call. JAX models: in
    float64 on edges built once in float32 (at the model's cutoff plus 0.5 Å, so that small displacements keep every
    pair they need), the model's capacity measured in float32."""
    if model.host_only:
        return np.array([s.energy for s in model.label(structures)])
    total = sum(s.n_atoms for s in structures)
    shape = BatchShape(atoms=total + 1, graphs=len(structures) + 1)
    batch32 = jax.tree.map(jnp.asarray, pad_structures(structures, shape))
    capacity = capacities.allocate(model, batch32, model.cutoff + 0.5)
    edges, found = with_neighbours(batch32, model.cutoff + 0.5, capacity.neighbours)
    assert not bool(found.overflow)
    positions = np.zeros(batch32.positions.shape)
    positions[:total] = np.concatenate([s.positions for s in structures])
    cells = np.asarray(batch32.cell, np.float64).copy()
    for g, s in enumerate(structures):
        if s.periodic:
            cells[g] = s.cell
    with jax.enable_x64(True):
        cast = lambda x: jnp.asarray(np.asarray(x, np.float64)) if np.issubdtype(np.asarray(x).dtype, np.floating) \
            else jnp.asarray(x)
        params, batch = jax.tree.map(cast, model.params), jax.tree.map(cast, edges)
        batch = batch._replace(positions=jnp.asarray(positions), cell=jnp.asarray(cells))
        out = jax.jit(model.energies, static_argnums=2)(params, batch, capacity.model)
        assert not bool(out.overflow)
        energy = np.asarray(out.energy, np.float64)[: len(structures)]
    return model.total_energies(structures, energy)


H = 1e-4  # Å for positions, strain for cells: the step of the float64 central differences
STRAINS = [(0, 0), (1, 1), (0, 1), (1, 2)]


def force_checked(model, aspirin, water) -> list[tuple[Structure, list[tuple[int, int]]]]:
    """The structures whose forces are checked against differences, each with its (atom, axis) components. Orb's
    periodic derivatives are the stress check's; the ensemble is its members' mean (member 0 does water)."""
    count = 2 if light(model) else 4
    cases = []
    for s in (aspirin,) if light(model) or model.n_members > 1 else (aspirin, water):
        rng = np.random.default_rng(0)
        cases.append((s, list(zip(rng.integers(0, s.n_atoms, count), rng.integers(0, 3, count)))))
    return cases


@pytest.fixture(scope="module")
def differences(model, aspirin, water, crystal):
    """Central differences of the float64 energy: -dE/dx for each force-checked structure and component, and
    (1/V) dE/d(eps_ij) of the periodic structure for each of STRAINS. Every displaced and strained copy goes into
    one `energies64` call: a model compiles one float64 program for both checks."""
    periodic = crystal if light(model) else water
    cases = force_checked(model, aspirin, water)
    copies = [c for s, components in cases for c in displaced(s, components, (), H)]
    copies += displaced(periodic, (), STRAINS, H)
    slopes = central_slopes(energies64(model, copies), H)
    forces, start = [], 0
    for s, components in cases:
        forces.append(-slopes[start:start + len(components)])
        start += len(components)
    return forces, slopes[start:] / abs(np.linalg.det(periodic.cell))


def random_orthogonal(seed: int, proper: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return q


# --- invariance ----------------------------------------------------------------------------------------------

def skip_sums_checked_on_plain_painn(model) -> None:
    """The angular PaiNN skips the checks of what lies outside the network (per-graph sums, the calculator):
    those are plain PaiNN's, checked on it; the suite's time goes to the checks the embedding can fail."""
    if model.name == f"random {ANGULAR} student":
        pytest.skip("outside the network: checked on plain PaiNN")


def light(model) -> bool:
    """Orb: seconds per structure on a CPU."""
    return model.host_only


@pytest.mark.parametrize("name", ["aspirin", "water"])
def test_invariance_and_force_covariance(model, name, request):
    if light(model) and name == "water":
        pytest.skip("Orb: the molecule suffices (seconds per structure on a CPU)")
    s = request.getfixturevalue(name)
    perm = np.random.default_rng(3).permutation(s.n_atoms)
    cases = [("rotation", random_orthogonal(1, proper=True), np.zeros(3), None),
             ("reflection", random_orthogonal(2, proper=False), np.zeros(3), None),
             ("translation", np.eye(3), np.array([3.7, -11.2, 0.45]), None),
             ("permutation", np.eye(3), np.zeros(3), perm)]
    if model.name.startswith("orb:"):
        cases = cases[2:]  # not rotation invariant by construction (module docstring)
    moved = []
    for _, rotation, shift, p in cases:
        p = np.arange(s.n_atoms) if p is None else p
        moved.append(s.replace(numbers=s.numbers[p], positions=s.positions[p] @ rotation + shift,
                               cell=s.cell @ rotation))
    out = labelled(model, [s, *moved])
    scale = np.abs(out[0].forces).max()
    assert scale > 0.1, "the model has forces to compare"
    for (label, rotation, _, p), o in zip(cases, out[1:]):
        assert abs(o.energy - out[0].energy) < 2e-4 * s.n_atoms ** 0.5, label
        expected = out[0].forces @ rotation
        np.testing.assert_allclose(o.forces, expected if p is None else expected[p], atol=1e-4 * scale,
                                   err_msg=label)
        if s.periodic:
            np.testing.assert_allclose(o.stress, rotation.T @ out[0].stress @ rotation,
                                       atol=1e-4 * np.abs(out[0].stress).max(), err_msg=label)


# --- derivatives ------------------------------------------------------------------------------------------------

def test_forces_are_minus_the_energy_gradient(model, aspirin, water, differences):
    numeric_forces, _ = differences
    for (s, components), numeric in zip(force_checked(model, aspirin, water), numeric_forces):
        (analytic,) = labelled(model, [s])
        expected = np.array([analytic.forces[a, k] for a, k in components])
        scale = np.abs(analytic.forces).max()
        np.testing.assert_allclose(expected, numeric, atol=2e-4 * scale + 1e-5, err_msg=s.name)


def test_hessian_vector_products_are_finite_differences_of_forces(model, aspirin):
    """H·v (forward over reverse: the HVP loss term's, for teacher and student) against float64 central
    differences of the forces along v, on aspirin and two random directions."""
    if model.host_only:
        pytest.skip(f"{model.name} has first derivatives only (host model)")
    if model.n_members > 1:
        # Its forces under x64 carry float32 noise (~1e-6 relative), which a difference quotient magnifies past
        # the tolerance; the ensemble is its members' mean, and member 0 checks FeNNol's H·v.
        pytest.skip("the ensemble's finite differences are not float64 clean")
    # The quotient's error is h² F'''/6: at h = 1e-4 it reached 1.5e-5 of |Hv| for the angular student (float64
    # rounding stays near 1e-10 at this h).
    h, n = 2e-5, aspirin.n_atoms
    batch32 = jax.tree.map(jnp.asarray, pad_structures([aspirin], BatchShape(atoms=n + 1, graphs=2)))
    capacity = capacities.allocate(model, batch32, model.cutoff + 0.5)
    edges, _ = with_neighbours(batch32, model.cutoff + 0.5, capacity.neighbours)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        cast = lambda x: jnp.asarray(np.asarray(x, np.float64)) if np.issubdtype(np.asarray(x).dtype, np.floating) \
            else jnp.asarray(x)
        params, batch = jax.tree.map(cast, model.params), jax.tree.map(cast, edges)
        x = np.zeros(batch.positions.shape)
        x[:n] = aspirin.positions
        run = jax.jit(lambda params, batch, v: predictions(model, params, batch, capacity.model, directions=v))
        for _ in range(2):
            v = np.zeros_like(x)
            v[:n] = rng.normal(size=(n, 3))
            v /= np.linalg.norm(v)
            out = run(params, batch._replace(positions=jnp.asarray(x)), jnp.asarray(v))
            plus, minus = (run(params, batch._replace(positions=jnp.asarray(x + sign * h * v)), jnp.asarray(v)).forces
                           for sign in (1.0, -1.0))
            numeric = -(np.asarray(plus) - np.asarray(minus)) / (2 * h)
            hvp = np.asarray(out.hvp)
            assert np.abs(hvp).max() > 1e-2  # eV/Å²: something to check
            np.testing.assert_allclose(hvp[:n], numeric[:n], atol=1e-5 * np.abs(hvp).max() + 1e-7)
            assert not np.any(hvp[n:])  # padding atoms


def test_stress_is_the_strain_derivative(model, periodic, aspirin, differences):
    (analytic,) = labelled(model, [periodic])
    _, numeric = differences
    for (i, j), expected in zip(STRAINS, numeric):
        assert analytic.stress[i, j] == pytest.approx(expected, abs=2e-4 * np.abs(analytic.stress).max() + 1e-7)
    assert np.abs(analytic.stress).max() > 1e-4  # eV/Å³: the check has something to check
    np.testing.assert_allclose(analytic.stress, analytic.stress.T, atol=1e-7)
    assert labelled(model, [aspirin])[0].stress is None  # no cell, no stress


def test_energy_is_continuous_across_the_cutoff(model):
    """An H atom leaves an O atom's neighbourhood: the energy just inside the cutoff is that of the two
    separate atoms (up to the envelope's last bit), well inside it is not."""
    def dimer(r):
        return Structure(np.array([8, 1], np.int32), np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), np.zeros((3, 3)),
                         np.zeros(3, bool), name=f"OH at {r} Å")

    rc = model.cutoff
    far, inside, deep = (s.energy for s in labelled(model, [dimer(30.0), dimer(rc - 1e-3), dimer(0.7 * rc)]))
    assert abs(inside - far) < 1e-4
    assert abs(deep - far) > 1e-3
    angular = getattr(model.source, "angular_degree", 0) and model.source.angular_cutoff
    if angular:  # the angular embedding's own cutoff (shorter): an H crosses it, the energy is continuous there
        def water(r):
            direction = np.array([-0.3, 0.95, 0.0]) / np.hypot(0.3, 0.95)
            return Structure(np.array([8, 1, 1], np.int32), np.array([[0.0, 0.0, 0.0], [0.97, 0.0, 0.0],
                             r * direction]), np.zeros((3, 3)), np.zeros(3, bool), name=f"HOH, one H at {r} Å")

        # Second differences in float64 across it: a jump J there would show as J, the smooth part as E'' h².
        h = 1e-4
        below, at, above = energies64(model, [water(angular - h), water(angular), water(angular + h)])
        assert abs(above - 2 * at + below) < 1e-6


# --- extensivity ----------------------------------------------------------------------------------------------

def test_alone_equals_batched_equals_supercell(model, aspirin, periodic):
    together = labelled(model, [aspirin, periodic])
    for s, t in zip((aspirin, periodic), together):
        (alone,) = labelled(model, [s])
        assert t.energy == pytest.approx(alone.energy, abs=1e-4)
        np.testing.assert_allclose(t.forces, alone.forces, atol=1e-4 * np.abs(alone.forces).max())
    (cell,) = labelled(model, [periodic])
    (big,) = labelled(model, [periodic.tiled((2, 2, 2))])
    assert big.energy / 8 == pytest.approx(cell.energy, abs=1e-4)
    for image in big.forces.reshape(8, periodic.n_atoms, 3):  # ase's repeat: whole copies, in order
        np.testing.assert_allclose(image, cell.forces, atol=1e-4 * np.abs(cell.forces).max())
    np.testing.assert_allclose(big.stress, cell.stress, atol=1e-4 * np.abs(cell.stress).max())


def test_energy_per_atom_of_tilings(model, water):
    """watertiny tiled 3 x 3 x 3 (2,187 atoms): E/N as the cell's within 1e-5 eV/atom (a float32 sum of the
    totals was off by 7 meV/atom at 5,184 atoms; at 2,187 a float32 total of ~1.5e6 eV has an ulp of 0.125 eV,
    6e-5 eV/atom, so even one rounding of it fails this, and a larger tiling only costs more run time)."""
    skip_sums_checked_on_plain_painn(model)
    if model.host_only:
        pytest.skip("host-only models sum in their own precision (Orb: float64 here); the 2x2x2 supercell "
                    "check covers them")
    (cell,) = labelled(model, [water])
    big_structure = water.tiled((3, 3, 3))
    (big,) = labelled(model, [big_structure])
    assert abs(big.energy / big_structure.n_atoms - cell.energy / water.n_atoms) < 1e-5


# --- the calculator -------------------------------------------------------------------------------------------

def test_calculator_gives_the_pure_functions_numbers(model, aspirin, periodic):
    skip_sums_checked_on_plain_painn(model)
    for s in (aspirin, periodic):
        atoms = s.to_ase()
        atoms.calc = Calculator(model)
        if model.host_only:
            expected = model.label([s])[0]
            energy, forces, stress = expected.energy, expected.forces, expected.stress
        else:  # the jitted neighbour list and derivatives, at the Predictor's padded shape (one compilation)
            batch = jax.tree.map(jnp.asarray, pad_structures([s], predictor(model).shape(nl.round_up(s.n_atoms), 1)))
            capacity = capacities.allocate(model, batch, model.cutoff)
            out, _ = batch_predictions(model, model.params, batch, capacity, model.cutoff, s.periodic)
            energy = model.total_energies([s], np.asarray(out.energy)[:1])[0]
            forces, stress = np.asarray(out.forces)[: s.n_atoms], np.asarray(out.stress)[0]
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-5 * np.abs(forces).max())
        if s.periodic:
            np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, atol=1e-5 * np.abs(stress).max())
        else:
            with pytest.raises(PropertyNotImplementedError):
                atoms.get_stress()
