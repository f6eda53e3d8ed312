"""The FeNNol teacher against FeNNol's own (impure) energy_and_forces, its capacities, its reference energies,
and the spec registry. (The energy-model contract every model meets is tests/test_contract.py.)

Compiles dominate the time: every batch here is padded to one shape, that of the mixed batch, so that one
jitted function serves nearly all tests.
"""

import dataclasses
import os
import pathlib
import shutil

import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fennol import FENNIX
from flax.core import FrozenDict

from distiller.batch import BatchShape
from distiller.capacity import make_batch
from distiller.derivatives import hessian_vector_product, predictions
from distiller.predict import Predictor
from distiller.structure import Structure, StructureError, read_structures
from distiller.teachers import registry
from distiller.teachers.fennol import FennolCapacity, ModelFileError
from distiller.teachers.registry import ChecksumError, load_teacher

PMC = pathlib.Path(os.environ["FENNOL_PMC_DIR"])  # tests/conftest.py defaults it to ../shared/teachers/fennol-pmc
MEMBER0 = "ANI1X/ani1x_model0.fnx"
CUTOFF = 5.2  # the teacher's, as the Predictor uses


@pytest.fixture(scope="module")
def structures(structures_dir):
    aspirin = read_structures(structures_dir / "aspirin.extxyz")[0]
    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    rng = np.random.default_rng(0)
    rattled = aspirin.replace(positions=aspirin.positions + rng.normal(0.0, 0.05, aspirin.positions.shape),
                              name="aspirin rattled")
    return aspirin, water, rattled


@pytest.fixture(scope="module")
def single():
    return load_teacher("fennol-pmc:ani1x/0")


@pytest.fixture(scope="module")
def mixed(single, structures):
    batch, neighbour_capacity = make_batch(list(structures), CUTOFF)
    return batch, neighbour_capacity, single.capacity_for(batch, 1.25)


def same_shape(structs, mixed):
    """A batch of `structs` padded exactly like the mixed batch (same compiled functions)."""
    batch, neighbour_capacity, _ = mixed
    shape = BatchShape(atoms=batch.positions.shape[0], graphs=batch.n_graphs)
    out, capacity = make_batch(structs, CUTOFF, shape, neighbour_capacity)
    assert capacity == neighbour_capacity
    return out


@pytest.fixture(scope="module")
def run(single):
    """(params, batch, capacity) -> Predictions with stress, jitted once."""
    jitted = jax.jit(lambda params, batch, capacity: predictions(single, params, batch, capacity, stress=True),
                     static_argnums=2)
    return jitted


def totals(model, batch, out) -> np.ndarray:
    """float64 total energies of a batch's real graphs: the reference part plus the model's."""
    gi, z, atoms = np.asarray(batch.graph_index), np.asarray(batch.numbers), np.asarray(batch.atom_mask)
    graphs = np.flatnonzero(np.asarray(batch.graph_mask))
    return np.array([model.reference.energy(z[(gi == g) & atoms]) for g in graphs]) + np.asarray(out.energy,
                                                                                             np.float64)[graphs]


@pytest.fixture(scope="module")
def fennol_model():
    """A separately loaded model: FeNNol exactly as its users run it."""
    return FENNIX.load(PMC / MEMBER0)


def fennol_reference(model, s: Structure, variables=None):
    """FeNNol's own energy (eV), forces (eV/Å) and stress (eV/Å³, from its virial dE/d(scaling))."""
    kwargs = dict(species=s.numbers, coordinates=s.positions, natoms=np.array([s.n_atoms]),
                  batch_index=np.zeros(s.n_atoms, np.int32))
    if s.periodic:
        kwargs["cells"] = s.cell[None]
    e, f, virial, _ = model.energy_and_forces_and_virial(variables=variables, unit="eV", **kwargs)
    stress = np.asarray(virial)[0] / abs(np.linalg.det(s.cell)) if s.periodic else None
    return float(np.asarray(e)[0]), np.asarray(f), stress


@pytest.fixture(scope="module")
def reference(fennol_model, structures):
    return [fennol_reference(fennol_model, s) for s in structures]


