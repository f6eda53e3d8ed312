"""Issue 12's aspirin experiment: students of the ANI-1x ensemble judged on teacher MD they never saw.

    python experiments/aspirin.py                  # sample, train every student, evaluate: a GPU job
    python experiments/aspirin.py --only painn-64x3 [--time 10m]
    python experiments/aspirin.py --only painn-64x3,painn-64x3-hvp --steps 10000   # shorter runs, like for like
    python experiments/aspirin.py --only painn-64x3,painn-64x3-hvp --timing 400    # training ms/step alone
    python experiments/aspirin.py --only painn-64x3-md,painn-64x3-active   # issue 13's coverage variants
    python experiments/aspirin.py --sample         # the sets alone (before students train side by side)
    python experiments/aspirin.py --only painn-32x2 --no-speed &   # ... one process per student, then:
    python experiments/aspirin.py --only painn-32x2,painn-64x3,schnet-64x3 --speed   # their speed, one process
    python experiments/aspirin.py --tiny           # the same pipeline at toy sizes (CPU smoke run, runs/aspirin_tiny)
    distiller distill experiments/aspirin.py       # the PaiNN student alone (the sampled sets must exist)

Everything lives under runs/aspirin/ (runs/aspirin_tiny/ at --tiny) and resumes: sampled sets (and the
teacher's minimum) are kept, training continues from its checkpoints (a `--time` stop included), evaluation is
redone from the checkpoints. A student is evaluated once its run has all its steps. `--steps N` trains each
student for N steps instead (its own run directory and entry, NAME-Nk, since the learning-rate schedule follows
the step count). `--timing K` trains K steps of each student in NAME-timing (no validation, evaluation or
checkpoints before the last step) and records its training ms/step. The sets need no GPU: `--sample` on a
2-core CPU takes about 4 minutes, and the files can be carried to the GPU machine.
The results of a call are merged into bench/results/fidelity-<device>.json (under a lock: students trained
side by side write to it): entries of the same name are replaced, the others kept. Speed is measured alone:
`--no-speed` leaves it out of the evaluation (students trained side by side share the GPU), and `--speed`
times the listed, evaluated students one after the other beside the teacher in one process, adding their
`speed` rows (both kernel sets) to their entries.

1. Structures, all by the teacher (the 8-member ensemble) from the aspirin seed, each set from its own keys:
     train       NVT (Langevin) MD at 300, 400, 500 and 600 K (key 100; the ladder's 16 trajectories as one
                 program), and normal-mode samples at 400 K
     validation  MD at 300 and 500 K (key 500): the best checkpoint is chosen on it
     test-300K, test-500K
                 MD from keys 900+: the structures every number below is measured on
2. Online training: each step draws training structures, rattles them by 0.02 Å and labels them with the
   ensemble inside the step (unlimited fresh labels near the physical distribution); the averaged weights
   (EMA) are validated every `validation.every` steps and the best kept. Issue 13's variants change only where
   the structures come from: painn-64x3-md draws each batch from 32 replicas of the seed moving by ensemble MD
   inside the step (MDSampling); painn-64x3-active trains 15,000 steps, then runs 3 active-learning rounds
   (ACTIVE: the student's own MD, the frames where it errs most added to the training structures, 5,000 steps each).
3. Evaluation on both test sets; harmonic frequencies of student and teacher at the teacher's minimum (BFGS to
   1 meV/Å; their Hessians there); student and teacher speed (µs/atom/step, energy and forces, one call of 64
   molecules, and of 1,024 in `--speed`, with the student's XLA and Pallas kernels).
   Written to bench/results/fidelity-<device>.json, with each student's training ms/step (metrics.jsonl: the
   logged intervals of each call after its first, without those that hold a validation or a checkpoint).
"""

import dataclasses
import json
import os
import sys

from distiller.config import (ActiveLearning, Experiment, LossConfig, MDSampling, OptimizerConfig, SamplingConfig,
                              ValidationConfig)
