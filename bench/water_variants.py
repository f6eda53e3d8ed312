"""Student variants side by side on water, at a size a 2-core CPU trains: which change is worth a GPU run.

    python bench/water_variants.py --variants painn-64x3 painn-64x3-angular6 --steps 3000 \
        --out bench/results/water-variants-cpu.json

Every variant gets experiments/water.py's recipe (loss, optimiser, EMA, rattle and strain, ensemble labels in the
step, best checkpoint on validation) on watertiny (81 atoms, 27 molecules, periodic) instead of watersmall, for
`--steps` steps of `--batch` boxes, and is tested on 300 K ensemble MD from other seeds (80 snapshots, 6,480
atoms). Sets are sampled by experiments/water.py's own functions into runs/water_variants/ and kept; each
variant's run resumes, and a finished one is only evaluated again. Results (one row per variant: accuracy
retained, force MAE and RMSE, energy MAE per atom, training ms/step) are merged into `--out` by variant name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, ROOT)

SYSTEM = "watertiny"
WORK = os.path.join(ROOT, "runs", "water_variants")
# name: the student (PaiNNConfig fields). Fixed here, not relative to experiments/water.py's student, which moves.
VARIANTS = {name: {"cutoff": 5.0, "features": features, "layers": 3, "n_rbf": 16, "elements": (1, 8),
                   "angular_degree": degree}
            for name, features, degree in (("painn-64x3", 64, 0), ("painn-64x3-angular4", 64, 4),
                                           ("painn-64x3-angular6", 64, 6), ("painn-64x3-angular8", 64, 8),
                                           ("painn-128x3", 128, 0), ("painn-128x3-angular6", 128, 6))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8, help="watertiny boxes per step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be positive")

    from distiller.config import experiment_module
    from distiller.evaluate import evaluate_run
    from distiller.files import update_json
    from distiller.run_directory import RunDirectory, step_timing, training_seconds
    from distiller.speed import device_name, versions
    from distiller.students import PaiNNConfig
    from distiller.teachers.registry import load_teacher
    from distiller.train.loop import run

    water = experiment_module(os.path.join(ROOT, "experiments", "water.py"))
    teacher = load_teacher(water.TEACHER)
    systems = (SYSTEM,)
    train, validation = (water.structures(name, systems, teacher, False, WORK) for name in ("train", "validation"))
    (test_name, test), = water.test_set_files(systems, teacher, False, WORK).items()
    command = " ".join(["python", "bench/water_variants.py"] + sys.argv[1:])
    rows = {}
    for name in args.variants:
        student = PaiNNConfig(**VARIANTS[name])
        config = dataclasses.replace(
            water.config, name=name, student=student, structures=(train,), steps=args.steps,
            batch_size=args.batch, run_dir=os.path.join(WORK, name),
            validation=dataclasses.replace(water.config.validation, structures=(validation,)))
        run(config, resume=True)
        report = evaluate_run(config.run_dir, test, teacher=teacher,
                              out=os.path.join(config.run_dir, f"evaluation-{test_name}"))
        directory = RunDirectory(config.run_dir)
        metrics = directory.read_metrics()
        rows[name] = {"student": student.to_dict(), "steps": args.steps, "batch": args.batch,
                      "train_seconds": training_seconds(metrics), **step_timing(metrics, config.checkpoint_every),
                      "best": directory.read_best(),
                      test_name: {k: report["summary"][k] for k in ("accuracy_retained", "forces_mae", "forces_rmse",
                                                                   "energy_mae_per_atom")}}
        print(json.dumps({name: rows[name][test_name]}), flush=True)
    update_json(args.out, lambda old: {"command": command, "device": device_name(), "versions": versions(),
                                       "system": SYSTEM, "test_set": os.path.relpath(test, ROOT),
                                       "variants": {**(old or {}).get("variants", {}), **rows}})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