def assert_graph_matches(model, out, batch, g, start, ref, n_atoms):
    energy, forces, ref_stress = ref
    np.testing.assert_allclose(totals(model, batch, out)[g], energy, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.forces[start:start + n_atoms]), forces, rtol=1e-4, atol=1e-4)
    if ref_stress is not None:
        np.testing.assert_allclose(np.asarray(out.stress[g]), ref_stress, atol=1e-6)
    else:
        assert np.all(np.asarray(out.stress[g]) == 0.0)


def test_edges_beyond_the_cutoff_are_ignored(single, mixed, run, structures):
    """Batches built with a longer cutoff (a student's) carry pairs the teacher must not see: add aspirin's
    pairs between 5.2 and 6.5 Å in the padding slots of the edge list; nothing may change."""
    from ase.neighborlist import neighbor_list

    batch, _, capacity = mixed
    i, j, d = neighbor_list("ijd", structures[0].to_ase(), 6.5)
    far = d >= single.cutoff
    slots = np.flatnonzero(~np.asarray(batch.edge_mask))
    assert far.sum() > 50 and len(slots) >= far.sum()
    slots = slots[: far.sum()]
    longer = batch._replace(receivers=batch.receivers.at[slots].set(i[far]),
                            senders=batch.senders.at[slots].set(j[far]),
                            edge_mask=batch.edge_mask.at[slots].set(True))
    out = run(single.params, batch, capacity)
    out_longer = run(single.params, longer, capacity)
    assert not bool(out_longer.overflow)
    np.testing.assert_allclose(np.asarray(out_longer.energy), np.asarray(out.energy), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_longer.forces), np.asarray(out.forces), atol=1e-5)


def test_reference_energies_are_anis_self_energies(single, fennol_model):
    """The CHEMICAL_CONSTANT term (ANI's self-energies) is the model's float64 reference, converted to eV; the
    jitted model computes the rest."""
    constants = np.asarray(fennol_model.variables["params"]["self_energy"]["constant"], np.float64)
    np.testing.assert_allclose(single.reference.table[[1, 6, 7, 8]], constants[[1, 6, 7, 8]] * ase.units.Hartree,
                               rtol=1e-12)
    assert single.source.model.energy_terms == ["energy"]


@pytest.mark.parametrize("which", [0, 1], ids=["aspirin", "watertiny"])
def test_single_structure_matches_fennol(single, mixed, run, structures, reference, which):
    s = structures[which]
    batch = same_shape([s], mixed)
    out = run(single.params, batch, mixed[2])
    assert not bool(out.overflow)
    assert_graph_matches(single, out, batch, 0, 0, reference[which], s.n_atoms)
    # Padding graphs and atoms carry nothing; one model has no spread.
    assert np.all(np.asarray(out.energy[1:]) == 0.0)
    assert np.all(np.asarray(out.forces[s.n_atoms:]) == 0.0)
    assert np.all(np.asarray(out.spread) == 0.0)


def test_mixed_batch_equals_isolated(single, mixed, run, structures, reference):
    batch, _, capacity = mixed
    out = run(single.params, batch, capacity)
    assert not bool(out.overflow)
    start = 0
    for g, (s, ref) in enumerate(zip(structures, reference)):
        assert_graph_matches(single, out, batch, g, start, ref, s.n_atoms)
        alone = run(single.params, same_shape([s], mixed), capacity)
        np.testing.assert_allclose(float(out.energy[g]), float(alone.energy[0]), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.forces[start:start + s.n_atoms]),
                                   np.asarray(alone.forces[:s.n_atoms]), atol=2e-5)
        start += s.n_atoms


