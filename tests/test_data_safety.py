"""Labelling never breaks a dataset or labels with other weights, sets bad structures aside on request, and
float32 never costs accuracy far from the origin (issue 16, items 8, 9, 14 and 15)."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import serialization

from distiller.batch import near_origin, pad_structures
from distiller.cli import main as cli
from distiller.data.dataset import DatasetError, ShardWriter, merge_datasets, open_dataset
from distiller.files import sha256
from distiller.label import label_dataset
from distiller.predict import Predictor
from distiller.structure import StructureError, write_structures
from distiller.teachers.fennol import ModelFileError
from distiller.teachers.registry import load_teacher, pmc_file

EMT = "ase:ase.calculators.emt.EMT"
MEMBER0 = "ANI1X/ani1x_model0.fnx"


def visible(directory):
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


# --- item 9: another job never writes into a dataset -------------------------------------------------------


def test_another_job_is_refused_before_any_work_and_the_dataset_still_opens(tmp_path, aspirin):
    path = tmp_path / "in.extxyz"
    rng = np.random.default_rng(0)
    write_structures(path, [aspirin.replace(positions=aspirin.positions + rng.normal(0, 0.02, (21, 3)))
                            for _ in range(3)])
    label_dataset(EMT, [path], tmp_path / "d", chunk=2, progress=False)
    before = visible(tmp_path / "d")
    # Another shard count, another teacher: refused on opening, before a structure is labelled or a file written.
    with pytest.raises(DatasetError, match=r"manifest-00000-of-00001.json belongs to another labelling job "
                                           r"\(differs in: shard_sizes, shards\)"):
        label_dataset(EMT, [path], tmp_path / "d", shard=(1, 2), chunk=2, progress=False)
    with pytest.raises(DatasetError, match=r"differs in: teacher, teacher_class"):
        label_dataset("fennol-pmc:ani1x/0", [path], tmp_path / "d", chunk=2, progress=False)
    assert visible(tmp_path / "d") == before and len(open_dataset(tmp_path / "d")) == 3
    # A shard claims the directory when it starts, not at its first commit: one started beside it is refused.
    job = {"teacher": "t", "structures": 4, "chunk": 2, "shards": 2, "shard_sizes": [2, 2]}
    with ShardWriter(tmp_path / "e", job, 0, 2):
        with pytest.raises(DatasetError, match="differs in: teacher"):
            ShardWriter(tmp_path / "e", {**job, "teacher": "u"}, 1, 2)
    # Merging into a directory that holds another dataset copies nothing into it.
    label_dataset(EMT, [path], tmp_path / "s0", shard=(0, 2), chunk=2, progress=False)
    label_dataset(EMT, [path], tmp_path / "s1", shard=(1, 2), chunk=2, progress=False)
    with pytest.raises(DatasetError, match=r"manifest-00000-of-00001.json belongs to another labelling job"):
        merge_datasets([tmp_path / "s0", tmp_path / "s1"], tmp_path / "d")
    assert visible(tmp_path / "d") == before and len(open_dataset(tmp_path / "d")) == 3


# --- item 14: bad structures set aside on request ----------------------------------------------------------


def test_bad_structures_stop_the_job_or_are_set_aside_with_reasons(tmp_path, aspirin):
    close = aspirin.positions.copy()
    close[1] = close[0] + 0.05
    items = [aspirin, aspirin.replace(positions=close), aspirin, aspirin.replace(positions=close + 1.0), aspirin]
    path = tmp_path / "in.extxyz"
    write_structures(path, items)
    with pytest.raises(StructureError, match=r"in.extxyz:1: atoms 0 and 1 are 0.0866 Å apart.*--skip-bad"):
        label_dataset(EMT, [path], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "d"
    cli(["label", "--teacher", EMT, "--structures", str(path), "--out", str(out), "--chunk", "2", "--quiet",
         "--skip-bad"])
    dataset = open_dataset(out)
    assert dataset.source_indices.tolist() == [0, 2, 4] and [s.name for s in dataset] == [
        "in.extxyz:0", "in.extxyz:2", "in.extxyz:4"]
    assert all(s.forces is not None for s in dataset) and dataset.metadata["rejected"] == 2
    rejected = json.loads((out / "rejected.json").read_text())
    assert rejected["inputs"] == 5 and [r["index"] for r in rejected["rejected"]] == [1, 3]
    assert rejected["rejected"][0]["source"] == {"path": str(path), "index": 1}
    assert "in.extxyz:3: atoms 0 and 1 are 0.0866 Å apart" in rejected["rejected"][1]["reason"]
    # Sharded, the same structures are left out; the merged dataset carries the list.
    for i in range(2):
        label_dataset(EMT, [path], tmp_path / f"s{i}", shard=(i, 2), chunk=2, skip_bad=True, progress=False)
    merged = merge_datasets([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert merged.source_indices.tolist() == [0, 2, 4]
    assert json.loads((tmp_path / "merged" / "rejected.json").read_text()) == rejected


# --- item 8: teacher files checksummed and checked -------------------------------------------------------


def rewritten(source, destination, change):
    """A .fnx whose state dict (msgpack, as FeNNol saves it) went through `change`."""
    state = serialization.msgpack_restore(open(source, "rb").read())
    change(state["variables"]["params"]["energy"]["H"]["Layer_1"])
    destination.write_bytes(serialization.msgpack_serialize(state))
    return destination


def test_a_changed_teacher_file_refuses_resume_and_extend(tmp_path, aspirin):
    original = pmc_file(MEMBER0)
    model = tmp_path / "model.fnx"
    shutil.copyfile(original, model)
    spec = f"fennol:{model}"
    # Two structures ANI-1x cannot label (sulfur): the test labels nothing, so it compiles nothing.
    sulfur = aspirin.replace(numbers=np.where(aspirin.numbers == 8, 16, aspirin.numbers))
    path = tmp_path / "in.extxyz"
    write_structures(path, [sulfur, sulfur])
    out = tmp_path / "d"
    label_dataset(spec, [path], out, shard=(0, 2), skip_bad=True, progress=False)
    # Same architecture, other weights: loads fine, and labels would differ.
    rewritten(original, model, lambda layer: layer.update(bias=layer["bias"] * 1.01))
    for shard in ((0, 2), (1, 2)):  # resume, extend
        with pytest.raises(DatasetError, match=r"differs in: teacher_files"):
            label_dataset(spec, [path], out, shard=shard, skip_bad=True, progress=False)
    shutil.copyfile(original, model)
    summary = label_dataset(spec, [path], out, shard=(1, 2), skip_bad=True, progress=False)
    assert summary["dataset_complete"] and summary["rejected"] == 2
    metadata = open_dataset(out).metadata
    assert metadata["teacher_files"] == {str(model): sha256(original)} and metadata["rejected"] == 2
    reasons = [r["reason"] for r in json.loads((out / "rejected.json").read_text())["rejected"]]
    assert len(reasons) == 2 and all("contains element S" in r for r in reasons)


def test_damaged_model_files_are_named(tmp_path):
    original = pmc_file(MEMBER0)

    def nan(layer):
        layer["kernel"] = np.where(np.arange(layer["kernel"].size).reshape(layer["kernel"].shape) == 7, np.nan,
                                   layer["kernel"])

    damaged = rewritten(original, tmp_path / "nan.fnx", nan)
    with pytest.raises(ModelFileError, match=f"{damaged}: parameter params/energy/H/Layer_1/kernel has "
                                             f"non-finite values"):
        load_teacher(f"fennol:{damaged}")
    damaged = rewritten(original, tmp_path / "shape.fnx", lambda layer: layer.update(bias=layer["bias"][:-1]))
    with pytest.raises(ModelFileError, match=rf"{damaged}: parameter params/energy/H/Layer_1/bias has shape "
                                             rf"\(\d+,\), its architecture needs \(\d+,\)"):
        load_teacher(f"fennol:{damaged}")


# --- item 15: float32 positions far from the origin ------------------------------------------------------


def test_far_structures_enter_batches_near_the_origin(aspirin, water):
    far = aspirin.replace(positions=aspirin.positions + [1e4, -2e4, 3e4])
    np.testing.assert_array_equal(near_origin(far), far.positions - [1e4, -2e4, 3e4])  # by whole Å: exact
    np.testing.assert_array_equal(near_origin(aspirin), aspirin.positions)  # in place: untouched
    rng = np.random.default_rng(1)
    jumps = rng.integers(-300, 300, (water.n_atoms, 3))
    scattered = water.replace(positions=water.positions + jumps @ water.cell)
    np.testing.assert_allclose(near_origin(scattered), water.positions, rtol=0, atol=1e-9)
    assert near_origin(water) is water.positions
    batch = pad_structures([far, scattered])
    np.testing.assert_allclose(np.asarray(batch.positions[:21]), aspirin.positions, rtol=0, atol=1e-6)


def test_forces_do_not_depend_on_where_the_structure_is(aspirin, water):
    """ani1x/0 on aspirin translated by ~1e4 Å (its forces were 0.04 eV/Å off before positions were moved near
    the origin in float64) and on a water box whose atoms were moved by many cell vectors. One structure per
    call: the programs of tests/test_contract.py's single-structure labels (one compilation per bucket)."""
    far = aspirin.replace(positions=aspirin.positions + [1e4 + 0.37, -1e4 + 0.12, 1e4 - 0.81])
    jumps = np.random.default_rng(2).integers(-900, 900, (water.n_atoms, 3))
    scattered = water.replace(positions=water.positions + (jumps + [700, -500, 300]) @ water.cell)
    teacher = Predictor(load_teacher("fennol-pmc:ani1x/0"))
    for a, b in ((aspirin, far), (water, scattered)):
        (la,), (lb,) = teacher([a]), teacher([b])
        assert np.abs(la.forces).max() > 1.0
        np.testing.assert_allclose(lb.forces, la.forces, rtol=0, atol=1e-4, err_msg=a.name)
        assert lb.energy == pytest.approx(la.energy, abs=1e-3)
        np.testing.assert_array_equal(lb.positions, b.positions)  # the labelled structure is where it was given
    np.testing.assert_allclose(lb.stress, la.stress, rtol=0, atol=1e-5)
