"""The SevenNet-0 teacher (`sevenn:7net-0`, the pretrained weights shipped in the sevenn wheel) through the torch
bridge, against sevenn's own ASE calculator, finite differences, one-by-one calls and bad inputs.

SevenNet-0 takes ~0.05 s for 8 Si atoms on a CPU, but loading a model costs ~1-2 s: the module loads SevenNet-0
four times (float32 and float64 teachers, the calculator's own, the registry's) and SevenNet-MF-0 three times,
and every comparison is one batched call where possible.
"""

import warnings

import ase.build
import jax
import numpy as np
import pytest

pytest.importorskip("sevenn", reason="sevenn is not installed (pip install distiller[sevenn]): no SevenNet teacher")

import torch  # noqa: E402

from distiller.model import EnergyModel  # noqa: E402
from distiller.structure import Structure, StructureError  # noqa: E402
from distiller.teachers.registry import load_teacher, teacher_files  # noqa: E402
from distiller.teachers.sevenn import load_sevenn, parse_spec  # noqa: E402
from sevenn.calculator import SevenNetCalculator  # noqa: E402  (after distiller's import, which quiets sevenn's)
from finite_differences import energy_differences, strained  # noqa: E402

SPEC = "sevenn:7net-0"


# Every test: whatever the teacher did, torch's global settings are the caller's afterwards (conftest.py).
pytestmark = pytest.mark.usefixtures("torch_state_is_left_alone")


@pytest.fixture(scope="module")
def teacher():
    return load_sevenn(SPEC, device="cpu")


@pytest.fixture(scope="module")
def teacher64():
    return load_sevenn(SPEC + "?precision=float64", device="cpu")


@pytest.fixture(scope="module")
def calculator(teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its hint about optional accelerator backends
        return SevenNetCalculator(teacher.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def crystal():
    """Diamond Si in its 8-atom cubic cell, sheared (nonzero shear stress) and rattled (nonzero forces)."""
    si = Structure.from_ase(ase.build.bulk("Si", "diamond", a=5.43, cubic=True), name="Si8")
    strain = np.eye(3) + np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.01], [0.015, 0.0, 0.005]])
    positions = si.positions @ strain + np.random.default_rng(1).normal(0.0, 0.05, si.positions.shape)
    return si.replace(positions=positions, cell=si.cell @ strain)


@pytest.fixture(scope="module")
def structures(aspirin, crystal):
    """A molecule (no cell), a crystal and the crystal as a slab (periodic along x and y only)."""
    return [aspirin, crystal, crystal.replace(pbc=np.array([True, True, False]), name="Si8 slab")]


@pytest.fixture(scope="module")
def labelled(teacher, structures):
    """One batched call on the mixed batch; any warning of it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return teacher.label(structures)


def reference(calculator, structure: Structure):
    """sevenn's own calculator: energy, forces, stress (3, 3) or None."""
    atoms = structure.to_ase()
    atoms.calc = calculator
    stress = atoms.get_stress(voigt=False) if structure.periodic else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def test_mixed_batch_matches_sevenns_calculator(teacher, calculator, structures, labelled):
    assert teacher.cutoff == 5.0 and len(teacher.elements) == 89 and teacher.dtype == torch.float32
    assert [s.name for s in labelled] == [s.name for s in structures]
    for s, got in zip(structures, labelled):
        energy, forces, stress = reference(calculator, s)
        assert got.forces.shape == (s.n_atoms, 3) and np.array_equal(got.positions, s.positions)
        assert abs(got.energy - energy) < 1e-6 * (1.0 + abs(energy)), s.name
        np.testing.assert_allclose(got.forces, forces, atol=1e-5, err_msg=s.name)
        assert np.abs(forces).max() > 0.1  # a real comparison, not of zeros
        if s.periodic:
            assert got.stress.shape == (3, 3)
            np.testing.assert_allclose(got.stress, stress, atol=1e-6, err_msg=s.name)
            assert abs(stress[0, 1]) > 1e-3  # shear stress too
        else:
            assert got.stress is None


def test_batched_equals_one_by_one(teacher, structures, labelled):
    for a, b in zip(teacher.label(structures, batch_size=1), labelled):
        assert abs(a.energy - b.energy) < 1e-6 * (1.0 + abs(b.energy)), a.name
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5, err_msg=a.name)
        if b.stress is not None:
            np.testing.assert_allclose(a.stress, b.stress, atol=1e-7, err_msg=a.name)


