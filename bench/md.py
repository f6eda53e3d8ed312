"""MD speed (ns/day) of teachers and a student with distiller's JAX-MD integration, in one process.

    python bench/md.py --out bench/results/md-h200.json                   # waterbox and aspirin x1024
    python bench/md.py --teacher fennol-pmc:ani1x fennol-pmc:ani1x/0 --systems aspirin --replicas 1024 --out ...
    python bench/md.py --teacher fennol-pmc:ani1x fennol-pmc:ani1x/0 --students painn-64x3@4.0 \
        --systems waterbox waterhuge waterhuge:2x2x2 aspirin --out ...   # issue 14's four systems, one run
    python bench/md.py --steps 4 --chunk 2 --systems aspirin --replicas 4 --out /tmp/md.json   # CPU smoke run

Each model runs NVE MD (300 K initial velocities, dt 0.5 fs) with `distiller.md`: steps in `lax.scan`
chunks, neighbour list with a skin, capacities checked between chunks. A molecule (a structure without pbc)
runs as `--replicas N` independent replicas in one program (`simulate_replicas`, seeds 0..N-1: "aspirin x1024");
N = 1, and every periodic system, runs alone (`simulate`). The first chunk (compilation) is excluded from the
timing; a system NAME:AxBxC is the periodic structure NAME tiled A x B x C ("waterhuge:2x2x2": 96,000 atoms,
labelled "waterhuge 2x2x2"); ms/step and ns/day come from the remaining `--steps` steps, wall clock, host work between chunks
(the blow-up checks of every replica) included. The energy drift is reported as a sanity check (for replicas:
the median and the largest magnitude over the replicas). A row whose MD blows up, or whose kernel does not compile
or launch, is written with its `error` and the run goes on; the run then exits with status 1, naming those rows.

Rows (`rows` of the JSON): system, atoms (the total over the replicas), replicas, kind ("teacher-ensemble",
"teacher-member" or "student"), model, ms_per_step (one step of the whole program), ns_per_day (of each
replica's trajectory; `aggregate_ns_per_day` is over all replicas), us_per_atom_step (over all atoms).

The student is a fresh one of the size options (default SchNetConfig(cutoff=5.0, features=64, layers=3)), or a
trained one with --run (its own kernels, or --kernel's); `--students painn-64x3 painn-32x2@4.5 schnet-64x3:xla
...` times several fresh ones in the same run (ARCH-FEATURESxLAYERS, optionally @CUTOFF and :KERNEL; --n-rbf and
--kernel fill in the rest). A fresh student's random energy surface would fling atoms about, so its readout is
scaled by --readout-scale (1e-3): forces become tiny and the water flows like a gas at the same density, with
the same shapes and operations per step (speed does not depend on the weights' values). A molecule of a fresh
student drifts apart (nothing holds it together), its neighbour list's capacities grow, and the redone chunks are
not timed: PaiNN 128x3's aspirin x1024 grew in every chunk and gave no rate. Time molecules with a trained run
(--run), which is used as it is.

`--launch NAME=FWD/FIRST/SECOND[/PRECISION]` registers the Pallas kernel set NAME with those launch settings (each
BLOCK_EDGES,BLOCK_ATOMS,WARPS,STAGES[,LAYOUT], per derivative depth: the forward pass, the first VJP, deeper ones;
the kernels' dot precision, tf32x3 or ieee) for
--students to name as their kernel: `--launch e32=32,16,4,2/32,16,4,2/16,16,4,1 --students painn-64x3:pallas
painn-64x3:e32` times the same student with the defaults and with those (a launch sweep in MD, issue 14).

`--skins 0.5 0.3 ...` times every model and system at each neighbour-list skin (Å; default distiller.md's 0.5):
a thinner skin holds fewer edges (the XLA twins compute every edge of the list's capacity) but rebuilds more
often, and the rate includes the rebuilds. A fresh student's gas-like water moves ballistically and so rebuilds
more often than a liquid; the teacher rows are real liquid.

`--profile DIR` runs one more chunk of every row under the profiler (not timed with the others): its trace goes
to DIR/SYSTEM-MODEL/, and the row's `profile` (`distiller.profiling`) gives the device time per step by kernel
and by kind, the launches per step and the wall time beside them (where the time goes, issue 14).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import as_model, load_model  # noqa: E402
from distiller.profiling import kernel_table  # noqa: E402
from distiller.speed import (add_student_arguments, device_name, md_speed, sized_student,  # noqa: E402
                             student_from_arguments, versions)
from distiller.structure import StructureError, parse_tiled_name, read_structures, tiled_name  # noqa: E402


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
                             layers=int(layers), n_rbf=args.n_rbf, kernel=kernel or args.kernel or "xla")
    except ValueError as err:
        raise SystemExit(f"bench/md.py: --students {text!r}: {err} (format ARCH-FxL[@CUTOFF][:KERNEL], e.g. "
                         f"painn-64x3@4.5:pallas)") from None


def system_spec(text: str, structures_dir: str):
    """'waterhuge:2x2x2' -> (label "waterhuge 2x2x2", path of waterhuge.extxyz, (2, 2, 2)); 'aspirin' -> (aspirin,
    its path, None). Checks the tiling's form, not the file (main checks every file before any model loads)."""
    try:
        name, reps = parse_tiled_name(text)
    except ValueError:
        raise SystemExit(f"bench/md.py: --systems {text!r}: a tiling is NAME:AxBxC with positive integers, "
                         f"e.g. waterhuge:2x2x2") from None
    label = name if reps is None else tiled_name(name, reps)
    return label, os.path.join(structures_dir, f"{name}.extxyz"), reps


