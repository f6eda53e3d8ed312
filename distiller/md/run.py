"""`distiller md`: run MD from a structure file and write a trajectory, a thermo log and a summary.

    OUT/trajectory.extxyz   every `write_every` steps: positions (Å, wrapped into periodic cells), momenta
                            (ASE units), the model's energy (eV) and forces (eV/Å), info `step` and `time_fs`
    OUT/thermo.log          every `log_every` steps: step, time_fs, temperature_K, potential_eV, kinetic_eV,
                            total_eV (whitespace columns after `#` comment lines: `numpy.loadtxt` reads it)
    OUT/md.json             the command's parameters; at the end also wall time, ns/day and, for NVE, the drift;
                            after a blow-up (MDFailure) its step, time and cause under "failure"

With `replicas=N` (`--replicas N`, or a `--temperatures` ladder), N replicas of the structure (seeds seed,
seed + 1, ..., each its own temperature where given) run as one program (`simulate_replicas`) and each writes
OUT/replica-K/{trajectory.extxyz, thermo.log}; the one OUT/md.json lists the replicas (seed, temperature, and
at the end each one's final thermo row and drift), and a blow-up in one replica stops all of them: every
replica's files end at the last step before the failing one, and "failure" names the replica.

Both files grow by one `write` per chunk (then flush and fsync), so a reader, or a killed run, sees whole
chunks only (barring a crash inside that one write call). A blown-up run keeps the logged steps up to the last
sane one and nothing after it, and exits with the failure.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Sequence

import ase.io
import numpy as np

from distiller.files import write_json_atomic
from distiller.load import as_model
from distiller.md.simulate import (THERMO_COLUMNS, Dynamics, MDFailure, Records, Safety, energy_drift, frames,
                                   simulate, simulate_replicas, thermo)
from distiller.structure import read_structures

TRAJECTORY = "trajectory.extxyz"
THERMO = "thermo.log"
SUMMARY = "md.json"


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def trajectory_text(structure, records: Records, dt_fs: float, every: int) -> str:
    """extxyz text of the logged steps that are multiples of `every`, with momenta."""
    buffer = io.StringIO()
    momenta = {int(s): records.momentum[k] for k, s in enumerate(records.step)}
    atoms = []
    for frame in frames(structure, records, dt_fs, every):
        a = frame.to_ase()
        a.set_momenta(np.asarray(momenta[frame.info["step"]], np.float64), apply_constraint=False)
        atoms.append(a)
    if atoms:
        ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def run_md(model, structure_file: str, out: str, dynamics: Dynamics, steps: int, *, index: int = 0,
           log_every: int = 10, write_every: int | None = None, chunk: int = 100, seed: int = 0,
           replicas: int | None = None, temperatures: Sequence[float] | None = None, capacity=None,
           model_capacity=None, safety: Safety = Safety(), progress: bool = True,
           command: str | None = None) -> dict[str, Any]:
    """Run MD of structure `index` of `structure_file` and write OUT/{trajectory.extxyz, thermo.log, md.json}.

    replicas / temperatures: N replicas in one program, written to OUT/replica-K/ (see the module docstring);
    temperatures (one per replica, K) replace dynamics.temperature, and alone imply N = len(temperatures).
    Everything is checked (steps, intervals, replicas and temperatures, the structure, the model and its
    elements, OUT) before anything is written, so a corrected command can be given the same `out`. A blow-up
    (see `Safety`) raises `MDFailure` after the steps before it were written and md.json records it."""
    write_every = log_every if write_every is None else write_every
    for name, value in (("steps", steps), ("log_every", log_every), ("write_every", write_every), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if steps % log_every or write_every % log_every:
        raise ValueError(f"steps ({steps}) and write_every ({write_every}) must be multiples of log_every "
                         f"({log_every})")
    replicated = replicas is not None or temperatures is not None
    n = replicas if replicas is not None else len(temperatures) if temperatures is not None else 1
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if temperatures is not None and len(temperatures) != n:
        raise ValueError(f"{len(temperatures)} temperatures for {n} replicas: give one temperature per replica")
    temperatures = [dynamics.temperature] * n if temperatures is None else [float(t) for t in temperatures]
    for t in temperatures:
        dataclasses.replace(dynamics, temperature=t)  # refuses a negative or non-finite one, by its value
    structures = read_structures(structure_file)
    if not -len(structures) <= index < len(structures):
        raise IndexError(f"{structure_file} holds {len(structures)} structures; index {index} does not exist")
    structure = structures[index]
    model = as_model(model)
    model.check([structure])
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file; --out takes a directory")
    directories = [os.path.join(out, f"replica-{k}") for k in range(n)] if replicated else [out]
    paths = [{name: os.path.join(d, name) for name in (TRAJECTORY, THERMO)} for d in directories]
    for replica_paths in paths:
        for path in replica_paths.values():
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists; choose another --out or remove it")
    for d in directories:
        os.makedirs(d, exist_ok=True)
    summary_path = os.path.join(out, SUMMARY)
    summary: dict[str, Any] = {
        "command": command, "model": model.name, "structure": {"file": os.path.abspath(structure_file),
                                                                "index": index, "name": structure.name,
                                                                "atoms": structure.n_atoms},
        "dynamics": dict(vars(dynamics)), "steps": steps, "log_every": log_every, "write_every": write_every,
        "chunk": chunk, "seed": seed, "safety": dict(vars(safety)),
        "units": {"energy": "eV", "length": "Å", "time": "fs", "temperature": "K"},
        "thermo_columns": list(THERMO_COLUMNS),
    }
    if replicated:
        summary["replicas"] = [{"replica": k, "directory": os.path.basename(directories[k]), "seed": seed + k,
                                "temperature_K": temperatures[k]} for k in range(n)]
    write_json_atomic(summary_path, summary)
    # Written with the first chunk: a run that fails before its first step leaves no thermo.log to refuse.
    headers = [f"# distiller md: {model.name} on {structure.name} ({structure.n_atoms} atoms), "
               f"{dynamics.ensemble} {temperatures[k]} K, dt {dynamics.dt} fs"
               + (f", replica {k} of {n} (seed {seed + k})" if replicated else "")
               + f"\n# {' '.join(THERMO_COLUMNS)}\n" for k in range(n)]

    if replicated:
        runs = simulate_replicas(model, [structure] * n, dynamics, steps, keys=[seed + k for k in range(n)],
                                 temperatures=temperatures, log_every=log_every, chunk=chunk, capacity=capacity,
                                 model_capacity=model_capacity, safety=safety)
    else:
        runs = ((records,) for records in simulate(model, structure, dynamics, steps, log_every=log_every,
                                                    chunk=chunk, key=seed, capacity=capacity,
                                                    model_capacity=model_capacity, safety=safety))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"md {structure.name}" + (f" x{n}" if replicated else ""))
    rows, redone = [[] for _ in range(n)], 0
    start = time.perf_counter()
    timed_from = None  # the first chunk includes compilation; speed is measured after it
    try:
        for chunk_records in runs:
            for k, records in enumerate(chunk_records):
                table = thermo(records, structure.n_atoms, dynamics.dt)
                rows[k].append(table)
                _append(paths[k][TRAJECTORY], trajectory_text(structure, records, dynamics.dt, write_every))
                _append(paths[k][THERMO], headers[k] + "".join(
                    f"{int(r[0])} {r[1]:.3f} {r[2]:.3f} {r[3]:.6f} {r[4]:.6f} {r[5]:.6f}\n" for r in table))
                headers[k] = ""
            redone += chunk_records[0].redone
            last_step = int(chunk_records[0].step[-1])
            if timed_from is None and last_step > 0:
                timed_from = (time.perf_counter(), last_step)
            if bar is not None:
                bar.update(last_step - bar.n)
                last = [rows[k][-1][-1] for k in range(n)]
                if n == 1:
                    bar.set_postfix(T=f"{last[0][2]:.0f}K", E=f"{last[0][5]:.4f}eV")
                else:
                    bar.set_postfix(T=f"{min(r[2] for r in last):.0f}-{max(r[2] for r in last):.0f}K")
    except MDFailure as failure:
        summary["wall_s"] = time.perf_counter() - start
        summary["failure"] = {"step": failure.step, "time_fs": failure.time_fs, "cause": failure.cause,
                              "last_step": failure.last_step}
        if replicated:
            summary["failure"] = {"replica": failure.replica, **summary["failure"]}
            summary["replicas"][failure.replica]["failure"] = dict(summary["failure"])
        write_json_atomic(summary_path, summary)
        raise
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    rows = [np.concatenate(r) for r in rows]
    summary["wall_s"] = wall
    summary["chunks_redone"] = redone  # after a capacity overflow (the neighbour list's or the model's)
    if timed_from is not None and steps > timed_from[1]:
        per_step = (time.perf_counter() - timed_from[0]) / (steps - timed_from[1])
        summary["ns_per_day"] = dynamics.dt * 1e-6 / per_step * 86400  # of each replica's trajectory
    results = []
    for table in rows:
        result = {"final": dict(zip(THERMO_COLUMNS, table[-1].tolist()))}
        if dynamics.ensemble == "nve" and len(table) > 1:
            result["drift_meV_per_atom_ps"] = energy_drift(table, structure.n_atoms)
        results.append(result)
    if replicated:
        for entry, result in zip(summary["replicas"], results):
            entry.update(result)
    else:
        summary.update(results[0])
    write_json_atomic(summary_path, summary)
    return summary