from distiller.students import PaiNNConfig, SchNetConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(ROOT, "..", "shared"))
SEED = os.path.join(SHARED, "structures", "aspirin.extxyz")
WORK = os.path.join(ROOT, "runs", "aspirin")
WORK_TINY = WORK + "_tiny"  # --tiny's sets, runs and results: a toy set must never stand in for a real one
TEACHER = "fennol-pmc:ani1x"

config = Experiment(
    name="aspirin-painn-64x3",
    teacher=TEACHER,
    structures=(os.path.join(WORK, "train.extxyz"),),
    sampling=SamplingConfig(rattle=0.02, strain=0.0),
    student=PaiNNConfig(cutoff=5.0, features=64, layers=3, n_rbf=16, elements=(1, 6, 7, 8)),
    # Per-atom energy errors of 0.5 meV weigh (5e-4)² · 1000 = 2.5e-4 against 10 · (0.03 eV/Å)² = 9e-3 for forces.
    loss=LossConfig(energy_weight=1000.0, forces_weight=10.0),
    optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=500, final_learning_rate=1e-5, ema_decay=0.999),
    steps=30000,
    batch_size=32,
    seed=0,
    run_dir=os.path.join(WORK, "painn-64x3"),
    checkpoint_every=1000,
    log_every=100,
    held_out=16,
    validation=ValidationConfig(structures=(os.path.join(WORK, "validation.extxyz"),), every=1000),
)

STUDENTS = {
    "painn-64x3": config,
    # The accuracy-against-cost table: both architectures at two or three sizes, the same recipe.
    "painn-32x2": dataclasses.replace(config, name="aspirin-painn-32x2", run_dir=os.path.join(WORK, "painn-32x2"),
                                      student=dataclasses.replace(config.student, features=32, layers=2)),
    "painn-128x3": dataclasses.replace(config, name="aspirin-painn-128x3", run_dir=os.path.join(WORK, "painn-128x3"),
                                       student=dataclasses.replace(config.student, features=128)),
    # The cutoff against cost (issue 14): an edge costs the same at any length, and aspirin has 10.7 neighbours per
    # atom within 4 Å against 14.8 within 5 Å (water: about half); three layers still span the molecule.
    "painn-64x3-4A": dataclasses.replace(config, name="aspirin-painn-64x3-4A",
                                         run_dir=os.path.join(WORK, "painn-64x3-4A"),
                                         student=dataclasses.replace(config.student, cutoff=4.0)),
    "schnet-64x3": dataclasses.replace(config, name="aspirin-schnet-64x3", run_dir=os.path.join(WORK, "schnet-64x3"),
                                       student=SchNetConfig(cutoff=5.0, features=64, layers=3, n_rbf=16)),
    "schnet-128x3": dataclasses.replace(config, name="aspirin-schnet-128x3", run_dir=os.path.join(WORK, "schnet-128x3"),
                                        student=SchNetConfig(cutoff=5.0, features=128, layers=3, n_rbf=16)),
    "painn-64x3-hvp": dataclasses.replace(config, name="aspirin-painn-64x3-hvp",
                                          run_dir=os.path.join(WORK, "painn-64x3-hvp"),
                                          loss=dataclasses.replace(config.loss, hvp_weight=1.0)),
    # Issue 13's coverage variants, like for like with painn-64x3 (30,000 steps in all):
    # online MD sampling: 32 replicas of the seed move by ensemble MD on the 300-600 K ladder, 10 steps of 0.5 fs
    # between optimiser steps, and each step's batch is drawn from them (plus the same rattling);
    "painn-64x3-md": dataclasses.replace(config, name="aspirin-painn-64x3-md", run_dir=os.path.join(WORK, "painn-64x3-md"),
                                         structures=(SEED,),
                                         sampling=MDSampling(replicas=32, temperatures=(300.0, 400.0, 500.0, 600.0),
                                                             steps_between=10, equilibration=2000, rattle=0.02)),
    # active learning: 15,000 steps of painn-64x3's recipe, then 3 rounds (ACTIVE) of 5,000.
    "painn-64x3-active": dataclasses.replace(config, name="aspirin-painn-64x3-active", steps=15000,
                                             run_dir=os.path.join(WORK, "painn-64x3-active")),
}