def read_system(path: str, reps):
    """The first structure of `path`, tiled by `reps` (None: as it is); a tiling of a molecule is refused."""
    structure = read_structures(path)[0]
    try:
        return structure if reps is None else structure.tiled(reps)
    except StructureError as err:
        raise SystemExit(f"bench/md.py: {path}: {err}") from None


# What a kernel that does not compile or launch raises (Triton's out-of-resources errors reach JAX as these).
LAUNCH_ERRORS = (jax.errors.JaxRuntimeError, RuntimeError, ValueError)


def launch_spec(text: str) -> tuple[str, dict]:
    """'e32=32,16,4,2/32,16,4,2/16,16,4,1' -> ("e32", PallasConfig(forward=..., first=..., second=...) as a dict),
    registered in pallas_kernels.KERNELS under the name."""
    import dataclasses

    from pallas_kernels import KERNELS, pallas_set
    from pallas_kernels.edges.edge_op import KernelConfig, PallasConfig

    name, _, depths = text.partition("=")
    try:
        parts = depths.split("/")
        precision = parts.pop() if len(parts) == 4 else "tf32x3"  # a fourth part: the dot precision
        settings = [part.split(",") for part in parts]
        if not name or name in ("xla", "pallas") or len(settings) != 3 or {len(s) for s in settings} - {4, 5}:
            raise ValueError("a new name and three launch settings of four integers (and a layout)")
        configs = [KernelConfig(*(int(n) for n in s[:4]), *s[4:]) for s in settings]
        config = PallasConfig(*configs, precision=precision)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"bench/md.py: --launch {text!r}: {err} (format NAME=BE,BA,WARPS,STAGES[,LAYOUT]/x3"
                         f"[/PRECISION], e.g. e32=32,16,4,2/32,16,4,2/16,16,4,1)") from None
    KERNELS[name] = pallas_set(config)
    return name, dataclasses.asdict(config)


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
                        help="structure file names (no .extxyz), each optionally tiled: NAME:AxBxC")
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
    parser.add_argument("--launch", nargs="+", default=[], metavar="NAME=FWD/FIRST/SECOND[/PRECISION]",
                        help="Pallas kernel sets with these launch settings, for --students' :KERNEL (see above)")
    parser.add_argument("--skins", nargs="+", type=float, metavar="Å",
                        help="neighbour-list skins to time each model and system at (default: distiller.md's)")
    parser.add_argument("--profile", metavar="DIR", help="trace one more chunk per row into DIR (see above)")
    parser.add_argument("--out", help="JSON file to write (after every row)")
    args = parser.parse_args()
    if args.steps < 1 or args.steps % args.chunk:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --chunk ({args.chunk})")
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    if args.skins and min(args.skins) <= 0:
        parser.error(f"--skins must be > 0 Å, got {min(args.skins)}")
    skins = args.skins or [None]

    launches = dict(launch_spec(text) for text in args.launch)  # before --students, which may name them
    if args.students and args.run:
        parser.error("--students times fresh students; --run a trained one: give one of them")
    student_configs = ([student_spec(text, args) for text in args.students] if args.students else
                       [None if args.run else student_from_arguments(args)])
    systems = [system_spec(text, args.structures_dir) for text in args.systems]
    missing = [path for _, path, _ in systems if not os.path.isfile(path)]
    if missing:
        parser.error(f"no structure file {missing[0]}")
    structures = [(label, read_system(path, reps)) for label, path, reps in systems]  # bad input before any model
    teachers = [(teacher_kind(spec), load_model(spec)) for spec in args.teacher]
    trained = as_model(student_from_arguments(args)) if args.run else None  # once, with --kernel's kernels if given
    rows = []
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name(), "versions": versions(),
        "teachers": args.teacher,
        "students": [{"run": args.run, "kernel": args.kernel or "the run's own"} if config is None else
                     {"readout_scale": args.readout_scale, **config.to_dict()} for config in student_configs],
        "launch": launches,
        "ensemble": "nve", "initial_temperature_K": 300.0,
        "rows": rows,
    }
    for name, structure in structures:
        replicas = 1 if structure.periodic else args.replicas
        students = [("student", trained if config is None else
                     fresh_student(config, structure, args.readout_scale)) for config in student_configs]
        for (kind, model), skin in itertools.product(teachers + students, skins):
            label = name if replicas == 1 else f"{name} x{replicas}"
            tag = label if skin is None else f"{label} skin {skin:g}"
            trace = None
            if args.profile:
                trace = os.path.join(args.profile, "".join(c if c.isalnum() or c in "-." else "-"
                                                           for c in f"{tag}-{model.name}"))
            try:
                row = {"kind": kind, **md_speed(model, structure, replicas, args.steps, args.chunk, args.dt, label,
                                                trace=trace, skin=skin)}
            except (FloatingPointError, *LAUNCH_ERRORS) as err:
                # An untrained or poor student can blow up, and a launch setting of a sweep may not compile (too
                # much shared memory): say so, record it, go on with the next row.
                text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"{tag:>14} {kind:>16} failed: {text}", flush=True)
                row = {"kind": kind, "model": model.name, "system": label, "error": text}
            else:
                speed = ("no chunk ran without growing a capacity: no rate" if row["ms_per_step"] is None else
                         f"{row['ms_per_step']:9.3f} ms/step  {row['ns_per_day']:9.3f} ns/day")
                print(f"{tag:>14} {kind:>16} {row['atoms']:7d} atoms  {speed}  (warm-up {row['warmup_s']:.1f} s, "
                      f"drift {row['drift_meV_per_atom_ps']} meV/atom/ps)", flush=True)
                if "profile" in row:
                    print(kernel_table(row["profile"]), flush=True)
            rows.append(row)
            if args.out:  # after every row: a call cut short keeps what it measured
                write_json_atomic(args.out, report)
    if args.out:
        print(f"written {args.out}")
    failed = [f"{row['system']} {row['model']}" for row in rows if "error" in row]
    if failed:  # recorded and gone past, but a script running the bench must not read the run as a success
        raise SystemExit(f"bench/md.py: {len(failed)} of {len(rows)} rows failed (their errors are in the rows): "
                         + "; ".join(failed))


if __name__ == "__main__":
    main()
