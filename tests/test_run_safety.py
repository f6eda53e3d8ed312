"""Training runs lose nothing and mix nothing up: divergence, a changed config or teacher on resume, two trainers,
a deleted run directory, damaged checkpoints, a torn metrics line, SIGINT and SIGTERM.

The loop runs with a stand-in for the Distillation (no teacher, no compilation): a deterministic step on the real
student's parameter structure, with capacities of the real kinds, whose chosen steps a test breaks. The jitted
step itself is tested in test_train.py."""

import dataclasses
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from flax.core import FrozenDict
from test_train import small_config

from distiller import neighbours as nl
from distiller import reference as references
from distiller.capacity import Capacity
from distiller.files import lock_exclusively
from distiller.run_directory import (CheckpointError, DivergedError, RunDirectory, RunDirectoryError, load_student,
                                     params_template)
from distiller.teachers.fennol import FennolCapacity
from distiller.train import loop
from distiller.train.step import TrainState

CAPACITY = Capacity(nl.NeighbourCapacity(edges=512, bins=8, bin_size=16, reach=1), FennolCapacity((
    FrozenDict({"npairs": 2048, "nblist_mult_size": 1.0}),
    FrozenDict({"sizes": FrozenDict({1: 79, 6: 13, 8: 40}), "add_atoms": 0}),
)))


class StandInData:
    def __init__(self):
        self.capacity = CAPACITY

    def batches(self, start):
        while True:
            yield None

    def capacity_state(self):
        return self.capacity

    def restore_capacity(self, state):
        self.capacity = state


class StandIn:
    """What `loop.run` uses of a Distillation. `breaks[step](state, metrics)` -> (state, metrics) alters the
    outcome of that step (1, 2, ...)."""

    offline, teacher = False, None

    def __init__(self, template, breaks=None):
        self.template, self.breaks, self.reference = template, breaks or {}, None
        self.data = StandInData()

    def state_template(self):
        return TrainState(self.template, {"count": np.zeros((), np.float32)}, np.zeros((), np.int32), self.template)

    def initial_state(self):
        self.reference = references.ZERO
        return self.state_template()

    def use_reference(self, reference):
        self.reference = reference

    def step_key(self, step):
        return step

    def dispatch_step(self, state, inputs, key):
        moved = lambda tree: {k: moved(v) if isinstance(v, dict) else np.asarray(v) * 0.9 + 0.1 for k, v in tree.items()}
        step = int(state.step) + 1
        new = TrainState(moved(state.params), {"count": np.asarray(state.opt_state["count"]) + 1}, np.int32(step),
                         moved(state.ema))
        metrics = {"loss": 1.0 / step, "forces_rmse": 0.5, "gradient_norm": 1.0}
        if step in self.breaks:
            new, metrics = self.breaks[step](new, metrics)
        return new, metrics, False