# The active-learning rounds of the students named here (distiller.train.active): each round the student runs
# 16 replicas x 2 ps of NVT MD (300-600 K) from the seed, the ensemble labels every 20th step, and the 512 frames
# where the student's forces err most join the structures the step draws from.
ACTIVE = {"painn-64x3-active": ActiveLearning(rounds=3, steps_per_round=5000, structures=(SEED,), replicas=16,
                                              md_steps=4000, interval=20, select=512)}

# (temperature K or a ladder of them, trajectories at each, snapshots per trajectory, key) of each MD set. A ladder
# runs as one program (MDConfig's): the training set's 16 trajectories take the steps of one temperature's 4, and
# validation's 4 share the test sets' program.
MD_SETS = {
    "train": [((300.0, 400.0, 500.0, 600.0), 4, 250, 100)],
    "validation": [((300.0, 500.0), 2, 32, 500)],
    "test-300K": [(300.0, 4, 50, 900)],
    "test-500K": [(500.0, 4, 50, 910)],
}
NORMAL_MODES = 1000  # normal-mode samples at 400 K in the training set
SPEED_COPIES = (64, 1024)  # aspirin molecules in one energy+forces call of `--speed` (64 in the evaluation)
FLAGS = ("--tiny", "--sample", "--speed", "--no-speed")
OPTIONS = ("--only", "--time", "--steps", "--timing")  # take a value


def work_dir(tiny: bool) -> str:
    """Where this job's sets, teacher minimum and runs live: WORK, or WORK_TINY at --tiny."""
    return WORK_TINY if tiny else WORK


def structures(name: str, teacher, tiny: bool) -> str:
    """The set `name` (MD_SETS), sampled by the teacher once and kept; its path."""
    from distiller.data.sampling import MDConfig, NormalModeConfig, sample
    from distiller.structure import write_structures

    path = os.path.join(work_dir(tiny), f"{name}.extxyz")
    if os.path.isfile(path):
        return path
    out = []
    for temperature, trajectories, count, key in MD_SETS[name]:
        md = MDConfig(count=2 if tiny else count, temperature=temperature, interval=5 if tiny else 20,
                      equilibration=10 if tiny else 1000, dt=0.5, replicas=1 if tiny else trajectories)
        out += sample(SEED, md, teacher, key=key)
    if name == "train":
        modes = NormalModeConfig(count=4 if tiny else NORMAL_MODES, temperature=400.0, relax_fmax=0.01)
        out += sample(SEED, modes, teacher, key=7)
    os.makedirs(work_dir(tiny), exist_ok=True)
    write_structures(path, out)  # atomic: a killed job samples the set again
    print(f"{name}: {len(out)} structures -> {path}")
    return path


def teacher_minimum(teacher, tiny: bool):
    """The seed relaxed by the teacher to 1 meV/Å: ASE's BFGS on the calculator's float64 energies and forces
    (distiller.md.minimize's FIRE stalls near 0.05 eV/Å on aspirin, too far from a minimum for frequencies).
    Found once and kept in teacher-minimum.extxyz beside the sets (a minute of BFGS that every call repeated).
    Returns (structure, largest force there in eV/Å)."""
    import numpy as np
    from ase.optimize import BFGS

    from distiller.calculator import Calculator
    from distiller.structure import Structure, read_structures, write_structures

    path = os.path.join(work_dir(tiny), "teacher-minimum.extxyz")
    if os.path.isfile(path):
        minimum = read_structures(path)[0]
        if minimum.info.get("teacher") == TEACHER:  # another teacher's minimum is found again
            return minimum, float(minimum.info["fmax"])
    atoms = read_structures(SEED)[0].to_ase()
    atoms.calc = Calculator(teacher)
    BFGS(atoms, logfile=None).run(fmax=1e-2 if tiny else 1e-3, steps=2000)
    fmax = float(np.max(np.linalg.norm(atoms.get_forces(), axis=1)))
    atoms.calc = None
    minimum = Structure.from_ase(atoms, name="aspirin at the teacher's minimum")
    minimum = dataclasses.replace(minimum, info={**minimum.info, "fmax": fmax, "teacher": TEACHER})
    write_structures(path, [minimum])
    return minimum, fmax


