"""The `distiller` command line: distil, profile, evaluate."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _distill(args) -> int:
    import dataclasses

    from distiller.config import load_experiment, parse_duration
    from distiller.train.loop import run

    config = load_experiment(args.experiment, args.set)
    if args.run_dir:
        config = dataclasses.replace(config, run_dir=args.run_dir)
    if args.time:
        config = dataclasses.replace(config, time_limit=parse_duration(args.time))
    run(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run directory: {config.run_dir}")
    return 0


def _profile(args) -> int:
    import jax

    from distiller.config import load_experiment
    from distiller.train.step import Distillation

    config = load_experiment(args.experiment, args.set)
    job = Distillation.create(config)
    state = job.initial_state()
    # Compile and run once outside the trace so the trace shows steady-state steps.
    state, _, _ = job.dispatch_step(state, job.seed_batch(0), job.step_key(0))
    jax.block_until_ready(state)
    os.makedirs(args.out, exist_ok=True)
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for step in range(1, args.steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics, _ = job.dispatch_step(state, job.seed_batch(step), job.step_key(step))
        jax.block_until_ready(state)
    print(f"trace of {args.steps} steps written under {args.out} (open with TensorBoard's profile plugin or ui.perfetto.dev)")
    return 0


def _evaluate(args) -> int:
    from distiller.evaluate import evaluate_run

    report = evaluate_run(args.run_dir, args.structures, teacher=args.teacher, out=args.out)
    print(json.dumps(report["summary"], indent=2))
    return 0


def _label(args) -> int:
    from distiller import label

    if args.merge:
        if args.teacher or args.structures or args.shard:
            raise SystemExit("distiller label --merge takes only the shard directories and --out")
        summary = label.merge(args.merge, args.out)
    else:
        if not args.teacher or not args.structures:
            raise SystemExit("distiller label needs --teacher and --structures (or --merge DIR...)")
        summary = label.label_dataset(args.teacher, args.structures, args.out,
                                      shard=label.parse_shard(args.shard or "0/1"), chunk=args.chunk,
                                      max_atoms=args.max_atoms, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _md(args) -> int:
    import shlex

    from distiller.md.run import run_md
    from distiller.md.simulate import Dynamics

    dynamics = Dynamics(ensemble=args.ensemble, temperature=args.temperature, dt=args.dt, thermostat=args.thermostat,
                        friction=args.friction, tau=args.tau, dr_threshold=args.skin)
    # The command as it would be typed again (from the parsed arguments: main() may be called with argv).
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet") and v is not None}
    command = "distiller md " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in options.items())
    summary = run_md(args.model, args.structure, args.out, dynamics, args.steps, index=args.index,
                     log_every=args.log_every, write_every=args.write_every, chunk=args.chunk, seed=args.seed,
                     progress=not args.quiet, command=command)
    print(json.dumps({k: summary[k] for k in ("final", "ns_per_day", "drift_meV_per_atom_ps", "wall_s")
                      if k in summary}, indent=2))
    print(f"trajectory and thermo log written under {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distiller", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a student from a teacher as an experiment file says")
    p.add_argument("experiment", help="Python file defining `config = Experiment(...)`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds checkpoints (deletes them)")
    p.add_argument("--run-dir", help="override the run directory")
    p.add_argument("--time", metavar="DURATION", help="stop (after a checkpoint) once training has run this long, "
                   "e.g. 30m or 2h; --resume continues")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_distill)

    p = sub.add_parser("profile", help="write a jax.profiler trace of N training steps")
    p.add_argument("experiment")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_profile)

    p = sub.add_parser("evaluate", help="compare a trained student with its teacher; writes report.json and plots")
    p.add_argument("run_dir")
    p.add_argument("--structures", required=True, help="structure file (ASE-readable)")
    p.add_argument("--teacher", help="teacher spec (default: the run's teacher)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/evaluation)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("label", help="label structures with a teacher into a dataset (resumable, shardable)")
    p.add_argument("--teacher", help="teacher spec, e.g. fennol-pmc:ani1x or orb:orb-v3-conservative-inf-omat")
    p.add_argument("--structures", nargs="+", metavar="FILE_OR_DATASET",
                   help="structure files (ASE-readable) and/or dataset directories, labelled in this order")
    p.add_argument("--out", required=True, help="dataset directory (created; a killed job resumes in it)")
    p.add_argument("--shard", metavar="I/N", help="label only structures k with k mod N == I (default 0/1)")
    p.add_argument("--chunk", type=int, default=64, help="structures per committed chunk (default 64)")
    p.add_argument("--max-atoms", type=int, default=4096, help="atoms per teacher batch, JAX teachers (default 4096)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="gather the shard directories of one job into --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)

    p = sub.add_parser("md", help="molecular dynamics (JAX-MD) with a teacher or a student; writes an extxyz "
                                  "trajectory and a thermo log")
    p.add_argument("--model", required=True, metavar="SPEC_OR_RUN_DIR",
                   help="teacher spec (e.g. fennol-pmc:ani1x/0) or a student run directory")
    p.add_argument("--structure", required=True, metavar="FILE", help="starting structure (ASE-readable)")
    p.add_argument("--index", type=int, default=0, help="which structure of FILE (default 0)")
    p.add_argument("--ensemble", choices=["nve", "nvt"], default="nve")
    p.add_argument("--temperature", type=float, default=300.0, metavar="K",
                   help="initial velocities (and the thermostat for nvt), default 300")
    p.add_argument("--dt", type=float, default=0.5, metavar="FS", help="time step in fs (default 0.5)")
    p.add_argument("--steps", type=int, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (trajectory.extxyz, thermo.log, md.json)")
    p.add_argument("--chunk", type=int, default=100, help="steps per compiled lax.scan chunk (default 100)")
    p.add_argument("--log-every", type=int, default=10, metavar="K", help="thermo log interval in steps (default 10)")
    p.add_argument("--write-every", type=int, metavar="M",
                   help="trajectory interval in steps, a multiple of --log-every (default: --log-every)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and Langevin noise")
    p.add_argument("--thermostat", choices=["langevin", "nose-hoover"], default="langevin", help="for nvt")
    p.add_argument("--friction", type=float, default=0.01, metavar="PER_FS", help="Langevin friction, 1/fs")
    p.add_argument("--tau", type=float, default=100.0, metavar="FS", help="Nose-Hoover time constant, fs")
    p.add_argument("--skin", type=float, default=0.5, metavar="ANGSTROM", help="neighbour-list skin (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_md)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
