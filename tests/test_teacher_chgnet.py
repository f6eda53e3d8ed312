"""The CHGNet 0.3.0 teacher (`chgnet:0.3.0`, the pretrained weights shipped in the chgnet wheel) through the torch
bridge, against chgnet's own ASE calculator, finite differences, one-by-one calls and bad inputs.

CHGNet 0.3.0 loads in ~0.1 s and takes ~0.05 s for 8 Si atoms on a CPU; the module loads it four times (float32
and float64 teachers, the calculator's own, the registry's) and once more by path, and every comparison is one
batched call where possible.
"""

import warnings

import ase
import ase.build
import jax
import numpy as np
import pytest

pytest.importorskip("chgnet", reason="chgnet is not installed (pip install distiller[chgnet]): no CHGNet teacher")

import torch  # noqa: E402
from chgnet.model.dynamics import CHGNetCalculator  # noqa: E402

from distiller.model import EnergyModel  # noqa: E402
from distiller.structure import Structure, StructureError  # noqa: E402
from distiller.teachers.chgnet import boxed, load_chgnet, parse_spec, pretrained_checkpoints  # noqa: E402
from distiller.teachers.registry import is_torch_spec, load_teacher, teacher_files  # noqa: E402
from finite_differences import energy_differences, strained  # noqa: E402

SPEC = "chgnet:0.3.0"
SHEAR = np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.01], [0.015, 0.0, 0.005]])

# Every test: whatever the teacher did, torch's global settings are the caller's afterwards (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_state_is_left_alone")


@pytest.fixture(scope="module")
def teacher():
    return load_chgnet(SPEC, device="cpu")


@pytest.fixture(scope="module")
def teacher64():
    return load_chgnet(SPEC + "?precision=float64", device="cpu")


@pytest.fixture(scope="module")
def calculator():
    """chgnet's own calculator with its own copy of the pretrained model (it would reconfigure one it is given)."""
    return CHGNetCalculator(use_device="cpu", on_isolated_atoms="ignore")


def sheared_and_rattled(s: Structure, seed: int) -> Structure:
    """Nonzero shear stress and nonzero forces."""
    s = strained(s, SHEAR)
    return s.replace(positions=s.positions + np.random.default_rng(seed).normal(0.0, 0.05, s.positions.shape))


@pytest.fixture(scope="module")
def crystal():
    """Diamond Si in its 8-atom cubic cell, sheared and rattled."""
    return sheared_and_rattled(Structure.from_ase(ase.build.bulk("Si", "diamond", a=5.43, cubic=True), name="Si8"), 1)