def status(line: str) -> None:
    """A phase's status line (stderr, beside the progress bars): evaluation is minutes with none of its own."""
    print(line, file=sys.stderr, flush=True)


def normal_modes_mae(student, teacher, minimum) -> dict:
    """Harmonic wavenumbers (cm⁻¹) of student and teacher at the teacher's minimum, and their MAE."""
    import numpy as np

    from distiller.md.minimize import hessian
    from distiller.vibrations import frequencies

    nu_t = frequencies(minimum, hessian(teacher, minimum))
    nu_s = frequencies(minimum, hessian(student, minimum))
    return {"normal_modes_mae_cm1": float(np.mean(np.abs(nu_s - nu_t))),
            "normal_modes_max_error_cm1": float(np.max(np.abs(nu_s - nu_t))),
            "teacher_cm1": [round(float(x), 2) for x in nu_t], "student_cm1": [round(float(x), 2) for x in nu_s]}


def merged(old: dict | None, out: dict) -> dict:
    """`out` with the students, step timings and test-set descriptions of the results `old` (already in the file)
    that it does not replace (by name; experiments/water.py writes to the same file); each older student and timing
    keeps the command, device and versions it was made with."""
    if old is None:
        return out
    made = {key: old[key] for key in ("command", "device", "versions") if key in old}
    new = {entry["name"]: entry for entry in out["students"]}
    students = [new.pop(entry["name"], {**made, **entry}) for entry in old.get("students", [])]
    timing = {name: {**made, **entry} for name, entry in old.get("step_timing", {}).items()}
    timing.update(out.get("step_timing", {}))
    return {**out, "students": students + list(new.values()), "step_timing": timing,
            "test_sets": {**old.get("test_sets", {}), **out.get("test_sets", {})}}


def parse(argv) -> dict:
    """The command line as {option: value} (True for a flag); a one-line SystemExit for anything else."""
    from distiller.config import parse_arguments, parse_duration

    args = parse_arguments(argv, FLAGS, OPTIONS, "experiments/aspirin.py")
    args["--only"] = args["--only"].split(",") if "--only" in args else list(STUDENTS)
    unknown = sorted(set(args["--only"]) - set(STUDENTS))
    if unknown:
        raise SystemExit(f"experiments/aspirin.py: unknown student(s) {', '.join(unknown)} "
                         f"(known: {', '.join(STUDENTS)})")
    try:
        args["--time"] = parse_duration(args["--time"]) if "--time" in args else 0.0
    except ValueError as err:
        raise SystemExit(f"experiments/aspirin.py: --time: {err}") from None
    for name in ("--steps", "--timing"):
        if name in args:
            if not args[name].isdigit() or int(args[name]) < 1:
                raise SystemExit(f"experiments/aspirin.py: {name} takes a number of steps >= 1, not {args[name]!r}")
            args[name] = int(args[name])
    if "--speed" in args and ("--timing" in args or "--no-speed" in args):
        raise SystemExit("experiments/aspirin.py: --speed times evaluated students; it takes no --timing or --no-speed")
    return args


def student_config_for(name: str, tiny: bool, steps: int | None) -> tuple[str, Experiment]:
    """Student `name`'s entry name and experiment: toy sizes at --tiny; with `steps` other than its own, its own
    run directory and entry (NAME-Nk: the learning-rate schedule follows the step count)."""
    student_config = STUDENTS[name]
    if tiny:
        sampling = student_config.sampling
        if isinstance(sampling, MDSampling):
            sampling = dataclasses.replace(sampling, replicas=4, steps_between=2, equilibration=0)

        def tiny_path(path: str) -> str:  # under WORK_TINY instead of WORK
            return WORK_TINY + path[len(WORK):] if path.startswith(WORK + os.sep) else path

        validation = student_config.validation
        student_config = dataclasses.replace(
            student_config, steps=20, batch_size=2, checkpoint_every=10, log_every=5, sampling=sampling,
            run_dir=tiny_path(student_config.run_dir),
            structures=tuple(tiny_path(path) for path in student_config.structures),
            validation=dataclasses.replace(validation, every=10,
                                           structures=tuple(tiny_path(path) for path in validation.structures)))
    if steps is not None and steps != student_config.steps:
        suffix = f"-{steps // 1000}k" if steps % 1000 == 0 else f"-{steps}"
        name += suffix
        student_config = dataclasses.replace(student_config, name=student_config.name + suffix, steps=steps,
                                             run_dir=student_config.run_dir + suffix)
    return name, student_config


