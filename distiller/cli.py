"""The `distiller` command line: distil, profile, evaluate."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _distill(args) -> int:
    from distiller.config import load_experiment
    from distiller.train.trainer import run

    config = load_experiment(args.experiment, args.set)
    if args.run_dir:
        import dataclasses

        config = dataclasses.replace(config, run_dir=args.run_dir)
    run(config, resume=args.resume, progress=not args.quiet)
    print(f"run directory: {config.run_dir}")
    return 0


def _profile(args) -> int:
    import jax

    from distiller.config import load_experiment
    from distiller.train.trainer import Distillation

    config = load_experiment(args.experiment, args.set)
    job = Distillation.create(config)
    state = job.initial_state()
    step_fn = job.step_fn()
    # Compile and run once outside the trace so the trace shows steady-state steps.
    state, _, _ = step_fn(state, job.teacher_params, job.seed_batch(0), job.step_key(0))
    jax.block_until_ready(state)
    os.makedirs(args.out, exist_ok=True)
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for step in range(1, args.steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics, _ = step_fn(state, job.teacher_params, job.seed_batch(step), job.step_key(step))
        jax.block_until_ready(state)
    print(f"trace of {args.steps} steps written under {args.out} (open with TensorBoard's profile plugin or ui.perfetto.dev)")
    return 0


def _evaluate(args) -> int:
    from distiller.evaluate import evaluate_run

    report = evaluate_run(args.run_dir, args.structures, teacher_spec=args.teacher, out=args.out)
    print(json.dumps(report["summary"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distiller", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a student from a teacher as an experiment file says")
    p.add_argument("experiment", help="Python file defining `config = Experiment(...)`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run directory")
    p.add_argument("--run-dir", help="override the run directory")
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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
