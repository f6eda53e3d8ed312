"""The grain loader (every structure once per epoch, few shapes, sharding, resumable) and offline training."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from distiller.config import Experiment, LoaderConfig, LossConfig, OptimizerConfig, from_dict, to_dict
from distiller.data.dataset import DatasetError, write_dataset
from distiller.data.loader import Loader
from distiller.label import label_dataset
from distiller.structure import Structure, read_structures, write_structures
from distiller.students import SchNetConfig
from distiller.run_directory import RunDirectory
from distiller.train.loop import run
from distiller.train.step import Distillation

EMT = "ase:ase.calculators.emt.EMT"


def identified(count=50, seed=0):
    """Structures of 2..70 atoms whose energy is their index, so a batch says which structures it holds."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        n = int(rng.integers(2, 71))
        out.append(Structure(numbers=np.ones(n, np.int32), positions=rng.uniform(0, 20, (n, 3)), cell=np.zeros((3, 3)),
                             pbc=np.zeros(3, bool), name=f"s{k}", energy=float(k), forces=np.zeros((n, 3))))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("loader") / "d", identified(), chunk=16)


def batch_members(batch):
    return np.asarray(batch.energy)[np.asarray(batch.graph_mask)].astype(int).tolist()


def test_every_structure_once_per_epoch_with_few_shapes(dataset):
    loader = Loader(dataset, batch_size=4, seed=5, process_index=0, process_count=1, threads=2)
    it = loader.iterator(0)
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(loader.steps_per_epoch):
            batch = next(it)
            seen += batch_members(batch)
            shape = (batch.positions.shape[0], batch.graph_mask.shape[0])
            assert shape in [tuple(s) for s in loader.shapes]
            # Every batch comes from one bucket: its structures pad by less than half.
            n = np.asarray(batch.n_atoms)[np.asarray(batch.graph_mask)]
            assert n.max() < 1.5 * n.min() + 2
        assert sorted(seen) == list(range(50)), "each structure exactly once per epoch"
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2], "reshuffled every epoch"
    # Sizes 2..70 give buckets of round_up sizes: a handful of shapes, however long it runs.
    assert 4 <= len(loader.buckets) <= 12
    assert loader.shapes_seen == set(loader.shapes)
    report = loader.report()
    assert report["shapes_seen"] == sorted(list(s) for s in loader.shapes)


def test_order_is_a_function_of_seed_and_step(dataset):
    a = Loader(dataset, batch_size=3, seed=1, process_index=0, process_count=1, threads=3)
    b = Loader(dataset, batch_size=3, seed=1, process_index=0, process_count=1, threads=1)
    c = Loader(dataset, batch_size=3, seed=2, process_index=0, process_count=1)
    start = a.steps_per_epoch + 3  # resume in the middle of the second epoch
    from_start = [batch_members(x) for _, x in zip(range(start + 8), a.iterator(0))][start:]
    resumed = [batch_members(x) for _, x in zip(range(8), b.iterator(start))]
    assert from_start == resumed
    assert [batch_members(c.batch(s)) for s in range(start, start + 8)] != resumed


def test_sharding_by_process_and_atom_budget(dataset):
    loaders = [Loader(dataset, batch_size=4, seed=0, process_index=p, process_count=3) for p in range(3)]
    assert len({l.steps_per_epoch for l in loaders}) == 1
    steps = loaders[0].steps_per_epoch
    for epoch in range(2):
        seen = [m for l in loaders for s in range(epoch * steps, (epoch + 1) * steps) for m in batch_members(l.batch(s))]
        assert sorted(seen) == list(range(50)), "the processes together see each structure once"
    budget = Loader(dataset, batch_size=8, seed=0, max_atoms=96, process_index=0, process_count=1)
    for s in range(budget.steps_per_epoch):
        batch = budget.batch(s)
        assert int(np.asarray(batch.n_atoms).sum()) <= 96 or int(np.asarray(batch.graph_mask).sum()) == 1


def test_unlabelled_structures_are_refused_by_name(tmp_path):
    items = identified(3)
    items[1] = items[1].replace(energy=None, forces=None, name="no labels here")
    loader = Loader(write_dataset(tmp_path / "d", items), batch_size=3, process_index=0, process_count=1)
    with pytest.raises(DatasetError, match="'no labels here' has no energy or forces"):
        [loader.batch(s) for s in range(loader.steps_per_epoch)]


# --------------------------------------------------------------------------------------------------
# Offline training


