"""Issue 12's water experiment (and the water student of issues 13 and 14): a PaiNN student of the ANI-1x ensemble
on liquid water, judged on teacher MD it never saw, then run in MD against the teacher.

    python experiments/water.py                     # sample, train, evaluate, time: a GPU job
    python experiments/water.py --time 5m           # at most 5 min of training per call; the same command continues
    python experiments/water.py --no-speed          # no speed timing (another job shares the GPU)
    python experiments/water.py --sample            # the sampled sets alone (carry runs/water/ to train elsewhere)
    python experiments/water.py --stability waterbox [--ps 10 --nve-ps 5 --dt 0.5 --kernel pallas]   # issue 13
    python experiments/water.py --tiny              # the same pipeline at toy sizes (a CPU smoke run, runs/water_tiny/)
    python experiments/water.py --tiny --stability watertiny
    distiller distill experiments/water.py          # training alone (the sampled sets must exist)
    distiller active experiments/water.py           # then rounds of teacher-checked student MD (`active`)

Systems: watersmall (648 atoms, 216 molecules) and waterbox (1,500 atoms, 500 molecules), periodic cubic boxes at
1 g/cm³ from $DISTILLER_SHARED/structures; at --tiny, watertiny (81 atoms) alone. Everything lives under
runs/water/ (runs/water_tiny/ at --tiny) and resumes: sampled sets are kept (a killed job samples only the sets of
a system it had not finished), training continues from its checkpoints (with `--time`, a call stops training after
that long and the same command continues it), and the student is evaluated once its run has all its steps.

1. Structures, all by the teacher (the 8-member ensemble) from a system's box, Langevin NVT (friction
   0.01/fs, dt 0.5 fs), 4 trajectories per system and temperature integrated as one program, 0.4 ps of
   equilibration (the boxes come from a rigid-water model), then a snapshot every 10 fs; each set from its own
   keys (per system: key + system index):
     train        watersmall, MD at 250, 300 and 350 K (keys 100, 110, 120): 240 snapshots;
     validation   watersmall, MD at 300 K (key 500), every 10th snapshot (8): the best checkpoint is chosen on it;
     test-watersmall-300K, test-waterbox-300K
                  MD at 300 K (keys 900+, velocities and noise no other set has): 80 snapshots of each system,
                  the structures every number below is measured on. The student never sees a waterbox: its test
                  is of the same liquid at a size (and cell) it was not trained on.
2. Online training (as experiments/aspirin.py): each step draws 2 training snapshots (1,296 atoms), rattles
   them by 0.02 Å and strains each cell by a random symmetric strain of up to 1 % per component (fresh every
   step, so the stress is sampled away from zero strain), and labels them with the ensemble inside the step:
   energy, forces and stress (stress comes from the same reverse pass as the forces, for the teacher and the
   student, so it costs little). The loss: energy per atom, forces, stress.
   The averaged weights (EMA) are validated every 500 steps and the best kept. The student is PaiNN 128x3 at
   5 Å, the size that meets the aspirin targets, with the angular embedding (degree 6 within 3.5 Å; not yet run
   at this scale). The first run (64x3, both boxes, batches of 2 boxes, 12,000 steps) kept 92.7 % on watersmall
   (bench/results/water-h200.json); 128x3 without the embedding (entry `water-painn-128x3`) 93.1 % on watersmall
   and 92.6 % on waterbox (H100, bench/results/fidelity-h100.json): twice the features, 0.4 points. On watertiny
   at CPU scale the embedding took 64x3 from 86.8 to 88.0 % (bench/water_variants.py,
   bench/results/water-variants-cpu.json).
3. Evaluation on both test sets (accuracy retained 1 - ‖ΔF‖/‖F_t‖, force MAE and RMSE, energy MAE per atom, stress
   MAE), and student against ensemble per energy+forces call on waterbox (`distiller.speed.compare_speed`). Merged
   into bench/results/fidelity-<gpu>.json (runs/water_tiny/fidelity-tiny.json at --tiny) as aspirin's entries are:
   entry `water-painn-128x3-angular6` in "students" (replaced by a later call, the others kept), its test sets under
   "test_sets" beside aspirin's, with the call's phase times (`seconds`) and training ms/step.
4. `--stability SYSTEM`: `distiller.stability.evaluate_stability` of the trained student against the ensemble from
   the system's box: NVT (Langevin) at 300 K for `--ps` ps (default 10; 0.05 at --tiny), then NVE for `--nve-ps`
   (default half as long; the drift) from the teacher's last NVT frame; time step `--dt` fs (default 0.5), the
   student's kernels `--kernel` (default those it was trained with: xla); stability.json and PNGs in
   RUN/stability/<system>/. Each finished MD run is kept there (RUN/stability/<system>/runs/): a call stopped by
   a job's time limit, run again, continues after the runs that had finished. Collected in
   bench/results/stability-<gpu>.json (runs/water_tiny/stability-tiny.json at --tiny), issue 13's list of
   {"student", "system", "simulated_ps", "time_to_failure_ps", "rdf_l1", "drift_meV_per_atom_ps"}, one entry per
   (student, system, temperature) (a later report replaces it); rdf_l1 is the largest L1 over the element pairs
   (named in rdf_l1_pair), l1_by_pair["O-O"] the O-O one (issue 13's 2 % target).

GPU memory: `distiller.gpu_memory.make_room_for_torch()` runs first, before anything initialises JAX: it sets
XLA_PYTHON_CLIENT_PREALLOCATE=false (unless the user chose an allocator setting), so this job takes what it uses
rather than 75 % of a GPU another job shares.
"""

