"""Teacher against student speed, measured the same way in one process.

Each model's time is one call of a jitted function that rebuilds the neighbour list from positions and
returns energies and forces (what an MD step needs), after warm-up, the median of `repeats` calls, with
`block_until_ready`. For a FeNNol teacher, FeNNol's own `energy_and_forces` (its GPU preprocessing path,
first member) is timed too, and the speed-up is taken against the faster of the two teacher paths.
"""

from __future__ import annotations

import math
import platform
import re
import sys
import time
from importlib import metadata
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distiller import batch as batching
from distiller.capacity import make_batch
from distiller.model import EnergyModel
from distiller.structure import Structure


def call_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> np.ndarray:
    """Wall seconds of `repeats` calls of fn() with the result ready, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return float(np.median(call_seconds(fn, repeats, warmup)))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "fennol", "torch", "orb-models", "sevenn", "jax-md", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def device_kind() -> str:
    """The device's model in a file name's form ("h200" for an NVIDIA H200; "cpu"): results files are
    `bench/results/NAME-<kind>.json`."""
    d = jax.devices()[0]
    return kind_of(getattr(d, "device_kind", d.platform))


def kind_of(device_kind: str) -> str:
    """"NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100" (the model, not the memory), "cpu" -> "cpu":
    the first word (split at spaces and hyphens) of letters then digits, else the last word."""
    words = re.split(r"[\s-]+", device_kind.strip())
    models = [w for w in words if re.fullmatch(r"[A-Za-z]+\d+[A-Za-z]?", w)]
    return (models[0] if models else words[-1]).lower()


def add_student_arguments(parser) -> None:
    """The student options every bench script takes: a trained run, or a fresh student of a given size
    (by default SchNet 64x3 with 24 basis functions: the quickstart's until 2026-12-03, the student of the
    earlier speed results in bench/results)."""
    parser.add_argument("--run", help="trained student run directory (default: a fresh student of the size below)")
    parser.add_argument("--architecture", default="schnet", help="student architecture of a fresh student")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--n-rbf", type=int, default=24)
    parser.add_argument("--kernel", choices=["xla", "pallas"],
                        help="edge kernels (default: xla for a fresh student, the run's own for --run)")


def student_from_arguments(args, elements: Sequence[int] = (1, 6, 7, 8)):
    """The run directory of --run (loaded with --kernel where one is given), else the student config the size
    options describe (`sized_student`)."""
    if args.run:
        if args.kernel is None:
            return args.run
        from distiller.run_directory import load_student

        return load_student(args.run, kernel=args.kernel)
    return sized_student(args.architecture, cutoff=args.cutoff, features=args.features, layers=args.layers,
                         n_rbf=args.n_rbf, kernel=args.kernel or "xla", elements=elements)


def sized_student(architecture: str, *, cutoff: float, features: int, layers: int, n_rbf: int, kernel: str,
                  elements: Sequence[int] = (1, 6, 7, 8)):
    """The config of `architecture` with these sizes, those it has (a ValueError for an unknown architecture or
    sizes it refuses)."""
    import dataclasses

    from distiller.students import config_class

    cls = config_class(architecture)
    sizes = {"features": features, "layers": layers, "n_rbf": n_rbf}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(cutoff=cutoff, elements=tuple(elements), kernel=kernel,
               **{k: v for k, v in sizes.items() if k in names})


def fresh_student(config, structures: Sequence[Structure]) -> EnergyModel:
    """A student of `config` with random weights (speed does not depend on them), shaped on `structures`."""
    from distiller.students import init_params, student_model

    probe, _ = make_batch(structures, config.cutoff)
    return student_model(config, init_params(config, jax.random.key(0), probe), name="fresh student")


def model_timer(model: EnergyModel, structures: Sequence[Structure], stress: bool = False):
    """A no-argument function computing the model's energies and forces (and stress) of the structures, batched
    together, neighbour list included: what an MD step needs."""
    from distiller import capacity as capacities
    from distiller.predict import batch_predictions

    batch = jax.tree.map(jnp.asarray, batching.pad_structures(structures))
    cutoff = float(model.cutoff)

    def run(capacity):
        out, needed = batch_predictions(model, model.params, batch, capacity, cutoff, stress)
        return needed, out.overflow

    _, capacity, _ = capacities.until_fits(
        run, capacities.allocate(model, batch, cutoff),
        lambda c, needed, _: capacities.grow(model, c, batch, cutoff, needed), what=f"timing {model.name}")
    return lambda: batch_predictions(model, model.params, batch, capacity, cutoff, stress)[0]


def fennol_native_timer(model: EnergyModel, structures: Sequence[Structure]):
    """FeNNol's own API on its first member: preprocessing on the device (`gpu_preprocessing=True`); None for
    other models, and for batches mixing periodic and non-periodic systems (FeNNol takes cells for all or none)."""
    from distiller.teachers.fennol import FennolTeacher

    if not isinstance(model.source, FennolTeacher):
        return None
    fennol = model.source.model
    numbers = np.concatenate([s.numbers for s in structures]).astype(np.int32)
    inputs = {
        "species": numbers,
        "coordinates": np.concatenate([s.positions for s in structures]).astype(np.float32),
        "natoms": np.array([s.n_atoms for s in structures], np.int32),
        "batch_index": np.repeat(np.arange(len(structures), dtype=np.int32), [s.n_atoms for s in structures]),
    }
    if all(s.periodic for s in structures):
        inputs["cells"] = np.stack([s.cell for s in structures]).astype(np.float32)
    elif any(s.periodic for s in structures):
        return None
    fennol.energy_and_forces(**inputs)  # numpy preprocessing once: FeNNol sizes its buffers here
    return lambda: fennol.energy_and_forces(gpu_preprocessing=True, **inputs)[:2]


def compare_speed(teacher: EnergyModel | str, student, systems: Mapping[str, Sequence[Structure]], repeats: int = 20,
                  native: bool = True, on_row: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """Time teacher and student on each system (a name and its structures, batched together).

    `student` is a run directory, an EnergyModel or a student config (random weights: speed does not depend on
    them). native: also time FeNNol's own API (one more compilation per system). on_row: called with the report
    so far after each system (a long run cut short keeps what it measured). progress: a status line on stderr
    per system (each one compiles both models first).
    """
    from distiller.load import as_model
    from distiller.students import StudentConfig

    teacher = as_model(teacher)
    if isinstance(student, StudentConfig):
        student = fresh_student(student, next(iter(systems.values())))
    student = as_model(student)
    rows = []
    report = {
        "device": device_name(),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "teacher": teacher.name,
        "student": student.source.to_dict(),
        "repeats": repeats,
        "results": rows,
    }
    for name, structures in systems.items():
        atoms = sum(s.n_atoms for s in structures)
        if progress:
            print(f"timing teacher and student on {name} ({atoms} atoms, {repeats} calls each after compiling)",
                  file=sys.stderr, flush=True)
        teacher_s = median_seconds(model_timer(teacher, structures), repeats)
        student_s = median_seconds(model_timer(student, structures), repeats)
        row = {"system": name, "structures": len(structures), "atoms": atoms,
               "teacher_ms": 1e3 * teacher_s, "student_ms": 1e3 * student_s,
               "teacher_us_per_atom": 1e6 * teacher_s / atoms, "student_us_per_atom": 1e6 * student_s / atoms}
        best_teacher = teacher_s
        native_fn = fennol_native_timer(teacher, structures) if native else None
        if native_fn is not None:
            native_s = median_seconds(native_fn, repeats)
            row["fennol_native_one_member_ms"] = 1e3 * native_s
            if teacher.n_members == 1:
                best_teacher = min(best_teacher, native_s)
        row["speedup"] = best_teacher / student_s
        rows.append(row)
        if on_row is not None:
            on_row(report)
    return report


def md_speed(model: EnergyModel, structure: Structure, replicas: int, steps: int, chunk: int, dt: float,
             system: str, trace: str | None = None, skin: float | None = None) -> dict:
    """MD speed: run chunk (warm-up, compiles) + steps NVE steps of `replicas` copies of `structure` (one: `simulate`);
    time the `steps`.

    A chunk whose neighbour list overflowed was redone with larger capacities, i.e. recompiled: its wall time
    is compilation, not integration, so the rate comes from the chunks that ran once (all of them, usually).
    trace: a folder: one more chunk runs under the profiler after the timed ones (not timed with them); the row's
    `profile` is its `distiller.profiling.summarise` (device time per kernel and kind, per step).
    skin: the neighbour list's skin in Å (None: distiller.md's default). A thinner one holds fewer edges but
    rebuilds more often; the rate includes the rebuilds.
    """
    from distiller.md import Dynamics, energy_drift, simulate_each, thermo
    from distiller.md.potential import DEFAULT_SKIN
    from distiller.profiling import traced

    skin = DEFAULT_SKIN if skin is None else float(skin)
    dynamics = Dynamics("nve", temperature=300.0, dt=dt, dr_threshold=skin)
    log_every = math.gcd(chunk, 50)  # the thermo log (for the drift) every 50 steps where the chunk allows
    timed = chunk + steps
    runs = simulate_each(model, [structure] * replicas, dynamics, timed + (chunk if trace else 0),
                         keys=list(range(replicas)), log_every=log_every, chunk=chunk)
    rows, chunks = [[] for _ in range(replicas)], []

    def keep(records):
        for k, r in enumerate(records):
            rows[k].append(thermo(r, structure.n_atoms, dt))
        return records

    start = last = time.perf_counter()
    warmup = None
    for records in runs:
        keep(records)
        now = time.perf_counter()
        if records[0].step[-1] > 0:
            if warmup is None:
                warmup = now - start
            else:
                chunks.append((now - last, len(records[0].step) * log_every, records[0].redone))
        last = now
        if records[0].step[-1] >= timed:
            break
    profile = None
    if trace:
        traced_records = []
        profile = traced(lambda: traced_records.append(keep(next(runs))), trace, chunk)
        # A chunk redone with grown capacities holds a compilation and both attempts' kernels: say so.
        profile["chunk_redone"] = bool(traced_records[0][0].redone)
    rows = [np.concatenate(r) for r in rows]
    clean = [(t, n) for t, n, redone in chunks if not redone]
    atoms = replicas * structure.n_atoms
    # No chunk ran once (every one grew a capacity, e.g. a fresh student's molecule drifting apart): no rate.
    per_step = sum(t for t, _ in clean) / sum(n for _, n in clean) if clean else None
    rate = (lambda f: None if per_step is None else f(per_step))
    drifts = [energy_drift(r, structure.n_atoms) for r in rows] if len(rows[0]) >= 5 else None
    row = {
        "model": model.name, "system": system,
        "atoms": atoms, "replicas": replicas, "dt_fs": dt, "skin_A": skin, "steps": steps, "chunk": chunk,
        "warmup_s": warmup,
        "ms_per_step": rate(lambda t: 1e3 * t), "ns_per_day": rate(lambda t: dt * 1e-6 / t * 86400),
        "aggregate_ns_per_day": rate(lambda t: replicas * dt * 1e-6 / t * 86400),
        "us_per_atom_step": rate(lambda t: 1e6 * t / atoms),
        "chunks_timed": len(clean), "chunks_redone": sum(1 for *_, redone in chunks if redone),
        "final_temperature_K": float(np.mean([r[-1, 2] for r in rows])),
        "drift_meV_per_atom_ps": None if drifts is None else float(np.median(drifts)),
    }
    if replicas > 1:
        row["largest_drift_meV_per_atom_ps"] = None if drifts is None else float(np.max(np.abs(drifts)))
    if profile is not None:
        row["profile"] = profile
    return row


def table(report: dict) -> str:
    lines = [f"device {report['device']}, teacher {report['teacher']}, student {report['student']}",
             f"{'system':<16}{'atoms':>7}{'teacher ms':>12}{'µs/atom':>9}{'student ms':>12}{'µs/atom':>9}"
             f"{'native ms':>11}{'speed-up':>10}"]
    for r in report["results"]:
        native = r.get("fennol_native_one_member_ms")
        lines.append(f"{r['system']:<16}{r['atoms']:>7}{r['teacher_ms']:>12.3f}{r['teacher_us_per_atom']:>9.3f}"
                     f"{r['student_ms']:>12.3f}{r['student_us_per_atom']:>9.3f}"
                     f"{(f'{native:.3f}' if native is not None else '-'):>11}{r['speedup']:>9.1f}x")
    return "\n".join(lines)