@pytest.fixture(scope="module")
def emt_dataset(tmp_path_factory, structures_dir):
    """20 rattled aspirins and 10 rattled watertiny boxes labelled by another teacher (ASE's EMT), with stress."""
    aspirin = read_structures(structures_dir / "aspirin.extxyz")[0]
    water = read_structures(structures_dir / "watertiny.extxyz")[0]
    rng = np.random.default_rng(0)
    items = [(water if k % 3 == 0 else aspirin) for k in range(30)]
    items = [s.replace(positions=s.positions + rng.normal(0, 0.05, s.positions.shape), name=f"r{k}")
             for k, s in enumerate(items)]
    directory = tmp_path_factory.mktemp("emt")
    write_structures(directory / "rattled.extxyz", items)
    label_dataset(EMT, [directory / "rattled.extxyz"], directory / "data", chunk=8, progress=False)
    return directory / "data"


def offline_config(dataset, run_dir, steps):
    return Experiment(
        name="offline", teacher=EMT, dataset=str(dataset),
        student=SchNetConfig(cutoff=4.0, features=16, layers=1, n_rbf=8),
        loss=LossConfig(energy_weight=1.0, forces_weight=10.0, stress_weight=100.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=5, final_learning_rate=1e-3),
        steps=steps, batch_size=2, seed=3, run_dir=str(run_dir), checkpoint_every=10, log_every=1, held_out=4,
        loader=LoaderConfig(threads=2, prefetch=4),
    )


def metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_offline_training_lowers_the_loss_and_resumes_exactly(tmp_path, emt_dataset):
    whole = offline_config(emt_dataset, tmp_path / "whole", steps=52)
    job = Distillation.create(whole)  # for both fresh runs (the resume makes its own, as a new process would)
    final = run(whole, progress=False, job=job)
    rows = metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == list(range(1, 53))
    # 26 training structures, 2 a step: every 13 steps an epoch sees them all once, so epoch means compare.
    epoch_loss = [np.mean([r["loss"] for r in rows[e * 13:(e + 1) * 13]]) for e in range(4)]
    assert epoch_loss[3] < 0.5 * epoch_loss[0], epoch_loss
    assert any(r["stress_rmse"] > 0 for r in rows), "periodic batches carry the teacher's stress into the loss"
    loader = json.loads((tmp_path / "whole" / "loader.json").read_text())
    assert loader["structures"] == 26 and len(loader["shapes_seen"]) == 2  # aspirin and water buckets

    stopped = offline_config(emt_dataset, tmp_path / "stopped", steps=52)
    run(stopped, progress=False, stop_after=13, job=job)
    assert RunDirectory(stopped.run_dir).latest_step() == 10
    resumed = run(stopped, resume=True, progress=False)
    b = metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 53)), "each step logged exactly once"
    for ra, rb in zip(rows, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    for x, y in zip(jax.tree_util.tree_leaves(final.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # The held-out structures are the dataset's, never trained on.
    held = job.data.held_out(4)
    assert len(held) == 4 and all(s.energy is not None for s in held)
    assert not set(job.data.held_out_indices) & set(job.data.train_indices)


def test_offline_config_checks(tmp_path, emt_dataset):
    config = offline_config(emt_dataset, tmp_path / "run", steps=1)
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ValueError, match="labelled by 'ase:ase.calculators.emt.EMT'"):
        Distillation.create(dataclasses.replace(config, teacher="fennol-pmc:ani1x"))
    with pytest.raises(ValueError, match="sets both `structures`"):
        Distillation.create(dataclasses.replace(config, structures=("x.extxyz",)))


def test_added_training_datasets_are_read_after_the_runs_own(tmp_path, emt_dataset):
    """DatasetLabels.add_training (active learning's offline pool): the extra structures come after the run's,
    join the training indices alone (the held-out split is the run's), and must share the run's teacher."""
    job = Distillation.create(offline_config(emt_dataset, tmp_path / "run", steps=1))
    run_set, held, trained = job.data.dataset, list(job.data.held_out_indices), list(job.data.train_indices)
    extra = write_dataset(tmp_path / "extra", run_set.get([5, 6, 7]), teacher=EMT)
    job.data.add_training([extra])
    n = len(run_set)
    assert list(job.data.held_out_indices) == held
    assert list(job.data.train_indices) == trained + [n, n + 1, n + 2]
    got = job.data.dataset.get([0, n - 1, n, n + 2])
    assert [s.name for s in got] == [run_set[0].name, run_set[n - 1].name, extra[0].name, extra[2].name]
    np.testing.assert_array_equal(got[3].forces, extra[2].forces)
    other = write_dataset(tmp_path / "other", run_set.get([1]), teacher="ase:ase.calculators.lj.LennardJones")
    with pytest.raises(ValueError, match="labelled by 'ase:ase.calculators.lj.LennardJones'"):
        job.data.add_training([other])