import dataclasses
import json
import os
import sys
import time

from distiller.config import ActiveLearning, Experiment, LossConfig, OptimizerConfig, SamplingConfig, ValidationConfig
from distiller.students import PaiNNConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(ROOT, "..", "shared"))
WORK = os.path.join(ROOT, "runs", "water")
TEACHER = "fennol-pmc:ani1x"
STUDENT = "water-painn-128x3-angular6"
SYSTEMS = ("watersmall", "waterbox")  # each has a test set; the first is also trained and validated on
TINY_SYSTEMS = ("watertiny",)

config = Experiment(
    name=STUDENT,
    teacher=TEACHER,
    structures=(os.path.join(WORK, "train.extxyz"),),
    sampling=SamplingConfig(rattle=0.02, strain=0.01),
    # The size that meets the aspirin targets (experiments/aspirin.py's painn-128x3), with the angular embedding
    # (every cos^n θ up to n = 6 of the angles within 3.5 Å as the first layer's input, distiller.students.angular):
    # without it this student kept 93.1 % (watersmall) and 92.6 % (waterbox), and 97 % of its squared force error
    # was within molecules (bench/results/force-parts-cpu-water.json), where the environment bends each O-H.
    student=PaiNNConfig(cutoff=5.0, features=128, layers=3, n_rbf=16, elements=(1, 8), angular_degree=6),
    # Per-atom energy errors of 0.5 meV weigh (5e-4)² · 1000 = 2.5e-4 against 10 · (0.03 eV/Å)² = 9e-3 for forces;
    # stress errors of 0.05 GPa (3e-4 eV/Å³) 1e4 · 1e-7 = 1e-3: a constraint on the virial that leaves the forces
    # to lead.
    loss=LossConfig(energy_weight=1000.0, forces_weight=10.0, stress_weight=1e4),
    optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=300, final_learning_rate=1e-5, ema_decay=0.999),
    steps=10000,
    batch_size=2,
    seed=0,
    run_dir=os.path.join(WORK, "painn-128x3-angular6"),
    checkpoint_every=1000,
    log_every=100,
    held_out=8,
    validation=ValidationConfig(structures=(os.path.join(WORK, "validation.extxyz"),), every=500),
)

# Issue 13's teacher-checked student trajectories, `distiller active experiments/water.py` (after the training
# above; then `--stability waterbox` again). Plain 128x3's waterbox MD failed by two H atoms of different
# molecules meeting (0.45 Å at 61 ps of NVT at 1 fs, 0.49 Å at 1.8 ps of NVE): bench/contact_scan.py, from its
# last sane frames, finds a false well there (the student's energy rises 1.2-1.6 eV as the pair opens from 0.8
# to 1.4 Å, where the teacher's falls 1.0-1.5 eV). The training set (teacher MD at 250-350 K) has no such pair,
# so nothing taught the student to repel. Each round: 8 replicas of the watersmall box, 5 ps of the student's
# NVT at 300-450 K (hotter, so that it finds its holes sooner), every 100th step a frame, the ensemble labels
# them, and the 32 with the largest force error join the training structures for 2,000 more steps. Each round's
# MD runs the latest student, not the best on validation: the best may stay the pre-round one (its validation
# set is 300 K MD, which has no such contacts), and rounds must build on each other.
active = ActiveLearning(rounds=3, steps_per_round=2000, replicas=8, temperatures=(300.0, 350.0, 400.0, 450.0),
                        structures=(os.path.join(SHARED, "structures", "watersmall.extxyz"),), md_steps=10000,
                        dt=0.5, interval=100, select=32, checkpoint="latest")

