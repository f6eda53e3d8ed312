"""MD speed (ns/day) of teachers and a student with distiller's JAX-MD integration, in one process.

    python bench/md.py --out bench/results/md-h200.json                   # waterbox and aspirin x1024
    python bench/md.py --teacher fennol-pmc:ani1x fennol-pmc:ani1x/0 --systems aspirin --replicas 1024 --out ...
    python bench/md.py --steps 4 --chunk 2 --systems aspirin --replicas 4 --out /tmp/md.json   # CPU smoke run

Each model runs NVE MD (300 K initial velocities, dt 0.5 fs) with `distiller.md`: steps in `lax.scan`
chunks, neighbour list with a skin, capacities checked between chunks. A molecule (a structure without pbc)
runs as `--replicas N` independent replicas in one program (`simulate_replicas`, seeds 0..N-1: "aspirin x1024");
N = 1, and every periodic system, runs alone (`simulate`). The first chunk (compilation) is excluded from the
timing; ms/step and ns/day come from the remaining `--steps` steps, wall clock, host work between chunks
(the blow-up checks of every replica) included. The energy drift is reported as a sanity check (for replicas:
the median and the largest magnitude over the replicas).

Rows (`rows` of the JSON): system, atoms (the total over the replicas), replicas, kind ("teacher-ensemble",
"teacher-member" or "student"), model, ms_per_step (one step of the whole program), ns_per_day (of each
replica's trajectory; `aggregate_ns_per_day` is over all replicas), us_per_atom_step (over all atoms).

The student is a fresh one of the size options (default SchNetConfig(cutoff=5.0, features=64, layers=3)), or a
trained one with --run; `--students painn-64x3 painn-32x2@4.5 schnet-64x3:xla ...` times several fresh ones in
the same run (ARCH-FEATURESxLAYERS, optionally @CUTOFF and :KERNEL; --n-rbf and --kernel fill in the rest).
A fresh student's random energy surface would fling atoms about, so its readout is scaled by --readout-scale (1e-3): forces become tiny and the water flows like a gas at the same density, with
the same shapes and operations per step (speed does not depend on the weights' values); a molecule drifts
apart slowly (its neighbour list's capacities may grow, whose redone chunks are not timed). A trained run is
used as it is.

`--profile DIR` runs one more chunk of every row under the profiler (not timed with the others): its trace goes
to DIR/SYSTEM-MODEL/, and the row's `profile` (`distiller.profiling`) gives the device time per step by kernel
and by kind, the launches per step and the wall time beside them (where the time goes, issue 14).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.profiling import kernel_table  # noqa: E402
from distiller.speed import (add_student_arguments, device_name, md_speed, sized_student,  # noqa: E402
                             student_from_arguments, versions)
from distiller.structure import read_structures  # noqa: E402


def fresh_student(config, structure, readout_scale: float):
    from distiller.capacity import make_batch
    from distiller.students import init_params, student_model

    batch, _ = make_batch([structure], config.cutoff)
    params = init_params(config, jax.random.key(0), batch)
    # The readout's weights only: a fresh student's reference energies are zero (student_model's default).
    inner = dict(params["params"])
    inner["readout"] = jax.tree.map(lambda w: w * readout_scale, inner["readout"])
    name = (f"fresh {config.architecture} student (cutoff {config.cutoff}, features {config.features}, layers "
            f"{config.layers}, n_rbf {config.n_rbf}, {config.kernel}, readout x{readout_scale:g})")
    return student_model(config, {**params, "params": inner}, name=name)


def student_spec(text: str, args):
    """'painn-64x3@4.5:pallas' -> PaiNNConfig(features=64, layers=3, cutoff=4.5, kernel="pallas"): --students'
    format (the cutoff, n_rbf and kernel default to --cutoff, --n-rbf and --kernel)."""
    spec, _, kernel = text.partition(":")
    spec, _, cutoff = spec.partition("@")
    architecture, _, size = spec.partition("-")
    features, _, layers = size.partition("x")
    try:
        return sized_student(architecture, cutoff=float(cutoff or args.cutoff), features=int(features),
                             layers=int(layers), n_rbf=args.n_rbf, kernel=kernel or args.kernel)
    except ValueError as err:
        raise SystemExit(f"bench/md.py: --students {text!r}: {err} (format ARCH-FxL[@CUTOFF][:KERNEL], e.g. "
                         f"painn-64x3@4.5:pallas)") from None


def teacher_kind(spec: str) -> str:
    """The issue's row kinds: a FeNNol-PMC spec without a member index is the ensemble; any other teacher is one
    model (a member)."""
    if spec.startswith("fennol-pmc:") and "/" not in spec.split(":", 1)[1]:
        return "teacher-ensemble"
    return "teacher-member"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="*", default=["fennol-pmc:ani1x/0"],
                        help="teacher specs (the ensemble fennol-pmc:ani1x and/or a member, fennol-pmc:ani1x/0); "
                             "none: students alone")
    add_student_arguments(parser)
    parser.add_argument("--readout-scale", type=float, default=1e-3)
    parser.add_argument("--systems", nargs="+", default=["waterbox", "aspirin"],
                        help="structure file names (no .extxyz)")
    parser.add_argument("--replicas", type=int, default=1024,
                        help="replicas of each molecule in one MD program (default 1024: aspirin x1024)")
    parser.add_argument("--structures-dir",
                        default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per model and system")
    parser.add_argument("--chunk", type=int, default=500, help="steps per lax.scan chunk (the first is warm-up)")
    parser.add_argument("--dt", type=float, default=0.5, help="fs")
    parser.add_argument("--students", nargs="+", metavar="SPEC",
                        help="fresh students to time instead of the one the size options describe: "
                             "ARCH-FxL[@CUTOFF][:KERNEL], e.g. painn-64x3 painn-32x2@4.5 schnet-64x3:xla")
    parser.add_argument("--profile", metavar="DIR", help="trace one more chunk per row into DIR (see above)")
    parser.add_argument("--out", help="JSON file to write (after every row)")
    args = parser.parse_args()
    if args.steps < 1 or args.steps % args.chunk:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --chunk ({args.chunk})")
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")

    if args.students and args.run:
        parser.error("--students times fresh students; --run a trained one: give one of them")
    student_configs = ([student_spec(text, args) for text in args.students] if args.students else
                       [None if args.run else student_from_arguments(args)])
    paths = {name: os.path.join(args.structures_dir, f"{name}.extxyz") for name in args.systems}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        parser.error(f"no structure file {missing[0]}")
    teachers = [(teacher_kind(spec), load_model(spec)) for spec in args.teacher]
    rows = []
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name(), "versions": versions(),
        "teachers": args.teacher,
        "students": [{"run": args.run} if config is None else
                     {"readout_scale": args.readout_scale, **config.to_dict()} for config in student_configs],
        "ensemble": "nve", "initial_temperature_K": 300.0,
        "rows": rows,
    }
    for name in args.systems:
        structure = read_structures(paths[name])[0]
        replicas = 1 if structure.periodic else args.replicas
        students = [("student", load_model(args.run) if config is None else
                     fresh_student(config, structure, args.readout_scale)) for config in student_configs]
        for kind, model in teachers + students:
            label = name if replicas == 1 else f"{name} x{replicas}"
            trace = None
            if args.profile:
                trace = os.path.join(args.profile, "".join(c if c.isalnum() or c in "-." else "-"
                                                           for c in f"{label}-{model.name}"))
            try:
                row = {"kind": kind, **md_speed(model, structure, replicas, args.steps, args.chunk, args.dt, label,
                                                trace=trace)}
            except FloatingPointError as err:  # an untrained or poor student can blow up: say so, go on
                print(f"{label:>14} {kind:>16} failed: {err}", flush=True)
                rows.append({"kind": kind, "model": model.name, "system": label, "error": str(err)})
                continue
            speed = ("no chunk ran without growing a capacity: no rate" if row["ms_per_step"] is None else
                     f"{row['ms_per_step']:9.3f} ms/step  {row['ns_per_day']:9.3f} ns/day")
            print(f"{label:>14} {kind:>16} {row['atoms']:7d} atoms  {speed}  (warm-up {row['warmup_s']:.1f} s, "
                  f"drift {row['drift_meV_per_atom_ps']} meV/atom/ps)", flush=True)
            if "profile" in row:
                print(kernel_table(row["profile"]), flush=True)
            rows.append(row)
            if args.out:  # after every row: a call cut short keeps what it measured
                write_json_atomic(args.out, report)
    if args.out:
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
