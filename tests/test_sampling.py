"""Samplers: every candidate is a valid structure, candidates are reproducible from the key (and change with
it), provenance is complete and survives a file round trip."""

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from distiller.data.sampling import MDConfig, NormalModeConfig, RattleConfig, RattleRelaxConfig, sample
from distiller.structure import Structure, StructureError, read_structures, write_structures
from distiller.vibrations import frequencies, vibrational_modes

TEACHER = "fennol-pmc:ani1x/0"
MIN_DISTANCE = 0.5


@pytest.fixture(scope="module")
def model():
    from distiller.load import load_model

    return load_model(TEACHER)


@pytest.fixture(scope="module")
def ethanol():
    return Structure.from_ase(ase.build.molecule("CH3CH2OH"), name="ethanol")


def assert_valid(candidates, seeds):
    """Validated, no pair closer than MIN_DISTANCE Å (checked here with ASE, independently of the sampler), cells
    of periodic candidates far from singular, provenance naming a known seed."""
    names = {s.name for s in seeds}
    for c in candidates:
        c.validated()
        d = neighbor_list("d", c.to_ase(), MIN_DISTANCE)
        assert len(d) == 0, f"{c.name}: atoms {d.min():.3f} Å apart"
        seed = next(s for s in seeds if c.name.startswith(s.name + "|"))
        assert seed.name in names and np.array_equal(c.numbers, seed.numbers) and np.array_equal(c.pbc, seed.pbc)
        if seed.periodic:
            assert abs(np.linalg.det(c.cell)) > 0.8 * abs(np.linalg.det(seed.cell))
        assert c.energy is None and c.forces is None  # candidates are for labelling
        provenance = c.info["provenance"]
        assert {"method", "params", "source", "seed", "sample"} <= set(provenance)


def assert_reproducible(draw):
    """draw(key) -> candidates: the same key gives identical arrays, another key different ones."""
    a, b, c = draw(0), draw(0), draw(1)
    assert len(a) == len(b) == len(c) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell, y.cell)
        assert x.info["provenance"] == y.info["provenance"]
    for x, z in zip(a, c):
        assert not np.allclose(x.positions, z.positions)
    return a


def test_rattle(structures_dir):
    seeds = [read_structures(structures_dir / f)[0] for f in ("watertiny.extxyz", "aspirin.extxyz")]
    config = RattleConfig(count=4, stdev=0.05, strain=0.03)
    candidates = assert_reproducible(lambda key: sample([structures_dir / "watertiny.extxyz",
                                                         structures_dir / "aspirin.extxyz"], config, key=key))
    assert_valid(candidates, seeds)
    assert len(candidates) == 8
    water, aspirin = candidates[:4], candidates[4:]
    for c in water:  # periodic: strained cell, positions moved with it (fractional coordinates stay close)
        strain = np.linalg.solve(seeds[0].cell, c.cell) - np.eye(3)
        assert 0 < np.abs(strain).max() <= 0.03 + 1e-6
        np.testing.assert_allclose(strain, strain.T, atol=1e-6)
    for c in aspirin:  # molecule: cell untouched
        np.testing.assert_array_equal(c.cell, seeds[1].cell)
    displacement = np.concatenate([c.positions - seeds[1].positions for c in aspirin])
    assert np.std(displacement) == pytest.approx(0.05, rel=0.2)
    p = water[2].info["provenance"]
    assert p["method"] == "rattle" and p["params"] == {"count": 4, "stdev": 0.05, "strain": 0.03}
    assert p["source"]["path"].endswith("watertiny.extxyz") and p["source"]["index"] == 0 and p["sample"] == 2


def test_rattle_redraws_overlapping_candidates(ethanol):
    """Displacements of 0.3 Å make close pairs common; every candidate returned is still valid."""
    candidates = sample([ethanol], RattleConfig(count=30, stdev=0.3), key=3)
    assert_valid(candidates, [ethanol])
    assert any(c.info["provenance"]["attempt"] > 0 for c in candidates)


def test_provenance_survives_extxyz(tmp_path, ethanol):
    candidates = sample([ethanol], RattleConfig(count=2), key=5)
    write_structures(tmp_path / "candidates.extxyz", candidates)
    back = read_structures(tmp_path / "candidates.extxyz")
    assert [b.info["provenance"] for b in back] == [c.info["provenance"] for c in candidates]