# (temperature K, first key) of each MD set's runs; every run is MD_RUN's trajectories of each system.
MD_SETS = {
    "train": [(250.0, 100), (300.0, 110), (350.0, 120)],
    "validation": [(300.0, 500)],
    "test": [(300.0, 900)],
}
KEEP_EVERY = {"validation": 10}  # snapshots kept of each set's runs: every k-th
# One compiled program per system serves every set: simulate_replicas takes the temperatures as arguments, and every
# run has the same number of trajectories, snapshot interval and chunk. 800 + 20 x 20 = 1,200 steps (0.6 ps), 3 chunks of 400.
MD_RUN = {"replicas": 4, "count": 20, "interval": 20, "equilibration": 800, "chunk": 400}
MD_RUN_TINY = {"replicas": 2, "count": 2, "interval": 5, "equilibration": 10, "chunk": 20}
STABILITY_PS = 10.0  # NVT ps of `--stability` (0.05 at --tiny); NVE runs half as long unless --nve-ps
STABILITY_DT = 0.5  # fs, unless --dt
FLAGS = ("--tiny", "--no-speed", "--sample")
OPTIONS = ("--time", "--stability", "--ps", "--nve-ps", "--dt", "--kernel")  # take a value


def system_file(system: str) -> str:
    return os.path.join(SHARED, "structures", f"{system}.extxyz")


def md_test_set(system: str) -> str:
    """The name of a system's test set."""
    return f"test-{system}-300K"


