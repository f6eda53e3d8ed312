"""The `distiller` command line: distill, active, profile, evaluate, label, export and md.

A command that fails prints `distiller: error: MESSAGE` and exits 2 for a usage error (a bad option or --set
value, refused before any work), 1 for any other failure; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(ValueError):
    """A command line that cannot be right (a bad --set value, options that exclude each other): exit code 2."""


def _experiment(args):
    """The experiment file's config with the --set overrides, each checked before any work."""
    from distiller.config import apply_override, load_experiment

    config = load_experiment(args.experiment)
    for item in args.set:
        try:
            config = apply_override(config, item)
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--set {item}: {_message(err)}") from err
    return config


def _distill(args) -> int:
    import dataclasses

    from distiller.config import parse_duration
    from distiller.train.loop import run

    config = _experiment(args)
    if args.run_dir:
        config = dataclasses.replace(config, run_dir=args.run_dir)
    if args.time:
        try:
            config = dataclasses.replace(config, time_limit=parse_duration(args.time))
        except ValueError as err:
            raise UsageError(f"--time: {err}") from err
    run(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run directory: {config.run_dir}")
    return 0


def _active(args) -> int:
    import dataclasses

    from distiller.config import apply_override, load_active_learning
    from distiller.train.active import ACTIVE, ROUNDS, active_learning

    # --set active.FIELD=... sets the experiment file's ActiveLearning, any other key its Experiment.
    ours = [item for item in args.set if item.strip().startswith("active.")]
    args.set = [item for item in args.set if item not in ours]
    config = _experiment(args)
    active = load_active_learning(args.experiment)
    for item in ours + ([f"rounds={args.rounds}"] if args.rounds is not None else []):
        try:
            active = apply_override(active, item.strip().removeprefix("active."))
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{'--rounds' if item.startswith('rounds=') else '--set ' + item}: {_message(err)}") \
                from err
    if args.run_dir:
        config = dataclasses.replace(config, run_dir=args.run_dir)
    rows = active_learning(config, active, progress=not args.quiet)
    print(f"{len(rows)} rounds written to {os.path.join(config.run_dir, ACTIVE, ROUNDS)}")
    return 0


def _profile(args) -> int:
    """`distiller profile EXPERIMENT` (training steps) or `distiller profile --md STRUCTURE --model MODEL` (MD
    steps): a jax.profiler trace of steady-state steps, and its device time per kernel and kind (kernels.json
    beside the trace, a table on stdout)."""
    from distiller.files import write_json_atomic
    from distiller.profiling import kernel_table

    if (args.experiment is None) == (args.md is None):
        raise UsageError("profile takes an experiment file (training steps) or --md STRUCTURE with --model MODEL "
                         "(MD steps): one of them")
    if args.md is not None and args.model is None:
        raise UsageError("profile --md needs --model (a student run directory or a teacher spec)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"{args.out} is a file; --out takes a directory")
    summary = _profile_md(args) if args.md is not None else _profile_training(args)
    folder = os.path.dirname(summary["trace"])
    path = os.path.join(folder, "kernels.json")
    write_json_atomic(path, summary)
    print(kernel_table(summary))
    print(f"trace of {args.steps} steps written to {folder} (open with TensorBoard's profile plugin, or its "
          f"perfetto_trace.json.gz with ui.perfetto.dev); device time per kernel in {path}")
    return 0


def _profile_training(args) -> dict:
    import jax

    from distiller.profiling import traced
    from distiller.train.step import Distillation

    config = _experiment(args)
    _status(args, f"setting up {config.name}: teacher {config.teacher}, student {config.student.architecture}")
    job = Distillation.create(config)
    state = job.initial_state()
    _status(args, "compiling the training step and running it once (outside the trace)")
    # Compile and run once outside the trace so the trace shows steady-state steps.
    state, _, _ = job.dispatch_step(state, job.seed_batch(0), job.step_key(0))
    jax.block_until_ready(state)

    def steps():
        nonlocal state
        for step in range(1, args.steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, _, _ = job.dispatch_step(state, job.seed_batch(step), job.step_key(step))
        return state

    _status(args, f"tracing {args.steps} steps")
    return traced(steps, args.out, args.steps)


def _profile_md(args) -> dict:
    """NVE MD from the structure at 300 K (dt 0.5 fs): a chunk of --steps to compile, one timed, one traced."""
    from distiller.load import load_model
    from distiller.speed import md_speed
    from distiller.structure import read_structures

    structures = read_structures(args.md)  # names the file when it is missing or unreadable
    model = load_model(args.model)
    replicas = args.replicas or 1
    label = os.path.basename(args.md) + (f" x{replicas}" if replicas > 1 else "")
    _status(args, f"MD of {model.name} on {label} ({replicas * structures[0].n_atoms} atoms): {args.steps} steps "
                  f"to compile, {args.steps} timed, then {args.steps} traced")
    row = md_speed(model, structures[0], replicas, args.steps, args.steps, 0.5, label, trace=args.out)
    return {**row.pop("profile"), "md": row}


MD_EVALUATION = {"index": 0, "time_ps": 10.0, "temperature": 300.0, "dt": 0.5, "seed": 0, "nve_ps": None,
                 "kernel": None}
MD_COLLECTION = ("collect", "name")  # --md: the report also as a row of a collected list (stability-<gpu>.json)


def _evaluate(args) -> int:
    from distiller.evaluate import evaluate_run

    if (args.structures is None) == (args.md is None):
        raise UsageError("distiller evaluate takes --structures FILE_OR_DATASET (accuracy) or --md STRUCTURE_FILE "
                         "(MD stability), one of them")
    if args.md is not None:
        return _evaluate_md(args)
    md_only = [f"--{name.replace('_', '-')}" for name in (*MD_EVALUATION, *MD_COLLECTION)
               if getattr(args, name) is not None]
    if md_only:
        raise UsageError(f"{', '.join(md_only)}: only with --md")
    report = evaluate_run(args.run_dir, args.structures, teacher=args.teacher, out=args.out, progress=not args.quiet)
    print(json.dumps(report["summary"], indent=2))
    out = args.out or os.path.join(args.run_dir, "evaluation")
    print(f"report written to {os.path.join(out, 'report.json')}, parity plot to {os.path.join(out, 'parity.png')}")
    return 0


def _evaluate_md(args) -> int:
    """`distiller evaluate RUN --md FILE`: the MD stability report. A student that fails in MD is a result
    (exit 0, the failure printed and recorded); bad input is an error before any MD."""
    import math
    import shlex

    from distiller.stability import evaluate_stability

    values = {name: default if getattr(args, name) is None else getattr(args, name)
              for name, default in MD_EVALUATION.items()}
    for name in ("time_ps", "temperature", "dt", "nve_ps"):
        value = values[name]
        if value is not None and not (math.isfinite(value) and (value >= 0 if name == "nve_ps" else value > 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be a number {'>=' if name == 'nve_ps' else '>'} 0, "
                             f"got {value:g}")
    if args.name is not None and args.collect is None:
        raise UsageError("--name: the student's name in a --collect list; give --collect FILE")
    if args.collect is not None and not (args.collect.endswith(".json") and os.path.isdir(
            os.path.dirname(os.path.abspath(args.collect)))):
        raise UsageError(f"--collect {args.collect}: needs a .json file in an existing directory")
    given = {"md": args.md, "teacher": args.teacher, "out": args.out,
             **{k: getattr(args, k) for k in (*MD_EVALUATION, *MD_COLLECTION) if getattr(args, k) is not None}}
    command = f"distiller evaluate {shlex.quote(args.run_dir)} " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in given.items() if v is not None)
    result = evaluate_stability(args.run_dir, args.md, teacher=args.teacher, out=args.out, progress=not args.quiet,
                                command=command, **values)
    summary = result.report["summary"]
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for role, key in (("student", "failure"), ("student (NVE)", "nve_failure"), ("teacher", "teacher_failure"),
                      ("teacher (NVE)", "teacher_nve_failure")):
        if summary[key]:
            print(f"*** the {role} FAILED in MD: {summary[key]}")
    if not (summary["failure"] or summary["nve_failure"]):
        print(f"the student ran {summary['simulated_ps']:g} ps of NVT without failure")
    print(f"stability report written to {result.report['out']}")
    if args.collect:
        from distiller.speed import device_name
        from distiller.stability import REPORT, collect_stability, stability_entry

        system = result.report["structure"]["label"]  # the file's stem, with the index where it holds several
        entry = stability_entry(result.report, args.name or os.path.basename(os.path.abspath(args.run_dir)), system,
                                kernel=values["kernel"], report=os.path.join(result.report["out"], REPORT),
                                command=command, device=device_name())
        collect_stability(args.collect, entry)
        print(f"collected in {args.collect} as ({entry['student']}, {system}, {values['temperature']:g} K)")
    return 0


def _export(args) -> int:
    from distiller.data.dataset import open_dataset
    from distiller.structure import write_structures

    if os.path.exists(args.out):
        raise FileExistsError(f"{args.out} exists; export writes a new file (remove it or choose another --out)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise FileNotFoundError(f"{os.path.dirname(os.path.abspath(args.out))}: no such directory for --out")
    dataset = open_dataset(args.dataset)
    write_structures(args.out, list(dataset))
    print(f"{len(dataset)} structures of {args.dataset} (labels of {dataset.teacher}: energy eV, forces eV/Å, "
          f"stress eV/Å³ where present) written to {args.out}")
    return 0


def _label(args) -> int:
    from distiller import label

    if args.merge:
        if args.teacher or args.structures or args.shard or args.hvp is not None or args.hvp_seed is not None:
            raise UsageError("distiller label --merge takes only the shard directories and --out")
        summary = label.merge(args.merge, args.out)
    else:
        if not args.teacher or not args.structures:
            raise UsageError("distiller label needs --teacher and --structures (or --merge DIR...)")
        if args.hvp_seed is not None and args.hvp is None:
            raise UsageError("--hvp-seed seeds the directions of --hvp K: give --hvp too")
        try:
            shard = label.parse_shard(args.shard or "0/1")
            hvp = None if args.hvp is None else label.hvp_count(args.hvp)
        except ValueError as err:
            raise UsageError(str(err)) from err
        summary = label.label_dataset(args.teacher, args.structures, args.out, shard=shard, chunk=args.chunk,
                                      max_atoms=args.max_atoms, skip_bad=args.skip_bad, hvp=hvp,
                                      hvp_seed=args.hvp_seed or 0, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _md(args) -> int:
    import math
    import shlex

    from distiller.md.run import run_md
    from distiller.md.simulate import Dynamics, Safety

    try:
        dynamics = Dynamics(ensemble=args.ensemble, temperature=args.temperature, dt=args.dt,
                            thermostat=args.thermostat, friction=args.friction, tau=args.tau, dr_threshold=args.skin)
        safety = Safety(max_temperature=args.max_temperature, max_energy_jump=args.max_energy_jump)
    except ValueError as err:
        raise UsageError(str(err)) from err
    temperatures = None
    if args.temperatures is not None:
        try:
            temperatures = [float(t) for t in args.temperatures.split(",")]
        except ValueError:
            temperatures = []
        if not temperatures or not all(math.isfinite(t) and t >= 0 for t in temperatures):
            raise UsageError(f"--temperatures {args.temperatures!r}: expected comma-separated temperatures in K "
                             f"(each >= 0), e.g. 300,400,500")
    if temperatures is not None and args.replicas is not None and len(temperatures) != args.replicas:
        raise UsageError(f"--temperatures gives {len(temperatures)} temperatures for --replicas {args.replicas}: "
                         f"give one per replica")
    # The command as it would be typed again (from the parsed arguments: main() may be called with argv).
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet", "debug") and v is not None}
    command = "distiller md " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in options.items())
    summary = run_md(args.model, args.structure, args.out, dynamics, args.steps, index=args.index,
                     log_every=args.log_every, write_every=args.write_every, chunk=args.chunk, seed=args.seed,
                     replicas=args.replicas, temperatures=temperatures, safety=safety, progress=not args.quiet,
                     command=command)
    if "replicas" in summary:
        shown = {"replicas": [{k: r[k] for k in ("replica", "seed", "temperature_K", "final", "drift_meV_per_atom_ps")
                               if k in r} for r in summary["replicas"]],
                 **{k: summary[k] for k in ("ns_per_day", "wall_s") if k in summary}}
        print(json.dumps(shown, indent=2))
        print(f"trajectories and thermo logs written under {os.path.join(args.out, 'replica-*')}")
        return 0
    print(json.dumps({k: summary[k] for k in ("final", "ns_per_day", "drift_meV_per_atom_ps", "wall_s")
                      if k in summary}, indent=2))
    print(f"trajectory and thermo log written under {args.out}")
    return 0


def _status(args, message: str) -> None:
    """A status line on stderr for a phase without a progress bar (stdout keeps the results)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _message(err: BaseException) -> str:
    """An exception as one line for `distiller: error:`; the kinds that are not errors of the input, e.g. a
    bug's TypeError, keep their name."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if isinstance(err, (ValueError, OSError, KeyError, LookupError, ImportError, FloatingPointError)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("distiller")
    except metadata.PackageNotFoundError:
        import distiller

        return getattr(distiller, "__version__", "unknown")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distiller", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distiller {_version()}")
    debug = "show the traceback of an error instead of a one-line message"
    parser.add_argument("--debug", action="store_true", help=debug)
    # Also accepted after the command; SUPPRESS keeps a command's absent flag from hiding the top-level one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add_parser("distill", help="train a student from a teacher as an experiment file says")
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

    p = add_parser("active", help="active learning: rounds of student MD checked by the teacher, the worst frames "
                                  "added to training (RUN/active/rounds.jsonl)",
                   description="Trains the experiment (or continues it), then runs rounds: the student runs NVT MD "
                               "from the seeds on a temperature ladder, the teacher labels its frames, the frames "
                               "with the largest force error (or ensemble spread) join the training pool, and "
                               "training continues. Settings: `active = ActiveLearning(...)` in the experiment "
                               "file. Run again, it continues: a killed job redoes at most its round in progress.")
    p.add_argument("experiment", help="Python file defining `config = Experiment(...)` (and `active`)")
    p.add_argument("--rounds", type=int, metavar="N", help="rounds in all (those done are kept)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: active.select=32 (ActiveLearning) or steps=200 (Experiment)")
    p.add_argument("--run-dir", help="override the run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_active)

    p = add_parser("profile", help="write a jax.profiler trace of N training steps (or MD steps, --md) and the "
                                   "device time per kernel")
    p.add_argument("experiment", nargs="?", help="Python file defining `config = Experiment(...)`: its training steps")
    p.add_argument("--md", metavar="STRUCTURE", help="profile MD steps instead (NVE, 300 K): the first structure of "
                                                     "this file, with --model")
    p.add_argument("--model", help="for --md: a student run directory or a teacher spec (fennol-pmc:ani1x/0)")
    p.add_argument("--replicas", type=_positive_int, metavar="N", help="for --md: N replicas in one program")
    p.add_argument("--steps", type=_positive_int, default=10, metavar="N",
                   help="steps traced (default 10; for --md also the chunk: a multiple of 50 logs the energy drift)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="trace directory (the trace goes to DIR/plugins/profile/TIMESTAMP/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optimizer.learning_rate=1e-3")
    p.add_argument("--quiet", action="store_true", help="no status lines")
    p.set_defaults(func=_profile)

    p = add_parser("evaluate", help="compare a trained student with its teacher: accuracy on structures "
                                    "(report.json, parity.png) or stability in MD (--md: stability.json, PNGs)",
                   description="With --structures: energy and force errors and accuracy retained on a set "
                               "(RUN_DIR/evaluation/report.json, parity.png). With --md: student and teacher run "
                               "NVT (Langevin) and NVE from the same structure with the same seed; the report "
                               "gives each model's time to failure and its cause (temperature runaway, energy "
                               "jump, a bond stretched beyond 1.5x, atoms closer than 0.5 Å), the NVE drift "
                               "(meV/atom/ps), RDFs (pair-distance distributions for molecules), bond-length and "
                               "angle distributions with L1 differences, and temperature traces "
                               "(RUN_DIR/stability/STRUCTURE/stability.json and PNGs). A student that fails in MD "
                               "is a result, not an error: the command prints the failure and exits 0.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the student's run directory (written by `distiller distill`)")
    p.add_argument("--structures", metavar="FILE_OR_DATASET",
                   help="structure file (ASE-readable) or dataset directory (`distiller label`; labelled by the "
                        "teacher, its labels are used)")
    p.add_argument("--md", metavar="STRUCTURE_FILE",
                   help="MD stability report from a structure of this file (ASE-readable) instead of --structures")
    p.add_argument("--index", type=int, help="--md: which structure of the file (default 0)")
    p.add_argument("--time-ps", type=float, metavar="PS", help="--md: NVT (and NVE) time per model (default 10)")
    p.add_argument("--nve-ps", type=float, metavar="PS", help="--md: NVE time per model (default --time-ps; 0: none)")
    p.add_argument("--temperature", type=float, metavar="K",
                   help="--md: initial velocities and thermostat (default 300)")
    p.add_argument("--dt", type=float, metavar="FS", help="--md: time step in fs (default 0.5)")
    p.add_argument("--seed", type=int, help="--md: seed of the velocities and Langevin noise, both models (default 0)")
    p.add_argument("--kernel", choices=["xla", "pallas"],
                   help="--md: the student's edge kernels (default: those it was trained with; pallas is the fast "
                        "one on a GPU)")
    p.add_argument("--collect", metavar="FILE.json",
                   help="--md: also add the report as a row of this list (one row per student, system and "
                        "temperature; e.g. bench/results/stability-h200.json)")
    p.add_argument("--name", help="--collect: the student's name in the list (default: the run directory's name)")
    p.add_argument("--teacher", help="teacher spec (default: the run's teacher)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: RUN_DIR/evaluation, or RUN_DIR/stability/STRUCTURE with --md)")
    p.add_argument("--quiet", action="store_true", help="no status lines or progress bars")
    p.set_defaults(func=_evaluate)

    p = add_parser("export", help="write a dataset as an extxyz file (energies eV, forces eV/Å, stress eV/Å³)")
    p.add_argument("dataset", metavar="DATASET", help="dataset directory (written by `distiller label`)")
    p.add_argument("--out", required=True, metavar="FILE.extxyz", help="the extxyz file (new: never overwritten)")
    p.set_defaults(func=_export)

    p = add_parser("label", help="label structures with a teacher into a dataset (resumable, shardable)")
    p.add_argument("--teacher", help="teacher spec, e.g. fennol-pmc:ani1x or orb:orb-v3-conservative-inf-omat")
    p.add_argument("--structures", nargs="+", metavar="FILE_OR_DATASET",
                   help="structure files (ASE-readable) and/or dataset directories, labelled in this order")
    p.add_argument("--out", required=True, help="dataset directory (created; a killed job resumes in it)")
    p.add_argument("--shard", metavar="I/N", help="label only structures k with k mod N == I (default 0/1)")
    p.add_argument("--chunk", type=int, default=64, help="structures per committed chunk (default 64)")
    p.add_argument("--max-atoms", type=int, default=4096, help="atoms per teacher batch, JAX teachers (default 4096)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="gather the shard directories of one job into --out")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out bad structures (listed with the reasons in OUT/rejected.json) instead of stopping")
    p.add_argument("--hvp", metavar="K", help="also K random unit directions per structure and the teacher's "
                   "Hessian-vector products along them (eV/Å², for loss.hvp_weight offline; JAX teachers only)")
    p.add_argument("--hvp-seed", type=int, metavar="S",
                   help="seed of the --hvp directions (each a function of S and the structure's index; default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)

    p = add_parser("md", help="molecular dynamics (JAX-MD) with a teacher or a student; writes an extxyz "
                              "trajectory and a thermo log")
    p.add_argument("--model", required=True, metavar="SPEC_OR_RUN_DIR",
                   help="teacher spec (e.g. fennol-pmc:ani1x/0) or a student run directory")
    p.add_argument("--structure", required=True, metavar="FILE", help="starting structure (ASE-readable)")
    p.add_argument("--index", type=int, default=0, help="which structure of FILE (default 0)")
    p.add_argument("--ensemble", choices=["nve", "nvt"], default="nve",
                   help="nve: constant energy; nvt: with the --thermostat (default nve)")
    p.add_argument("--temperature", type=float, default=300.0, metavar="K",
                   help="initial velocities (and the thermostat for nvt), default 300")
    p.add_argument("--dt", type=float, default=0.5, metavar="FS", help="time step in fs (default 0.5)")
    p.add_argument("--steps", type=_positive_int, required=True, metavar="N",
                   help="MD steps, a multiple of --log-every")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (trajectory.extxyz, thermo.log, md.json)")
    p.add_argument("--chunk", type=_positive_int, default=100, help="steps per compiled lax.scan chunk (default 100)")
    p.add_argument("--log-every", type=_positive_int, default=10, metavar="K",
                   help="thermo log interval in steps (default 10)")
    p.add_argument("--write-every", type=_positive_int, metavar="M",
                   help="trajectory interval in steps, a multiple of --log-every (default: --log-every)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and Langevin noise")
    p.add_argument("--replicas", type=_positive_int, metavar="N",
                   help="N replicas in one program (seeds SEED, SEED+1, ...), written to OUT/replica-K/; a blow-up "
                        "in one stops all and names it")
    p.add_argument("--temperatures", metavar="K,K,...",
                   help="one temperature per replica (initial velocities, and the thermostat's target for nvt), "
                        "e.g. 300,400,500; alone it sets --replicas")
    p.add_argument("--thermostat", choices=["langevin", "nose-hoover"], default="langevin", help="for nvt")
    p.add_argument("--friction", type=float, default=0.01, metavar="PER_FS", help="Langevin friction, 1/fs")
    p.add_argument("--tau", type=float, default=100.0, metavar="FS", help="Nose-Hoover time constant, fs")
    p.add_argument("--skin", type=float, default=0.5, metavar="ANGSTROM", help="neighbour-list skin (default 0.5)")
    p.add_argument("--max-temperature", type=float, metavar="K",
                   help="stop as blown up above this temperature (default 5000, or 3x --temperature if higher)")
    p.add_argument("--max-energy-jump", type=float, default=1.0, metavar="EV_PER_ATOM",
                   help="stop as blown up when the total energy changes more between logged steps (default 1.0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_md)
    return parser


def _names_torch_teacher(args) -> bool:
    """Whether the command will load a PyTorch teacher: a --teacher or --model spec, or (evaluate) the teacher of
    the run directory, read from its config.json without loading anything. (`md --model RUN` loads the student
    alone; `distill` loads its teacher through the registry, whose torch loaders apply the policy themselves.)"""
    from distiller.teachers.registry import is_torch_spec

    specs = [getattr(args, name, None) for name in ("teacher", "model")]
    run_dir = getattr(args, "run_dir", None)
    config = os.path.join(run_dir, "config.json") if isinstance(run_dir, str) else ""
    if os.path.isfile(config):
        try:
            with open(config) as f:
                specs.append(json.load(f).get("teacher"))
        except (OSError, ValueError, AttributeError):
            pass  # the command itself reports a broken run directory
    return any(is_torch_spec(spec) for spec in specs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if _names_torch_teacher(args):  # before anything initialises JAX's GPU backend (distiller.gpu_memory)
        from distiller.gpu_memory import make_room_for_torch

        make_room_for_torch()
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        print(f"distiller: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception as err:
        if args.debug:
            raise
        print(f"distiller: error: {_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