def test_vibrational_modes_of_a_harmonic_bond():
    """Two atoms joined by a spring k along x: 5 rigid modes (linear) dropped, one stretch with force
    constant 2k along the unit direction (-x, +x)/sqrt(2)."""
    k = 30.0
    pair = Structure(np.array([8, 8]), np.array([[0.0, 0, 0], [1.2, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool),
                     name="O2")
    block = np.zeros((3, 3))
    block[0, 0] = k
    H = np.block([[block, -block], [-block, block]])
    directions, constants = vibrational_modes(pair, H)
    assert directions.shape == (1, 2, 3)
    np.testing.assert_allclose(constants, [2 * k])
    np.testing.assert_allclose(np.abs(directions[0]), np.array([[1, 0, 0], [1, 0, 0]]) / np.sqrt(2), atol=1e-12)
    # ν = sqrt(k / μ) / (2π c) with μ = m/2, in SI units (CODATA): 30 eV/Å² between two oxygens ≈ 1471 cm⁻¹.
    mass = pair.to_ase().get_masses()[0] * 1.66053906660e-27
    expected = np.sqrt(k * 16.02176634 / (mass / 2)) / (2 * np.pi * 2.99792458e10)
    np.testing.assert_allclose(frequencies(pair, H), [expected], rtol=1e-6)
    np.testing.assert_allclose(frequencies(pair, -H), [-expected], rtol=1e-6)  # unstable: negative


def test_normal_modes(model, ethanol):
    config = NormalModeConfig(count=4, temperature=300.0, relax_fmax=0.05, relax_steps=400)
    candidates = assert_reproducible(lambda key: sample([ethanol], config, model, key=key))
    assert_valid(candidates, [ethanol])
    p = candidates[0].info["provenance"]
    assert p["method"] == "normal_modes" and p["modes"] == 3 * 9 - 6 and p["relaxed_fmax"] <= 0.05
    assert p["softest_force_constant"] > 0  # a minimum: no negative modes left after the rigid ones
    for c in candidates:  # displaced, but only by thermal amplitudes
        shift = np.linalg.norm(c.positions - ethanol.positions, axis=1)
        assert 0.01 < shift.max() < 1.0


def test_teacher_md(model, structures_dir):
    seed = read_structures(structures_dir / "watertiny.extxyz")[0]
    config = MDConfig(count=3, temperature=400.0, interval=10, equilibration=20, chunk=50, replicas=2)
    candidates = assert_reproducible(lambda key: sample([structures_dir / "watertiny.extxyz"], config, model, key=key))
    assert_valid(candidates, [seed])
    assert [(c.info["provenance"]["replica"], c.info["provenance"]["step"]) for c in candidates] == \
        [(0, 30), (0, 40), (0, 50), (1, 30), (1, 40), (1, 50)]
    assert not np.allclose(candidates[0].positions, candidates[3].positions)  # replicas are independent
    assert all(c.info["provenance"]["model"] == TEACHER for c in candidates)
    np.testing.assert_array_equal(candidates[0].cell, seed.cell)


def test_rattle_relax(model, ethanol):
    config = RattleRelaxConfig(families=2, cycles=3, stdev=0.1, relax_steps=5)
    candidates = assert_reproducible(lambda key: sample([ethanol], config, model, key=key))
    assert_valid(candidates, [ethanol])
    assert len(candidates) == 12
    stages = [(c.info["provenance"]["family"], c.info["provenance"]["cycle"], c.info["provenance"]["stage"])
              for c in candidates]
    assert stages == [(f, c, s) for f in range(2) for c in range(3) for s in ("rattled", "relaxed")]
    # Relaxing lowers the teacher's energy of each rattled frame.
    from distiller.md import potential

    neighbor_fn, energy_fn = potential(model, ethanol)
    energy = jax.jit(lambda R, nbrs: energy_fn(R, neighbor=nbrs))

    def e(structure):
        R = jnp.asarray(structure.positions, jnp.float32)
        return float(energy(R, neighbor_fn.allocate(R)))

    for rattled, relaxed in zip(candidates[::2], candidates[1::2]):
        assert e(relaxed) < e(rattled)
    # The next rattle starts from the relaxed frame, not from the seed: families wander off.
    assert not np.allclose(candidates[4].positions, ethanol.positions, atol=0.3)


def test_bad_configurations_are_refused(ethanol):
    with pytest.raises(ValueError, match="count"):
        RattleConfig(count=0)
    with pytest.raises(ValueError, match="multiple of interval"):
        MDConfig(interval=20, equilibration=30)
    with pytest.raises(ValueError, match="needs an energy model"):
        sample([ethanol], MDConfig(), None)
    with pytest.raises(TypeError, match="unknown sampling configuration"):
        sample([ethanol], {"method": "rattle"})
    with pytest.raises(StructureError, match="ethanol"):  # bonds are ~1 Å: no draw can be valid
        sample([ethanol], RattleConfig(count=1, stdev=0.01), key=0, min_distance=2.0)
