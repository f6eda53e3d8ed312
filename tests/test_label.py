"""Labelling jobs: a job killed with SIGKILL resumes without loss or duplicates; shards merge into one dataset."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distiller.cli import main as cli
from distiller.data.dataset import DatasetError, merge_datasets, open_dataset, part_name, write_dataset
from distiller.label import label_dataset, parse_shard, shard_chunks
from distiller.predict import Predictor
from distiller.structure import StructureError, read_structures, write_structures
from distiller.teachers.registry import load_teacher

TEACHER = "fennol-pmc:ani1x/0"
EMT = "ase:ase.calculators.emt.EMT"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(TEACHER)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, structures_dir):
    """16 rattled aspirins and 8 rattled (strained) watertiny boxes, interleaved, in one extxyz file.

    The first aspirin chunk is stretched by 30 %: the capacities measured on it are too small for the
    others, so the job has to grow them on the way.
    """
    aspirin = read_structures(structures_dir / "aspirin.extxyz")[0]
    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    rng = np.random.default_rng(7)
    items = []
    for k in range(24):
        base = water if k % 3 == 0 else aspirin
        scale = 1.3 if k < 6 and not base.periodic else 1.0
        strain = scale * np.eye(3) + (rng.uniform(-0.02, 0.02, (3, 3)) if base.periodic else 0)
        items.append(base.replace(positions=(base.positions + rng.normal(0, 0.05, base.positions.shape)) @ strain,
                                  cell=base.cell @ strain, name=f"in{k}"))
    path = tmp_path_factory.mktemp("inputs") / "rattled.extxyz"
    write_structures(path, items)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher, inputs):
    """The uninterrupted, unsharded job."""
    out = tmp_path_factory.mktemp("reference") / "data"
    summary = label_dataset(teacher, [inputs], out, chunk=4, progress=False)
    assert summary["labelled"] == 24 and summary["dataset_complete"]
    assert summary["capacity_growths"] >= 1 and len(summary["shapes"]) == 2  # aspirin and water buckets
    return open_dataset(out)


def labels(dataset):
    return [(s.name, s.energy, s.forces, s.stress, s.info) for s in dataset]


def assert_equal_labels(a, b):
    assert len(a) == len(b)
    for (na, ea, fa, sa, ia), (nb, eb, fb, sb, ib) in zip(a, b):
        assert na == nb and ea == eb and ia == ib
        np.testing.assert_array_equal(fa, fb)
        assert (sa is None) == (sb is None)
        if sa is not None:
            np.testing.assert_array_equal(sa, sb)


def test_labels_are_the_teachers(reference, teacher, inputs):
    items = read_structures(inputs)
    assert reference.source_indices.tolist() == list(range(24))
    assert reference.teacher == TEACHER and reference.metadata["with_stress"] == 8
    # The Predictor in batches of the job's chunk size, so that its programs are the job's (compiled once): the
    # check is the dataset's bookkeeping (order, names, stress, sources) around the teacher's labels.
    direct = Predictor(teacher, max_structures=4)(items)
    for got, want in zip(reference, direct):
        assert got.name == want.name
        np.testing.assert_allclose(got.energy, want.energy, rtol=1e-6)
        np.testing.assert_allclose(got.forces, want.forces, atol=2e-4)
        assert (got.stress is None) == (not want.periodic)
        if want.periodic:
            np.testing.assert_allclose(got.stress, want.stress, atol=1e-6)
        assert got.info["source"] == {"path": str(inputs), "index": int(want.name.split(":")[1])}
        assert "energy_spread" not in got.info  # one member: no ensemble spread


def test_kill_and_restart_loses_nothing_and_duplicates_nothing(tmp_path, inputs, reference, compilation_cache):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "distiller.cli", "label", "--teacher", TEACHER, "--structures", str(inputs),
               "--out", str(out), "--chunk", "4", "--quiet"]
    manifest = out / "manifest-00000-of-00001.json"
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text())["parts"]:
                break
            time.sleep(0.02)
        assert job.poll() is None, f"the job ended before it could be killed: {job.stdout.read().decode()[-2000:]}"
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    state = json.loads(manifest.read_text())
    committed = len(state["parts"])
    assert 1 <= committed < 6 and not state["complete"], "killed in the middle"
    # What a kill between a part's rename and its manifest update would leave: a part file the manifest does
    # not list, plus a temporary file. The restart must replace and remove them, not read them.
    (out / part_name(0, 1, 5)).write_bytes(b"half-written garbage")
    (out / f".{part_name(0, 1, 5)}.tmp-99999").write_bytes(b"more garbage")
    with pytest.raises(DatasetError, match="incomplete"):
        open_dataset(out)

    # The restart may load what the reference job compiled (this session's cache, tests/conftest.py); the killed
    # job may not, so that it is still running when its first part is committed.
    cached = {"JAX_COMPILATION_CACHE_DIR": compilation_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    restart = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, **cached})
    assert restart.returncode == 0, restart.stdout[-2000:] + restart.stderr[-2000:]
    summary = json.loads(restart.stdout)
    assert summary["resumed_from"] == 4 * committed and summary["labelled"] == 24 - 4 * committed
    resumed = open_dataset(out)
    assert resumed.source_indices.tolist() == list(range(24)), "every structure exactly once"
    assert_equal_labels(labels(resumed), labels(reference))
    assert sorted(os.listdir(out)) == sorted([".manifest-00000-of-00001.json.lock", "manifest-00000-of-00001.json",
                                              "metadata.json"] + [part_name(0, 1, c) for c in range(6)])
    resumed.verify()


def test_two_shards_merged_equal_one_unsharded_run(tmp_path, inputs):
    # ASE's EMT labels one structure at a time, so sharded and unsharded labels are equal to the bit.
    whole = label_dataset(EMT, [inputs], tmp_path / "whole", chunk=4, progress=False)
    assert whole["dataset_complete"]
    for i in range(2):
        cli(["label", "--teacher", EMT, "--structures", str(inputs), "--out", str(tmp_path / f"shard{i}"),
             "--shard", f"{i}/2", "--chunk", "4", "--quiet"])
        with pytest.raises(DatasetError, match=f"shard {1 - i}/2 missing"):
            open_dataset(tmp_path / f"shard{i}")
    cli(["label", "--merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "merged")])
    merged = open_dataset(tmp_path / "merged")
    assert merged.source_indices.tolist() == list(range(24))
    assert merged.metadata["shards"] == 2 and merged.metadata["structures"] == 24
    assert_equal_labels(labels(merged), labels(open_dataset(tmp_path / "whole")))
    # Shards of another job (here: another chunk size) do not merge with these.
    label_dataset(EMT, [inputs], tmp_path / "other", shard=(1, 2), chunk=5, progress=False)
    with pytest.raises(DatasetError, match="differs in: chunk"):
        merge_datasets([tmp_path / "shard0", tmp_path / "other"], tmp_path / "mixed")


def test_relabel_a_dataset_with_another_teacher_and_refuse_unknown_elements(tmp_path, reference):
    # Any teacher of the protocol: an ASE calculator relabels the dataset (a dataset as input).
    summary = label_dataset(EMT, [reference.path], tmp_path / "emt", chunk=10, progress=False)
    emt = open_dataset(tmp_path / "emt")
    assert summary["labelled"] == 24 and emt.teacher == EMT
    first = emt[0]
    assert first.name == reference[0].name and first.energy != reference[0].energy
    assert first.stress is not None and emt.metadata["with_stress"] == 8
    assert first.info["source"] == reference[0].info["source"]  # the original source is kept
    # A structure the teacher cannot label stops the job before its chunk is committed, naming it.
    aspirin = reference[1]
    bad = aspirin.replace(numbers=np.where(aspirin.numbers == 8, 16, aspirin.numbers), name="sulfur aspirin")
    write_dataset(tmp_path / "bad", [aspirin, bad])
    with pytest.raises(StructureError, match="sulfur aspirin.*element S"):
        label_dataset(TEACHER, [tmp_path / "bad"], tmp_path / "never", progress=False)
    assert not list((tmp_path / "never").glob("part-*"))


def test_shard_assignment_and_order():
    sizes = np.array([5, 3, 9, 3, 1, 5, 7])
    assert shard_chunks(sizes, 0, 1, 3) == [[4, 1, 3], [0, 5, 6], [2]]
    assert shard_chunks(sizes, 1, 2, 2) == [[1, 3], [5]]
    assert parse_shard("3/16") == (3, 16)
    for bad in ("3", "16/16", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