@pytest.fixture(scope="module")
def perovskite():
    """Cubic SrTiO3 (a = 3.905 Å) doubled along x, 10 atoms of three elements, sheared and rattled."""
    cell = ase.Atoms("SrTiO3", cell=np.eye(3) * 3.905, pbc=True,
                     scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return sheared_and_rattled(Structure.from_ase(cell * (2, 1, 1), name="SrTiO3"), 2)


@pytest.fixture(scope="module")
def structures(aspirin, crystal, perovskite):
    """A molecule (no cell), two crystals and the Si crystal as a slab (periodic along x and y only)."""
    return [aspirin, crystal, perovskite, crystal.replace(pbc=np.array([True, True, False]), name="Si8 slab")]


@pytest.fixture(scope="module")
def labelled(teacher, structures):
    """One batched call on the mixed batch; any warning of it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return teacher.label(structures)


def reference(calculator, structure: Structure, cutoff: float):
    """chgnet's own calculator: energy, forces, stress (3, 3) or None. It needs a cell: a molecule goes in the
    teacher's vacuum box (fully periodic, no atom within the cutoff of an image), as a user would put it."""
    atoms = boxed(structure, cutoff)
    atoms.calc = calculator
    stress = atoms.get_stress(voigt=False) if structure.periodic else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def test_mixed_batch_matches_chgnets_calculator(teacher, calculator, structures, labelled):
    """Measured: energies and forces equal to the last bit; stress within 6e-9 eV/Å³ (the calculator converts
    GPa with ase.units.GPa, 8e-9 relative from the factor chgnet applied)."""
    assert teacher.cutoff == 6.0 and len(teacher.elements) == 89 and teacher.dtype == torch.float32
    assert [s.name for s in labelled] == [s.name for s in structures]
    for s, got in zip(structures, labelled):
        energy, forces, stress = reference(calculator, s, teacher.cutoff)
        assert got.forces.shape == (s.n_atoms, 3) and np.array_equal(got.positions, s.positions)
        assert abs(got.energy - energy) < 1e-6 * (1.0 + abs(energy)), s.name
        np.testing.assert_allclose(got.forces, forces, atol=1e-5, err_msg=s.name)
        assert np.abs(forces).max() > 0.1  # a real comparison, not of zeros
        if s.periodic:
            assert got.stress.shape == (3, 3)
            np.testing.assert_allclose(got.stress, stress, atol=2e-8, err_msg=s.name)
            assert abs(stress[0, 1]) > 1e-3  # shear stress too
        else:
            assert got.stress is None


def test_slab_is_the_crystal_with_vacuum_along_z(teacher, crystal, labelled):
    """pbc [T, T, F] is honoured: the slab's energy and forces are those of the fully periodic crystal whose third
    cell vector is stretched to leave 8 Å of vacuum (> the 6 Å cutoff), to float32's rounding."""
    c = crystal.cell[2]
    padded = crystal.replace(cell=np.array([crystal.cell[0], crystal.cell[1], c * (1 + 8 / np.linalg.norm(c))]))
    (got,) = teacher.label([padded])
    slab = labelled[3]
    assert abs(got.energy - slab.energy) < 2e-5
    np.testing.assert_allclose(got.forces, slab.forces, atol=5e-5)
    assert abs(slab.energy - labelled[1].energy) > 1.0  # the surfaces cost energy: the check has something to see


def test_a_molecule_is_isolated_in_its_vacuum_box(teacher, aspirin, labelled):
    """The box the calculator comparison shares with the teacher is large enough: in a periodic cube 20 Å wider
    than the molecule, its energy and forces are the same, to float32's rounding (measured: 0 eV, 2e-5 eV/Å; a
    cube only 3 Å wider moves them by 0.02 eV and 0.04 eV/Å)."""
    extent = float(np.ptp(aspirin.positions, axis=0).max())
    far = aspirin.replace(cell=np.eye(3) * (extent + 20.0), pbc=np.ones(3, bool), name="aspirin, far images")
    (got,) = teacher.label([far])
    assert abs(got.energy - labelled[0].energy) < 1e-5
    np.testing.assert_allclose(got.forces, labelled[0].forces, atol=1e-4)


def test_batched_equals_one_by_one(teacher, structures, labelled):
    for a, b in zip(teacher.label(structures, batch_size=1), labelled):
        assert abs(a.energy - b.energy) < 1e-6 * (1.0 + abs(b.energy)), a.name
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5, err_msg=a.name)
        if b.stress is not None:
            np.testing.assert_allclose(a.stress, b.stress, atol=1e-8, err_msg=a.name)