def results_path(tiny: bool) -> str:
    from distiller.speed import device_kind

    return os.path.join(WORK_TINY, "fidelity-tiny.json") if tiny else \
        os.path.join(ROOT, "bench", "results", f"fidelity-{device_kind()}.json")


def speed_rows(teacher, student, copies, kernels, tiny: bool) -> list[dict]:
    """Energy+forces of `student` (a run directory, or a student config: random weights, since speed does not
    depend on them) with each of `kernels` beside the teacher, on each of `copies` aspirin molecules in one call:
    `compare_speed`'s rows, each naming its kernel."""
    from distiller.run_directory import load_student
    from distiller.speed import compare_speed
    from distiller.structure import read_structures
    from distiller.students import StudentConfig

    seed = read_structures(SEED)
    systems = {f"aspirin x{n}": seed * n for n in copies}
    rows = []
    for kernel in kernels:
        model = (dataclasses.replace(student, kernel=kernel) if isinstance(student, StudentConfig) else
                 load_student(student, kernel=kernel))
        report = compare_speed(teacher, model, systems, repeats=3 if tiny else 20, native=False, progress=True)
        rows += [{**row, "kernel": kernel} for row in report["results"]]
    return rows


def time_students(names: list, teacher, tiny: bool, steps: int | None, command: str) -> dict:
    """`--speed`: `speed_rows` of each evaluated student's architecture and size (its XLA and Pallas kernels; XLA
    alone on a CPU) on SPEED_COPIES molecules, one student after the other in this process; the rows replace each
    entry's `speed`. Timed with random weights (the run directory need not be here: the GPU machine that trained
    a student may be gone), the same arithmetic as the trained weights'. Students not yet evaluated are refused
    before any timing."""
    import jax

    from distiller.files import update_json

    path = results_path(tiny)
    entries = {}
    if os.path.isfile(path):
        with open(path) as f:
            entries = {entry["name"]: entry for entry in json.load(f).get("students", [])}
    named = [student_config_for(name, tiny, steps) for name in names]
    missing = [name for name, _ in named if name not in entries]
    if missing:
        raise SystemExit(f"experiments/aspirin.py --speed: {', '.join(missing)} not evaluated in {path} yet: "
                         "train and evaluate them first (the same command without --speed)")
    kernels = ("xla", "pallas") if jax.default_backend() == "gpu" else ("xla",)
    timed = {}
    for name, student_config in named:
        rows = speed_rows(teacher, student_config.student, (4, 16) if tiny else SPEED_COPIES, kernels, tiny)
        timed[name] = rows
        print(json.dumps({name: rows}), flush=True)

        def with_speed(old: dict, name=name, rows=rows) -> dict:
            for entry in old["students"]:
                if entry["name"] == name:
                    entry.update(speed=rows, speed_command=command, speed_weights="random (the config's)")
            return old

        update_json(path, with_speed)  # each student as it is timed: a call cut short keeps the ones it measured
    print(f"results: {path}")
    return timed


