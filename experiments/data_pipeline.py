"""Issue 3's closing run: a student taught on teacher-MD and rattled structures against one taught on rattling alone.

    python experiments/data_pipeline.py            # sample, label, train both students, evaluate (a GPU job)
    python experiments/data_pipeline.py --tiny     # the same pipeline at toy sizes (a CPU smoke run)
    distiller distill experiments/data_pipeline.py # only the MD+rattle student (its dataset must exist)

Stages, all under runs/data_pipeline/ (each resumes: sampled sets are kept, labelling jobs continue where a
kill stopped them, training resumes from its checkpoints):

1. Candidates with `distiller.data.sampling.sample(seeds, method, teacher, key)` from the aspirin and
   watersmall (648-atom periodic water) seeds: teacher MD (NVT) snapshots, and rattled copies (Gaussian
   displacements, plus cell strain for water). Each set is written as an unlabelled dataset, which keeps
   every structure's provenance (`info`).
2. Labelling with the ANI-1x ensemble (`distiller.label.label_dataset`), energy spread included:
     md+rattle   half MD snapshots, half rattled copies (per seed system);
     rattle      the same number of structures, all rattled.
3. Offline training of the same student, same steps and seed, on each dataset.
4. Evaluation against the teacher on MD snapshots from another trajectory (other seed): the physical
   distribution at the temperature, which neither training set contains. Also on fresh rattled copies.
   The closing note (note.json) gives each student's accuracy retained.
"""

import dataclasses
import json
import os
import sys

from distiller.config import Experiment, LoaderConfig, LossConfig, OptimizerConfig
from distiller.students import SchNetConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(ROOT, "..", "shared"))
WORK = os.path.join(ROOT, "runs", "data_pipeline")
TEACHER = "fennol-pmc:ani1x"

# Structures per seed system and method in each training set (aspirin is 21 atoms, watersmall 648).
COUNTS = {"aspirin": 1200, "watersmall": 150}
TEST_COUNTS = {"aspirin": 100, "watersmall": 12}
TRAJECTORIES = 6  # independent MD runs per seed system and set

config = Experiment(
    name="data-pipeline-md-rattle",
    teacher=TEACHER,
    dataset=os.path.join(WORK, "data-md-rattle"),
    student=SchNetConfig(cutoff=5.0, features=64, layers=3, elements=(1, 6, 7, 8)),
    loss=LossConfig(energy_weight=1.0, forces_weight=10.0, stress_weight=100.0),
    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100, final_learning_rate=5e-5),
    steps=6000,
    batch_size=8,
    seed=0,
    run_dir=os.path.join(WORK, "student-md-rattle"),
    checkpoint_every=500,
    log_every=20,
    held_out=64,
    loader=LoaderConfig(threads=4, prefetch=16, max_atoms=8192),
)


def methods(system: str, method: str, count: int, tiny: bool):
    """The sampling configuration (distiller.data.sampling) for `count` structures of one trajectory or set.

    MD: NVT (Langevin) at 300 K for water and 500 K for aspirin (a molecule in vacuum needs the higher
    temperature to leave the harmonic well in a short run), 0.5 fs steps, a snapshot every 20 steps after
    1000 steps of equilibration. Rattling: 0.1 Å Gaussian displacements for aspirin; 0.08 Å and up to 2 %
    cell strain for water.
    """
    from distiller.data.sampling import MDConfig, RattleConfig

    if method == "md":
        interval, equilibration = (5, 10) if tiny else (20, 1000)
        temperature = 500.0 if system == "aspirin" else 300.0
        return MDConfig(count=count, temperature=temperature, interval=interval, equilibration=equilibration,
                        dt=0.5)
    if system == "aspirin":
        return RattleConfig(count=count, stdev=0.1, strain=0.0)
    return RattleConfig(count=count, stdev=0.08, strain=0.02)


def candidates(method: str, system: str, count: int, seed: int, teacher, tiny: bool) -> str:
    """`count` structures of `method` from the `system` seed, as an unlabelled dataset (cached); its path.

    MD snapshots come from `TRAJECTORIES` independent trajectories (keys seed·100 + t), so that they are not
    all from one correlated run.
    """
    from distiller.data.dataset import is_dataset, write_dataset
    from distiller.data.sampling import sample

    path = os.path.join(WORK, "candidates", f"{method}-{system}-{seed}")
    if is_dataset(path):
        return path
    seeds = os.path.join(SHARED, "structures", f"{system}.extxyz")
    if method == "md":
        trajectories = min(TRAJECTORIES, count)
        structures = []
        for t in range(trajectories):
            n = count // trajectories + (t < count % trajectories)
            structures += sample(seeds, methods(system, method, n, tiny), teacher, key=seed * 100 + t)
    else:
        structures = sample(seeds, methods(system, method, count, tiny), None, key=seed)
    write_dataset(path, structures, description=f"{method} from {system}, seed {seed}")
    return path