def test_ensemble_mean_and_spread(mixed, structures, fennol_model):
    model = load_teacher("fennol-pmc:ani1x")
    assert model.n_members == 8 and len(model.source.paths) == 8
    assert all(leaf.shape[0] == 8 for leaf in jax.tree.leaves(model.params))
    batch, _, capacity = mixed
    out = jax.jit(lambda p, b, c: predictions(model, p, b, c), static_argnums=2)(model.params, batch, capacity)
    assert not bool(out.overflow)
    start = 0
    for g, s in enumerate(structures):
        members = [fennol_reference(fennol_model, s, jax.tree.map(lambda x: x[k], model.params)) for k in range(8)]
        energies = np.array([m[0] for m in members])
        forces = np.mean([m[1] for m in members], axis=0)
        assert energies.std() > 1e-3  # the members do differ
        np.testing.assert_allclose(totals(model, batch, out)[g], energies.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(out.spread[g]), energies.std(), rtol=0.05, atol=2e-3)
        np.testing.assert_allclose(np.asarray(out.forces[start:start + s.n_atoms]), forces, rtol=1e-4, atol=1e-4)
        start += s.n_atoms
    assert float(out.spread[-1]) == 0.0
    labelled = Predictor(model)(list(structures[:1]))[0]  # labels carry the spread
    assert labelled.info["energy_spread"] == pytest.approx(float(out.spread[0]), rel=1e-3)


def shrunk(capacity: FennolCapacity, layer: int, key: str) -> FennolCapacity:
    states = list(capacity.layer_states)
    value = states[layer][key]
    small = FrozenDict({z: 1 for z in value}) if isinstance(value, FrozenDict) else 8
    states[layer] = FrozenDict({**states[layer], key: small})
    return dataclasses.replace(capacity, layer_states=tuple(states))


@pytest.mark.parametrize("layer,key", [(0, "npairs"), (1, "nangles"), (2, "sizes")],
                         ids=["filtered-edges", "angles", "species"])
def test_overflow_is_flagged_and_growing_fixes_it(single, mixed, run, layer, key):
    batch, _, capacity = mixed
    assert [type(x).__name__ for x in single.source.model.preprocessing.layers[1:]] == [
        "GraphFilter", "GraphAngularExtension", "SpeciesIndexer"]
    small = shrunk(capacity, layer, key)
    assert bool(run(single.params, batch, small).overflow)
    grown = single.grow(small, batch, 1.25)
    out = run(single.params, batch, grown)
    assert not bool(out.overflow)
    np.testing.assert_allclose(np.asarray(out.energy), np.asarray(run(single.params, batch, capacity).energy),
                               rtol=1e-6, atol=1e-5)


def test_unknown_element_inside_jit_overflows(single, mixed, run):
    batch = mixed[0]
    assert not bool(run(single.params, batch, mixed[2]).overflow)
    silicon = batch._replace(numbers=batch.numbers.at[0].set(14))
    assert bool(run(single.params, silicon, mixed[2]).overflow)
    with pytest.raises(ValueError, match=r"Si \(Z=14\)"):
        single.capacity_for(silicon, 1.25)


def test_capacity_is_bounded(single, mixed):
    batch, _, capacity = mixed
    sizes = capacity.layer_states[2]["sizes"]
    assert set(sizes) == {1, 6, 7, 8}
    counts = np.bincount(np.asarray(batch.numbers)[np.asarray(batch.atom_mask)], minlength=9)
    for z, size in sizes.items():
        assert counts[z] <= size <= batch.positions.shape[0]
    needed = single.source.measure(batch)
    assert needed.layer_states[0]["npairs"] <= capacity.layer_states[0]["npairs"]
    assert "npairs" in str(capacity)


