"""The command line's rough edges: one-line errors with exit codes, checked --set values, `md` and `evaluate`
refusing bad input before they write, status lines, the parity plot, help, --version and `export`.

Nothing here trains or compiles a student: runs are a config.json with a stand-in student (a host model), the
teacher is ASE's EMT (host-only) or a FeNNol spec that is only loaded."""

import json
import math

import ase.build
import ase.io
import numpy as np
import pytest

from distiller import cli, evaluate
from distiller.cli import main
from distiller.config import Experiment, LoaderConfig, OptimizerConfig, SamplingConfig, apply_override
from distiller.data.dataset import write_dataset
from distiller.files import write_json_atomic
from distiller.run_directory import RunDirectory
from distiller.structure import Structure, write_structures
from distiller.students import SchNetConfig
from distiller.teachers.host import host_model

EMT = "ase:ase.calculators.emt.EMT"
FENNOL = "fennol-pmc:ani1x/0"


def error_line(capsys) -> str:
    """The one line a failed command writes to stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def molecules(tmp_path):
    """Two small labelled molecules of two systems (water, methane) in an extxyz file."""
    rng = np.random.default_rng(0)
    structures = []
    for k, name in enumerate(["H2O", "CH4", "H2O"]):
        atoms = ase.build.molecule(name)
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        structures.append(Structure.from_ase(atoms, name=f"{name}-{k}").replace(
            energy=-10.0 * len(atoms) + 0.01 * k, forces=rng.normal(0, 1, (len(atoms), 3))))
    path = tmp_path / "molecules.extxyz"
    write_structures(path, structures)
    return path, structures


def stand_in_student(offset: float):
    """A 'trained student' that gives the structures' own labels shifted by `offset` (NaN: a broken one)."""
    def label(structures):
        return [s.replace(energy=s.energy + offset if s.energy is not None else offset,
                          forces=(s.forces if s.forces is not None else np.zeros((s.n_atoms, 3))) + offset)
                for s in structures]

    return host_model("stand-in student", label, cutoff=4.0, elements=frozenset({1, 6, 8}), source=SchNetConfig())


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory (config.json only; teacher EMT) whose student is `stand_in_student(0.01)` unless a test
    patches `evaluate.load_student` again."""
    path = tmp_path / "run"
    RunDirectory(path).write_config(Experiment(name="stand-in", teacher=EMT, run_dir=str(path)))
    monkeypatch.setattr(evaluate, "load_student", lambda run_dir: stand_in_student(0.01))
    return path


# 1. Strict JSON, and evaluation refusing a broken student


def test_json_files_are_strict_and_a_nan_is_refused_before_writing(tmp_path):
    path = tmp_path / "report.json"
    with pytest.raises(ValueError, match="report.json: not written.*NaN or infinity"):
        write_json_atomic(path, {"accuracy_retained": math.nan})
    assert not path.exists() and list(tmp_path.iterdir()) == []
    write_json_atomic(path, {"accuracy_retained": 0.5})
    assert json.loads(path.read_text()) == {"accuracy_retained": 0.5}


def test_evaluate_refuses_a_student_with_non_finite_predictions(run_dir, molecules, monkeypatch, capsys):
    path, _ = molecules
    monkeypatch.setattr(evaluate, "load_student", lambda run_dir: stand_in_student(math.nan))
    out = run_dir / "evaluation"
    assert main(["evaluate", str(run_dir), "--structures", str(path), "--quiet"]) == 1
    line = error_line(capsys)
    assert line.startswith("distiller: error: the student of") and "nothing written" in line
    assert "structure 'molecules.extxyz:0'" in line and "energy nan" in line
    assert not out.exists()


# 10. Errors: one line, exit code 2 for usage, 1 for failures, --debug for the traceback


def test_errors_are_one_line_with_exit_codes_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "missing.py")]) == 1
    assert error_line(capsys) == f"distiller: error: experiment file not found: {tmp_path / 'missing.py'}"
    assert main(["label", "--out", str(tmp_path / "ds")]) == 2  # a usage error of our own, not argparse's
    assert error_line(capsys) == "distiller: error: distiller label needs --teacher and --structures (or --merge DIR...)"
    with pytest.raises(SystemExit) as stop:  # argparse's own usage errors keep their exit code 2
        main(["md", "--model", EMT])
    assert stop.value.code == 2
    capsys.readouterr()
    for argv in (["--debug", "distill", str(tmp_path / "missing.py")], ["distill", str(tmp_path / "missing.py"), "--debug"]):
        with pytest.raises(FileNotFoundError, match="experiment file not found"):
            main(argv)
    assert not (tmp_path / "ds").exists()


def test_a_bug_keeps_its_exception_name(monkeypatch, capsys):
    def broken(args):
        raise TypeError("'>' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(cli, "_export", broken)
    assert main(["export", "ds", "--out", "x.extxyz"]) == 1
    assert error_line(capsys) == "distiller: error: TypeError: '>' not supported between instances of 'str' and 'int'"


# 11. --set values checked for type and range, naming the field, before any work


@pytest.mark.parametrize("item, message", [
    ("steps=abc", "steps must be an integer, got 'abc'"),
    ("steps=-5", "steps must be >= 1, got -5"),
    ("steps=2.5", "steps must be an integer, got '2.5'"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("held_out=-1", "held_out must be >= 0, got -1"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("time_limit=-1", "time_limit must be >= 0, got -1.0"),
    ("sampling.rattle=-1", "sampling.rattle must be >= 0, got -1.0"),
    ("sampling.rattle=abc", "sampling.rattle must be a finite number, got 'abc'"),
    ("sampling.strain=0.5", "sampling.strain must be in [0, 1/3), got 0.5"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate must be > 0, got 0.0"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate must be a finite number, got 'nan'"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps must be >= 0, got -1"),
    ("optimizer.gradient_clip=0", "optimizer.gradient_clip must be > 0, got 0.0"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay must be >= 0, got -1.0"),
    ("optimizer.final_learning_rate=-1", "optimizer.final_learning_rate must be >= 0, got -1.0"),
    ("loader.threads=-1", "loader.threads must be >= 0, got -1"),
    ("loader.prefetch=0", "loader.prefetch must be >= 1, got 0"),
    ("loader.max_atoms=-1", "loader.max_atoms must be >= 0, got -1"),
    ("loss.forces_weight=x", "loss.forces_weight must be a finite number, got 'x'"),
    ("student.features=abc", "student.features must be an integer, got 'abc'"),
    ("student.elements=[1, 'x']", "student.elements must be an integer, got 'x'"),
    ("validation.every=True", "validation.every must be an integer, got 'True'"),
    ("sampling=3", "sampling is a group of fields (rattle, strain)"),
])
def test_set_values_are_checked_for_type_and_range_naming_the_field(item, message):
    config = Experiment(name="x")
    with pytest.raises(ValueError) as refused:
        apply_override(config, item)
    assert str(refused.value).startswith(message), str(refused.value)


def test_set_values_are_converted_to_the_fields_type():
    config = Experiment(name="x")
    assert apply_override(config, "steps=1e4").steps == 10000
    assert apply_override(config, "name=2024").name == "2024"
    assert apply_override(config, "structures=a.xyz").structures == ("a.xyz",)
    assert apply_override(config, "dataset=None").dataset is None
    assert apply_override(config, "optimizer.learning_rate=1").optimizer.learning_rate == 1.0


def test_experiment_files_get_the_same_checks():
    for build, message in ((lambda: Experiment(name="x", steps="100"), "steps must be an integer >= 1, got '100'"),
                           (lambda: SamplingConfig(strain=-0.1), r"sampling.strain must be in \[0, 1/3\)"),
                           (lambda: OptimizerConfig(learning_rate=float("inf")), "optimizer.learning_rate must be a"),
                           (lambda: LoaderConfig(threads=1.5), "loader.threads must be an integer")):
        with pytest.raises(ValueError, match=message):
            build()


def test_a_bad_set_value_stops_distill_before_anything_is_written(tmp_path, capsys):
    experiment = tmp_path / "experiment.py"
    run = tmp_path / "run"
    experiment.write_text(f"from distiller.config import Experiment\nconfig = Experiment(name='x', run_dir={str(run)!r})\n")
    assert main(["distill", str(experiment), "--set", "steps=abc"]) == 2
    assert error_line(capsys) == "distiller: error: --set steps=abc: steps must be an integer, got 'abc'"
    assert main(["distill", str(experiment), "--set", "sampling.rattle=-1"]) == 2
    assert error_line(capsys) == "distiller: error: --set sampling.rattle=-1: sampling.rattle must be >= 0, got -1.0"
    assert main(["distill", str(experiment), "--set", "optimizer.lr=1"]) == 2
    assert "OptimizerConfig has no field 'lr'" in error_line(capsys)
    assert not run.exists()


# 12. `distiller md` checks everything before it writes


def test_md_refuses_bad_input_with_nothing_created(tmp_path, structures_dir, capsys):
    water = str(structures_dir / "watertiny.extxyz")
    silicon = tmp_path / "silicon.extxyz"
    ase.io.write(silicon, ase.build.bulk("Si", cubic=True))
    out = tmp_path / "md"
    base = ["md", "--out", str(out), "--quiet"]
    refused = [
        (["--model", FENNOL, "--structure", str(silicon), "--steps", "10"], 1, "element Si (Z=14)"),
        (["--model", FENNOL, "--structure", water, "--steps", "15", "--log-every", "10"], 1,
         "steps (15) and write_every (10) must be multiples of log_every (10)"),
        (["--model", str(tmp_path / "runs" / "nonexistent"), "--structure", water, "--steps", "10"], 1,
         "is neither a run directory (no such directory) nor a teacher spec"),
        (["--model", FENNOL, "--structure", water, "--steps", "10", "--dt", "0"], 2, "dt=0.0 fs (> 0)"),
        (["--model", FENNOL, "--structure", water, "--steps", "10", "--index", "5"], 1, "index 5 does not exist"),
    ]
    for argv, code, message in refused:
        assert main(base + argv) == code, argv
        line = error_line(capsys)
        assert line.startswith("distiller: error: ") and message in line, line
        assert not out.exists(), argv
    with pytest.raises(SystemExit) as stop:
        main(base + ["--model", FENNOL, "--structure", water, "--steps", "0"])
    assert stop.value.code == 2 and "argument --steps: must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not out.exists()


# 13. Messages that say what is wrong; evaluate takes datasets


def test_evaluate_names_a_missing_run_and_a_directory_that_is_no_dataset(tmp_path, run_dir, molecules, capsys):
    path, _ = molecules
    assert main(["evaluate", str(tmp_path / "runs" / "nonexistent"), "--structures", str(path)]) == 1
    assert error_line(capsys) == f"distiller: error: {tmp_path / 'runs' / 'nonexistent'}: no such run directory"
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--structures", str(path)]) == 1
    assert "not a distiller run directory (no config.json)" in error_line(capsys)
    assert main(["evaluate", str(run_dir), "--structures", str(tmp_path / "empty")]) == 1
    assert "a directory, but not a dataset (no manifest-*.json)" in error_line(capsys)


def test_evaluate_takes_a_dataset_and_compares_with_its_labels(tmp_path, run_dir, molecules, capsys):
    _, structures = molecules
    write_dataset(tmp_path / "dataset", structures, teacher=EMT)  # labelled "by EMT", the run's teacher
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(run_dir), "--structures", str(tmp_path / "dataset"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["labels"] == "dataset" and summary["structures"] == 3
    assert summary["forces_rmse"] == pytest.approx(0.01) and summary["energy_mae_per_atom"] > 0
    # 17: status lines on stderr while it works; where it wrote, on stdout
    assert f"evaluating on 3 structures of {tmp_path / 'dataset'}, labelled by {EMT}" in captured.err
    assert "predicting them with the student" in captured.err
    assert f"report written to {out / 'report.json'}, parity plot to {out / 'parity.png'}" in captured.out
    assert (out / "parity.png").stat().st_size > 10_000


# 17. Progress: status lines for the silent phases


def test_profile_says_what_it_does_and_where_the_trace_is(tmp_path, monkeypatch, capsys):
    """The training step is a stand-in (the trace machinery is real): compiling a student is not the point."""
    import jax.numpy as jnp

    from distiller.train import step

    class Job:
        def initial_state(self):
            return jnp.zeros(())

        def dispatch_step(self, state, batch, key):
            return state + 1, {}, None

        def seed_batch(self, k):
            return None

        def step_key(self, k):
            return None

    monkeypatch.setattr(step.Distillation, "create", staticmethod(lambda config: Job()))
    experiment = tmp_path / "experiment.py"
    experiment.write_text("from distiller.config import Experiment\nconfig = Experiment(name='traced')\n")
    out = tmp_path / "trace"
    assert main(["profile", str(experiment), "--steps", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "setting up traced: teacher fennol-pmc:ani1x, student schnet" in captured.err
    assert "compiling the training step" in captured.err and "tracing 2 steps" in captured.err
    (folder,) = (out / "plugins" / "profile").iterdir()
    assert f"trace of 2 steps written to {folder} " in captured.out


def test_profile_takes_an_experiment_or_md_with_a_model(tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["profile", "--out", str(out)]) == 2
    assert "profile takes an experiment file (training steps) or --md STRUCTURE" in error_line(capsys)
    assert main(["profile", "--md", "water.extxyz", "--out", str(out)]) == 2
    assert "profile --md needs --model" in error_line(capsys)
    assert main(["profile", "--md", str(tmp_path / "missing.extxyz"), "--model", FENNOL, "--out", str(out)]) == 1
    assert "missing.extxyz" in error_line(capsys)
    assert not out.exists()


def test_speed_comparison_says_which_system_it_times(monkeypatch, capsys):
    from distiller import speed

    monkeypatch.setattr(speed, "model_timer", lambda model, structures: lambda: 0.0)
    water = Structure.from_ase(ase.build.molecule("H2O"), name="water")
    model = stand_in_student(0.0)
    report = speed.compare_speed(model, model, {"water": [water]}, repeats=2, native=False, progress=True)
    assert [r["system"] for r in report["results"]] == ["water"]
    assert "timing teacher and student on water (3 atoms, 2 calls each after compiling)" in capsys.readouterr().err


# 18. The parity plot


def test_parity_plot_colours_systems_with_a_legend_and_readable_energy_ticks(molecules):
    """Energies spread by 0.3 meV/atom (a well-trained student on one molecule's MD): in eV/atom the tick
    labels ran into each other."""
    import matplotlib.pyplot as plt

    _, structures = molecules
    rng = np.random.default_rng(1)
    teacher = [s.replace(energy=s.energy + rng.normal(0, 3e-4) * s.n_atoms) for s in structures]
    student = [s.replace(energy=s.energy + rng.normal(0, 1e-4) * s.n_atoms) for s in teacher]
    fig = evaluate.parity_figure(student, teacher)
    fig.canvas.draw()
    forces, energies = fig.axes
    assert [t.get_text() for t in forces.get_legend().get_texts()] == ["H2O (2)", "CH4 (1)"]
    assert energies.get_xlabel() == "teacher energy − composition mean (meV/atom)"
    assert any("relative to the teacher's mean over the structures of its composition" in t.get_text()
               for t in fig.texts)
    for axis in (energies.get_xticklabels(), energies.get_yticklabels()):
        boxes = [t.get_window_extent() for t in axis if t.get_text()]
        assert len(boxes) >= 3 and not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    plt.close(fig)


# 19. Help, --version, export


def test_help_names_every_command_and_every_option_has_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for command in ("distill", "profile", "evaluate", "label", "export", "md"):
        assert f"    {command} " in text and command in text.splitlines()[2], command
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for name, parser in commands.items():
        missing = [a.dest for a in parser._actions if not a.help]
        assert missing == [], f"distiller {name}: {missing} without help"


def test_version_comes_from_the_package_metadata(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"distiller {metadata.version('distiller')}"


def test_export_writes_a_dataset_as_extxyz_and_never_overwrites(tmp_path, molecules, capsys):
    _, structures = molecules
    copper = Structure.from_ase(ase.build.bulk("Cu", cubic=True), name="copper").replace(
        energy=-14.0, forces=np.full((4, 3), 0.1), stress=np.diag([0.01, 0.02, 0.03]))
    write_dataset(tmp_path / "dataset", [*structures, copper], teacher=EMT)
    out = tmp_path / "dataset.extxyz"
    assert main(["export", str(tmp_path / "dataset"), "--out", str(out)]) == 0
    assert "4 structures" in capsys.readouterr().out
    frames = ase.io.read(out, ":")
    for atoms, s in zip(frames, [*structures, copper]):
        assert atoms.get_potential_energy() == pytest.approx(s.energy)
        np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=1e-7)  # extxyz keeps 8 decimals
        np.testing.assert_allclose(atoms.positions, s.positions, atol=1e-7)
    np.testing.assert_allclose(frames[3].get_stress(voigt=False), copper.stress)
    assert "stress" not in frames[0].calc.results
    before = out.read_bytes()
    assert main(["export", str(tmp_path / "dataset"), "--out", str(out)]) == 1
    assert error_line(capsys) == (f"distiller: error: {out} exists; export writes a new file (remove it or choose "
                                  f"another --out)")
    assert out.read_bytes() == before
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.extxyz")]) == 1
    assert "no such dataset directory" in error_line(capsys) and not (tmp_path / "x.extxyz").exists()
