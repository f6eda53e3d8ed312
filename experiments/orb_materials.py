"""Issue 4: an Orb teacher (PyTorch) distilled offline into one student for periodic materials and water.

    python experiments/orb_materials.py                 # sample, label, train, evaluate (a GPU job, minutes)
    python experiments/orb_materials.py --scale cpu     # smaller seeds and sets (2 CPU cores, ~15 min)
    python experiments/orb_materials.py --scale tiny    # toy sizes: a smoke run of the pipeline (~2 min)
    python experiments/orb_materials.py --teacher orb:orb-v3-conservative-inf-omat \
        --weights-path orb-v3-conservative-inf-omat-20250404.ckpt --work runs/orb_materials_omat
    distiller distill experiments/orb_materials.py      # training only (the dataset must exist)

Stages, all under runs/orb_materials/ (runs/orb_materials_SCALE/ for another scale; each resumes: sampled sets
are kept, labelling continues where a kill stopped it, training resumes from its checkpoints):

1. Candidates by rattling three seeds with `distiller.data.sampling.sample`: fcc Cu (3x3x3 cubic supercell,
   108 atoms; 2x2x2, 32 atoms, at the smaller scales), diamond Si (2x2x2 cubic, 64 atoms) and liquid water
   (watersmall, 648 atoms; watertiny, 81 atoms, at the smaller scales). Every copy gets
   Gaussian displacements and a random symmetric cell strain: strained cells are what teach the student the
   stress, which is in the loss.
2. Labelling with the Orb teacher (`distiller.label.label_dataset`, resumable): energy, forces and stress.
   By default `orb:random/orb-v3-conservative`, the real orb-v3 architecture with seeded random weights (no
   pretrained weights can be downloaded here); `--teacher`/`--weights-path` take a real checkpoint.
3. Offline training of one student for all three systems (elements H, O, Si, Cu), stress in the loss.
4. Evaluation against the teacher on fresh rattled structures of each system (another sampling key), per
   system and all together. The closing note (note.json) gives the accuracy retained (forces) and the stress
   error per system and overall.

With random teacher weights the numbers say how well the student imitates this teacher, not how good the
physics is. A different teacher needs another --work directory (a dataset belongs to one teacher).
"""

import argparse
import dataclasses
import json
import os
import time

# JAX takes 75 % of a GPU's memory when it first touches it; Orb (PyTorch) labels on the same GPU and needs room.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")

from distiller.config import Experiment, LoaderConfig, LossConfig, OptimizerConfig  # noqa: E402
from distiller.students import SchNetConfig  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(ROOT, "..", "shared"))
WORK = os.path.join(ROOT, "runs", "orb_materials")
TEACHER = "orb:random/orb-v3-conservative"
SYSTEMS = ("cu", "si", "water")


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big a run is: training and test structures per system, seed sizes, training steps and batch."""

    counts: dict
    test_counts: dict
    small_seeds: bool  # Cu 2x2x2 and watertiny instead of Cu 3x3x3 and watersmall
    steps: int
    batch_size: int
    held_out: int


SCALES = {
    "gpu": Scale({"cu": 480, "si": 480, "water": 120}, {"cu": 32, "si": 32, "water": 8}, False, 5000, 8, 32),
    # Orb costs ~0.3 ms per edge on a 2-core CPU: ~1 s per structure here.
    "cpu": Scale({"cu": 64, "si": 64, "water": 32}, {"cu": 12, "si": 12, "water": 6}, True, 2000, 4, 8),
    "tiny": Scale({"cu": 3, "si": 3, "water": 2}, {"cu": 3, "si": 3, "water": 2}, True, 40, 8, 2),
}

config = Experiment(
    name="orb-materials",
    teacher=TEACHER,
    dataset=os.path.join(WORK, "data"),
    student=SchNetConfig(cutoff=5.0, features=64, layers=3, n_rbf=24, elements=(1, 8, 14, 29)),
    # Stress in eV/Å³: 1 GPa (0.0062 eV/Å³) of error weighs about as much as 0.06 eV/Å of force error.
    loss=LossConfig(energy_weight=1.0, forces_weight=10.0, stress_weight=1000.0),
    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100, final_learning_rate=5e-5),
    steps=5000,
    batch_size=8,
    seed=0,
    run_dir=os.path.join(WORK, "student"),
    checkpoint_every=500,
    log_every=20,
    held_out=32,
    loader=LoaderConfig(threads=4, prefetch=16, max_atoms=4096),
)


def seed_structure(system: str, small: bool):
    """The seed of a system: ideal crystals from ase.build (lattice constants of experiment), or the shared
    periodic water box; `small`: a 2x2x2 Cu cell (32 atoms) and the 81-atom water box."""
    from ase.build import bulk

    from distiller.structure import Structure, read_structures

    if system == "cu":
        return Structure.from_ase(bulk("Cu", "fcc", a=3.615, cubic=True).repeat(2 if small else 3), name="fcc Cu")
    if system == "si":
        return Structure.from_ase(bulk("Si", "diamond", a=5.431, cubic=True).repeat(2), name="diamond Si")
    water = "watertiny" if small else "watersmall"
    return read_structures(os.path.join(SHARED, "structures", f"{water}.extxyz"))[0]


def rattling(system: str, count: int):
    """Gaussian displacements and cell strain: 0.1 Å and up to 3 % for the crystals (far from the ideal
    lattice, where the forces are zero), 0.08 Å and 2 % for water (as in experiments/data_pipeline.py)."""
    from distiller.data.sampling import RattleConfig

    if system == "water":
        return RattleConfig(count=count, stdev=0.08, strain=0.02)
    return RattleConfig(count=count, stdev=0.1, strain=0.03)


def candidates(work: str, system: str, count: int, key: int, small: bool) -> str:
    """`count` rattled copies of the system's seed drawn with `key`, as an unlabelled dataset (cached); its path."""
    from distiller.data.dataset import is_dataset, write_dataset
    from distiller.data.sampling import sample

    path = os.path.join(work, "candidates", f"{system}-{count}-key{key}")
    if not is_dataset(path):
        structures = sample([seed_structure(system, small)], rattling(system, count), None, key=key)
        write_dataset(path, structures, description=f"rattled {system}, key {key}")
    return path