def system_set(name: str, system: str, systems: tuple, teacher, tiny: bool, work: str) -> list:
    """The structures of MD set `name` for one system, sampled by the teacher once and kept in work/sets/."""
    from distiller.data.sampling import MDConfig, sample
    from distiller.structure import read_structures, write_structures

    path = os.path.join(work, "sets", f"{name}-{system}.extxyz")
    if os.path.isfile(path):
        return read_structures(path)
    seed = read_structures(system_file(system))[0]
    k = systems.index(system)
    out = []
    for temperature, key in MD_SETS[name]:
        md = MDConfig(temperature=temperature, dt=0.5, **(MD_RUN_TINY if tiny else MD_RUN))
        t0 = time.perf_counter()
        frames = sample([seed], md, teacher, key=key + k)[::1 if tiny else KEEP_EVERY.get(name, 1)]
        print(f"{name}: {len(frames)} MD snapshots of {system} at {temperature:g} K "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        out += frames
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_structures(path, out)  # atomic
    return out


def structures(name: str, systems: tuple, teacher, tiny: bool, work: str) -> str:
    """Set `name` ("train", "validation", or a test set's name) of its systems in one file; its path."""
    from distiller.structure import write_structures

    path = os.path.join(work, f"{name}.extxyz")
    if not os.path.isfile(path):
        # Training and validation structures come from the first system alone; every system has a test set.
        kind, of = (name, systems[:1]) if name in MD_SETS else ("test", [s for s in systems if md_test_set(s) == name])
        out = [s for system in of for s in system_set(kind, system, systems, teacher, tiny, work)]
        write_structures(path, out)
        print(f"{name}: {len(out)} structures -> {path}", flush=True)
    return path


def test_set_files(systems: tuple, teacher, tiny: bool, work: str) -> dict:
    """{test set name: its file} of every system, sampled where missing."""
    return {md_test_set(s): structures(md_test_set(s), systems, teacher, tiny, work) for s in systems}


def run_config_for(tiny: bool) -> Experiment:
    """`config` with this job's paths (and toy sizes at --tiny)."""
    work = WORK + ("_tiny" if tiny else "")
    run_config = dataclasses.replace(
        config, structures=(os.path.join(work, "train.extxyz"),),
        run_dir=os.path.join(work, os.path.basename(config.run_dir)),
        validation=dataclasses.replace(config.validation, structures=(os.path.join(work, "validation.extxyz"),)))
    if tiny:
        run_config = dataclasses.replace(
            run_config, steps=20, batch_size=2, checkpoint_every=10, log_every=5, held_out=2,
            optimizer=dataclasses.replace(run_config.optimizer, warmup_steps=5),
            validation=dataclasses.replace(run_config.validation, every=10))
    return run_config


def trained_steps(run_dir: str) -> int:
    """The step of the run's newest checkpoint (0 before the first)."""
    from distiller.run_directory import RunDirectory

    return (RunDirectory(run_dir).latest_step() or 0) if os.path.isdir(run_dir) else 0


def parse(argv) -> dict:
    """The command line as {option: value} (True for a flag); a one-line SystemExit for anything else."""
    from distiller.config import parse_arguments, parse_duration

    args = parse_arguments(argv, FLAGS, OPTIONS, "experiments/water.py")
    systems = TINY_SYSTEMS if "--tiny" in args else SYSTEMS
    if "--stability" in args and args["--stability"] not in systems:
        raise SystemExit(f"experiments/water.py: --stability takes one of {', '.join(systems)}"
                         f"{' (at --tiny)' if '--tiny' in args else ''}, not {args['--stability']!r}")
    for option in ("--ps", "--nve-ps", "--dt", "--kernel"):
        if option in args and "--stability" not in args:
            raise SystemExit(f"experiments/water.py: {option} is a setting of a --stability run; give --stability "
                             "SYSTEM")
    try:
        if "--time" in args:
            args["--time"] = parse_duration(args["--time"])
    except ValueError as err:
        raise SystemExit(f"experiments/water.py: --time: {err}") from None
    if args.get("--kernel", "xla") not in ("xla", "pallas"):
        raise SystemExit(f"experiments/water.py: --kernel takes xla or pallas, not {args['--kernel']!r}")
    for option, what, positive in (("--ps", "picoseconds", True), ("--nve-ps", "picoseconds", False),
                                   ("--dt", "femtoseconds", True)):
        if option in args:
            text = args[option]
            try:
                args[option] = float(text)
            except ValueError:
                args[option] = float("nan")
            value = args[option]
            if not (value > 0 if positive else value >= 0) or value == float("inf"):
                raise SystemExit(f"experiments/water.py: {option} must be a number of {what} "
                                 f"{'>' if positive else '>='} 0, got {text!r}")
    return args


def merged_results(old: dict | None, out: dict) -> dict:
    """This call's results `out` merged with those already in the file, `old` (aspirin's too), by
    experiments/aspirin.py's `merged`: students, step timings and test sets of other names kept, an entry of the
    same name replaced."""
    from distiller.config import experiment_module

    return experiment_module(os.path.join(HERE, "aspirin.py")).merged(old, out)


def results_kind(tiny: bool) -> str:
    from distiller.speed import device_kind

    return "tiny" if tiny else device_kind()


def stability(system: str, teacher, tiny: bool, time_ps: float, command: str, nve_ps: float | None = None,
              dt: float = STABILITY_DT, kernel: str | None = None) -> dict:
    """`--stability SYSTEM`: the trained student's MD stability report from the system's box, collected into
    stability-<gpu>.json (`collect_stability`)."""
    from distiller.speed import device_name
    from distiller.stability import REPORT, collect_stability, evaluate_stability, stability_entry

    run_dir = run_config_for(tiny).run_dir
    out = os.path.join(run_dir, "stability", system)
    nve_ps = time_ps / 2 if nve_ps is None else nve_ps
    result = evaluate_stability(run_dir, system_file(system), index=0, time_ps=time_ps, nve_ps=nve_ps,
                                temperature=300.0, dt=dt, teacher=teacher, out=out, progress=True,
                                command=command, kernel=kernel)
    entry = stability_entry(result.report, STUDENT, system, kernel=kernel or run_config_for(tiny).student.kernel,
                            report=os.path.relpath(os.path.join(out, REPORT), ROOT), command=command,
                            device=device_name())
    work = os.path.dirname(run_dir)
    path = os.path.join(work if tiny else os.path.join(ROOT, "bench", "results"),
                        f"stability-{results_kind(tiny)}.json")
    collect_stability(path, entry)
    print(json.dumps({**{k: entry[k] for k in ("student", "system", "simulated_ps", "time_to_failure_ps", "rdf_l1",
                                               "drift_meV_per_atom_ps")},
                      "rdf_l1_OO": entry["l1_by_pair"].get("O-O")}), flush=True)
    print(f"stability: {path}")
    return entry


def main(argv) -> dict:
    from distiller.gpu_memory import make_room_for_torch

    make_room_for_torch()  # before anything initialises JAX's GPU backend: no 75 % preallocation (module docstring)
    args = parse(argv)
    tiny = bool(args.get("--tiny"))
    systems = TINY_SYSTEMS if tiny else SYSTEMS
    command = "python experiments/water.py " + " ".join(argv)
    run_config = dataclasses.replace(run_config_for(tiny), time_limit=args.get("--time", 0.0))
    work = os.path.dirname(run_config.run_dir)
    done = trained_steps(run_config.run_dir)
    if "--stability" in args and done < run_config.steps:
        raise SystemExit(f"experiments/water.py: --stability needs the trained student in {run_config.run_dir} "
                         f"(checkpointed to step {done} of {run_config.steps}): run {command.split(' --')[0]}"
                         f"{' --tiny' if tiny else ''} first")

    from distiller.evaluate import evaluate_run
    from distiller.files import update_json
    from distiller.run_directory import RunDirectory, step_timing, training_seconds
    from distiller.speed import compare_speed, device_name, versions
    from distiller.structure import read_structures
    from distiller.teachers.registry import load_teacher
    from distiller.train.loop import run

    teacher = load_teacher(TEACHER)
    if "--stability" in args:
        return stability(args["--stability"], teacher, tiny, args.get("--ps", 0.05 if tiny else STABILITY_PS),
                         command, nve_ps=args.get("--nve-ps"), dt=args.get("--dt", STABILITY_DT),
                         kernel=args.get("--kernel"))

    seconds = {}
    t0 = time.perf_counter()
    sets = {name: structures(name, systems, teacher, tiny, work) for name in ("train", "validation")}
    seconds["sampling"] = time.perf_counter() - t0
    if "--sample" in args:  # the test sets too, then stop: nothing is trained
        test_set_files(systems, teacher, tiny, work)
        print(f"sampled sets in {work} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return {}
    if done < run_config.steps:
        t0 = time.perf_counter()
        run(run_config, resume=True)
        seconds["training"] = time.perf_counter() - t0
        done = trained_steps(run_config.run_dir)
        if done < run_config.steps:
            print(f"{STUDENT}: stopped at step {done} of {run_config.steps}; run the same command again to continue "
                  "(evaluated once complete)", flush=True)
            return {}

    t0 = time.perf_counter()
    tests = test_set_files(systems, teacher, tiny, work)
    seconds["sampling"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = ("structures", "atoms", "accuracy_retained", "forces_mae", "forces_rmse", "energy_mae_per_atom",
            "stress_mae_gpa", "stress_rmse_gpa")
    test_sets = {}
    for test, path in tests.items():
        report = evaluate_run(run_config.run_dir, path, teacher=teacher,
                              out=os.path.join(run_config.run_dir, f"evaluation-{test}"))
        test_sets[test] = {k: report["summary"][k] for k in keys if k in report["summary"]}
        print(json.dumps({test: test_sets[test]}), flush=True)
    seconds["evaluation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed = systems[-1]  # waterbox (watertiny at --tiny)
    speed = None if "--no-speed" in args else compare_speed(
        teacher, run_config.run_dir, {timed: read_structures(system_file(timed))}, repeats=3 if tiny else 20,
        native=False)["results"]
    seconds["speed"] = time.perf_counter() - t0

    rows = RunDirectory(run_config.run_dir).read_metrics()
    entry = {"name": STUDENT, "command": command, "device": device_name(), "teacher": TEACHER,
             "systems": list(systems), "student": run_config.student.to_dict(),
             "sampling": dataclasses.asdict(run_config.sampling), "loss": dataclasses.asdict(run_config.loss),
             "steps": done, "batch_size": run_config.batch_size, "best": RunDirectory(run_config.run_dir).read_best(),
             "train_seconds": training_seconds(rows),
             **step_timing(rows, run_config.checkpoint_every),
             "sets": {name: {"file": os.path.relpath(path, ROOT), "structures": len(read_structures(path))}
                      for name, path in sets.items()},
             "test_sets": test_sets, "speed": speed,
             "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    print(json.dumps({k: entry[k] for k in ("name", "steps", "ms_per_step", "test_sets", "seconds")}, indent=1))
    path = os.path.join(work if tiny else os.path.join(ROOT, "bench", "results"), f"fidelity-{results_kind(tiny)}.json")
    out = {"command": command, "device": device_name(), "versions": versions(), "teacher": TEACHER,
           "students": [entry], "step_timing": {},
           "test_sets": {name: {"file": os.path.relpath(p, ROOT), "structures": len(read_structures(p))}
                         for name, p in tests.items()}}
    out = update_json(path, lambda old: merged_results(old, out))
    print(f"results: {path}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
