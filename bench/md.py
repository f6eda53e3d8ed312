"""MD speed (ns/day) of a teacher and a student with distiller's JAX-MD integration, in one process.

    python bench/md.py --out bench/results/md-h200.json                   # waterbox, ani1x/0 and a student
    python bench/md.py --steps 4 --chunk 2 --systems watertiny --out /tmp/md.json   # CPU smoke run

Each model runs NVE MD (300 K initial velocities, dt 0.5 fs) with `distiller.md.simulate`: steps in
`lax.scan` chunks, neighbour list with a skin, capacities checked between chunks. The first chunk
(compilation) is excluded from the timing; ms/step and ns/day come from the remaining `--steps` steps,
wall clock, host work between chunks included. The energy drift is reported as a sanity check.

The student is a fresh one of the quickstart's size (SchNetConfig(cutoff=5.0, features=64, layers=3)), or a
trained one with --run. A fresh student's random energy surface would fling atoms about, so its readout is
scaled by --readout-scale (1e-3): forces become tiny and the water flows like a gas at the same density, with
the same shapes and operations per step (speed does not depend on the weights' values). A trained run is used
as it is.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.md import Dynamics, energy_drift, simulate, thermo  # noqa: E402
from distiller.speed import add_student_arguments, device_name, student_from_arguments, versions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def fresh_student(config, structure, readout_scale: float):
    from distiller.capacity import make_batch
    from distiller.students import init_params, student_model

    batch, _ = make_batch([structure], config.cutoff)
    params = init_params(config, jax.random.key(0), batch)
    # The readout's weights only: a fresh student's reference energies are zero (student_model's default).
    inner = dict(params["params"])
    inner["readout"] = jax.tree.map(lambda w: w * readout_scale, inner["readout"])
    name = (f"fresh student (cutoff {config.cutoff}, features {config.features}, layers {config.layers}, "
            f"readout x{readout_scale:g})")
    return student_model(config, {**params, "params": inner}, name=name)


def measure(model, structure, steps: int, chunk: int, dt: float) -> dict:
    """Run chunk (warm-up, compiles) + steps NVE steps; time the `steps`.

    A chunk whose neighbour list overflowed was redone with larger capacities, i.e. recompiled: its wall time
    is compilation, not integration, so the rate comes from the chunks that ran once (all of them, usually).
    """
    dynamics = Dynamics("nve", temperature=300.0, dt=dt)
    log_every = math.gcd(chunk, 50)  # the thermo log (for the drift) every 50 steps where the chunk allows
    rows, chunks = [], []
    start = last = time.perf_counter()
    warmup = None
    for records in simulate(model, structure, dynamics, chunk + steps, log_every=log_every, chunk=chunk, key=0):
        rows.append(thermo(records, structure.n_atoms, dt))
        now = time.perf_counter()
        if records.step[-1] > 0:
            if warmup is None:
                warmup = now - start
            else:
                chunks.append((now - last, len(records.step) * log_every, records.redone))
        last = now
    rows = np.concatenate(rows)
    clean = [(t, n) for t, n, redone in chunks if not redone]
    per_step = sum(t for t, _ in clean) / sum(n for _, n in clean) if clean else float("nan")
    return {
        "model": model.name, "system": structure.name, "atoms": structure.n_atoms, "dt_fs": dt, "steps": steps,
        "chunk": chunk, "warmup_s": warmup, "ms_per_step": 1e3 * per_step,
        "ns_per_day": dt * 1e-6 / per_step * 86400, "us_per_atom_step": 1e6 * per_step / structure.n_atoms,
        "chunks_timed": len(clean), "chunks_redone": sum(1 for *_, redone in chunks if redone),
        "final_temperature_K": float(rows[-1, 2]),
        "drift_meV_per_atom_ps": energy_drift(rows, structure.n_atoms) if len(rows) >= 5 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="fennol-pmc:ani1x/0")
    add_student_arguments(parser)
    parser.add_argument("--readout-scale", type=float, default=1e-3)
    parser.add_argument("--systems", nargs="+", default=["waterbox"], help="structure file names (no .extxyz)")
    parser.add_argument("--structures-dir",
                        default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per model and system")
    parser.add_argument("--chunk", type=int, default=500, help="steps per lax.scan chunk (the first is warm-up)")
    parser.add_argument("--dt", type=float, default=0.5, help="fs")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    if args.steps < 1 or args.steps % args.chunk:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --chunk ({args.chunk})")

    teacher = load_model(args.teacher)
    results = []
    student_config = student_from_arguments(args)
    for name in args.systems:
        structure = read_structures(os.path.join(args.structures_dir, f"{name}.extxyz"))[0]
        if args.run:
            student = load_model(args.run)
            student_config = student.source  # a student model's source is its config
        else:
            student = fresh_student(student_config, structure, args.readout_scale)
        for kind, model in (("teacher", teacher), ("student", student)):
            try:
                row = {"kind": kind, **measure(model, structure, args.steps, args.chunk, args.dt)}
            except FloatingPointError as err:  # an untrained or poor student can blow up: say so, go on
                print(f"{name:>10} {kind:>8} failed: {err}", flush=True)
                results.append({"kind": kind, "model": model.name, "system": name, "error": str(err)})
                continue
            print(f"{name:>10} {kind:>8} {row['atoms']:6d} atoms  {row['ms_per_step']:9.3f} ms/step  "
                  f"{row['ns_per_day']:9.3f} ns/day  (warm-up {row['warmup_s']:.1f} s, drift "
                  f"{row['drift_meV_per_atom_ps']} meV/atom/ps)", flush=True)
            results.append(row)
    report = {
        "device": device_name(), "versions": versions(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "teacher": args.teacher,
        "student": {"run": args.run, "readout_scale": None if args.run else args.readout_scale,
                    **{k: getattr(student_config, k) for k in ("cutoff", "features", "layers", "n_rbf", "kernel")}},
        "ensemble": "nve", "initial_temperature_K": 300.0,
        "results": results,
    }
    if args.out:
        write_json_atomic(args.out, report)
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