def main(tiny: bool = False) -> dict:
    from distiller.data.dataset import open_dataset
    from distiller.evaluate import evaluate_run
    from distiller.label import label_dataset
    from distiller.structure import write_structures
    from distiller.teachers.registry import load_teacher
    from distiller.train.loop import run

    counts = {k: (4 if tiny else v) for k, v in COUNTS.items()}
    test_counts = {k: (2 if tiny else v) for k, v in TEST_COUNTS.items()}
    teacher = load_teacher(TEACHER)
    os.makedirs(WORK, exist_ok=True)

    # 1. Candidates: MD and rattled sets for training (seed 1, and seed 2 for the second rattled half of the
    #    rattle-only set), and the test sets from other seeds.
    md = [candidates("md", s, n, 1, teacher, tiny) for s, n in counts.items()]
    rattle = [candidates("rattle", s, n, 1, teacher, tiny) for s, n in counts.items()]
    rattle_more = [candidates("rattle", s, n, 2, teacher, tiny) for s, n in counts.items()]
    test_md = [candidates("md", s, n, 99, teacher, tiny) for s, n in test_counts.items()]
    test_rattle = [candidates("rattle", s, n, 99, teacher, tiny) for s, n in test_counts.items()]

    # 2. Labelling (resumable; on a cluster the same commands run as --shard i/n array jobs).
    datasets = {"md+rattle": (os.path.join(WORK, "data-md-rattle"), md + rattle),
                "rattle": (os.path.join(WORK, "data-rattle"), rattle + rattle_more)}
    labelling = {}
    for name, (out, inputs) in datasets.items():
        labelling[name] = label_dataset(teacher, inputs, out, chunk=64, max_atoms=8192)

    # 3. Training: the same student, steps and seed; only the dataset differs.
    steps = 40 if tiny else config.steps
    runs = {}
    for name, (out, _) in datasets.items():
        tag = name.replace("+", "-")
        runs[name] = dataclasses.replace(
            config, name=f"data-pipeline-{tag}", dataset=out, run_dir=os.path.join(WORK, f"student-{tag}"),
            steps=steps, held_out=4 if tiny else config.held_out, checkpoint_every=min(config.checkpoint_every, steps),
            log_every=min(config.log_every, steps))
        run(runs[name], resume=True)

    # 4. Evaluation against the teacher on test structures no student has seen.
    tests = {}
    for label, paths in (("md", test_md), ("rattle", test_rattle)):
        path = os.path.join(WORK, f"test-{label}.extxyz")
        write_structures(path, [s for p in paths for s in open_dataset(p)])
        tests[label] = path
    results = {}
    for name, run_config in runs.items():
        results[name] = {}
        for label, path in tests.items():
            report = evaluate_run(run_config.run_dir, path, out=os.path.join(run_config.run_dir, f"evaluation-{label}"))
            results[name][label] = {k: report["summary"][k] for k in
                                    ("structures", "accuracy_retained", "forces_rmse", "energy_mae_per_atom")}
    sizes = {name: len(open_dataset(out)) for name, (out, _) in datasets.items()}
    note = {
        "teacher": TEACHER, "student": config.student.to_dict(), "steps": steps, "datasets": sizes,
        "labelling": labelling, "results": results,
        "closing_note": (
            f"On MD snapshots from an unseen trajectory, the student taught on teacher MD + rattling retains "
            f"{100 * results['md+rattle']['md']['accuracy_retained']:.1f} % of the teacher's force accuracy, "
            f"against {100 * results['rattle']['md']['accuracy_retained']:.1f} % for the same student taught on "
            f"rattling alone ({sizes['rattle']} structures each, {steps} steps)."),
    }
    with open(os.path.join(WORK, "note.json"), "w") as f:
        json.dump(note, f, indent=2)
    print(note["closing_note"])
    return note


if __name__ == "__main__":
    main(tiny="--tiny" in sys.argv[1:])