def test_hessian_vector_product(single, mixed):
    """Against float64 central differences of the forces. Padding entries of the angular graph sit exactly at
    its cutoff and the water box has pairs within 3e-4 Å below it: where FeNNol's switch, with its float
    exponent, has NaN second derivatives (see fennol._integer_exponent). Float32 differences cannot be both
    accurate and fine enough: ANI's CELU activations make the Hessian jump wherever a hidden unit crosses zero."""
    batch, _, capacity = mixed
    lengths = np.linalg.norm(np.asarray(batch.edge_vectors()), axis=1)[np.asarray(batch.edge_mask)]
    assert np.any(np.abs(lengths - 3.5) < 3e-4)
    rng = np.random.default_rng(1)
    v = rng.normal(size=batch.positions.shape) * np.asarray(batch.atom_mask)[:, None]
    hvp = jax.jit(lambda p, b, c, v: hessian_vector_product(single, p, b, c, v), static_argnums=2)
    hv = np.asarray(hvp(single.params, batch, capacity, v))
    assert np.all(np.isfinite(hv))
    h = 1e-6
    forces64 = jax.jit(lambda p, b, c: predictions(single, p, b, c).forces, static_argnums=2)
    with jax.enable_x64(True):
        cast = lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
        params64, batch64 = jax.tree.map(cast, single.params), jax.tree.map(cast, batch)
        positions = np.asarray(batch.positions, np.float64)
        plus, minus = (np.asarray(forces64(params64, batch64._replace(positions=jnp.asarray(positions + sign * h * v)),
                                           capacity)) for sign in (1.0, -1.0))
    numeric = -(plus - minus) / (2 * h)
    assert np.abs(hv).max() > 10.0
    np.testing.assert_allclose(hv, numeric, atol=2e-4 * np.abs(hv).max())
    assert np.all(hv[~np.asarray(batch.atom_mask)] == 0.0)


def test_predictor_labels_as_fennol(single, structures, reference):
    labelled = Predictor(single)(list(structures))
    for s, out, (energy, forces, stress) in zip(structures, labelled, reference):
        assert out.name == s.name
        np.testing.assert_allclose(out.energy, energy, rtol=1e-6)
        np.testing.assert_allclose(out.forces, forces, rtol=1e-4, atol=1e-4)
        if stress is None:
            assert out.stress is None
        else:
            np.testing.assert_allclose(out.stress, stress, atol=1e-6)


def test_unknown_element_is_refused(single, structures):
    aspirin = structures[0]
    numbers = aspirin.numbers.copy()
    numbers[3] = 14
    bad = aspirin.replace(numbers=numbers, name="x.extxyz:3")
    message = ("structure 'x.extxyz:3' contains element Si (Z=14) which fennol-pmc:ani1x/0 does not know "
               "(knows H, C, N, O)")
    with pytest.raises(StructureError) as err:
        single.check([aspirin, bad])
    assert str(err.value) == message
    with pytest.raises(StructureError, match="x.extxyz:3"):
        Predictor(single)([bad])
    assert single.elements == frozenset({1, 6, 7, 8})
    assert single.cutoff == 5.2


# ------------------------------------------------------------------------------------------------
# Registry


def test_pmc_member_resolves_through_env(single):
    assert single.name == "fennol-pmc:ani1x/0"
    assert single.source.paths == (str(PMC / MEMBER0),)
    member3 = load_teacher("fennol-pmc:ani1x/3")
    assert member3.source.paths == (str(PMC / "ANI1X/ani1x_model3.fnx"),)
    expected = FENNIX.load(PMC / "ANI1X/ani1x_model3.fnx").variables
    np.testing.assert_array_equal(np.asarray(member3.params["params"]["energy"]["H"]["Layer_1"]["kernel"][0]),
                                  np.asarray(expected["params"]["energy"]["H"]["Layer_1"]["kernel"]))
    # One spec, one model object (shared compilations), every file still checksummed on every load.
    assert load_teacher("fennol-pmc:ani1x/3") is member3 and member3 is not single
    # Models compare by identity: a jit static argument never mistakes one for another.
    assert member3 != dataclasses.replace(member3) and hash(member3) == hash(member3)


def test_fennol_path_spec():
    path = PMC / "ANI1X/ani1x_model5.fnx"
    model = load_teacher(f"fennol:{path}")
    assert model.name == f"fennol:{path}" and model.source.paths == (str(path),) and model.n_members == 1


@pytest.mark.parametrize("spec", ["fennol-pmc:ani9x", "fennol-pmc:ani1x/8", "fennol-pmc:ani1x/x", "nope:x",
                                  "fennol-pmc"])
def test_bad_specs(spec):
    with pytest.raises(ValueError):
        load_teacher(spec)


