"""Active learning: rounds of teacher-checked student trajectories (`distiller active EXPERIMENT.py`).

    rows = active_learning(config, ActiveLearning(rounds=3, steps_per_round=2000, select=16))

The experiment's own training runs first (or is resumed, or is found finished). Then round r = 1, 2, ...:

1. The run's student (RUN/best/ or its latest checkpoint: `active.checkpoint`) runs NVT (Langevin) MD from the
   seed structures: replica k is seed k mod S at temperatures[(k // S) mod T] (MDSampling's ladder), every
   replica of one atom count and pbc in one program (md.simulate_each). Blow-ups are findings, not errors: a
   replica that fails md.simulate's Safety, stretches a bond `max_stretch`x or brings atoms within
   `min_distance` (distiller.stability's criteria) has its time to failure recorded and its frames kept up to the
   last sane one; the others run on (a Safety failure stops simulate_replicas' program for every replica, so the
   others run again from their start with the same keys: the same trajectories).
2. Every `interval`-th MD step is a frame. The student's forces are the MD's own (md.frames); the teacher labels
   the frames on the host (predict.Predictor, so any teacher: FeNNol, torch, ASE). Per frame: the student's force
   RMSE against the teacher, and an ensemble teacher's energy spread per atom.
3. The `select` frames with the largest criterion ("force_error" or "ensemble_spread") are written, labelled by the
   teacher, to RUN/active/round-NNN/selected.extxyz (with frames.json: every frame's scores; round.json: the
   round's MD and error summary).
4. Training resumes (train.loop.run of the same run, `steps` grown by `steps_per_round`) with the pool added. Online
   (the teacher in the step): the selected frames of every round so far are seed structures beside the
   experiment's, rattled and labelled by the teacher inside the step like them. Offline (a dataset): each round's
   frames are labelled by distiller.label into round-NNN/dataset, and the loader reads the run's dataset followed
   by those (the run's held-out split is unchanged).
5. RUN/active/rounds.jsonl gains the round's row, which is also printed.

Why so: the pool reaches the trainer as what the trainer already reads (seed structure files, datasets labelled by
`distiller label`), through `loop.run(config, job=...)`: `config` is the experiment's, so config.json, the resume
check and the checkpoints are the run's own; the job's label source reads the pool too. No new path through the
jitted step, no new label source. The learning-rate schedule follows `steps`, as any resume with more steps does.
(MD sampling runs draw from their replica pool, not from seed structures: they are refused.)

Nothing is done twice or lost: RUN/active/.lock keeps one active job per run; a round's selection is written into
a temporary directory renamed into place (whole or absent), so a restarted job reuses a selected round and never
adds its frames twice; training resumes from its checkpoints; a round is done once its row is in rounds.jsonl
(rewritten atomically). A job killed at any point redoes at most the round in progress. RUN/active/active.json
records the settings and the step the rounds started from: a continued job may raise `rounds`, nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from distiller.config import ActiveLearning, Experiment, MDSampling, as_compared, to_dict
from distiller.data.dataset import open_dataset
from distiller.evaluate import summarise
from distiller.files import (fsync_directory, is_temporary, lock_exclusively, temporary_path, write_json_atomic,
                             write_text_atomic)
from distiller.label import label_dataset
from distiller.load import as_model
from distiller.md.simulate import Dynamics, MDFailure, Records, Safety, frames, simulate_each
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.run_directory import RunDirectory, RunDirectoryError, load_student
from distiller.stability import Bonds, Criteria, find_bonds, structural_failure
from distiller.structure import Structure, StructureError, read_structures, write_structures
from distiller.train.loop import run
from distiller.train.step import Distillation

ACTIVE = "active"  # RUN/active/
ROUNDS = "rounds.jsonl"
STATE = "active.json"
SELECTED = "selected.extxyz"
FRAMES = "frames.json"
SUMMARY = "round.json"
DATASET = "dataset"


def round_name(number: int) -> str:
    return f"round-{number:03d}"


# --------------------------------------------------------------------------------------------------
# Scores and the selection: pure functions of labelled frames


def frame_scores(student: Sequence[Structure], teacher: Sequence[Structure]) -> dict[str, np.ndarray]:
    """Per frame: "force_error", the force RMSE (eV/Å) of the student against the teacher over the frame's
    atoms and components; "ensemble_spread", the teacher's energy spread per atom (eV/atom; NaN where the teacher
    gave none: a single model)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student frames but {len(teacher)} teacher frames")
    error = np.array([np.sqrt(np.mean((np.asarray(s.forces) - np.asarray(t.forces)) ** 2))
                      for s, t in zip(student, teacher)], np.float64)
    spread = np.array([t.info.get("energy_spread", np.nan) / t.n_atoms for t in teacher], np.float64)
    return {"force_error": error, "ensemble_spread": spread}