def test_label_arrays(teacher, structures, labelled):
    arrays = teacher.label_arrays(structures)
    assert all(isinstance(a, jax.Array) for a in arrays.values())
    np.testing.assert_allclose(np.asarray(arrays["energy"]), [s.energy for s in labelled], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(arrays["forces"]), np.concatenate([s.forces for s in labelled]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(arrays["stress"]),
                               [s.stress if s.stress is not None else np.zeros((3, 3)) for s in labelled], atol=1e-7)
    assert np.asarray(arrays["stress_mask"]).tolist() == [False, True, True]


def test_forces_and_stress_are_derivatives_of_the_energy(teacher64, teacher):
    """float64 (sevenn's one-hot cast, module docstring), central differences with h = 1e-5 (Å, strain), on
    diamond Si's 2-atom cell, sheared and rattled: the three force components of one atom, the six of stress."""
    si = Structure.from_ase(ase.build.bulk("Si", "diamond", a=5.43), name="Si2")
    shear = np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.01], [0.015, 0.0, 0.005]])
    crystal = strained(si, shear).replace(positions=strained(si, shear).positions + [[0.05, -0.03, 0.02], [0, 0, 0]])
    components = [(1, axis) for axis in range(3)]
    strains = [(i, j) for i in range(3) for j in range(i, 3)]
    exact, forces, stress = energy_differences(teacher64.label, crystal, components, strains, h=1e-5)
    for (atom, axis), f in zip(components, forces):
        assert abs(f - exact.forces[atom, axis]) < 1e-7, (atom, axis)
    for (i, j), sigma in zip(strains, stress):
        assert abs(sigma - exact.stress[i, j]) < 1e-9, (i, j)
    assert np.abs(exact.forces).max() > 0.1 and abs(exact.stress[0, 1]) > 1e-3
    # The float64 teacher is the float32 one, to float32's rounding.
    single = teacher.label([crystal])[0]
    assert abs(exact.energy - single.energy) < 1e-6 * (1.0 + abs(exact.energy))
    np.testing.assert_allclose(exact.forces, single.forces, atol=1e-5)
    np.testing.assert_allclose(exact.stress, single.stress, atol=1e-7)


def test_isolated_atom_has_no_forces(teacher, calculator):
    """No edge in the whole chunk: sevenn leaves forces out; the bridge gives zeros and the calculator's energy."""
    lone = Structure(np.array([14]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), name="lone Si")
    got = teacher.label([lone])[0]
    assert np.array_equal(got.forces, np.zeros((1, 3))) and got.stress is None
    assert abs(got.energy - reference(calculator, lone)[0]) < 1e-6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.replace(numbers=np.array([84] + [14] * (s.n_atoms - 1))),
         "'bad one' contains element Po \\(Z=84\\) which teacher sevenn:7net-0 does not know \\(knows Z = 1..83, "
         "89..94\\)"),
        (lambda s: s.replace(cell=np.array([[5.4, 0, 0], [10.8, 0, 0], [0, 0, 5.4]])), "bad one: singular cell"),
        (lambda s: s.replace(cell=np.array([[5.4, 0, 0], [0, 5.4, 0], [0, 0, 0.0]]), pbc=np.array([True, True, False])),
         "bad one: singular cell"),
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
    for bad in ["sevenn:", "sevenn:7net-0?precision=half", "sevenn:7net-0?colour=red", "orb:7net-0"]:
        with pytest.raises(ValueError, match="Valid specs: sevenn:7net-0 or sevenn:PATH.pth"):
            parse_spec(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        parse_spec(f"sevenn:{tmp_path / 'nowhere.pth'}")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load the SevenNet checkpoint .*broken.pth"):
        load_sevenn(f"sevenn:{broken}")
    assert parse_spec("sevenn:7net-0?precision=float64&modal=mpa").modal == "mpa"


def test_registry_gives_an_energy_model_that_labels(labelled, structures):
    model = load_teacher(SPEC)
    assert isinstance(model, EnergyModel) and model.host_only and model.name == SPEC and model.cutoff == 5.0
    got = model.label(structures[1:2])[0]
    assert abs(got.energy - labelled[1].energy) < 1e-6 * (1.0 + abs(got.energy))
    np.testing.assert_allclose(got.stress, labelled[1].stress, atol=1e-7)
    with pytest.raises(StructureError, match="Po"):
        model.check_more([structures[1].replace(numbers=np.full(8, 84))])
    files = teacher_files(SPEC)
    assert list(files) == ["7net-0"] and len(files["7net-0"]) == 64


def test_multi_fidelity_checkpoint_by_path_and_modal(crystal):
    """SevenNet-MF-0 (also in the wheel): loaded by path, its modal given to every graph of the batch."""
    from sevenn import _const

    path = _const.SEVENNET_MF_0
    with pytest.raises(ValueError, match="needs \\?modal=NAME, one of .*PBE"):
        load_sevenn(f"sevenn:{path}")
    teacher = load_sevenn(f"sevenn:{path}?modal=PBE")
    water = Structure.from_ase(ase.build.molecule("H2O"), name="water")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calculator = SevenNetCalculator(path, device="cpu", modal="PBE")
    for s, got in zip([crystal, water], teacher.label([crystal, water])):
        energy, forces, stress = reference(calculator, s)
        assert abs(got.energy - energy) < 1e-6 * (1.0 + abs(energy)), s.name
        np.testing.assert_allclose(got.forces, forces, atol=1e-5, err_msg=s.name)
        if s.periodic:
            np.testing.assert_allclose(got.stress, stress, atol=1e-6)