def test_registry_extension_point(monkeypatch, single):
    monkeypatch.setitem(registry._LOADERS, "same", lambda spec: single)
    assert load_teacher("same:x") is single
    monkeypatch.setitem(registry._LOADERS, "dummy", lambda spec: f"teacher for {spec}")
    with pytest.raises(TypeError, match="not an EnergyModel"):
        load_teacher("dummy:x")
    assert {"fennol", "fennol-pmc", "orb", "ase"} <= set(registry.known_prefixes())


def test_missing_model_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.fnx")):
        load_teacher(f"fennol:{tmp_path / 'missing.fnx'}")
    monkeypatch.setenv("FENNOL_PMC_DIR", str(tmp_path / "pmc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILLER_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_teacher("fennol-pmc:ani1x/2")
    message = str(err.value)
    assert "ANI1X/ani1x_model2.fnx" in message
    assert message.index(str(tmp_path / "pmc")) < message.index(str(tmp_path / "cache" / "distiller"))
    assert "DISTILLER_OFFLINE" in message


def test_corrupt_model_file(tmp_path):
    garbage = tmp_path / "garbage.fnx"
    garbage.write_bytes(b"\x00\x01 not msgpack at all" * 10)
    truncated = tmp_path / "truncated.fnx"
    truncated.write_bytes((PMC / MEMBER0).read_bytes()[:50_000])
    for path in (garbage, truncated):
        with pytest.raises(ModelFileError, match=str(path)):
            load_teacher(f"fennol:{path}")


def corrupted_copy(destination: pathlib.Path) -> None:
    data = bytearray((PMC / MEMBER0).read_bytes())
    data[len(data) // 2] ^= 0xFF
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(bytes(data))


def test_cache_is_checksum_verified(tmp_path, monkeypatch):
    monkeypatch.delenv("FENNOL_PMC_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("DISTILLER_OFFLINE", "1")
    cached = tmp_path / "distiller" / "fennol-pmc" / MEMBER0
    assert registry.cache_dir() == tmp_path / "distiller" / "fennol-pmc"
    corrupted_copy(cached)
    with pytest.raises(ChecksumError, match=str(cached)):
        load_teacher("fennol-pmc:ani1x/0")
    shutil.copyfile(PMC / MEMBER0, cached)
    assert registry.pmc_file(MEMBER0) == cached
    # A corrupted file in FENNOL_PMC_DIR is refused as well.
    corrupted_copy(tmp_path / "pmc" / MEMBER0)
    monkeypatch.setenv("FENNOL_PMC_DIR", str(tmp_path / "pmc"))
    with pytest.raises(ChecksumError, match=str(tmp_path / "pmc")):
        registry.pmc_file(MEMBER0)


def test_download_is_verified_and_atomic(tmp_path, monkeypatch):
    """Downloads through a file:// mirror (no network): a good file lands in the cache, a bad one nowhere."""
    monkeypatch.delenv("FENNOL_PMC_DIR", raising=False)
    monkeypatch.delenv("DISTILLER_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "distiller" / "fennol-pmc" / MEMBER0

    bad_mirror = tmp_path / "bad"
    corrupted_copy(bad_mirror / registry.PMC_REMOTE_PREFIX / MEMBER0)
    monkeypatch.setenv("FENNOL_PMC_URL", bad_mirror.as_uri())
    with pytest.raises(ChecksumError, match="rejected"):
        registry.pmc_file(MEMBER0)
    assert list(cached.parent.iterdir()) == []  # neither the file nor a partial download

    good_mirror = tmp_path / "good" / registry.PMC_REMOTE_PREFIX / MEMBER0
    good_mirror.parent.mkdir(parents=True)
    good_mirror.symlink_to(PMC / MEMBER0)
    monkeypatch.setenv("FENNOL_PMC_URL", (tmp_path / "good").as_uri())
    assert registry.pmc_file(MEMBER0) == cached
    assert registry.sha256(cached) == registry.PMC_SHA256[MEMBER0]
    assert list(cached.parent.iterdir()) == [cached]

    missing = tmp_path / "empty"
    missing.mkdir()
    monkeypatch.setenv("FENNOL_PMC_URL", missing.as_uri())
    with pytest.raises(FileNotFoundError, match="download"):
        registry.pmc_file("ANI1X/ani1x_model1.fnx")
