"""experiments/water.py without a GPU job: its command line, its sets' keys and how its results join others'.

The pipeline itself (teacher MD, online training, evaluation, stability) is the `--tiny` smoke run's to prove
(~2.5 min on 2 cores, too long for the suite); these are the parts that decide what is written where.
"""

import importlib.util
import json
import os

import pytest

from distiller.config import load_experiment

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "experiments", "water.py")


@pytest.fixture(scope="module")
def water():
    spec = importlib.util.spec_from_file_location("water_experiment", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--time"], "--time needs a value"),
    (["--time", "soon"], "--time: a duration"),
    (["--ps", "2"], "--ps is a setting of a --stability run"),
    (["--dt", "1"], "--dt is a setting of a --stability run"),
    (["--stability", "waterbox", "--ps", "-1"], "--ps must be a number of picoseconds > 0, got '-1'"),
    (["--stability", "waterbox", "--nve-ps", "-1"], "--nve-ps must be a number of picoseconds >= 0, got '-1'"),
    (["--stability", "waterbox", "--dt", "0"], "--dt must be a number of femtoseconds > 0, got '0'"),
    (["--stability", "waterbox", "--kernel", "cuda"], "--kernel takes xla or pallas, not 'cuda'"),
    (["--stability", "aspirin"], "--stability takes one of watersmall, waterbox, not 'aspirin'"),
    (["--tiny", "--stability", "waterbox"], "--stability takes one of watertiny (at --tiny)"),
])
def test_bad_command_lines_are_refused_by_name(water, argv, message):
    with pytest.raises(SystemExit, match="^experiments/water.py: ") as err:
        water.parse(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_command_line_values(water):
    assert water.parse(["--time", "5m"]) == {"--time": 300.0}
    assert water.parse(["--tiny", "--stability", "watertiny", "--ps", "0.1"]) == {
        "--tiny": True, "--stability": "watertiny", "--ps": 0.1}
    assert water.parse(["--stability", "waterbox", "--ps", "100", "--nve-ps", "0", "--dt", "1"]) == {
        "--stability": "waterbox", "--ps": 100.0, "--nve-ps": 0.0, "--dt": 1.0}


def test_every_md_run_has_its_own_keys(water):
    """Each (set, temperature, system) draws its trajectories from keys no other one uses: test sets share no
    velocities or noise with training or validation."""
    for systems in (water.SYSTEMS, water.TINY_SYSTEMS):
        keys = [key + k for runs in water.MD_SETS.values() for _, key in runs for k in range(len(systems))]
        assert len(keys) == len(set(keys))
    assert [t for t, _ in water.MD_SETS["train"]] == [250.0, 300.0, 350.0]
    assert water.MD_SETS["test"] == [(300.0, 900)]


def test_config_is_the_experiment_file_one_and_tiny_lives_apart(water):
    config = load_experiment(PATH)
    assert config == water.config and config.student.elements == (1, 8) and config.loss.stress_weight > 0
    tiny = water.run_config_for(True)
    assert tiny.run_dir.endswith(os.path.join("runs", "water_tiny", os.path.basename(config.run_dir)))
    assert tiny.structures[0].endswith(os.path.join("runs", "water_tiny", "train.extxyz"))
    assert tiny.steps < config.steps and tiny.student == config.student


def test_training_and_validation_come_from_the_first_system_and_every_system_is_tested(water, tmp_path,
                                                                                       monkeypatch):
    asked = []
    monkeypatch.setattr(water, "system_set", lambda name, system, *rest: asked.append((name, system)) or [])
    monkeypatch.setattr("distiller.structure.write_structures", lambda path, structures: None)
    for name in ("train", "validation", *(water.md_test_set(s) for s in water.SYSTEMS)):
        water.structures(name, water.SYSTEMS, None, False, str(tmp_path))
    assert asked == [("train", "watersmall"), ("validation", "watersmall"), ("test", "watersmall"),
                     ("test", "waterbox")]


def test_results_join_aspirins_without_replacing_them(water):
    aspirin = {"command": "python experiments/aspirin.py", "device": "gpu:NVIDIA H200", "versions": {"jax": "x"},
               "teacher": "fennol-pmc:ani1x", "test_sets": {"test-300K": {"file": "runs/aspirin/test-300K.extxyz"}},
               "students": [{"name": "painn-64x3", "test_sets": {"test-300K": {"accuracy_retained": 0.973}}},
                            {"name": water.STUDENT, "test_sets": {}}],
               "step_timing": {"painn-64x3": {"ms_per_step": 11.3}}}
    entry = {"name": water.STUDENT, "test_sets": {"test-waterbox-300K": {"accuracy_retained": 0.97}}}
    out = water.merged_results(aspirin, {"command": "python experiments/water.py", "device": "gpu:NVIDIA H200",
                                           "versions": {}, "teacher": "fennol-pmc:ani1x", "students": [entry],
                                           "step_timing": {},
                                           "test_sets": {"test-waterbox-300K": {"file": "runs/water/t.extxyz"}}})
    assert [s["name"] for s in out["students"]] == ["painn-64x3", water.STUDENT]
    assert out["students"][1] == entry  # the older water entry replaced, in its place
    assert out["students"][0]["command"] == "python experiments/aspirin.py"  # aspirin's keeps its command
    assert set(out["test_sets"]) == {"test-300K", "test-waterbox-300K"}
    assert out["step_timing"]["painn-64x3"]["ms_per_step"] == 11.3 and out["command"].endswith("water.py")