def test_label_arrays(teacher, structures, labelled):
    arrays = teacher.label_arrays(structures)
    assert all(isinstance(a, jax.Array) for a in arrays.values())
    np.testing.assert_allclose(np.asarray(arrays["energy"]), [s.energy for s in labelled], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(arrays["forces"]), np.concatenate([s.forces for s in labelled]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(arrays["stress"]),
                               [s.stress if s.stress is not None else np.zeros((3, 3)) for s in labelled], atol=1e-8)
    assert np.asarray(arrays["stress_mask"]).tolist() == [False, True, True, True]


def test_forces_and_stress_are_derivatives_of_the_energy(teacher64, teacher):
    """float64 (coordinates from pymatgen's float64 arrays, module docstring), central differences with h = 1e-5
    (Å, strain), on diamond Si's 2-atom cell, sheared and rattled: three force components, the six of stress.
    Measured: within 5e-8 eV/Å and 3e-9 eV/Å³; float64 against float32 labels 1e-6 eV, 4e-6 eV/Å, 3e-7 eV/Å³."""
    si = Structure.from_ase(ase.build.bulk("Si", "diamond", a=5.43), name="Si2")
    crystal = strained(si, SHEAR).replace(positions=strained(si, SHEAR).positions + [[0.05, -0.03, 0.02], [0, 0, 0]])
    components = [(1, axis) for axis in range(3)]
    strains = [(i, j) for i in range(3) for j in range(i, 3)]
    exact, forces, stress = energy_differences(teacher64.label, crystal, components, strains, h=1e-5)
    for (atom, axis), f in zip(components, forces):
        assert abs(f - exact.forces[atom, axis]) < 2e-7, (atom, axis)
    for (i, j), sigma in zip(strains, stress):
        assert abs(sigma - exact.stress[i, j]) < 5e-9, (i, j)
    assert np.abs(exact.forces).max() > 0.1 and abs(exact.stress[0, 1]) > 1e-3
    # The float64 teacher is the float32 one, to float32's rounding.
    single = teacher.label([crystal])[0]
    assert abs(exact.energy - single.energy) < 1e-6 * (1.0 + abs(exact.energy))
    np.testing.assert_allclose(exact.forces, single.forces, atol=1e-5)
    np.testing.assert_allclose(exact.stress, single.stress, atol=1e-6)


def test_isolated_atom_has_no_forces(teacher, calculator):
    """No edge in the whole chunk: zero forces and the calculator's energy (in the vacuum box)."""
    lone = Structure(np.array([14]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), name="lone Si")
    got = teacher.label([lone])[0]
    assert np.array_equal(got.forces, np.zeros((1, 3))) and got.stress is None
    assert abs(got.energy - reference(calculator, lone, teacher.cutoff)[0]) < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.replace(numbers=np.array([84] + [14] * (s.n_atoms - 1))),
         "'bad one' contains element Po \\(Z=84\\) which teacher chgnet:0.3.0 does not know \\(knows Z = 1..83, "
         "89..94\\)"),
        (lambda s: s.replace(numbers=np.array([95] + [14] * (s.n_atoms - 1))), "element Am \\(Z=95\\)"),
        (lambda s: s.replace(cell=np.array([[5.4, 0, 0], [10.8, 0, 0], [0, 0, 5.4]])), "bad one: singular cell"),
        (lambda s: s.replace(positions=np.where(np.arange(s.n_atoms)[:, None] == 1, np.nan, s.positions)),
         "bad one: non-finite"),
    ],
)
def test_bad_structures_are_refused_by_name(teacher, crystal, change, message):
    bad = change(crystal).replace(name="bad one")
    with pytest.raises(StructureError, match=message) as err:
        teacher.label([crystal, bad])
    assert "\n" not in str(err.value)


def test_bad_specs_say_what_is_valid(tmp_path):
    for bad in ["chgnet:", "chgnet:0.3.0?precision=half", "chgnet:0.3.0?colour=red", "sevenn:0.3.0"]:
        with pytest.raises(ValueError, match="Valid specs: chgnet:0.3.0 or chgnet:PATH"):
            parse_spec(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pth.tar"):
        parse_spec(f"chgnet:{tmp_path / 'nowhere.pth.tar'}")
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load the CHGNet checkpoint .*broken.pth.tar"):
        load_chgnet(f"chgnet:{broken}")
    assert parse_spec("chgnet:0.3.0?precision=float64").precision == "float64"


def test_registry_gives_an_energy_model_that_labels(labelled, structures):
    model = load_teacher(SPEC)
    assert isinstance(model, EnergyModel) and model.host_only and model.name == SPEC and model.cutoff == 6.0
    assert is_torch_spec(SPEC)  # the CLI applies the GPU memory policy before JAX starts
    got = model.label(structures[1:2])[0]
    assert abs(got.energy - labelled[1].energy) < 1e-6 * (1.0 + abs(got.energy))
    np.testing.assert_allclose(got.stress, labelled[1].stress, atol=1e-8)
    with pytest.raises(StructureError, match="Po"):
        model.check_more([structures[1].replace(numbers=np.full(8, 84))])
    files = teacher_files(SPEC)
    assert list(files) == ["0.3.0"] and len(files["0.3.0"]) == 64


def test_checkpoint_by_path_is_the_pretrained_model(crystal, labelled):
    """`chgnet:PATH` on the wheel's own file: the same labels; the file does not say what it was trained on, so
    the teacher takes every element of the embedding table (module docstring)."""
    path = pretrained_checkpoints()["0.3.0"]
    teacher = load_chgnet(f"chgnet:{path}", device="cpu")
    assert teacher.elements == frozenset(range(1, 95))
    got = teacher.label([crystal])[0]
    assert abs(got.energy - labelled[1].energy) < 1e-6 * (1.0 + abs(got.energy))
    np.testing.assert_allclose(got.forces, labelled[1].forces, atol=1e-5)
    assert teacher_files(f"chgnet:{path}") == {path: teacher_files(SPEC)["0.3.0"]}
