"""Active learning (distiller.train.active): the selection picks exactly the frames where student and teacher
disagree most; a real round with the ANI-1x teacher writes rounds.jsonl and grows the training pool; a job stopped
mid-round continues without doing a selection twice or adding a frame twice; bad settings fail at once, by name."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from distiller.cli import main as cli
from distiller.config import ActiveLearning, Experiment, MDSampling, OptimizerConfig, SamplingConfig
from distiller.files import temporary_path
from distiller.run_directory import RunDirectory
from distiller.structure import read_structures
from distiller.students import SchNetConfig
from distiller.train import active as al


def planted(aspirin, errors, spreads):
    """Teacher frames (rattled aspirin, forces of any size) and student frames whose forces differ from the
    teacher's by exactly `errors[k]` eV/Å RMS in frame k; the teacher's energy spread is `spreads[k]` eV/atom."""
    rng = np.random.default_rng(0)
    teacher, student = [], []
    for k, (error, spread) in enumerate(zip(errors, spreads)):
        positions = aspirin.positions + rng.normal(0, 0.02, aspirin.positions.shape)
        forces = rng.normal(0, 1.0, positions.shape)
        direction = rng.normal(0, 1.0, positions.shape)
        direction /= np.sqrt(np.mean(direction**2))
        frame = aspirin.replace(positions=positions, name=f"frame {k}")
        teacher.append(frame.replace(forces=forces, energy=-1.0,
                                     info={"energy_spread": spread * aspirin.n_atoms}))
        student.append(frame.replace(forces=forces + error * direction, energy=-1.0))
    return student, teacher


def test_the_selection_picks_the_frames_of_largest_disagreement(aspirin):
    errors = np.array([0.1, 0.9, 0.3, 0.05, 0.7, 0.3, 1.2, 0.2])
    spreads = np.array([0.5, 0.01, 0.02, 0.4, 0.03, 0.2, 0.0, 0.1])
    student, teacher = planted(aspirin, errors, spreads)
    scores = al.frame_scores(student, teacher)
    np.testing.assert_allclose(scores["force_error"], errors, rtol=1e-12)
    np.testing.assert_allclose(scores["ensemble_spread"], spreads, rtol=1e-12)
    assert al.select(scores["force_error"], 3).tolist() == [6, 1, 4]  # 1.2, 0.9, 0.7
    assert al.select(np.array([0.3, 0.5, 0.3, 0.3]), 3).tolist() == [1, 0, 2]  # of equal ones the earlier first
    assert al.select(scores["ensemble_spread"], 2).tolist() == [0, 3]
    assert sorted(al.select(errors, 100).tolist()) == list(range(8))  # fewer frames than asked: all of them
    with pytest.raises(ValueError, match="finite"):
        al.select(np.array([0.1, np.nan]), 1)


def test_the_ladder_runs_every_seed_at_every_temperature():
    active = ActiveLearning(replicas=6, temperatures=(300.0, 500.0, 700.0))
    assert al.ladder(2, active) == [(0, 300.0), (1, 300.0), (0, 500.0), (1, 500.0), (0, 700.0), (1, 700.0)]


def experiment(structures_dir, run_dir, **changes):
    return dataclasses.replace(Experiment(
        name="active", teacher="fennol-pmc:ani1x/0", structures=(str(structures_dir / "aspirin.extxyz"),),
        sampling=SamplingConfig(rattle=0.05, strain=0.0), student=SchNetConfig(cutoff=4.0, features=8, layers=1, n_rbf=8),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, final_learning_rate=1e-3),
        steps=4, batch_size=2, seed=3, run_dir=str(run_dir), checkpoint_every=4, log_every=1, tensorboard=False),
        **changes)


# Two replicas (300 and 600 K) of aspirin, 40 MD steps, a frame every 10: the random student's 600 K replica breaks
# a bond within them (a finding: its time to failure is reported, the other replica runs on).
ROUNDS = ActiveLearning(rounds=1, steps_per_round=2, replicas=2, temperatures=(300.0, 600.0), md_steps=40,
                        interval=10, select=2, checkpoint="latest")


@pytest.fixture(scope="module")
def one_round(tmp_path_factory, structures_dir):
    """The experiment's 4 steps and one round, the job killed during the round's training and run again (the
    round's selection must not be redone), and a selection of a later round killed while being written."""
    config = experiment(structures_dir, tmp_path_factory.mktemp("active") / "run")
    active = pathlib.Path(config.run_dir) / al.ACTIVE
    monkeypatch = pytest.MonkeyPatch()
    train, select, job = al.run, al._select, al.training_job
    calls, jobs = [], []

    def killed(config, **kwargs):
        calls.append(config.steps)
        if len(calls) == 2:  # the experiment's training went through; the round's is killed
            raise KeyboardInterrupt("killed during round 1's training")
        return train(config, **kwargs)

    monkeypatch.setattr(al, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        al.active_learning(config, ROUNDS, progress=False)
    selected = frames_of(active / al.round_name(1))
    os.makedirs(temporary_path(active / al.round_name(2)))  # a selection killed while being written

    def selected_again(*args, **kwargs):
        raise AssertionError("round 1's frames were selected again")

    monkeypatch.setattr(al, "run", train)
    monkeypatch.setattr(al, "_select", selected_again)
    monkeypatch.setattr(al, "training_job", lambda *args: jobs.append(job(*args)) or jobs[-1])
    try:
        rows = al.active_learning(config, ROUNDS, progress=False)
    finally:
        monkeypatch.undo()
    assert al._select is select
    return config, rows, calls, selected, jobs


def frames_of(directory):
    with open(directory / al.FRAMES) as f:
        return json.load(f)


def test_a_round_reports_its_frames_and_grows_the_training_pool(one_round):
    config, rows, calls, _, (job,) = one_round
    run_dir = RunDirectory(config.run_dir)
    active = pathlib.Path(config.run_dir) / al.ACTIVE
    with open(active / al.ROUNDS) as f:
        assert [json.loads(line) for line in f] == rows
    (row,) = rows
    assert row["round"] == 1 and row["student_step"] == 4 and row["steps"] == 6 and row["training_steps"] == 2
    assert calls == [4, 6] and run_dir.latest_step() == 6
    # The 600 K replica failed; its frames before the failure and the 300 K replica's four are the candidates.
    (failure,) = row["failures"]
    assert failure["replica"] == 1 and failure["temperature_K"] == 600.0 and "bond" in failure["cause"]
    assert row["time_to_failure_ps"] == failure["time_ps"] > 0
    listed = frames_of(active / al.round_name(1))
    assert row["frames"] == len(listed) == 4 + (failure["step"] - 1) // 10
    assert all(f["step"] < failure["step"] for f in listed if f["replica"] == 1)
    assert 0 < row["forces_mae"] and row["accuracy_retained"] < 1
    # The selected frames are the two with the largest force error, written with the teacher's labels.
    worst = sorted(listed, key=lambda f: -f["force_error"])[:2]
    assert [f["selected"] for f in listed].count(True) == 2 and all(f["selected"] for f in worst)
    selected = read_structures(active / al.round_name(1) / al.SELECTED)
    assert [s.info["force_error"] for s in selected] == pytest.approx([f["force_error"] for f in worst])
    assert row["selected_scores"] == pytest.approx([f["force_error"] for f in worst])
    # The round's training drew from the experiment's seed and the pool.
    assert len(job.data.seeds) == 1 + 2 and job.config.steps == 6
    for seed, frame in zip(job.data.seeds[1:], selected):
        np.testing.assert_allclose(seed.positions, frame.positions)


def test_a_stopped_job_continues_without_doing_a_round_twice(one_round):
    config, rows, _, selected, _ = one_round
    active = pathlib.Path(config.run_dir) / al.ACTIVE
    assert frames_of(active / al.round_name(1)) == selected  # the selection of before the kill
    assert sorted(os.listdir(active)) == [".lock", al.STATE, al.round_name(1), al.ROUNDS]  # the torn one is gone
    assert len({s.positions.tobytes() for s in read_structures(active / al.round_name(1) / al.SELECTED)}) == 2
    assert al.active_learning(config, ROUNDS, progress=False) == rows  # done: nothing more to do
    with pytest.raises(Exception, match=r"active\.select 2 -> 3"):
        al.active_learning(config, dataclasses.replace(ROUNDS, rounds=2, select=3), progress=False)


@pytest.mark.parametrize("settings, message", [
    (dict(md_steps=45, interval=10), r"active\.md_steps must be a multiple of active\.interval \(10\), got 45"),
    (dict(criterion="loss"), r"active\.criterion must be one of force_error, ensemble_spread, got 'loss'"),
    (dict(replicas=0), r"active\.replicas must be >= 1, got 0"),
    (dict(temperatures=()), r"active\.temperatures must be a non-empty tuple"),
    (dict(checkpoint="first"), r"active\.checkpoint must be one of best, latest"),
])
def test_bad_settings_fail_at_once_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        ActiveLearning(**settings)


def test_a_job_that_cannot_work_is_refused_before_anything_is_written(tmp_path, structures_dir, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="MDSampling"):
        al.active_learning(experiment(structures_dir, run_dir, sampling=MDSampling(replicas=2)), ROUNDS)
    with pytest.raises(ValueError, match="ensemble_spread.*one model"):
        al.active_learning(experiment(structures_dir, run_dir),
                           dataclasses.replace(ROUNDS, criterion="ensemble_spread"))
    assert not run_dir.exists()
    file = tmp_path / "experiment.py"
    file.write_text("from distiller.config import ActiveLearning, Experiment\n"
                    f"config = Experiment(name='x', structures=({str(structures_dir / 'aspirin.extxyz')!r},), "
                    f"run_dir={str(run_dir)!r})\nactive = ActiveLearning(rounds=1)\n")
    assert cli(["active", str(file), "--set", "active.select=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "distiller: error: --set active.select=0: active.select must be >= 1, got 0"
    assert cli(["active", str(file), "--rounds", "-1"]) == 2
    assert "active.rounds must be >= 0, got -1" in capsys.readouterr().err
    assert not run_dir.exists()