def load(spec: str, weights_path: str | None):
    """The teacher: any spec through the registry, or an Orb model from a local checkpoint."""
    from distiller.teachers.registry import load_teacher

    if weights_path:
        from distiller.teachers.orb import orb_model

        return orb_model(spec, weights_path=weights_path)
    return load_teacher(spec)


def main(scale: str = "gpu", teacher_spec: str = TEACHER, weights_path: str | None = None,
         work: str | None = None) -> dict:
    from distiller.data.dataset import open_dataset
    from distiller.evaluate import evaluate_run
    from distiller.files import write_json_atomic
    from distiller.label import label_dataset
    from distiller.structure import write_structures
    from distiller.train.loop import run

    size = SCALES[scale]
    work = work or (WORK if scale == "gpu" else f"{WORK}_{scale}")
    tiny = scale == "tiny"
    os.makedirs(work, exist_ok=True)
    teacher = load(teacher_spec, weights_path)

    # 1. Candidates: training sets (key 1) and test sets (key 99) per system.
    train = {s: candidates(work, s, size.counts[s], 1, size.small_seeds) for s in SYSTEMS}
    test = {s: candidates(work, s, size.test_counts[s], 99, size.small_seeds) for s in SYSTEMS}

    # 2. Labelling (resumable; on a cluster the same job runs as `distiller label --shard i/n` array jobs).
    dataset = os.path.join(work, "data")
    labelling = label_dataset(teacher, [train[s] for s in SYSTEMS], dataset, chunk=64, progress=not tiny)

    # 3. Training: one student for the three systems.
    steps = size.steps
    run_config = dataclasses.replace(
        config, teacher=teacher.name, dataset=dataset, run_dir=os.path.join(work, "student"), steps=steps,
        batch_size=size.batch_size, held_out=size.held_out, checkpoint_every=min(config.checkpoint_every, steps),
        log_every=min(config.log_every, steps))
    t0 = time.perf_counter()
    run(run_config, resume=True, progress=not tiny)
    training_seconds = time.perf_counter() - t0
    with open(os.path.join(run_config.run_dir, "metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])

    # 4. Evaluation against the teacher on fresh rattled structures, per system and all together.
    files = {}
    for system in SYSTEMS:
        files[system] = os.path.join(work, f"test-{system}.extxyz")
        write_structures(files[system], list(open_dataset(test[system])))
    files["all"] = os.path.join(work, "test-all.extxyz")
    write_structures(files["all"], [s for system in SYSTEMS for s in open_dataset(test[system])])
    keys = ("structures", "atoms", "accuracy_retained", "forces_rmse", "teacher_forces_rms", "energy_mae_per_atom",
            "stress_rmse_gpa", "stress_accuracy_retained", "teacher_stress_rms")
    results = {}
    for name, path in files.items():
        report = evaluate_run(run_config.run_dir, path, out=os.path.join(run_config.run_dir, f"evaluation-{name}"),
                              teacher=teacher)
        results[name] = {k: report["summary"][k] for k in keys if k in report["summary"]}

    data = open_dataset(dataset)
    seeds = {s: seed_structure(s, size.small_seeds) for s in SYSTEMS}
    seeds = {s: {"name": seed.name, "atoms": seed.n_atoms, "rattle": dataclasses.asdict(rattling(s, size.counts[s]))}
             for s, seed in seeds.items()}
    retained = {name: f"{100 * r['accuracy_retained']:.1f} %" for name, r in results.items()}
    note = {
        "teacher": teacher.name, "weights_path": weights_path, "scale": scale, "seeds": seeds,
        "student": run_config.student.to_dict(), "loss": dataclasses.asdict(run_config.loss),
        "steps": steps, "dataset": {"structures": len(data), "atoms": int(data.n_atoms.sum()), "path": dataset},
        "labelling": labelling, "training": {"seconds": round(training_seconds, 1), "last_logged": last},
        "results": results,
        "closing_note": (
            f"On fresh rattled and strained structures, one student ({run_config.student.features} features, "
            f"{run_config.student.layers} layers, {run_config.student.cutoff} Å) retains {retained['all']} of "
            f"{teacher.name}'s force accuracy overall (Cu {retained['cu']}, Si {retained['si']}, water "
            f"{retained['water']}); stress RMSE {results['all'].get('stress_rmse_gpa', float('nan')):.3f} GPa "
            f"({len(data)} training structures, {steps} steps)."),
    }
    write_json_atomic(os.path.join(work, "note.json"), note)
    print(note["closing_note"])
    return note


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="gpu",
                        help="gpu (default, minutes on one GPU), cpu (~15 min on 2 cores), tiny (a smoke run)")
    parser.add_argument("--teacher", default=TEACHER, help=f"teacher spec (default {TEACHER})")
    parser.add_argument("--weights-path", help="a local Orb checkpoint (.ckpt) for the --teacher architecture")
    parser.add_argument("--work", help=f"working directory (default {WORK}, or {WORK}_SCALE)")
    args = parser.parse_args()
    main(scale=args.scale, teacher_spec=args.teacher, weights_path=args.weights_path, work=args.work)
