"""Issue 15's materials distillation: SevenNet-0 (a pretrained PyTorch foundation model) into one JAX student.

    python experiments/materials.py [--time 4m]   # sample, label, train, evaluate, time: a GPU job (~20 min, H200)
    python experiments/materials.py --tiny        # the same pipeline at toy sizes (a CPU smoke run, ~5 min)
    for s in si cu lfp; do python experiments/materials.py --sample $s & done; wait      # the sets, in parallel
    for s in si cu lfp; do python experiments/materials.py --stability $s & done; wait   # MD stability reports
    distiller distill experiments/materials.py    # training alone (the labelled dataset must exist)

SevenNet-0 (`sevenn:7net-0`, NequIP-style, trained on MPtrj, 89 elements) ships its weights inside the sevenn
wheel, so this runs offline. Everything lives under runs/materials/ (runs/materials_tiny/ for --tiny) and resumes:
sampled sets are kept, labelling continues where a kill stopped it, training resumes from its checkpoints (with
`--time`, training stops after that long; the same command continues it, and evaluates once it is complete).

Systems: diamond Si (2x2x2 cubic cell, 64 atoms), fcc Cu (3x3x3 cubic, 108) and olivine LiFePO4 (1x2x2 cells,
112 atoms: Li, Fe, P, O; the structure of Streltsov et al. 1993, Pnma). At --tiny: the conventional cells (8, 4x2=32,
28 atoms).

1. Structures, all from the teacher, each set from its own keys:
     train       per system: rattled and strained copies of the ideal crystal (0.1 Å, strain up to 3 %), and
                 teacher NVT MD (Langevin, 1 fs) at 300, 600 and 1000 K, 4 trajectories each, every snapshot also
                 strained by up to 2 % (stress at temperature);
     validation  MD at 600 K (keys 500+): the best checkpoint is chosen on it;
     test-300K, test-1000K
                 MD from keys 900+ (other velocities and noise than any training trajectory): every number below
                 is measured on these.
   Teacher MD runs through distiller's JAX-MD integration, the torch teacher called from the step
   (`jax.pure_callback`, one host round trip per step: ~80 ms for ~100 atoms on an H200, where SevenNet's eager
   kernels leave the GPU mostly idle). A set's trajectories run as one program (`simulate_replicas`), the teacher
   labelling all of them in one call per step, and one process per system (`--sample SYSTEM`) runs the systems
   side by side.
2. Offline labelling of the training set with the teacher (`distiller.label.label_dataset`, resumable): energy,
   forces and stress.
3. Offline training of one PaiNN student for the three systems, stress in the loss, the EMA weights validated on the
   validation set every 500 steps.
4. Evaluation on both test sets (accuracy retained, force MAE, energy MAE per atom, stress MAE in GPa, together
   and per system), and teacher against student per call (energy, forces and stress) on a 4,000-atom Cu cell and a
   1,728-atom Si cell on the same device, per call and in MD (NVE, the neighbour list kept with a skin; the
   student with the XLA and the Pallas kernels, the same function). Written to bench/results/materials-<gpu>.json
   (runs/materials_tiny/ for --tiny) with the command, device and versions.
5. `--stability SYSTEM`: the MD stability report (`distiller evaluate RUN --md`) of the trained student against
   SevenNet-0 from the system's ideal crystal, NVT at 600 K for 0.5 ps and NVE for 0.25 ps (dt 1 fs), written to
   RUN/stability/<system>/ (stability.json and PNGs); bench/results/materials-stability-<gpu>.json collects them.
"""

import dataclasses
import json
import os
import sys
import time

from distiller.config import Experiment, LoaderConfig, LossConfig, OptimizerConfig, ValidationConfig
from distiller.students import PaiNNConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORK = os.path.join(ROOT, "runs", "materials")
TEACHER = "sevenn:7net-0"
SYSTEMS = ("si", "cu", "lfp")
ELEMENTS = (3, 8, 14, 15, 26, 29)  # Li O Si P Fe Cu

