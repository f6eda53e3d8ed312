"""Dataset format: records round-trip exactly; damaged, truncated, missing or inconsistent files are named."""

import json
import os
import shutil

import numpy as np
import pytest

from distiller.data.dataset import (DatasetError, IncompleteDataset, ShardWriter, decode_structure, encode_structure,
                                    merge_datasets, open_dataset, write_dataset)
from distiller.structure import Structure


def structures(count=12, seed=0):
    """Molecules and periodic cells of a few sizes with labels that identify them (energy = index)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        n = [3, 5, 9, 17][k % 4]
        periodic = k % 3 == 0
        cell = np.diag(rng.uniform(8, 10, 3)) if periodic else np.zeros((3, 3))
        positions = rng.uniform(0, 8, (n, 3))
        out.append(Structure(
            numbers=rng.choice([1, 6, 7, 8], n).astype(np.int32), positions=positions, cell=cell,
            pbc=np.full(3, periodic), name=f"s{k}", energy=float(k) - 0.1234567890123,
            forces=rng.normal(size=(n, 3)), stress=rng.normal(size=(3, 3)) if periodic else None,
            info={"provenance": {"method": ["md", "rattle"][k % 2], "temperature": 300.0, "step": k},
                  "energy_spread": 0.01 * k},
        ))
    return out


def assert_same(a: Structure, b: Structure):
    assert a.name == b.name and a.energy == b.energy and a.info == b.info
    for field in ("numbers", "positions", "cell", "pbc", "forces"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.stress is None) == (b.stress is None)
    if a.stress is not None:
        np.testing.assert_array_equal(a.stress, b.stress)


def test_record_round_trip_is_exact():
    for s in structures(8):
        back, index = decode_structure(encode_structure(s, 41), "here")
        assert index == 41
        assert_same(s, back)
    unlabelled = structures(1)[0].replace(energy=None, forces=None, stress=None, info={})
    back, _ = decode_structure(encode_structure(unlabelled, 0))
    assert back.energy is None and back.forces is None and back.stress is None and back.info == {}


def test_record_corruption_is_detected():
    record = bytearray(encode_structure(structures(1)[0], 0))
    record[len(record) // 2] ^= 0x01  # one bit in the positions
    with pytest.raises(DatasetError, match=r"part-7: record 3: checksum mismatch"):
        decode_structure(bytes(record), "part-7: record 3")
    with pytest.raises(DatasetError, match="bad header"):
        decode_structure(b"JUNK" + bytes(record[4:]), "x")


def test_dataset_random_access_metadata_and_order(tmp_path):
    items = structures(30)
    dataset = write_dataset(tmp_path / "d", items, teacher="test-teacher", chunk=7)
    assert len(dataset) == 30 and len(dataset.parts) == 5
    for k in (0, 7, 29, 13):
        assert_same(dataset[k], items[k])
    for a, b in zip(dataset.get([29, 0, 14, 15]), [items[29], items[0], items[14], items[15]]):
        assert_same(a, b)
    np.testing.assert_array_equal(dataset.n_atoms, [s.n_atoms for s in items])
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    assert meta["format"] == "distiller-dataset" and meta["version"] == 1
    assert meta["teacher"] == "test-teacher" and meta["units"]["energy"] == "eV" and meta["units"]["length"] == "Å"
    assert meta["structures"] == 30 and meta["atoms"] == sum(s.n_atoms for s in items)
    assert meta["periodic"] == meta["with_stress"] == 10 and meta["with_energy_spread"] == 30
    assert meta["provenance"]["methods"] == {"md": 15, "rattle": 15}
    assert [f["file"] for f in meta["files"]] == [os.path.basename(f) for f in dataset.files]
    assert all(len(f["sha256"]) == 64 for f in meta["files"])
    dataset.verify()
    with pytest.raises(IndexError):
        dataset[30]


def damage(path, offset, length=8):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(length))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_corrupt_truncated_and_missing_files_are_named(tmp_path):
    items = structures(12)
    write_dataset(tmp_path / "d", items, chunk=6)
    first, second = sorted((tmp_path / "d").glob("part-*.arrayrecord"))

    # A flipped byte inside a record: the reader names the file; never returns the damaged structure.
    original = first.read_bytes()
    damage(first, 200)
    dataset = open_dataset(tmp_path / "d")  # same size: opening is cheap and cannot tell
    with pytest.raises(DatasetError, match=f"{first.name}.*(corrupt|checksum)"):
        [dataset[k] for k in range(6)]
    with pytest.raises(DatasetError, match=f"{first.name}.*(sha256|corrupt)"):
        dataset.verify()
    for k in range(6, 12):  # the other file is fine
        assert_same(dataset[k], items[k])
    first.write_bytes(original)

    # Truncated: the size differs from the manifest's, found on opening.
    second.write_bytes(second.read_bytes()[: 65536])
    with pytest.raises(DatasetError, match=f"{second.name}: 65536 bytes, the manifest records .*truncated"):
        open_dataset(tmp_path / "d")
    # Missing.
    second.unlink()
    with pytest.raises(DatasetError, match=f"{second.name}: missing"):
        open_dataset(tmp_path / "d")


def test_corruption_past_the_format_checks_is_caught_by_the_record_crc(tmp_path):
    """Rewrite a part file as valid ArrayRecord whose record bytes differ: only our crc can tell."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    write_dataset(tmp_path / "d", structures(4), chunk=4)
    (part,) = (tmp_path / "d").glob("part-*.arrayrecord")
    records = ArrayRecordReader(str(part)).read_all()
    bad = bytearray(records[2])
    bad[-20] ^= 0x10
    records[2] = bytes(bad)
    size = part.stat().st_size
    writer = ArrayRecordWriter(str(part), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    assert part.stat().st_size == size  # passes the size check
    dataset = open_dataset(tmp_path / "d")
    dataset[1]
    with pytest.raises(DatasetError, match=f"{part.name}: record 2: checksum mismatch"):
        dataset[2]


def test_shards_in_one_directory_merge_on_read_and_incomplete_is_an_error(tmp_path):
    items = structures(10)
    job = {"teacher": "t", "structures": 10, "chunk": 2, "shards": 2, "shard_sizes": [5, 5]}
    with ShardWriter(tmp_path / "d", job, 1, 2) as w:
        w.commit(0, [items[k] for k in (1, 3)], [1, 3])
        w.commit(1, [items[k] for k in (5, 7, 9)], [5, 7, 9])
        assert w.finish() is False  # shard 0 not there yet: no metadata.json
    assert not (tmp_path / "d" / "metadata.json").exists()
    with pytest.raises(IncompleteDataset, match="shard 0/2 missing"):
        open_dataset(tmp_path / "d")
    with ShardWriter(tmp_path / "e", job, 0, 2) as w:
        w.commit(0, [items[k] for k in (0, 2, 4)], [0, 2, 4])
    with pytest.raises(IncompleteDataset, match=r"shard 0/2 unfinished \(3 structures so far\)"):
        merge_datasets([tmp_path / "d", tmp_path / "e"], tmp_path / "merged")
    partial = open_dataset(tmp_path / "e", allow_incomplete=True)
    assert partial.source_indices.tolist() == [0, 2, 4]
    with ShardWriter(tmp_path / "e", job, 0, 2) as w:  # the same job continues
        assert w.committed_chunks == {0}
        w.commit(1, [items[k] for k in (6, 8)], [6, 8])
        w.finish()
    merged = merge_datasets([tmp_path / "d", tmp_path / "e"], tmp_path / "merged")
    assert merged.source_indices.tolist() == list(range(10))
    for k in range(10):
        assert_same(merged[k], items[k])
    assert json.loads((tmp_path / "merged" / "metadata.json").read_text())["structures"] == 10
    # Copying the shards into one directory by hand reads the same (merge on read).
    for name in os.listdir(tmp_path / "e"):
        if not name.startswith("."):
            shutil.copy(tmp_path / "e" / name, tmp_path / "d" / name)
    together = open_dataset(tmp_path / "d")
    assert [s.name for s in together] == [s.name for s in items]


def test_a_different_job_cannot_write_into_a_dataset(tmp_path):
    job = {"teacher": "a", "structures": 4, "chunk": 2, "shards": 1, "shard_sizes": [4]}
    with ShardWriter(tmp_path / "d", job) as w:
        w.commit(0, structures(2), [0, 1])
        with pytest.raises(DatasetError, match="being written by another process"):
            ShardWriter(tmp_path / "d", job)
    with pytest.raises(DatasetError, match="another labelling job.*differs in: teacher"):
        ShardWriter(tmp_path / "d", {**job, "teacher": "b"})
    # A job does not resume on top of a committed part that has since been damaged.
    (part,) = (tmp_path / "d").glob("part-*.arrayrecord")
    part.write_bytes(part.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=f"{part.name}: committed by .* but it is 1000 bytes"):
        ShardWriter(tmp_path / "d", job)


def test_duplicate_structures_are_refused(tmp_path):
    items = structures(4)
    job = {"teacher": "t", "structures": 4, "chunk": 2, "shards": 1, "shard_sizes": [4]}
    with ShardWriter(tmp_path / "d", job) as w:
        w.commit(0, items[:2], [0, 1])
        w.commit(1, items[2:], [1, 3])  # a bug upstream: index 1 twice
    with pytest.raises(DatasetError, match="structure 1 appears more than once"):
        open_dataset(tmp_path / "d", allow_incomplete=True)
