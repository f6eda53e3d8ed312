"""`distiller label --hvp K`: K unit directions per structure and the teacher's H·v along each, stored with the
labels (a function of the seed and the structure's index: resumed and sharded jobs store the same ones), refused
for host teachers and bad K before any file; offline training with loss.hvp_weight trains on them."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distiller import capacity as capacities
from distiller.batch import BatchShape, pad_structures, with_neighbours
from distiller.cli import main as cli
from distiller.config import Experiment, LoaderConfig, LossConfig, OptimizerConfig
from distiller.data.dataset import DatasetError, ShardWriter, merge_datasets, open_dataset, write_dataset
from distiller.derivatives import predictions
from distiller.label import hvp_directions, label_dataset
from distiller.structure import read_structures, write_structures
from distiller.students import SchNetConfig
from distiller.teachers.registry import load_teacher
from distiller.train.loop import run
from distiller.train.step import Distillation

TEACHER = "fennol-pmc:ani1x/0"
EMT = "ase:ase.calculators.emt.EMT"
K, SEED = 2, 5


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(TEACHER)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, structures_dir):
    """Four rattled aspirins: two chunks of two, one batch shape (compiled once for every job here)."""
    aspirin = read_structures(structures_dir / "aspirin.extxyz")[0]
    rng = np.random.default_rng(11)
    items = [aspirin.replace(positions=aspirin.positions + rng.normal(0, 0.05, aspirin.positions.shape), name=f"a{k}")
             for k in range(4)]
    path = tmp_path_factory.mktemp("inputs") / "aspirins.extxyz"
    write_structures(path, items)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("labelled") / "data"
    summary = label_dataset(TEACHER, [inputs], out, chunk=2, hvp=K, hvp_seed=SEED, progress=False)
    assert summary["labelled"] == 4 and summary["hvp_directions"] == K and summary["dataset_complete"]
    return open_dataset(out)


def without_products(dataset, path):
    """The dataset's structures and labels as a dataset without Hessian-vector products."""
    return write_dataset(path, [s.replace(directions=None, hvp=None) for s in dataset], teacher=dataset.teacher)


def test_directions_are_unit_vectors_from_the_seed_and_the_index(labelled, inputs):
    assert labelled.hvp_directions == K and labelled.metadata["hvp_directions"] == K
    items = read_structures(inputs)
    for index, s in zip(labelled.source_indices, labelled):
        assert s.directions.shape == s.hvp.shape == (K, s.n_atoms, 3)
        norms = np.linalg.norm(s.directions.reshape(K, -1), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-6)
        assert abs(float(np.sum(s.directions[0] * s.directions[1]))) < 0.5  # two draws, not one direction twice
        # A function of (seed, index) alone: recomputed outside the job, the same bits; another seed, others.
        np.testing.assert_array_equal(s.directions, hvp_directions(items[index], SEED, int(index), K))
        assert not np.allclose(s.directions, hvp_directions(items[index], SEED + 1, int(index), K))
    assert not np.allclose(labelled[0].directions, labelled[1].directions)


def test_stored_products_are_finite_differences_of_the_teachers_forces(labelled, teacher):
    """Each stored H·v (float32, from the labelling job) against float64 central differences of the teacher's
    forces along its stored direction: eV/Å², the sign of derivatives.predictions' hvp (H·v = −dF/dh)."""
    h = 1e-4
    first = labelled[0]
    n = first.n_atoms
    shape = BatchShape(atoms=n + 1, graphs=2)
    capacity = capacities.allocate(teacher, jax.tree.map(jnp.asarray, pad_structures([first], shape)),
                                   teacher.cutoff + 0.5)
    forces64 = jax.jit(lambda params, batch: predictions(teacher, params, batch, capacity.model))
    checked = 0
    with jax.enable_x64(True):
        cast = lambda x: jnp.asarray(np.asarray(x, np.float64)) if np.issubdtype(np.asarray(x).dtype, np.floating) \
            else jnp.asarray(x)
        params = jax.tree.map(cast, teacher.params)
        for s in (labelled[0], labelled[3]):  # one of each chunk
            batch32 = jax.tree.map(jnp.asarray, pad_structures([s], shape))
            edges, neighbours = with_neighbours(batch32, teacher.cutoff + 0.5, capacity.neighbours)
            assert not neighbours.overflow
            batch = jax.tree.map(cast, edges)
            x = np.asarray(batch.positions)
            for v, stored in zip(s.directions, s.hvp):
                step = np.zeros_like(x)
                step[:n] = h * v
                plus, minus = (forces64(params, batch._replace(positions=jnp.asarray(x + sign * step)))
                               for sign in (1.0, -1.0))
                assert not (plus.overflow or minus.overflow)
                numeric = -(np.asarray(plus.forces) - np.asarray(minus.forces))[:n] / (2 * h)
                assert np.abs(stored).max() > 1.0  # eV/Å²: something to check
                np.testing.assert_allclose(stored, numeric, atol=2e-5 * np.abs(stored).max())
                checked += 1
    assert checked == 2 * K