config = Experiment(
    name="materials-painn-64x3-20k",
    teacher=TEACHER,
    dataset=os.path.join(WORK, "data"),
    student=PaiNNConfig(cutoff=5.0, features=64, layers=3, n_rbf=16, elements=ELEMENTS),
    # Per-atom energy errors of 2 meV weigh (2e-3)² · 100 = 4e-4, force errors of 0.05 eV/Å 10 · 2.5e-3 = 2.5e-2,
    # stress errors of 0.1 GPa (6e-4 eV/Å³) 1e4 · 3.9e-7 = 4e-3.
    loss=LossConfig(energy_weight=100.0, forces_weight=10.0, stress_weight=1e4),
    optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=500, final_learning_rate=1e-5, ema_decay=0.999),
    steps=20000,
    batch_size=8,
    seed=0,
    run_dir=os.path.join(WORK, "painn-64x3-20k"),
    checkpoint_every=1000,
    log_every=100,
    held_out=16,
    loader=LoaderConfig(threads=4, prefetch=16, max_atoms=2048),
    validation=ValidationConfig(structures=(os.path.join(WORK, "validation.extxyz"),), every=500),
)

# (temperature K, trajectories per system, snapshots per trajectory, first key) of each MD set.
MD_SETS = {
    "train": [(300.0, 4, 40, 100), (600.0, 4, 40, 110), (1000.0, 4, 40, 120)],
    "validation": [(600.0, 2, 12, 500)],
    "test-300K": [(300.0, 2, 24, 900)],
    "test-1000K": [(1000.0, 2, 24, 910)],
}
RATTLED = 150  # rattled and strained copies of each ideal crystal in the training set


def seed_structure(system: str, tiny: bool):
    """The ideal crystal of a system (lattice constants of experiment)."""
    from ase.build import bulk
    from ase.spacegroup import crystal

    from distiller.structure import Structure

    if system == "si":
        atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(1 if tiny else 2)
        return Structure.from_ase(atoms, name="diamond Si")
    if system == "cu":
        return Structure.from_ase(bulk("Cu", "fcc", a=3.615, cubic=True).repeat(2 if tiny else 3), name="fcc Cu")
    # Olivine LiFePO4, Pnma (No. 62): Li 4a, Fe, P, O1, O2 4c, O3 8d.
    atoms = crystal(["Li", "Fe", "P", "O", "O", "O"],
                    basis=[(0, 0, 0), (0.28222, 0.25, 0.97472), (0.09486, 0.25, 0.41820), (0.09678, 0.25, 0.74279),
                           (0.45710, 0.25, 0.20602), (0.16558, 0.04646, 0.28494)],
                    spacegroup=62, cellpar=[10.332, 6.010, 4.692, 90, 90, 90])
    return Structure.from_ase(atoms.repeat((1, 1, 1) if tiny else (1, 2, 2)), name="olivine LiFePO4")


