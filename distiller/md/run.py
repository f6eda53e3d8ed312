"""`distiller md`: run MD from a structure file and write a trajectory, a thermo log and a summary.

    OUT/trajectory.extxyz   every `write_every` steps: positions (Å, wrapped into periodic cells), momenta
                            (ASE units), the model's energy (eV) and forces (eV/Å), info `step` and `time_fs`
    OUT/thermo.log          every `log_every` steps: step, time_fs, temperature_K, potential_eV, kinetic_eV,
                            total_eV (whitespace columns after `#` comment lines: `numpy.loadtxt` reads it)
    OUT/md.json             the command's parameters; at the end also wall time, ns/day and, for NVE, the drift;
                            after a blow-up (MDFailure) its step, time and cause under "failure"

Both files grow by one `write` per chunk (then flush and fsync), so a reader, or a killed run, sees whole
chunks only (barring a crash inside that one write call). A blown-up run keeps the logged steps up to the last
sane one and nothing after it, and exits with the failure.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import ase.io
import numpy as np

from distiller.files import write_json_atomic
from distiller.load import as_model
from distiller.md.simulate import (THERMO_COLUMNS, Dynamics, MDFailure, Records, Safety, energy_drift, frames,
                                   simulate, thermo)
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
           log_every: int = 10, write_every: int | None = None, chunk: int = 100, seed: int = 0, capacity=None,
           model_capacity=None, safety: Safety = Safety(), progress: bool = True,
           command: str | None = None) -> dict[str, Any]:
    """Run MD of structure `index` of `structure_file` and write OUT/{trajectory.extxyz, thermo.log, md.json}.

    Everything is checked (steps, intervals, the structure, the model and its elements, OUT) before anything is
    written, so a corrected command can be given the same `out`. A blow-up (see `Safety`) raises `MDFailure`
    after the steps before it were written and md.json records it."""
    write_every = log_every if write_every is None else write_every
    for name, value in (("steps", steps), ("log_every", log_every), ("write_every", write_every), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if steps % log_every or write_every % log_every:
        raise ValueError(f"steps ({steps}) and write_every ({write_every}) must be multiples of log_every "
                         f"({log_every})")
    structures = read_structures(structure_file)
    if not -len(structures) <= index < len(structures):
        raise IndexError(f"{structure_file} holds {len(structures)} structures; index {index} does not exist")
    structure = structures[index]
    model = as_model(model)
    model.check([structure])
    paths = {name: os.path.join(out, name) for name in (TRAJECTORY, THERMO, SUMMARY)}
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file; --out takes a directory")
    for name in (TRAJECTORY, THERMO):
        if os.path.exists(paths[name]):
            raise FileExistsError(f"{paths[name]} exists; choose another --out or remove it")
    os.makedirs(out, exist_ok=True)
    summary: dict[str, Any] = {
        "command": command, "model": model.name, "structure": {"file": os.path.abspath(structure_file),
                                                                "index": index, "name": structure.name,
                                                                "atoms": structure.n_atoms},
        "dynamics": dict(vars(dynamics)), "steps": steps, "log_every": log_every, "write_every": write_every,
        "chunk": chunk, "seed": seed, "safety": dict(vars(safety)),
        "units": {"energy": "eV", "length": "Å", "time": "fs", "temperature": "K"},
        "thermo_columns": list(THERMO_COLUMNS),
    }
    write_json_atomic(paths[SUMMARY], summary)
    # Written with the first chunk: a run that fails before its first step leaves no thermo.log to refuse.
    header = (f"# distiller md: {model.name} on {structure.name} ({structure.n_atoms} atoms), "
              f"{dynamics.ensemble} {dynamics.temperature} K, dt {dynamics.dt} fs\n"
              f"# {' '.join(THERMO_COLUMNS)}\n")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"md {structure.name}")
    rows, redone = [], 0
    start = time.perf_counter()
    timed_from = None  # the first chunk includes compilation; speed is measured after it
    try:
        for records in simulate(model, structure, dynamics, steps, log_every=log_every, chunk=chunk, key=seed,
                                capacity=capacity, model_capacity=model_capacity, safety=safety):
            table = thermo(records, structure.n_atoms, dynamics.dt)
            rows.append(table)
            redone += records.redone
            _append(paths[TRAJECTORY], trajectory_text(structure, records, dynamics.dt, write_every))
            _append(paths[THERMO], header + "".join(
                f"{int(r[0])} {r[1]:.3f} {r[2]:.3f} {r[3]:.6f} {r[4]:.6f} {r[5]:.6f}\n" for r in table))
            header = ""
            last_step = int(records.step[-1])
            if timed_from is None and last_step > 0:
                timed_from = (time.perf_counter(), last_step)
            if bar is not None:
                bar.update(last_step - bar.n)
                bar.set_postfix(T=f"{table[-1, 2]:.0f}K", E=f"{table[-1, 5]:.4f}eV")
    except MDFailure as failure:
        summary["wall_s"] = time.perf_counter() - start
        summary["failure"] = {"step": failure.step, "time_fs": failure.time_fs, "cause": failure.cause,
                              "last_step": failure.last_step}
        write_json_atomic(paths[SUMMARY], summary)
        raise
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    rows = np.concatenate(rows)
    summary["wall_s"] = wall
    summary["chunks_redone"] = redone  # after a capacity overflow (the neighbour list's or the model's)
    if timed_from is not None and steps > timed_from[1]:
        per_step = (time.perf_counter() - timed_from[0]) / (steps - timed_from[1])
        summary["ns_per_day"] = dynamics.dt * 1e-6 / per_step * 86400
    summary["final"] = dict(zip(THERMO_COLUMNS, rows[-1].tolist()))
    if dynamics.ensemble == "nve" and len(rows) > 1:
        summary["drift_meV_per_atom_ps"] = energy_drift(rows, structure.n_atoms)
    write_json_atomic(paths[SUMMARY], summary)
    return summary