def test_a_resumed_job_and_merged_shards_store_the_same_directions_and_products(tmp_path, inputs, labelled,
                                                                                 monkeypatch, capsys):
    # Killed right after its first commit (the loss a kill can cause is the chunk in flight), then run again.
    commit = ShardWriter.commit

    def commit_then_die(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    out = tmp_path / "resumed"
    monkeypatch.setattr(ShardWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        label_dataset(TEACHER, [inputs], out, chunk=2, hvp=K, hvp_seed=SEED, progress=False)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    # Another K or seed (or none) is another job: refused before any work, the killed job's part kept.
    for other in ({"hvp": K + 1, "hvp_seed": SEED}, {"hvp": K, "hvp_seed": SEED + 1}, {}):
        with pytest.raises(DatasetError, match="differs in: hvp"):
            label_dataset(TEACHER, [inputs], out, chunk=2, progress=False, **other)
    summary = label_dataset(TEACHER, [inputs], out, chunk=2, hvp=K, hvp_seed=SEED, progress=False)
    assert summary["resumed_from"] == 2 and summary["labelled"] == 2
    manifest = lambda path: json.loads((pathlib.Path(path) / "manifest-00000-of-00001.json").read_text())
    digests = lambda path: [part["sha256"] for part in manifest(path)["parts"]]
    assert digests(out) == digests(labelled.path)  # the same bytes as the uninterrupted job

    # Two shards (one through the command line), merged: the same directions; the same products but for the
    # float32 rounding of other batch companions.
    assert cli(["label", "--teacher", TEACHER, "--structures", str(inputs), "--out", str(tmp_path / "shard0"),
                "--shard", "0/2", "--chunk", "2", "--hvp", str(K), "--hvp-seed", str(SEED), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["hvp_directions"] == K
    label_dataset(TEACHER, [inputs], tmp_path / "shard1", shard=(1, 2), chunk=2, hvp=K, hvp_seed=SEED, progress=False)
    merged = merge_datasets([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert merged.hvp_directions == K and merged.source_indices.tolist() == [0, 1, 2, 3]
    for got, want in zip(merged, labelled):
        assert got.name == want.name
        np.testing.assert_array_equal(got.directions, want.directions)
        np.testing.assert_allclose(got.hvp, want.hvp, rtol=0, atol=1e-5 * np.abs(want.hvp).max())

    # Datasets with and without products, or with another K, do not merge: one line naming both.
    plain = without_products(labelled, tmp_path / "plain")
    fewer = write_dataset(tmp_path / "fewer", [s.replace(directions=s.directions[:1], hvp=s.hvp[:1]) for s in labelled],
                          teacher=TEACHER)
    for other, held in ((plain, "no Hessian-vector products"), (fewer, "labelled with --hvp 1")):
        with pytest.raises(DatasetError) as refused:
            merge_datasets([tmp_path / "shard0", other.path], tmp_path / "mixed")
        message = str(refused.value)
        assert "\n" not in message and message == (f"cannot merge {tmp_path / 'shard0'} (labelled with --hvp {K}) with "
                                                    f"{other.path} ({held}): label every shard with the same --hvp")
    assert not (tmp_path / "mixed").exists()


def test_host_teachers_and_bad_counts_are_refused_before_any_file(tmp_path, inputs, capsys):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=f"teacher {EMT} is computed outside JAX and has first derivatives only"):
        label_dataset(EMT, [inputs], out, hvp=K, progress=False)
    assert cli(["label", "--teacher", EMT, "--structures", str(inputs), "--out", str(out), "--hvp", "2"]) == 1
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"distiller: error: teacher {EMT} is computed outside JAX")
    for bad in (0, -3, True, 2.5, "two"):
        with pytest.raises(ValueError, match=r"--hvp must be an integer >= 1 \(directions per structure\), got"):
            label_dataset(TEACHER, [inputs], out, hvp=bad, progress=False)
    for bad in ("0", "two", "1.5"):
        assert cli(["label", "--teacher", TEACHER, "--structures", str(inputs), "--out", str(out), "--hvp", bad]) == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert line == f"distiller: error: --hvp must be an integer >= 1 (directions per structure), got {bad!r}"
    assert cli(["label", "--teacher", TEACHER, "--structures", str(inputs), "--out", str(out), "--hvp-seed", "3"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line == "distiller: error: --hvp-seed seeds the directions of --hvp K: give --hvp too"
    assert not out.exists()


def offline_config(dataset, run_dir) -> Experiment:
    return Experiment(
        name="hvp-offline", teacher=TEACHER, dataset=str(dataset),
        student=SchNetConfig(cutoff=4.0, features=16, layers=1, n_rbf=8),
        loss=LossConfig(energy_weight=1.0, forces_weight=10.0, hvp_weight=1.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, final_learning_rate=1e-3),
        steps=3, batch_size=2, seed=3, run_dir=str(run_dir), checkpoint_every=3, log_every=1, held_out=1,
        loader=LoaderConfig(threads=1, prefetch=2),
    )


def test_offline_training_uses_the_stored_products_and_refuses_datasets_without(tmp_path, labelled):
    config = offline_config(labelled.path, tmp_path / "run")
    job = Distillation.create(config)
    run(config, progress=False, job=job)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["hvp_rmse"]) and r["hvp_rmse"] > 0.1 for r in rows)  # eV/Å²: a random student's

    # A step's direction and H·v per structure are one of its stored pairs (the same one), zero on padding.
    inputs = job.data.inputs(0)
    capacity = job.data.capacity(inputs)
    label = jax.jit(lambda inputs, key: job.data.labelled(capacity, None, inputs, key, job.shift, hvp=True)[0])
    graph, real = np.asarray(inputs.graph_index), np.asarray(inputs.atom_mask)
    for step in range(2):
        batch = label(inputs, job.step_key(step))
        directions, hvp = np.asarray(batch.directions), np.asarray(batch.hvp)
        assert directions.shape == hvp.shape == inputs.positions.shape
        for g in np.flatnonzero(np.asarray(inputs.graph_mask)):
            atoms = (graph == g) & real
            picked = [k for k in range(K) if np.array_equal(directions[atoms], np.asarray(inputs.directions)[k, atoms])]
            assert len(picked) == 1
            np.testing.assert_array_equal(hvp[atoms], np.asarray(inputs.hvp)[picked[0], atoms])
        assert not np.any(directions[~real]) and not np.any(hvp[~real])

    # Without stored products (or with only some datasets holding them): one line at the start, nothing written.
    plain = without_products(labelled, tmp_path / "plain")
    refused_run = dataclasses.replace(config, dataset=plain.path, run_dir=str(tmp_path / "refused"))
    with pytest.raises(ValueError) as refused:
        run(refused_run, progress=False)
    assert str(refused.value) == (f"experiment 'hvp-offline': loss.hvp_weight needs Hessian-vector products and "
                                  f"dataset {plain.path} holds none: label it with `distiller label --hvp K` (a JAX "
                                  f"teacher), or set loss.hvp_weight=0")
    assert not (tmp_path / "refused" / "config.json").exists()
    with pytest.raises(ValueError, match=f"dataset {plain.path} holds none: label it with `distiller label --hvp K`"):
        job.data.add_training([plain])


def test_offline_active_rounds_with_the_hvp_term_refuse_a_host_teacher_before_any_work(tmp_path, labelled,
                                                                                        structures_dir):
    # Their frames would be labelled with the run's K products each, which only a JAX teacher gives.
    from distiller.config import ActiveLearning
    from distiller.train.active import active_learning

    config = dataclasses.replace(offline_config(labelled.path, tmp_path / "run"), teacher=EMT)
    active = ActiveLearning(rounds=1, steps_per_round=1, structures=(str(structures_dir / "aspirin.extxyz"),),
                            replicas=1, md_steps=20, interval=10)
    with pytest.raises(ValueError, match=f"teacher {EMT} is computed outside JAX"):
        active_learning(config, active, progress=False)
    assert not (tmp_path / "run").exists()