def main(argv) -> dict:
    from distiller.evaluate import evaluate_run
    from distiller.files import update_json
    from distiller.run_directory import RunDirectory, load_student, step_timing, training_seconds
    from distiller.speed import device_name, versions
    from distiller.structure import read_structures
    from distiller.teachers.registry import load_teacher
    from distiller.train.active import active_learning
    from distiller.train.loop import run

    args = parse(argv)
    tiny, steps, timing = bool(args.get("--tiny")), args.get("--steps"), args.get("--timing")
    command = "python experiments/aspirin.py " + " ".join(argv)
    teacher = load_teacher(TEACHER)
    if "--speed" in args:
        return time_students(args["--only"], teacher, tiny, steps, command)
    tests = {name: structures(name, teacher, tiny) for name in MD_SETS}
    if "--sample" in args:
        return {}
    minimum = None

    results, timings = [], {}
    for base in args["--only"]:
        name, student_config = student_config_for(base, tiny, steps)
        active = ACTIVE.get(base)
        if timing is not None:  # K steps alone in their own run directory: no validation, one checkpoint
            student_config = dataclasses.replace(
                student_config, name=student_config.name + "-timing", run_dir=student_config.run_dir + "-timing",
                steps=timing, checkpoint_every=timing, log_every=5 if tiny else 20,
                validation=dataclasses.replace(student_config.validation, every=0), time_limit=0.0)
            run(student_config, overwrite=True)
            rows = RunDirectory(student_config.run_dir).read_metrics()
            timings[name] = {"command": command, "device": device_name(), "steps": timing,
                             "batch_size": student_config.batch_size, "hvp_weight": student_config.loss.hvp_weight,
                             **step_timing(rows, student_config.checkpoint_every)}
            print(json.dumps({name: timings[name]}))
            continue
        student_config = dataclasses.replace(student_config, time_limit=args["--time"])
        if active is None:
            run(student_config, resume=True)
        else:  # the student's own training, then its rounds; evaluated once every round has trained
            if tiny:
                active = dataclasses.replace(active, rounds=1, steps_per_round=10, replicas=2, md_steps=40,
                                             interval=10, select=4)
            active_learning(student_config, active)
            student_config = dataclasses.replace(student_config,
                                                 steps=student_config.steps + active.rounds * active.steps_per_round)
        run_dir = RunDirectory(student_config.run_dir)
        rows = run_dir.read_metrics()
        done = rows[-1]["step"] if rows else 0
        if done < student_config.steps:
            print(f"{name}: stopped at step {done} of {student_config.steps}; run again to continue "
                  "(evaluated once complete)")
            continue
        test_sets = {}
        for test in ("test-300K", "test-500K"):
            status(f"{name}: evaluating on {test}")
            report = evaluate_run(student_config.run_dir, tests[test], teacher=teacher,
                                  out=os.path.join(student_config.run_dir, f"evaluation-{test}"))
            test_sets[test] = {k: report["summary"][k] for k in ("structures", "accuracy_retained", "forces_mae",
                                                                 "forces_rmse", "energy_mae_per_atom")}
        student = load_student(student_config.run_dir)
        speed = None if "--no-speed" in args else speed_rows(teacher, student_config.run_dir, (64,),
                                                             (student_config.student.kernel,), tiny)
        if minimum is None:
            status("the teacher's minimum (BFGS to 1 meV/Å; found once, then read from its file)")
            minimum, minimum_fmax = teacher_minimum(teacher, tiny)
        status(f"{name}: normal modes (Hessians of student and teacher at the teacher's minimum)")
        results.append({"name": name, "command": command, "student": student_config.student.to_dict(),
                        "loss": dataclasses.asdict(student_config.loss), "steps": done,
                        "batch_size": student_config.batch_size, "best": run_dir.read_best(),
                        "train_seconds": training_seconds(rows),
                        **step_timing(rows, student_config.checkpoint_every), "test_sets": test_sets,
                        "teacher_minimum_fmax": minimum_fmax, **normal_modes_mae(student, teacher, minimum),
                        "speed": speed})
        print(json.dumps({k: results[-1][k] for k in ("name", "steps", "ms_per_step", "test_sets",
                                                      "normal_modes_mae_cm1")}, indent=1))
    if not results and not timings:
        return {}
    out = {"command": command, "device": device_name(), "versions": versions(), "teacher": TEACHER,
           "test_sets": {name: {"file": os.path.relpath(path, ROOT), "structures": len(read_structures(path))}
                         for name, path in tests.items()}, "students": results, "step_timing": timings}
    path = results_path(tiny)
    out = update_json(path, lambda old: merged(old, out))  # students trained side by side share the file
    print(f"results: {path}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
