"""Structures: ASE round trips, batching, and clear errors for bad input."""

import numpy as np
import pytest

from distiller.batch import pad_structures, shape_for, unpad_atoms
from distiller.structure import Structure, StructureError, parse_tiling, read_structures, write_structures


def water(structures_dir):
    return read_structures(structures_dir / "watertiny.extxyz")[0]


def test_read_and_round_trip(structures_dir, tmp_path):
    aspirin = read_structures(structures_dir / "aspirin.extxyz")[0]
    assert aspirin.n_atoms == 21 and not aspirin.periodic and aspirin.name == "aspirin.extxyz:0"
    w = water(structures_dir)
    assert w.n_atoms == 81 and w.periodic
    labelled = w.replace(energy=-1.5, forces=np.ones((81, 3)), stress=np.diag([0.1, 0.2, 0.3]))
    write_structures(tmp_path / "x.extxyz", [aspirin, labelled])
    back = read_structures(tmp_path / "x.extxyz")
    assert np.allclose(back[1].positions, w.positions) and back[1].energy == -1.5
    assert np.allclose(back[1].stress, np.diag([0.1, 0.2, 0.3]))
    assert np.allclose(back[0].positions, aspirin.positions)


def test_padded_batch_keeps_every_atom(structures_dir):
    s = [read_structures(structures_dir / "aspirin.extxyz")[0], water(structures_dir)]
    batch = pad_structures(s)
    assert batch.positions.shape[0] == shape_for(s).atoms > 102
    assert int(batch.atom_mask.sum()) == 102 and list(batch.n_atoms[:2]) == [21, 81]
    assert batch.graph_mask.tolist() == [True, True, False]
    parts = unpad_atoms(batch, batch.positions)
    assert np.allclose(parts[1], s[1].positions, atol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda w: w.replace(positions=np.where(np.arange(81)[:, None] == 5, np.nan, w.positions)), "non-finite"),
        (lambda w: w.replace(positions=np.vstack([w.positions[:1], w.positions[:1] + 0.05, w.positions[2:]])), "apart"),
        (lambda w: w.replace(cell=np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])), "singular cell"),
        (lambda w: w.replace(numbers=np.zeros(0, int), positions=np.zeros((0, 3))), "empty"),
    ],
)
def test_bad_structures_are_refused_by_name(structures_dir, make, message):
    with pytest.raises(StructureError, match=message) as err:
        make(water(structures_dir)).validated()
    assert "watertiny.extxyz:0" in str(err.value)


def test_overlap_through_periodic_image_is_found():
    s = Structure(np.array([1, 1]), np.array([[0.0, 0, 0], [2.95, 0, 0]]), np.eye(3) * 3.0, np.ones(3, bool), name="img")
    with pytest.raises(StructureError, match="img: atoms 0 and 1"):
        s.validated()


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.extxyz"
    bad.write_text("3\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 1 1\n")
    with pytest.raises(StructureError, match="broken.extxyz"):
        read_structures(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.xyz"):
        read_structures(tmp_path / "nowhere.xyz")


def test_a_tiling_repeats_periodic_directions_only(structures_dir):
    cell = read_structures(structures_dir / "watertiny.extxyz")[0]
    big = cell.tiled(parse_tiling("2x1x3"))
    assert big.n_atoms == 6 * cell.n_atoms and big.name.endswith(" 2x1x3") and big.energy is None
    np.testing.assert_allclose(big.cell, cell.cell * np.array([2, 1, 3])[:, None])
    slab = cell.replace(pbc=np.array([True, True, False]))
    assert slab.tiled((2, 2, 1)).n_atoms == 4 * cell.n_atoms
    with pytest.raises(StructureError, match="not periodic along every repeated direction"):
        slab.tiled((1, 1, 2))
    for bad in ("2x2", "0x1x1", "2xAx1"):
        with pytest.raises(ValueError, match="a tiling is AxBxC"):
            parse_tiling(bad)