def system_set(name: str, system: str, teacher, tiny: bool, work: str) -> list:
    """The structures of set `name` for one system (MD_SETS, plus the rattled crystals for "train"), sampled by the
    teacher once and kept in work/sets/ (a killed job samples only what it had not finished)."""
    from distiller.data.sampling import MDConfig, RattleConfig, sample
    from distiller.structure import read_structures, write_structures

    path = os.path.join(work, "sets", f"{name}-{system}.extxyz")
    if os.path.isfile(path):
        return read_structures(path)
    k = SYSTEMS.index(system)
    seed = seed_structure(system, tiny)
    out = []
    for temperature, trajectories, count, key in MD_SETS[name]:
        md = MDConfig(count=2 if tiny else count, temperature=temperature, interval=5 if tiny else 10,
                      equilibration=5 if tiny else 50, dt=1.0, chunk=100,
                      replicas=min(trajectories, 2) if tiny else trajectories)
        frames = sample([seed], md, teacher, key=key + k)
        print(f"{name}: {len(frames)} MD frames of {seed.name} at {temperature:g} K", flush=True)
        if name == "train":  # the same thermal disorder, strained: stress away from zero strain
            frames = sample(frames, RattleConfig(count=1, stdev=0.0, strain=0.02), key=key + k)
        out += frames
    if name == "train":
        out += sample([seed], RattleConfig(count=3 if tiny else RATTLED, stdev=0.1, strain=0.03), key=k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_structures(path, out)  # atomic
    return out


def structures(name: str, teacher, tiny: bool, work: str) -> str:
    """The set `name` of every system in one file; its path."""
    from distiller.structure import write_structures

    path = os.path.join(work, f"{name}.extxyz")
    if not os.path.isfile(path):
        out = [s for system in SYSTEMS for s in system_set(name, system, teacher, tiny, work)]
        write_structures(path, out)
        print(f"{name}: {len(out)} structures -> {path}", flush=True)
    return path


def seeds_file(tiny: bool, work: str) -> str:
    """The three ideal crystals in one file (the stability reports' starts), in SYSTEMS order."""
    from distiller.structure import write_structures

    path = os.path.join(work, "seeds.extxyz")
    if not os.path.isfile(path):
        os.makedirs(work, exist_ok=True)
        write_structures(path, [seed_structure(system, tiny) for system in SYSTEMS])
    return path


def speed_cells(tiny: bool) -> dict:
    """The cells timed per call and in MD: 1,728 Si atoms and 4,000 Cu atoms (64 and 32 at --tiny)."""
    from distiller.structure import Structure

    cells = [seed_structure("si", True).to_ase().repeat(2 if tiny else 6),
             seed_structure("cu", True).to_ase().repeat(1 if tiny else 5)]
    return {f"{atoms.get_chemical_formula()} ({len(atoms)} atoms)": Structure.from_ase(atoms) for atoms in cells}


def md_speed_rows(teacher, students: dict, tiny: bool) -> list[dict]:
    """NVE MD ms/step of the teacher and of each student on the speed cells, one process, after one warm-up chunk:
    the teacher 20 steps (every one a host round trip of ~0.1-0.3 s), the students 1,000."""
    from distiller.speed import md_speed

    rows = []
    for name, cell in speed_cells(tiny).items():
        teacher_row = {"kind": "teacher", **md_speed(teacher, cell, 1, steps=4 if tiny else 20, chunk=2 if tiny else 10,
                                                     dt=1.0, system=name)}
        rows.append(teacher_row)
        for kernel, student in students.items():
            row = {"kind": f"student ({kernel})", **md_speed(student, cell, 1, steps=20 if tiny else 1000,
                                                             chunk=10 if tiny else 500, dt=1.0, system=name)}
            if row["ms_per_step"] and teacher_row["ms_per_step"]:
                row["speedup"] = teacher_row["ms_per_step"] / row["ms_per_step"]
            rows.append(row)
        print(json.dumps(rows[-1 - len(students):]), flush=True)
    return rows


def stability(system: str, teacher, tiny: bool, work: str, command: str) -> None:
    """`--stability SYSTEM`: the trained student's MD stability report from the system's ideal crystal; the
    collected reports in bench/results/materials-stability-<gpu>.json (runs/materials_tiny/ for --tiny)."""
    from distiller.files import update_json
    from distiller.speed import device_kind, device_name
    from distiller.stability import evaluate_stability

    run_dir = run_config_for(tiny, work).run_dir
    result = evaluate_stability(run_dir, seeds_file(tiny, work), index=SYSTEMS.index(system), time_ps=0.05 if tiny
                                else 0.5, nve_ps=0.02 if tiny else 0.25, temperature=600.0, dt=1.0, teacher=teacher,
                                out=os.path.join(run_dir, "stability", system), progress=True, command=command)
    kind = "tiny" if tiny else device_kind()
    path = os.path.join(work if tiny else os.path.join(ROOT, "bench", "results"), f"materials-stability-{kind}.json")
    entry = {"command": command, "device": device_name(), **result.report["summary"]}
    update_json(path, lambda collected: {**(collected or {}), system: entry})  # the three systems' processes
    print(json.dumps({system: result.report["summary"]}), flush=True)


def run_config_for(tiny: bool, work: str) -> Experiment:
    """`config` with this job's paths (and toy sizes at --tiny)."""
    run_config = dataclasses.replace(
        config, dataset=os.path.join(work, "data"), run_dir=os.path.join(work, "painn-64x3-20k"),
        validation=dataclasses.replace(config.validation, structures=(os.path.join(work, "validation.extxyz"),)))
    if tiny:
        run_config = dataclasses.replace(run_config, steps=40, batch_size=2, checkpoint_every=20, log_every=10,
                                         held_out=2, validation=dataclasses.replace(run_config.validation, every=20))
    return run_config


def option(argv, name: str, choices=None):
    """The value after `name` in argv (None if absent), checked against `choices`."""
    if name not in argv:
        return None
    value = argv[argv.index(name) + 1] if argv.index(name) + 1 < len(argv) else ""
    if choices is not None and value not in choices:
        raise SystemExit(f"{name} takes one of {', '.join(choices)}, not {value!r}")
    return value


def main(argv) -> dict:
    from distiller.gpu_memory import make_room_for_torch

    # Before any import below can initialise JAX's GPU backend (jax_md does so on import): torch needs the room.
    make_room_for_torch()
    import jax

    from distiller.config import parse_duration
    from distiller.evaluate import evaluate_run
    from distiller.files import write_json_atomic
    from distiller.label import label_dataset
    from distiller.run_directory import RunDirectory, load_student, training_seconds
    from distiller.speed import compare_speed, device_kind, device_name, versions
    from distiller.teachers.registry import load_teacher
    from distiller.train.loop import run

    tiny = "--tiny" in argv
    command = "python experiments/materials.py " + " ".join(argv)
    work = WORK + ("_tiny" if tiny else "")
    sample_only, stability_of = option(argv, "--sample", SYSTEMS), option(argv, "--stability", SYSTEMS)
    time_limit = option(argv, "--time")
    time_limit = 0.0 if time_limit is None else parse_duration(time_limit)
    run_config = dataclasses.replace(run_config_for(tiny, work), time_limit=time_limit)
    if stability_of is not None and not os.path.isfile(os.path.join(run_config.run_dir, "best.json")):
        raise SystemExit(f"--stability needs a trained student in {run_config.run_dir}: run "
                         "python experiments/materials.py first")
    teacher = load_teacher(TEACHER)  # before JAX touches a GPU: the memory policy (distiller.gpu_memory) applies
    if sample_only is not None:  # one system's sets alone, e.g. one process per system on one GPU
        for name in MD_SETS:  # a set whose file of every system exists is complete
            if not os.path.isfile(os.path.join(work, f"{name}.extxyz")):
                system_set(name, sample_only, teacher, tiny, work)
        return {}
    if stability_of is not None:
        stability(stability_of, teacher, tiny, work, command)
        return {}
    sets = {name: structures(name, teacher, tiny, work) for name in ("train", "validation")}

    t0 = time.perf_counter()
    labelling = label_dataset(teacher, [sets["train"]], os.path.join(work, "data"), chunk=64, progress=True)
    labelling["seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    run(run_config, resume=True)
    call_seconds = round(time.perf_counter() - t0, 1)
    rows = RunDirectory(run_config.run_dir).read_metrics()
    done = rows[-1]["step"] if rows else 0
    if done < run_config.steps:
        print(f"training stopped at step {done} of {run_config.steps}: run the same command again to continue "
              "(evaluated once complete)", flush=True)
        return {}

    sets.update({name: structures(name, teacher, tiny, work) for name in MD_SETS if name not in sets})
    keys = ("structures", "atoms", "accuracy_retained", "forces_mae", "forces_rmse", "energy_mae_per_atom",
            "stress_mae_gpa", "stress_rmse_gpa")
    results = {}
    for test in ("test-300K", "test-1000K"):
        report = evaluate_run(run_config.run_dir, sets[test], teacher=teacher,
                              out=os.path.join(run_config.run_dir, f"evaluation-{test}"))
        summary = report["summary"]
        results[test] = {name: {k: part[k] for k in keys if k in part}
                         for name, part in [("all", summary), *summary.get("systems", {}).items()]}
        print(json.dumps({test: results[test]}), flush=True)

    # The student as trained (XLA) and, on a GPU, with the Pallas kernels: the same function, timed both ways.
    kernels = ("xla",) if jax.default_backend() == "cpu" else ("xla", "pallas")
    students = {kernel: load_student(run_config.run_dir, kernel=kernel) for kernel in kernels}
    systems = {name: [cell] for name, cell in speed_cells(tiny).items()}
    speed = {kernel: compare_speed(teacher, student, systems, repeats=3 if tiny else 10, native=False,
                                   progress=True)["results"] for kernel, student in students.items()}
    md = md_speed_rows(teacher, students, tiny)

    out = {"command": command, "device": device_name(), "versions": versions(), "teacher": TEACHER,
           "sets": {name: {"file": os.path.relpath(path, ROOT)} for name, path in sets.items()},
           "labelling": labelling, "student": run_config.student.to_dict(), "loss": dataclasses.asdict(run_config.loss),
           "steps": done, "batch_size": run_config.batch_size,
           "train_seconds": training_seconds(rows) or call_seconds,
           "best": RunDirectory(run_config.run_dir).read_best(), "test_sets": results,
           "speed": speed, "md_speed": md}
    kind = "tiny" if tiny else device_kind()
    path = os.path.join(work if tiny else os.path.join(ROOT, "bench", "results"), f"materials-{kind}.json")
    write_json_atomic(path, out)
    print(f"results: {path}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
