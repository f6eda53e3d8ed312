"""The README's main job: distil, evaluate on held-out structures, measure the speed-up, in one go."""

from __future__ import annotations

import os
import time

from distiller.config import Experiment
from distiller.files import write_json_atomic


def main(config: Experiment) -> dict:
    from distiller.evaluate import evaluate_run
    from distiller.speed import compare_speed
    from distiller.structure import read_structures
    from distiller.train.loop import run, write_held_out
    from distiller.train.step import Distillation

    t0 = time.perf_counter()
    job = Distillation.create(config)
    run(config, job=job, overwrite=True)  # the demo starts afresh every time it is run
    train_seconds = time.perf_counter() - t0

    held_out_path = os.path.join(config.run_dir, "held_out.extxyz")
    write_held_out(job, held_out_path)
    report = evaluate_run(config.run_dir, held_out_path, progress=True)

    seeds = [s for path in config.structures for s in read_structures(path)]
    speed = compare_speed(config.teacher, config.run_dir, {s.name: [s] for s in seeds}, repeats=10, progress=True)
    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": config.steps,
        "held_out_structures": report["summary"]["structures"],
        "accuracy_retained": report["summary"]["accuracy_retained"],
        "forces_rmse": report["summary"]["forces_rmse"],
        "energy_mae_per_atom": report["summary"]["energy_mae_per_atom"],
        "speed": speed["results"],
        "device": speed["device"],
    }
    write_json_atomic(os.path.join(config.run_dir, "quickstart.json"), summary)
    print()
    print(f"trained {config.steps} steps in {train_seconds:.0f} s")
    print(f"held-out ({summary['held_out_structures']} structures): accuracy retained "
          f"{100 * summary['accuracy_retained']:.1f} %, force RMSE {summary['forces_rmse']:.3f} eV/Å, "
          f"energy MAE {1000 * summary['energy_mae_per_atom']:.2f} meV/atom")
    for row in speed["results"]:
        print(f"speed on {speed['device']}, {row['system']} ({row['atoms']} atoms): teacher {row['teacher_ms']:.2f} ms, "
              f"student {row['student_ms']:.2f} ms, speed-up {row['speedup']:.1f}x")
    print(f"report: {os.path.join(config.run_dir, 'evaluation', 'report.json')}, "
          f"plot: {os.path.join(config.run_dir, 'evaluation', 'parity.png')}")
    return summary