@pytest.fixture(scope="module")
def base(structures_dir):
    return dataclasses.replace(small_config(structures_dir, "run"), steps=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def template(base):
    return params_template(base.student)


@pytest.fixture
def config_of(base):
    return lambda run_dir, **changes: dataclasses.replace(base, run_dir=str(run_dir), **changes)


def train(config, template, breaks=None, **kwargs):
    return loop.run(config, progress=False, job=StandIn(template, breaks), **kwargs)


def steps_logged(run_dir):
    return [row["step"] for row in RunDirectory(run_dir).read_metrics()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base, template):
    """A finished 4-step run (checkpoints 2 and 4) and its final state; tests work on copies."""
    config = dataclasses.replace(base, run_dir=str(tmp_path_factory.mktemp("finished") / "run"))
    return config, train(config, template)


@pytest.fixture
def copy(finished, tmp_path):
    config, _ = finished
    shutil.copytree(config.run_dir, tmp_path / "copy")
    return dataclasses.replace(config, run_dir=str(tmp_path / "copy"))


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def nan_weights(state, metrics):
    return state._replace(params=dict(state.params, params={**state.params["params"],
                                                            "element_offsets": np.full(4, np.nan)})), metrics


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_its_student_is_refused(tmp_path, config_of, template,
                                                                                       copy):
    config = config_of(tmp_path / "loss")
    with pytest.raises(DivergedError, match=r"the loss is not finite at step 3: .*last checkpoint \(step 2\) is kept"):
        train(config, template, {3: lambda state, metrics: (state, {**metrics, "loss": float("nan")})})
    assert RunDirectory(config.run_dir).latest_step() == 2 and steps_logged(config.run_dir) == [1, 2]

    config = config_of(tmp_path / "weights")  # finite loss, weights not: the checkpoint of step 4 is not written
    with pytest.raises(DivergedError, match="the parameters are not finite at step 4"):
        train(config, template, {4: nan_weights})
    assert RunDirectory(config.run_dir).latest_step() == 2

    run = RunDirectory(copy.run_dir)  # a run diverged before the trainer checked: evaluation and MD refuse it
    state = StandIn(template).state_template()
    nan_state = nan_weights(state, {})[0]
    run.save_checkpoint(run.checkpoints(), 6, nan_state.params, (state.params, state.opt_state, state.step))
    with pytest.raises(DivergedError, match=r"copy: the student of step 6 has weights that are not finite"):
        load_student(copy.run_dir)


def test_resume_refuses_another_config_before_writing_anything_and_allows_what_may_change(copy, template, finished):
    stored = (RunDirectory(copy.run_dir).file("config.json"))
    before = open(stored, "rb").read()
    changed = dataclasses.replace(copy, seed=4, student=dataclasses.replace(copy.student, cutoff=5.0))
    with pytest.raises(RunDirectoryError, match=r"differs from the run's config.json in seed 0 -> 4; student.cutoff "
                                                r"4.0 -> 5.0; only name, run_dir, steps"):
        train(changed, template, resume=True)
    with pytest.raises(RunDirectoryError, match="steps=3 is below the run's checkpoint of step 4"):
        train(dataclasses.replace(copy, steps=3), template, resume=True)
    assert open(stored, "rb").read() == before
    # Files are compared, not their spelling: the same structures through `..` resume; another file does not.
    aspirin, water = copy.structures
    respelled = os.path.join(os.path.dirname(aspirin), "..", os.path.basename(os.path.dirname(aspirin)),
                             os.path.basename(aspirin))
    train(dataclasses.replace(copy, structures=(respelled, water)), template, resume=True)
    with pytest.raises(RunDirectoryError, match=r"differs from the run's config.json in structures"):
        train(dataclasses.replace(copy, structures=(water, water)), template, resume=True)
    # The copy is a moved directory (its config.json names the original); a new name, more steps, other intervals:
    longer = dataclasses.replace(copy, name="longer", steps=6, log_every=2, checkpoint_every=3)
    final = train(longer, template, resume=True)
    assert steps_logged(copy.run_dir) == [1, 2, 3, 4, 6] and int(final.step) == 6
    assert RunDirectory(copy.run_dir).read_config() == longer


def test_two_trainers_never_share_a_run_directory(tmp_path, config_of, template):
    config = config_of(tmp_path / "run")
    os.makedirs(config.run_dir)
    holder = lock_exclusively(os.path.join(config.run_dir, ".lock"))  # another trainer's lock
    with pytest.raises(RunDirectoryError, match="another trainer is using this run directory"):
        train(config, template)
    assert os.listdir(config.run_dir) == [".lock"]
    holder.close()


def test_results_files_updated_by_processes_side_by_side_lose_no_entry(tmp_path):
    # experiments' students trained side by side add their entries to one results file
    import subprocess
    import sys

    path = str(tmp_path / "results.json")
    add = ("import sys; from distiller.files import update_json\n"
           "for k in range(int(sys.argv[2]), int(sys.argv[2]) + 40):\n"
           "    update_json(sys.argv[1], lambda old: {**(old or {}), str(k): k})")
    workers = [subprocess.Popen([sys.executable, "-c", add, path, str(100 * w)]) for w in range(3)]
    assert [worker.wait(60) for worker in workers] == [0, 0, 0]
    with open(path) as f:
        assert sorted(json.load(f).values()) == [100 * w + k for w in range(3) for k in range(40)]


def test_a_run_directory_deleted_during_training_stops_it(tmp_path, config_of, template):
    config = config_of(tmp_path / "run")

    def delete(state, metrics):
        shutil.rmtree(config.run_dir)
        return state, metrics

    with pytest.raises(RunDirectoryError, match="deleted or replaced during training .* stopped at step 3"):
        train(config, template, {3: delete})
    assert not os.path.exists(config.run_dir)  # no checkpoint recreated it


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one_naming_the_bad_file(copy, template, tmp_path):
    run = RunDirectory(copy.run_dir)
    assert json.load(open(run.file("capacity", "4.json")))["online"]["model"]["fennol"][1]["pairs"][0][1]["pairs"][0] \
        == [1, 79]  # JSON, not pickle: element numbers stay numbers
    assert run.load_capacity(4) == CAPACITY and not any(n.endswith(".pkl") for n in os.listdir(run.file("capacity")))
    data = max((os.path.join(r, n) for r, _, ns in os.walk(run.file("checkpoints", "4", "params")) for n in ns),
               key=os.path.getsize)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.warns(RuntimeWarning, match=f"{re.escape(data)}: damaged .*using the checkpoint before it"):
        student = load_student(copy.run_dir)
    assert_same(student.params, run.restore(template, step=2)[1])

    shutil.copytree(copy.run_dir, tmp_path / "metadata")
    metadata = RunDirectory(tmp_path / "metadata")
    open(metadata.file("checkpoints", "4", "params", "_METADATA"), "w").close()
    open(metadata.file("capacity", "2.json"), "w").write('{"online": {"neigh')
    with pytest.raises(CheckpointError, match=r"capacity/2.json: damaged capacities of checkpoint 2"):
        metadata.load_capacity(2)
    with pytest.warns(RuntimeWarning, match=r"4/params/_METADATA: damaged"):
        with pytest.raises(CheckpointError, match=r"capacity/2.json"):  # no intact checkpoint left to train on
            train(dataclasses.replace(copy, run_dir=metadata.path), template, resume=True)

    resumed = dataclasses.replace(copy, run_dir=str(tmp_path / "resumed"))  # one damaged file: steps 3, 4 again
    shutil.copytree(copy.run_dir, resumed.run_dir)
    with pytest.warns(RuntimeWarning, match=r"moved to .*damaged/4"):
        train(resumed, template, resume=True)
    assert steps_logged(resumed.run_dir) == [1, 2, 3, 4] and RunDirectory(resumed.run_dir).latest_step() == 4
    assert os.path.isdir(os.path.join(resumed.run_dir, "damaged", "4"))


def test_a_torn_last_metrics_line_is_left_out_and_repaired_on_resume(copy, template):
    run = RunDirectory(copy.run_dir)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write: step 5 was never checkpointed
    assert steps_logged(copy.run_dir) == [1, 2, 3, 4]
    train(dataclasses.replace(copy, steps=6), template, resume=True)
    assert [json.loads(line)["step"] for line in open(run.metrics_path)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_the_step_in_progress_and_resume_continues(tmp_path, config_of, template, finished,
                                                                        signum):
    config = config_of(tmp_path / "run", checkpoint_every=4)

    def interrupt(state, metrics):
        signal.raise_signal(signum)
        return state, metrics

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.Interrupted, match=f"{signal.Signals(signum).name} at step 2 of 4: checkpointed"):
        train(config, template, {2: interrupt})
    assert RunDirectory(config.run_dir).latest_step() == 2 and steps_logged(config.run_dir) == [1, 2]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    final = train(config, template, resume=True)
    assert steps_logged(config.run_dir) == [1, 2, 3, 4]
    assert_same(final, finished[1])


def test_resume_refuses_a_changed_teacher_file(tmp_path, config_of, template):
    model = tmp_path / "teacher.fnx"
    model.write_bytes(b"weights")
    config = config_of(tmp_path / "run", steps=2, teacher=f"fennol:{model}")
    train(config, template)
    model.write_bytes(b"other weights")
    with pytest.raises(RunDirectoryError, match=r"teacher.fnx: the teacher's model file changed since the run started"):
        train(dataclasses.replace(config, steps=4), template, resume=True)