def select(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest scores (all of them if fewer), largest first; of equal scores the earlier
    frame first. A score that is not finite is refused: it would be no ranking."""
    scores = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"frame scores must be finite to rank them, got {scores[~np.isfinite(scores)][:3]}")
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:count]


def ladder(n_seeds: int, active: ActiveLearning) -> list[tuple[int, float]]:
    """(seed index, temperature K) of every replica: replica k is seed k mod S at temperatures[(k // S) mod T]."""
    T = active.temperatures
    return [(k % n_seeds, float(T[(k // n_seeds) % len(T)])) for k in range(active.replicas)]


# --------------------------------------------------------------------------------------------------
# The student's MD


class ReplicaRun(NamedTuple):
    """One replica's MD in a round: its frames (labelled by the student, step 0 left out) and its failure
    (None: it ran all `md_steps`): {"step", "time_ps", "cause"}."""

    replica: int
    seed: int  # index into the seed structures
    temperature: float
    frames: list[Structure]
    failure: dict | None


def _head(records: Records, n: int) -> Records:
    return Records(*(np.asarray(x)[:n] for x in records[:-1]), redone=records.redone)


def student_md(student: EnergyModel, seeds: Sequence[Structure], active: ActiveLearning, key: jax.Array,
               criteria: Criteria, bonds: Sequence[Bonds]) -> list[ReplicaRun]:
    """Every replica of the ladder, the replicas of one atom count and pbc as one program."""
    layout = ladder(len(seeds), active)
    groups: dict[tuple, list[int]] = {}
    for k, (s, _) in enumerate(layout):
        groups.setdefault((seeds[s].n_atoms, tuple(np.asarray(seeds[s].pbc, bool).tolist())), []).append(k)
    out: list[ReplicaRun | None] = [None] * len(layout)
    for members in groups.values():
        runs = _replicas(student, [seeds[layout[k][0]] for k in members], [layout[k][1] for k in members],
                         [jax.random.fold_in(key, k) for k in members], active, criteria,
                         [bonds[layout[k][0]] for k in members])
        for k, (records, failure) in zip(members, runs):
            structure = seeds[layout[k][0]]
            found = [f.replace(info={**f.info, "replica": k, "temperature_K": layout[k][1]})
                     for r in records for f in frames(structure, r, active.dt, active.interval)
                     if f.info["step"] > 0]
            out[k] = ReplicaRun(k, layout[k][0], layout[k][1], found, failure)
    return out  # type: ignore[return-value]


def _replicas(student: EnergyModel, structures: list[Structure], temperatures: list[float], keys: list,
              active: ActiveLearning, criteria: Criteria, bonds: list[Bonds]) -> list[tuple[list[Records], dict | None]]:
    """(records up to the last sane logged step, failure or None) per replica, as one program. A replica that
    breaks a bond or a contact runs on, its later steps ignored; one that fails the Safety rule stops the
    program, and the replicas that had not failed run again from their start without it."""
    results: list[Any] = [None] * len(structures)
    alive = list(range(len(structures)))
    while alive:
        kept: dict[int, list[Records]] = {k: [] for k in alive}
        failed: dict[int, dict] = {}
        stopped = False
        dynamics = Dynamics("nvt", temperature=temperatures[alive[0]], dt=active.dt, friction=active.friction)
        options = {} if len(alive) == 1 else {"temperatures": [temperatures[k] for k in alive]}
        md = simulate_each(student, [structures[k] for k in alive], dynamics, active.md_steps,
                           keys=[keys[k] for k in alive], log_every=active.interval, safety=criteria.safety, **options)
        try:
            for records in md:
                for j, k in enumerate(alive):
                    if k in failed:
                        continue
                    found = structural_failure(records[j].position, structures[k], bonds[k], criteria)
                    if found is None:
                        kept[k].append(records[j])
                        continue
                    index, cause = found
                    kept[k].append(_head(records[j], index))
                    step = int(records[j].step[index])
                    failed[k] = {"step": step, "time_ps": step * active.dt / 1000.0, "cause": cause}
        except MDFailure as err:
            stopped = True
            k = alive[err.replica or 0]
            failed.setdefault(k, {"step": err.step, "time_ps": err.time_fs / 1000.0, "cause": err.cause})
        finally:
            md.close()
        for k, failure in failed.items():
            results[k] = (kept[k], failure)
        if not stopped:
            for k in alive:
                if k not in failed:
                    results[k] = (kept[k], None)
            break
        alive = [k for k in alive if k not in failed]
    return results


# --------------------------------------------------------------------------------------------------
# The pool, as the trainer reads it


def training_job(config: Experiment, directories: Sequence[str]) -> Distillation:
    """The Distillation of `config` whose label source also reads the selected frames of the round directories
    `directories` (see the module docstring)."""
    if not config.dataset:
        files = tuple(os.path.join(d, SELECTED) for d in directories if os.path.exists(os.path.join(d, SELECTED)))
        return Distillation.create(dataclasses.replace(config, structures=config.structures + files))
    job = Distillation.create(config)
    job.data.add_training([open_dataset(os.path.join(d, DATASET)) for d in directories
                           if os.path.isdir(os.path.join(d, DATASET))])
    return job


# --------------------------------------------------------------------------------------------------
# The job


def seed_structures(config: Experiment, active: ActiveLearning) -> list[Structure]:
    """The MD seeds: active.structures, else the experiment's structures; refused by name before any work if there
    are none or the student cannot take them."""
    paths = active.structures or config.structures
    if not paths:
        raise ValueError(f"experiment {config.name!r}: active learning needs seed structures for its MD: set "
                         "active.structures (an offline run has no `structures`)")
    seeds = [s for path in paths for s in read_structures(path)]
    if not seeds:
        raise ValueError(f"active learning: no structures in {', '.join(paths)}")
    known = set(int(z) for z in config.student.elements)
    for s in seeds:
        unknown = sorted(set(s.numbers.tolist()) - known)
        if unknown:
            raise StructureError(f"{s.name}: elements {unknown} are not among the student's "
                                 f"(student.elements {sorted(known)})")
    return seeds


def check(config: Experiment, active: ActiveLearning) -> list[Structure]:
    """Refuse what cannot work, before any work (one line naming the field or structure); the seeds."""
    if isinstance(config.sampling, MDSampling):
        raise ValueError(f"experiment {config.name!r}: active learning adds frames to the structures the step draws "
                         "from; sampling=MDSampling(...) draws from its replica pool instead: use rattled seeds "
                         "(sampling=SamplingConfig(...)) or a dataset")
    return seed_structures(config, active)


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except ValueError:
        raise RunDirectoryError(f"{path}: not JSON lines (it is rewritten whole, so it was altered)") from None


def _started(directory: str, active: ActiveLearning, base_steps: int | None) -> int:
    """The step the rounds start from: active.json's (its settings must be `active`'s but for RESUMABLE), or, on
    the first call, `base_steps`, recorded with the settings."""
    path = os.path.join(directory, STATE)
    wanted = {k: v for k, v in to_dict(active).items() if k not in ActiveLearning.RESUMABLE}
    if not os.path.exists(path):
        write_json_atomic(path, {"base_steps": base_steps, "active": wanted})
        return int(base_steps)
    with open(path) as f:
        stored = json.load(f)
    changed = [k for k in sorted(set(stored["active"]) | set(wanted))
               if as_compared(k, stored["active"].get(k)) != as_compared(k, wanted.get(k))]
    if changed:
        differences = "; ".join(f"active.{k} {stored['active'].get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        raise RunDirectoryError(f"{path}: the active-learning job continues with other settings: {differences}; only "
                                f"{', '.join('active.' + k for k in ActiveLearning.RESUMABLE)} may change")
    return int(stored["base_steps"])


def active_learning(config: Experiment, active: ActiveLearning, progress: bool = True) -> list[dict]:
    """Run (or continue) the active-learning rounds of the run in `config.run_dir`; returns rounds.jsonl's rows.

    The experiment's training first (a fresh run, a resume, or nothing if it is finished), then rounds up to
    `active.rounds` (those done already are kept). Bad settings or seeds are refused before any work."""
    seeds = check(config, active)
    teacher = as_model(config.teacher)
    if active.criterion == "ensemble_spread" and teacher.n_members < 2:
        raise ValueError(f"active.criterion='ensemble_spread' needs an ensemble teacher; {config.teacher} is one "
                         "model (no spread): use criterion='force_error' or an ensemble spec")
    teacher.check(seeds)
    # Offline with the HVP term: each round's frames are labelled with as many stored products as the run's dataset.
    hvp = open_dataset(config.dataset).hvp_directions if config.dataset and config.loss.weighs("hvp") else None
    if hvp and teacher.host_only:
        raise ValueError(f"loss.hvp_weight offline: the rounds' frames need Hessian-vector products and teacher "
                         f"{config.teacher} is computed outside JAX (first derivatives only): use a JAX teacher")
    run_dir = RunDirectory(config.run_dir)
    directory = run_dir.file(ACTIVE)
    os.makedirs(directory, exist_ok=True)
    lock = lock_exclusively(os.path.join(directory, ".lock"))
    if lock is None:
        raise RunDirectoryError(f"{directory}: another active-learning job is using this run (it holds "
                                f"{os.path.join(directory, '.lock')}); wait for it to finish or stop it")
    try:
        for name in os.listdir(directory):  # a killed job's half-written round (we hold the lock)
            if is_temporary(name):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        if not os.path.exists(os.path.join(directory, STATE)):
            run(config, resume=True, progress=progress)  # the experiment's own training, or its end
            if not _trained_to(run_dir, config.steps, config.name):
                return []
        base = _started(directory, active, run_dir.latest_step())
        rows_path = os.path.join(directory, ROUNDS)
        rows = _read_rows(rows_path)
        criteria = Criteria(max_stretch=active.max_stretch, min_distance=active.min_distance,
                            safety=Safety(max_temperature=active.max_temperature,
                                          max_energy_jump=active.max_energy_jump))
        bonds = [find_bonds(s, criteria.bond_factor) for s in seeds]
        for number in range(len(rows) + 1, active.rounds + 1):
            here = os.path.join(directory, round_name(number))
            if not os.path.isdir(here):
                _select(config, active, teacher, seeds, criteria, bonds, number, here, progress, hvp)
            with open(os.path.join(here, SUMMARY)) as f:
                summary = json.load(f)
            target = base + number * active.steps_per_round
            t0 = time.perf_counter()
            trained = dataclasses.replace(config, steps=target)
            rounds = [os.path.join(directory, round_name(k)) for k in range(1, number + 1)]
            run(trained, resume=True, progress=progress, job=training_job(trained, rounds))
            if not _trained_to(run_dir, target, config.name):
                break
            row = {**summary, "pool": sum(r["selected"] for r in rows) + summary["selected"],
                   "training_steps": active.steps_per_round, "steps": target,
                   "train_seconds": round(time.perf_counter() - t0, 3)}
            rows.append(row)
            write_text_atomic(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
            print(round_line(config.name, active.rounds, row), flush=True)
    finally:
        lock.close()
    return rows


def _trained_to(run_dir: RunDirectory, steps: int, name: str) -> bool:
    """Whether the run reached `steps`; if not (config.time_limit stopped it) say how to continue: a round's
    MD must not start from a student whose training stopped short."""
    done = run_dir.latest_step() or 0
    if done < steps:
        print(f"{name}: training stopped at step {done} of {steps} (time limit): run the same command again to "
              "continue the active-learning job", flush=True)
    return done >= steps


def _select(config: Experiment, active: ActiveLearning, teacher: EnergyModel, seeds: list[Structure],
            criteria: Criteria, bonds: list[Bonds], number: int, here: str, progress: bool,
            hvp: int | None = None) -> None:
    """Round `number`'s MD, labels and selection, written to `here` whole or not at all."""
    run_dir = RunDirectory(config.run_dir)
    latest = run_dir.latest_step()
    best = run_dir.read_best() if active.checkpoint == "best" else None
    student = load_student(config.run_dir, step=None if best else latest)
    student_step = int(best["step"]) if best else latest
    say = (lambda line: print(f"{config.name}: round {number}: {line}", flush=True)) if progress else (lambda _: None)
    say(f"the student of step {student_step} runs {active.md_steps} MD steps of {active.dt:g} fs in each of "
        f"{active.replicas} replicas ({min(active.temperatures):g}-{max(active.temperatures):g} K)")
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(config.seed), number)
    replicas = student_md(student, seeds, active, key, criteria, bonds)
    md_seconds = time.perf_counter() - t0
    student_frames = [f for r in replicas for f in r.frames]
    for k, f in enumerate(student_frames):
        student_frames[k] = f.replace(info={**f.info, "active_round": number})
    say(f"{len(replicas)} replicas, {len(student_frames)} frames in {md_seconds:.0f} s "
        f"({sum(r.failure is not None for r in replicas)} failed); the teacher labels them")
    t0 = time.perf_counter()
    teacher_frames = Predictor(teacher)(student_frames) if student_frames else []
    scores = frame_scores(student_frames, teacher_frames)
    chosen = select(scores[active.criterion], active.select) if student_frames else np.zeros(0, np.int64)
    failures = [{"replica": r.replica, "structure": seeds[r.seed].name, "temperature_K": r.temperature, **r.failure}
                for r in replicas if r.failure is not None]
    summary = {"round": number, "student_step": student_step, "replicas": len(replicas),
               "md_ps": active.md_steps * active.dt / 1000.0, "frames": len(student_frames),
               **({k: v for k, v in summarise(student_frames, teacher_frames).items()
                   if k in ("forces_mae", "forces_rmse", "accuracy_retained", "energy_mae_per_atom")}
                  if student_frames else {"forces_mae": None, "forces_rmse": None, "accuracy_retained": None,
                                          "energy_mae_per_atom": None}),
               "time_to_failure_ps": min((f["time_ps"] for f in failures), default=None), "failures": failures,
               "criterion": active.criterion, "selected": int(len(chosen)),
               "selected_scores": [float(scores[active.criterion][k]) for k in chosen],
               "md_seconds": round(md_seconds, 3)}
    tmp = temporary_path(here)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    picked = set(chosen.tolist())
    write_json_atomic(os.path.join(tmp, FRAMES), [
        {"name": f.name, "replica": f.info["replica"], "temperature_K": f.info["temperature_K"],
         "step": f.info["step"], "force_error": float(scores["force_error"][k]),
         "ensemble_spread": None if np.isnan(scores["ensemble_spread"][k]) else float(scores["ensemble_spread"][k]),
         "selected": k in picked} for k, f in enumerate(student_frames)])
    if len(chosen):
        selected = [teacher_frames[k].replace(info={
            **teacher_frames[k].info, "force_error": float(scores["force_error"][k])}) for k in chosen]
        write_structures(os.path.join(tmp, SELECTED), selected)
        if config.dataset:  # offline: a dataset labelled as `distiller label` labels, for the loader
            # with `hvp`, the run's K stored products per frame; the round's number seeds their directions
            label_dataset(teacher, [os.path.join(tmp, SELECTED)], os.path.join(tmp, DATASET), hvp=hvp,
                          hvp_seed=number, progress=progress)
    summary["label_seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(os.path.join(tmp, SUMMARY), summary)
    os.rename(tmp, here)
    fsync_directory(os.path.dirname(here))


def round_line(name: str, rounds: int, row: dict) -> str:
    """A round's row as one printed line."""
    if row["frames"]:
        error = (f"force MAE {row['forces_mae']:.3f} eV/Å, accuracy retained {100 * row['accuracy_retained']:.1f} % "
                 f"on its {row['frames']} frames")
    else:
        error = "no frame before every replica failed"
    if row["failures"]:
        first = min(row["failures"], key=lambda f: f["time_ps"])
        md = (f"{len(row['failures'])} of {row['replicas']} replicas failed, the first (replica {first['replica']}, "
              f"{first['temperature_K']:g} K) after {first['time_ps']:g} ps: {first['cause']}")
    else:
        md = f"no failure in {row['replicas']} replicas x {row['md_ps']:g} ps"
    return (f"{name}: active round {row['round']}/{rounds}: student of step {row['student_step']}: {error}; {md}; "
            f"{row['selected']} frames selected (pool {row['pool']}); trained {row['training_steps']} steps to step "
            f"{row['steps']}")
