"""Data pipeline speed: labelling throughput with a teacher, and the grain loader against the training step.

    python bench/data.py --teacher fennol-pmc:ani1x --systems aspirin:512 watersmall:128 waterbox:32 \
        --out bench/results/data-h200.json
    python bench/data.py --systems aspirin:8 watertiny:4 --steps 5 --repeat-batches 4   # a CPU smoke run

For each system NAME:N (a structure file of the shared structures folder and a count), N rattled copies are
labelled by `distiller.label.label_dataset` twice: "cold" (compilation included, what a short job sees) and
"warm" (the same job again into another directory: capacities and shapes are the same, so nothing compiles;
encoding, fsync and the manifest are included). Rates are structures/s and atoms/s.

Then, on the warm dataset, offline training of a student (the quickstart's size by default):
  * loader alone: batches/s the grain loader delivers (its threads reading, decoding and padding);
  * step alone: training steps/s on batches already in memory (the device's rate, each batch shape warmed up);
  * training: steps/s of the real loop, the loader feeding the step.
The loader is not the bottleneck when "training" is close to "step alone" and "loader alone" is above it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from distiller.config import Experiment, LoaderConfig  # noqa: E402
from distiller.data.dataset import open_dataset  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.label import label_dataset  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.structure import read_structures, write_structures  # noqa: E402
from distiller.students import SchNetConfig, StudentConfig  # noqa: E402
from distiller.teachers.registry import load_teacher  # noqa: E402
from distiller.train.step import Distillation  # noqa: E402


def rattled(structures_dir: str, name: str, count: int, seed: int = 0):
    base = read_structures(os.path.join(structures_dir, f"{name}.extxyz"))[0]
    rng = np.random.default_rng(seed)
    return [base.replace(positions=base.positions + rng.normal(0, 0.05, base.positions.shape), name=f"{name}/{k}")
            for k in range(count)]


def label_rates(teacher, structures, work: str, name: str, chunk: int, max_atoms: int) -> tuple[dict, str]:
    path = os.path.join(work, f"{name}.extxyz")
    write_structures(path, structures)
    atoms = sum(s.n_atoms for s in structures)
    out = {"structures": len(structures), "atoms_each": structures[0].n_atoms}
    for run in ("cold", "warm"):
        directory = os.path.join(work, f"{name}-{run}")
        t0 = time.perf_counter()
        summary = label_dataset(teacher, [path], directory, chunk=chunk, max_atoms=max_atoms, progress=False)
        seconds = time.perf_counter() - t0
        out[run] = {"seconds": round(seconds, 3), "structures_per_second": round(len(structures) / seconds, 2),
                    "atoms_per_second": round(atoms / seconds, 1), "batch_shapes": summary["shapes"]}
    return out, directory


def training_rates(dataset_path: str, teacher_spec: str, student: StudentConfig, batch_size: int, steps: int,
                   threads: int, repeat_batches: int) -> dict:
    config = Experiment(name="bench-data", teacher=teacher_spec, dataset=dataset_path, student=student,
                        batch_size=batch_size, steps=steps, held_out=0, run_dir=tempfile.mkdtemp(),
                        loader=LoaderConfig(threads=threads, prefetch=4 * threads))
    job = Distillation.create(config)
    state = job.initial_state()
    # After initial_state: fitting the reference energies gives the labels a new loader (energies relative to them).
    loader = job.data.loader
    n = min(steps, max(repeat_batches, 1) * loader.steps_per_epoch)

    # Loader alone, from a fresh iterator (its start-up included; a warm prefetch buffer would flatter it).
    t0 = time.perf_counter()
    it = loader.iterator(0)
    batches = [next(it) for _ in range(n)]
    loader_seconds = time.perf_counter() - t0
    structures = sum(int(np.asarray(b.graph_mask).sum()) for b in batches)

    # Step alone: every shape compiled first, then the same batches from memory.
    device_batches = [jax.device_put(jax.tree_util.tree_map(np.asarray, b)) for b in batches]
    for b in {(b.positions.shape, b.graph_mask.shape): b for b in device_batches}.values():
        state, _, _ = job.apply_step(state, b, job.step_key(0))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for k, b in enumerate(device_batches):
        state, metrics, _ = job.apply_step(state, b, job.step_key(k))
    jax.block_until_ready(state)
    step_seconds = time.perf_counter() - t0

    # Training as it runs: the loader's iterator feeding the step.
    it = loader.iterator(n)
    t0 = time.perf_counter()
    for k in range(n):
        state, metrics, _ = job.apply_step(state, next(it), job.step_key(n + k))
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - t0
    return {
        "steps": n, "batch_size": batch_size, "structures_per_step": round(structures / n, 2),
        "loader_batches_per_second": round(n / loader_seconds, 2),
        "step_alone_per_second": round(n / step_seconds, 2),
        "training_steps_per_second": round(n / train_seconds, 2),
        "loader_headroom": round((n / loader_seconds) / (n / step_seconds), 2),
        "shapes": loader.report()["shapes"], "shapes_seen": loader.report()["shapes_seen"],
        "loader_threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="fennol-pmc:ani1x")
    parser.add_argument("--systems", nargs="+", default=["aspirin:512", "watersmall:128", "waterbox:32"],
                        help="NAME:COUNT, NAME a file of the structures folder")
    parser.add_argument("--structures-dir",
                        default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--max-atoms", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8, help="structures per training step")
    parser.add_argument("--steps", type=int, default=200, help="training steps timed, at most")
    parser.add_argument("--repeat-batches", type=int, default=4, help="epochs of the dataset timed, at most")
    parser.add_argument("--threads", type=int, default=4, help="loader threads")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--work", help="directory for the datasets (default: a temporary one)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()

    teacher = load_teacher(args.teacher)
    student = SchNetConfig(cutoff=args.cutoff, features=args.features, layers=args.layers, elements=(1, 6, 7, 8))
    work = args.work or tempfile.mkdtemp(prefix="bench-data-")
    report = {"benchmark": "data", "device": device_name(), "devices": len(jax.devices()), "versions": versions(),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "teacher": args.teacher,
              "student": dataclasses.asdict(student), "chunk": args.chunk, "max_atoms": args.max_atoms,
              "labelling": {}, "training": {}}
    for spec in args.systems:
        name, _, count = spec.partition(":")
        structures = rattled(args.structures_dir, name, int(count or 64))
        rates, dataset = label_rates(teacher, structures, work, name, args.chunk, args.max_atoms)
        report["labelling"][spec] = rates
        print(f"label {spec}: cold {rates['cold']['structures_per_second']} structures/s, "
              f"warm {rates['warm']['structures_per_second']} structures/s ({rates['warm']['atoms_per_second']} atoms/s)",
              flush=True)
        assert len(open_dataset(dataset)) == len(structures)
        train = training_rates(dataset, args.teacher, student, args.batch_size, args.steps, args.threads,
                               args.repeat_batches)
        report["training"][spec] = train
        print(f"train {spec}: loader {train['loader_batches_per_second']} batches/s, step alone "
              f"{train['step_alone_per_second']}/s, training {train['training_steps_per_second']} steps/s", flush=True)
        if args.out:  # after every system, so a run cut short keeps what it measured
            write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
