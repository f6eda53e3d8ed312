"""Is a student stable in MD? Student and teacher run the same MD, and the report compares what they do.

    result = stability_report(student, teacher, structure, time_ps=10, temperature=300, dt=0.5, seed=0)
    result.report      # JSON-able: time to failure and its cause, NVE drift, distribution differences
    write_stability(result, "runs/x/stability/aspirin")   # stability.json and PNGs
    evaluate_stability("runs/x", "aspirin.extxyz")          # what `distiller evaluate RUN --md FILE` runs
    collect_stability("stability-h200.json", stability_entry(result.report, "name", "aspirin"))   # one row

Each model runs NVT (Langevin) from the structure, then NVE from the teacher's last kept NVT frame (equilibrated,
so that NVE measures drift, not the start's relaxation; the structure itself if the teacher's NVT failed), both
models from the same start with the same seed: the same initial velocities and, under NVT, the same noise, so a
student identical to its teacher gives identical trajectories, and any difference is the student's. Every run
is integrated in `lax.scan` chunks by `distiller.md.simulate`, which stops at its own `Safety` failures
(temperature runaway, energy jump, non-finite values: `MDFailure`); between chunks this module checks the
structural criteria on every logged step of the chunk, and stops integrating a model at its first failing step
(the generator is closed: no step after it is computed):

- a bond stretched beyond `max_stretch` (1.5x) its start length; bonds are the pairs closer than `bond_factor`
  (1.2x) the sum of their covalent radii (`ase.data.covalent_radii`) at the start, minimum image in cells;
- two atoms closer than `min_distance` (0.5 Å), periodic images included.

A failing student is a result, not an error: it is recorded with its step, time and cause as one line, and the
comparison uses the sane part of each trajectory.

A stopped report loses no finished MD run: `evaluate_stability` keeps each in OUT/runs/<role>-<ensemble>.npz
with the fingerprint of its model (weights and configuration), structure and settings, and a later call with
the same ones takes it back instead of integrating it again (`run_fingerprint`, `save_trajectory`,
`load_trajectory`).

Distributions compare the NVT trajectories after `discard_ps` (default a tenth of the run) of equilibration,
from at most `max_frames` logged frames evenly spaced:

- periodic cells: the radial distribution function g_ab(r) of every element pair, all periodic images within
  `r_max` (so r_max may exceed half the cell), normalised so that g -> 1 for an ideal gas: count of (i in a,
  j in b, i != j) pairs in the shell over N_a (N_b, or N_a - 1 for a == b) / V times the shell's volume;
- molecules (no cell, no density): the pair-distance distribution of every element pair, a probability density
  in 1/Å normalised to the number of pairs (distances beyond its range count, outside it, as missing mass);
- bond lengths per bond type and bond angles (j-i-k for bonds i-j and i-k) per angle type, from the start's
  bonds, probability densities (1/Å, 1/degree) of unit area.

Every difference is L1 = ∫|p_student - p_teacher| dx / ∫ p_teacher dx over the histogram's range: 0 for equal
distributions, 2 for disjoint normalised ones (for g(r) it is relative to the teacher's ∫g dr).

NVE energy drift: the least-squares slope of the total energy, meV/atom/ps (`distiller.md.energy_drift`), over
the sane part of the NVE run. Units at the boundary: eV, Å, fs for steps and ps for times, K.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
from ase.data import chemical_symbols, covalent_radii

from distiller.files import lock_exclusively, write_bytes_atomic, write_json_atomic
from distiller.load import as_model
from distiller.md.simulate import THERMO_COLUMNS, Dynamics, MDFailure, Safety, energy_drift, simulate, thermo
from distiller.model import EnergyModel
from distiller.run_directory import RunDirectory, load_student
from distiller.structure import Structure, read_structures

REPORT = "stability.json"
KEPT = "runs"  # OUT/runs/<role>-<ensemble>.npz: the finished MD runs of `evaluate_stability`
LOCK = ".lock"  # OUT/.lock: held by the report writing there
FIGURES = {"temperature": "temperature.png", "pairs": "rdf.png", "bonds": "bonds.png"}


# --------------------------------------------------------------------------------------------------
# Criteria


@dataclasses.dataclass(frozen=True)
class Criteria:
    """When a model's MD has failed: `safety` (simulate's own checks) and the structural limits."""

    bond_factor: float = 1.2  # pairs closer than this x the sum of covalent radii at the start are bonds
    max_stretch: float = 1.5  # a bond longer than this x its start length is broken
    min_distance: float = 0.5  # Å: atoms closer than this have collided
    safety: Safety = Safety()

    def __post_init__(self):
        if not self.bond_factor > 0 or not self.max_stretch > 1 or not self.min_distance > 0:
            raise ValueError(f"invalid stability criteria: bond_factor={self.bond_factor} (> 0), max_stretch="
                             f"{self.max_stretch} (> 1), min_distance={self.min_distance} Å (> 0)")


def _symbol(z: int) -> str:
    return chemical_symbols[int(z)]


def _images(cell: np.ndarray) -> np.ndarray:
    """(27, 3) Cartesian lattice vectors n @ cell, n in {-1, 0, 1}^3."""
    n = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    return n.astype(np.float64) @ cell


def minimum_image_vectors(vectors: np.ndarray, cell: np.ndarray | None) -> np.ndarray:
    """The shortest periodic images (..., 3) of difference vectors (..., 3) in Å; the vectors themselves for
    molecules (cell None). Fractional rounding, then the 27 neighbouring images (exact for skewed cells too,
    for vectors shorter than the cell's smallest width)."""
    vectors = np.asarray(vectors, np.float64)
    if cell is None:
        return vectors
    cell = np.asarray(cell, np.float64)
    fractional = vectors @ np.linalg.inv(cell)
    reduced = (fractional - np.round(fractional)) @ cell
    candidates = reduced[..., None, :] + _images(cell)  # (..., 27, 3)
    nearest = np.argmin(np.linalg.norm(candidates, axis=-1), axis=-1)
    return np.take_along_axis(candidates, nearest[..., None, None], axis=-2)[..., 0, :]


def minimum_image(vectors: np.ndarray, cell: np.ndarray | None) -> np.ndarray:
    """Lengths (...,) of the shortest periodic images of difference vectors (..., 3) in Å
    (`minimum_image_vectors`); plain lengths for molecules (cell None)."""
    return np.linalg.norm(minimum_image_vectors(vectors, cell), axis=-1)


def _cell(structure: Structure) -> np.ndarray | None:
    return np.asarray(structure.cell, np.float64) if structure.periodic else None


def _pairs_within(positions: np.ndarray, structure: Structure, cutoff: float):
    """(i, j, vector) of every pair i < j (periodic images included) closer than `cutoff` Å; vector is
    R[j] - R[i] plus the image's lattice vector. Molecules use a k-d tree (any extent: a molecule's atoms may
    have flown apart); so do rectangular cells up to half their shortest side (one image per pair; 15 times
    faster than ASE's neighbour list on 1500 waters); other cells ASE's neighbour list (their atoms are
    wrapped into the cell)."""
    from scipy.spatial import cKDTree

    positions = np.asarray(positions, np.float64)
    if not structure.periodic:
        pairs = cKDTree(positions).query_pairs(cutoff, output_type="ndarray").reshape(-1, 2)
        i, j = pairs[:, 0], pairs[:, 1]
        return i, j, positions[j] - positions[i]
    cell = np.asarray(structure.cell, np.float64)
    sides = np.diag(cell)
    if np.all(structure.pbc) and np.all(cell == np.diag(sides)) and cutoff < 0.5 * sides.min():
        wrapped = positions % sides
        wrapped = np.where(wrapped >= sides, 0.0, wrapped)  # x % L can round to L itself
        pairs = cKDTree(wrapped, boxsize=sides).query_pairs(cutoff, output_type="ndarray").reshape(-1, 2)
        i, j = pairs[:, 0], pairs[:, 1]
        vector = positions[j] - positions[i]
        return i, j, vector - np.round(vector / sides) * sides
    from ase.neighborlist import primitive_neighbor_list

    i, j, D = primitive_neighbor_list("ijD", np.asarray(structure.pbc), np.asarray(structure.cell, np.float64),
                                      positions, cutoff, self_interaction=False)
    keep = i < j
    return i[keep], j[keep], D[keep]


class Bonds(NamedTuple):
    """The bonds of a start structure: atom pairs, their start lengths (Å), and the angles between bonds."""

    pairs: np.ndarray  # (B, 2) int, i < j
    length: np.ndarray  # (B,) Å at the start
    angles: np.ndarray  # (A, 3) int: (j, i, k), the angle at i between bonds i-j and i-k, j < k


def find_bonds(structure: Structure, factor: float = 1.2) -> Bonds:
    """Pairs closer than `factor` x the sum of their covalent radii (minimum image in cells), and the angles
    they make at shared atoms."""
    numbers = np.asarray(structure.numbers)
    radii = covalent_radii[numbers]
    i, j, vector = _pairs_within(structure.positions, structure, factor * 2.0 * float(radii.max()))
    length = np.linalg.norm(vector, axis=-1)
    bonded = length < factor * (radii[i] + radii[j])
    pairs = np.unique(np.stack([i[bonded], j[bonded]], axis=1).reshape(-1, 2), axis=0)  # one image per pair
    lengths = minimum_image(structure.positions[pairs[:, 1]] - structure.positions[pairs[:, 0]], _cell(structure))
    partners: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    angles = [(j, centre, k) for centre, others in sorted(partners.items())
              for n, j in enumerate(sorted(others)) for k in sorted(others)[n + 1:]]
    return Bonds(pairs.astype(np.int64), lengths, np.asarray(angles, np.int64).reshape(-1, 3))


def _unwrapped(frames: np.ndarray, structure: Structure) -> np.ndarray:
    """Frames (R, N, 3) made continuous from the first: each atom moved by its minimum image displacement
    since frame 0 (periodic atoms are wrapped into the cell by the integrator). Exact while atoms move less
    than half a cell between frame 0 and the last."""
    frames = np.asarray(frames, np.float64)
    if not structure.periodic:
        return frames
    cell = np.asarray(structure.cell, np.float64)
    fractional = (frames - frames[:1]) @ np.linalg.inv(cell)
    return frames[:1] + (fractional - np.round(fractional)) @ cell


def contact_failure(frames: np.ndarray, structure: Structure, min_distance: float = 0.5,
                    max_reach: float = 4.0) -> tuple[int, str] | None:
    """(index, cause) of the first frame (R, N, 3) in which two atoms are closer than `min_distance` Å
    (periodic images included), or None.

    Verlet's trick, so that a chunk costs one pair search, not one per frame: any pair closer than d in some
    frame was closer than d + 2 max_displacement in the first; only those pairs are measured in every frame.
    Frames in which atoms moved too far for that (the search would reach beyond `max_reach` Å) are split."""
    frames = np.asarray(frames, np.float64)
    if len(frames) == 0:
        return None
    unwrapped = _unwrapped(frames, structure)
    displacement = float(np.max(np.linalg.norm(unwrapped - unwrapped[:1], axis=-1)))
    reach = min_distance + 2.0 * displacement
    if reach > max_reach and len(frames) > 1:
        half = len(frames) // 2
        first = contact_failure(frames[:half], structure, min_distance, max_reach)
        if first is not None:
            return first
        later = contact_failure(frames[half:], structure, min_distance, max_reach)
        return None if later is None else (later[0] + half, later[1])
    i, j, vector = _pairs_within(frames[0], structure, max(reach, min_distance) * (1 + 1e-9))
    if len(i) == 0:
        return None
    # The pair's image fixed at frame 0 (its lattice vector), followed through the continuous positions.
    image = vector - (frames[0, j] - frames[0, i])
    distance = np.linalg.norm(unwrapped[:, j] - unwrapped[:, i] + image, axis=-1)  # (R, P)
    close = distance < min_distance
    if not close.any():
        return None
    k = int(np.flatnonzero(close.any(axis=1))[0])
    p = int(np.argmin(np.where(close[k], distance[k], np.inf)))
    a, b = int(i[p]), int(j[p])
    numbers = structure.numbers
    return k, (f"atoms {_symbol(numbers[a])}{a} and {_symbol(numbers[b])}{b} are {distance[k, p]:.2f} Å apart "
               f"(limit {min_distance:g} Å)")


def bond_failure(frames: np.ndarray, structure: Structure, bonds: Bonds, max_stretch: float = 1.5
                 ) -> tuple[int, str] | None:
    """(index, cause) of the first frame (R, N, 3) in which a bond is longer than `max_stretch` x its start
    length (minimum image), or None."""
    frames = np.asarray(frames, np.float64)
    if len(frames) == 0 or len(bonds.pairs) == 0:
        return None
    i, j = bonds.pairs[:, 0], bonds.pairs[:, 1]
    stretch = minimum_image(frames[:, j] - frames[:, i], _cell(structure)) / bonds.length  # (R, B)
    broken = stretch > max_stretch
    if not broken.any():
        return None
    k = int(np.flatnonzero(broken.any(axis=1))[0])
    b = int(np.argmax(stretch[k]))
    numbers = structure.numbers
    return k, (f"bond {_symbol(numbers[i[b]])}{i[b]}-{_symbol(numbers[j[b]])}{j[b]} stretched to "
               f"{stretch[k, b] * bonds.length[b]:.2f} Å, {stretch[k, b]:.2f}x its start {bonds.length[b]:.2f} Å "
               f"(limit {max_stretch:g}x)")


def structural_failure(frames: np.ndarray, structure: Structure, bonds: Bonds, criteria: Criteria = Criteria()
                       ) -> tuple[int, str] | None:
    """(index, cause) of the first frame that breaks a bond or brings atoms into contact, or None."""
    found = [f for f in (bond_failure(frames, structure, bonds, criteria.max_stretch),
                         contact_failure(frames, structure, criteria.min_distance)) if f is not None]
    return min(found, key=lambda f: f[0]) if found else None


# --------------------------------------------------------------------------------------------------
# Trajectories


class Trajectory(NamedTuple):
    """One model's MD run as the report needs it: every logged step's thermo row, the positions of every
    `stride`-th logged step (for distributions), and the failure (None: it ran to the end)."""

    rows: np.ndarray  # (R, 6) THERMO_COLUMNS, up to the last sane logged step
    frames: np.ndarray  # (F, N, 3) Å
    frame_steps: np.ndarray  # (F,) int
    failure: dict | None  # step, time_ps, cause, criterion, last_step, line
    wall_s: float


def run_trajectory(model: EnergyModel, structure: Structure, dynamics: Dynamics, steps: int, *, log_every: int,
                   chunk: int, seed: int, criteria: Criteria, bonds: Bonds, stride: int = 1, label: str = "",
                   progress: bool = False) -> Trajectory:
    """MD of `model` from `structure`, stopped at its first failing logged step (simulate's `Safety`, then the
    bond and contact criteria between chunks)."""
    rows, frames, frame_steps, failure = [], [], [], None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc=label or model.name, file=sys.stderr)
    start = time.perf_counter()
    run = simulate(model, structure, dynamics, steps, log_every=log_every, chunk=chunk, key=seed,
                   safety=criteria.safety)
    where = f"{label or model.name} on {structure.name}"
    last_step = None  # the last logged step handed on as sane
    try:
        for records in run:
            found = structural_failure(records.position, structure, bonds, criteria)
            n = len(records.step) if found is None else found[0]
            table = thermo(records, structure.n_atoms, dynamics.dt)[:n]
            rows.append(table)
            keep = [k for k in range(n) if (int(records.step[k]) // log_every) % stride == 0]
            frames.extend(np.asarray(records.position[k], np.float64) for k in keep)
            frame_steps.extend(int(records.step[k]) for k in keep)
            if n:
                last_step = int(records.step[n - 1])
                if bar is not None:
                    bar.update(last_step - bar.n)
                    bar.set_postfix(T=f"{table[-1, 2]:.0f}K")
            if found is not None:
                step = int(records.step[found[0]])
                failure = _failure(MDFailure(where, step, step * dynamics.dt, found[1], last_step),
                                   "bond" if found[1].startswith("bond") else "contact")
                break
    except MDFailure as err:
        failure = _failure(err.within(where), "safety")
    finally:
        run.close()  # a failed model is not integrated further
        if bar is not None:
            bar.close()
    rows = np.concatenate(rows) if rows else np.zeros((0, len(THERMO_COLUMNS)))
    frames = np.stack(frames) if frames else np.zeros((0, structure.n_atoms, 3))
    return Trajectory(rows, frames, np.asarray(frame_steps, np.int64), failure, time.perf_counter() - start)


# A finished MD run is kept as KEPT/<role>-<ensemble>.npz, so that a report stopped by a kill or a time limit (a
# 100 ps student run and the teacher's may not fit one job) does not integrate it again. The file holds its
# settings' fingerprint: a later call takes it back only for the same model (name and weights), structure,
# dynamics, steps, logging, seed and criteria, and integrates afresh otherwise.


def run_fingerprint(model: EnergyModel, structure: Structure, dynamics: Dynamics, steps: int, **settings) -> str:
    """sha256 of everything a run's trajectory depends on: the model's name, source (a student's configuration
    and kernels) and weights, the structure, the dynamics, the step count and `settings` (logging, chunk, seed,
    stride, criteria: their reprs)."""
    digest = hashlib.sha256()
    described = {"model": [model.name, repr(model.source)],
                 "structure": [structure.name, structure.numbers.tolist()], "dynamics": repr(dynamics),
                 "steps": steps, **{k: repr(v) for k, v in sorted(settings.items())}}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for array in (structure.positions, structure.cell, structure.pbc, *jax.tree.leaves(model.params)):
        digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    return digest.hexdigest()


def save_trajectory(path: str, trajectory: Trajectory, fingerprint: str) -> None:
    """Atomically: the trajectory and its fingerprint."""
    buffer = io.BytesIO()
    np.savez(buffer, rows=trajectory.rows, frames=trajectory.frames, frame_steps=trajectory.frame_steps,
             wall_s=trajectory.wall_s, failure=json.dumps(trajectory.failure), fingerprint=fingerprint)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def load_trajectory(path: str, fingerprint: str) -> Trajectory | None:
    """The trajectory kept at `path` if it was run with these settings (fingerprint), else None."""
    if not os.path.isfile(path):
        return None
    with np.load(path) as archive:
        if str(archive["fingerprint"]) != fingerprint:
            return None
        return Trajectory(archive["rows"], archive["frames"], archive["frame_steps"],
                          json.loads(str(archive["failure"])), float(archive["wall_s"]))


def _failure(failure: MDFailure, criterion: str) -> dict:
    return {"step": failure.step, "time_ps": failure.time_fs / 1000.0, "cause": failure.cause,
            "criterion": criterion, "last_step": failure.last_step, "line": str(failure)}


# --------------------------------------------------------------------------------------------------
# Distributions


class Histogram(NamedTuple):
    """A distribution on bins: centres x, the two models' densities, and their L1 difference."""

    x: np.ndarray
    student: np.ndarray
    teacher: np.ndarray
    l1: float | None  # None where the teacher has no weight in range (nothing to compare with)


def l1_difference(student: np.ndarray, teacher: np.ndarray, width: float) -> float | None:
    """∫|p_s - p_t| dx / ∫ p_t dx on bins of `width`; None when the teacher's integral is zero."""
    norm = float(np.sum(teacher) * width)
    return float(np.sum(np.abs(student - teacher)) * width / norm) if norm > 0 else None


def _pair_name(a: int, b: int) -> str:
    a, b = sorted((int(a), int(b)), key=lambda z: _symbol(z))
    return f"{_symbol(a)}-{_symbol(b)}"


def element_pairs(numbers: np.ndarray) -> list[tuple[int, int]]:
    """Every element pair present (an element with itself only where it has two atoms), in symbol order."""
    numbers = np.asarray(numbers)
    present = sorted(set(numbers.tolist()), key=_symbol)
    counts = {z: int(np.sum(numbers == z)) for z in present}
    return [(a, b) for n, a in enumerate(present) for b in present[n:] if a != b or counts[a] > 1]


def radial_distribution(frames: np.ndarray, structure: Structure, r_max: float, bins: int
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(r centres, {"O-H": g(r)}) over the frames (F, N, 3) of a periodic structure, all images within r_max,
    g -> 1 for an ideal gas (see the module docstring)."""
    numbers = np.asarray(structure.numbers)
    edges = np.linspace(0.0, r_max, bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    volume = abs(float(np.linalg.det(structure.cell)))
    pairs = element_pairs(numbers)
    counts = {pair: np.zeros(bins) for pair in pairs}
    for positions in frames:
        i, j, vector = _pairs_within(positions, structure, r_max)
        distance = np.linalg.norm(vector, axis=-1)
        for a, b in pairs:
            mask = ((numbers[i] == a) & (numbers[j] == b)) | ((numbers[i] == b) & (numbers[j] == a))
            counts[(a, b)] += np.histogram(distance[mask], edges)[0]
    out = {}
    for a, b in pairs:
        n_a, n_b = int(np.sum(numbers == a)), int(np.sum(numbers == b))
        ordered = 2.0 * counts[(a, b)] if a == b else counts[(a, b)]  # each unordered pair counted once above
        ideal = n_a * ((n_a - 1) if a == b else n_b) / volume * shell * max(len(frames), 1)
        out[_pair_name(a, b)] = ordered / ideal
    return 0.5 * (edges[1:] + edges[:-1]), out


def pair_distance_distribution(frames: np.ndarray, structure: Structure, r_max: float, bins: int
                               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(r centres, {"C-H": p(r)}) over the frames (F, N, 3) of a molecule: densities in 1/Å normalised to the
    number of pairs of each type (distances beyond r_max are missing mass)."""
    numbers = np.asarray(structure.numbers)
    edges = np.linspace(0.0, r_max, bins + 1)
    width = edges[1] - edges[0]
    i, j = np.triu_indices(len(numbers), k=1)
    out = {}
    frames = np.asarray(frames, np.float64)
    distance = np.linalg.norm(frames[:, j] - frames[:, i], axis=-1) if len(frames) else np.zeros((0, len(i)))
    for a, b in element_pairs(numbers):
        mask = ((numbers[i] == a) & (numbers[j] == b)) | ((numbers[i] == b) & (numbers[j] == a))
        values = distance[:, mask].ravel()
        out[_pair_name(a, b)] = np.histogram(values, edges)[0] / max(values.size, 1) / width
    return 0.5 * (edges[1:] + edges[:-1]), out


def _density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(values, edges)[0] / max(values.size, 1) / (edges[1] - edges[0])


def bond_geometry(frames: np.ndarray, structure: Structure, bonds: Bonds) -> tuple[dict, dict]:
    """Bond lengths (F, B) Å and angles (F, A) degrees of the frames, grouped by type: ({"C-H": lengths},
    {"C-O-H": angles}); an angle type names its centre in the middle, its ends in symbol order."""
    frames = np.asarray(frames, np.float64)
    numbers = np.asarray(structure.numbers)
    cell = _cell(structure)
    lengths, angles = {}, {}
    if len(bonds.pairs):
        i, j = bonds.pairs[:, 0], bonds.pairs[:, 1]
        values = minimum_image(frames[:, j] - frames[:, i], cell) if len(frames) else np.zeros((0, len(i)))
        for b, (a, c) in enumerate(zip(numbers[i], numbers[j])):
            lengths.setdefault(_pair_name(a, c), []).append(values[:, b])
    if len(bonds.angles):
        j, i, k = bonds.angles.T
        u, v = _bond_vectors(frames, j, i, cell), _bond_vectors(frames, k, i, cell)
        cosine = np.sum(u * v, axis=-1) / np.maximum(np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1), 1e-12)
        values = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
        for n, (a, centre, c) in enumerate(zip(numbers[j], numbers[i], numbers[k])):
            ends = sorted((_symbol(a), _symbol(c)))
            angles.setdefault(f"{ends[0]}-{_symbol(centre)}-{ends[1]}", []).append(values[:, n])
    stack = lambda groups: {name: np.stack(v, axis=1) for name, v in sorted(groups.items())}
    return stack(lengths), stack(angles)


def _bond_vectors(frames: np.ndarray, to: np.ndarray, centre: np.ndarray, cell: np.ndarray | None) -> np.ndarray:
    """Minimum-image vectors from atoms `centre` to atoms `to`, (F, A, 3)."""
    vectors = frames[:, to] - frames[:, centre]
    if cell is None:
        return vectors
    fractional = vectors @ np.linalg.inv(cell)
    reduced = (fractional - np.round(fractional)) @ cell
    candidates = reduced[..., None, :] + _images(cell)
    best = np.argmin(np.linalg.norm(candidates, axis=-1), axis=-1)
    return np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]


def compare_distributions(student: np.ndarray, teacher: np.ndarray, structure: Structure, bonds: Bonds, *,
                          r_max: float = 6.0, r_bins: int = 300) -> dict[str, dict[str, Histogram]]:
    """{"pairs": {...}, "bond_lengths": {...}, "angles": {...}} of Histograms, student frames against teacher
    frames (each (F, N, 3)); the histogram ranges are set by the start structure, the same for both. Where
    either side has no frames (a model that failed before the sampled part), the L1 differences are None."""
    out: dict[str, dict[str, Histogram]] = {"pairs": {}, "bond_lengths": {}, "angles": {}}
    both = len(student) > 0 and len(teacher) > 0

    def histogram(x, p_s, p_t, width):
        return Histogram(x, p_s, p_t, l1_difference(p_s, p_t, width) if both else None)

    if structure.periodic:
        x, g_s = radial_distribution(student, structure, r_max, r_bins)
        _, g_t = radial_distribution(teacher, structure, r_max, r_bins)
    else:
        span = float(np.max(minimum_image(structure.positions[:, None] - structure.positions[None], None)))
        x, g_s = pair_distance_distribution(student, structure, 1.25 * span + 1.0, r_bins)
        _, g_t = pair_distance_distribution(teacher, structure, 1.25 * span + 1.0, r_bins)
    for name in g_t:
        out["pairs"][name] = histogram(x, g_s[name], g_t[name], float(x[1] - x[0]))
    lengths_s, angles_s = bond_geometry(student, structure, bonds)
    lengths_t, angles_t = bond_geometry(teacher, structure, bonds)
    start = bond_geometry(np.asarray(structure.positions)[None], structure, bonds)[0]
    for name in lengths_t:
        edges = np.linspace(0.75 * float(start[name].min()), 1.5 * float(start[name].max()), 151)
        out["bond_lengths"][name] = histogram(0.5 * (edges[1:] + edges[:-1]), _density(lengths_s[name], edges),
                                              _density(lengths_t[name], edges), edges[1] - edges[0])
    edges = np.linspace(0.0, 180.0, 181)
    for name in angles_t:
        out["angles"][name] = histogram(0.5 * (edges[1:] + edges[:-1]), _density(angles_s[name], edges),
                                        _density(angles_t[name], edges), 1.0)
    return out


# --------------------------------------------------------------------------------------------------
# The report


class StabilityResult(NamedTuple):
    """The JSON-able report and what its plots need."""

    report: dict
    trajectories: dict[str, Trajectory]  # "student nvt", "teacher nvt", "student nve", "teacher nve"
    distributions: dict[str, dict[str, Histogram]]


def _steps(time_ps: float, dt: float, log_every: int) -> int:
    """Steps covering time_ps, a whole number of logged intervals."""
    return max(1, math.ceil(round(time_ps * 1000.0 / dt, 6) / log_every)) * log_every


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"stability report: {name} must be a number > 0, got {value!r}")


def _nve_start(structure: Structure, teacher_nvt: Trajectory, dt: float) -> tuple[Structure, str]:
    """Where both models' NVE starts, and what that is: the teacher's last kept NVT frame (equilibrated at the
    thermostat's temperature, so the run measures drift, not relaxation), else (the teacher failed, or kept no
    frame after the start) the structure itself."""
    if teacher_nvt.failure is None and len(teacher_nvt.frame_steps) and teacher_nvt.frame_steps[-1] > 0:
        step = int(teacher_nvt.frame_steps[-1])
        return (dataclasses.replace(structure, positions=np.asarray(teacher_nvt.frames[-1], np.float64),
                                    name=f"{structure.name} (teacher NVT at {step * dt / 1000:g} ps)",
                                    energy=None, forces=None, stress=None),
                f"the teacher's NVT frame at step {step} ({step * dt / 1000:g} ps)")
    return structure, "the structure (the teacher's NVT kept no sane frame after its start)"


def stability_report(student, teacher, structure: Structure, *, time_ps: float, temperature: float = 300.0,
                     dt: float = 0.5, seed: int = 0, nve_ps: float | None = None, friction: float = 0.01,
                     log_fs: float = 5.0, chunk_fs: float = 500.0, discard_ps: float | None = None,
                     max_frames: int = 500, r_max: float = 6.0, criteria: Criteria = Criteria(),
                     status: Callable[[str], None] | None = None, progress: bool = False,
                     kept: str | None = None) -> StabilityResult:
    """Student and teacher (EnergyModels, specs or run directories) in NVT (Langevin at `temperature` K,
    `friction` 1/fs) for `time_ps` from `structure` and NVE for `nve_ps` (default: time_ps; 0: none) from the
    teacher's last NVT frame, each with the same seed; see the module docstring for what is compared. log_fs:
    interval of the logged (checked) steps; chunk_fs: MD time per compiled chunk (checks between chunks);
    discard_ps: NVT equilibration left out of the distributions (default time_ps / 10); max_frames: frames per
    distribution; r_max: RDF range (periodic). status: called with a line per phase; progress: a tqdm bar per
    MD run (stderr). kept: a directory where each finished MD run is kept and whence a later call with the same
    settings takes it back (None: nothing kept)."""
    say = status or (lambda message: None)
    for name, value in (("time_ps", time_ps), ("temperature", temperature), ("dt", dt), ("log_fs", log_fs),
                        ("chunk_fs", chunk_fs), ("r_max", r_max), ("friction", friction)):
        _positive(name, value)
    nve_ps = time_ps if nve_ps is None else nve_ps
    discard_ps = 0.1 * time_ps if discard_ps is None else discard_ps
    if not 0 <= nve_ps or not 0 <= discard_ps < time_ps or not max_frames >= 2:
        raise ValueError(f"stability report: need nve_ps >= 0 (got {nve_ps}), 0 <= discard_ps < time_ps (got "
                         f"{discard_ps} and {time_ps}), max_frames >= 2 (got {max_frames})")
    student, teacher = as_model(student), as_model(teacher)
    structure = structure.validated()
    for model in (student, teacher):
        model.check([structure])
    from distiller.md.potential import space

    space(structure)  # refuses partly periodic cells before any work
    log_every = max(1, round(log_fs / dt))
    chunk = max(1, round(chunk_fs / dt / log_every)) * log_every
    runs = {"nvt": (Dynamics("nvt", temperature=temperature, dt=dt, thermostat="langevin", friction=friction),
                    _steps(time_ps, dt, log_every)),
            "nve": (Dynamics("nve", temperature=temperature, dt=dt), _steps(nve_ps, dt, log_every) if nve_ps else 0)}
    first_frame = math.ceil(round(discard_ps * 1000.0 / dt, 6) / log_every)  # the first sampled logged step
    stride = max(1, math.ceil((runs["nvt"][1] // log_every + 1 - first_frame) / max_frames))
    bonds = find_bonds(structure, criteria.bond_factor)

    trajectories, nve_start, nve_from = {}, None, None
    for ensemble, (dynamics, steps) in runs.items():
        if ensemble == "nve" and steps:
            nve_start, nve_from = _nve_start(structure, trajectories["teacher nvt"], dt)
        for role, model in (("student", student), ("teacher", teacher)):
            if steps == 0:
                continue
            label = f"{role} {ensemble}"
            start = nve_start if ensemble == "nve" else structure
            path = os.path.join(kept, f"{role}-{ensemble}.npz") if kept else None
            fingerprint = run_fingerprint(model, start, dynamics, steps, log_every=log_every, chunk=chunk,
                                          seed=seed, criteria=criteria, stride=stride) if kept else None
            trajectory = load_trajectory(path, fingerprint) if kept else None
            if trajectory is not None:
                say(f"{label}: {model.name}, {steps} steps, kept from an earlier call ({path})")
            else:
                say(f"{label}: {model.name}, {steps} steps of {dt:g} fs ({steps * dt / 1000:g} ps) from "
                    f"{temperature:g} K on {start.name}")
                trajectory = run_trajectory(model, start, dynamics, steps, log_every=log_every, chunk=chunk,
                                            seed=seed, criteria=criteria, bonds=bonds, stride=stride, label=label,
                                            progress=progress)
                if kept:
                    save_trajectory(path, trajectory, fingerprint)
            trajectories[label] = trajectory
            failure = trajectories[label].failure
            if failure is not None:
                say(f"{label} FAILED: {failure['line']}")

    say("comparing distributions")
    sampled = {role: trajectories[f"{role} nvt"].frames[trajectories[f"{role} nvt"].frame_steps
                                                         >= first_frame * log_every]
               for role in ("student", "teacher")}
    distributions = compare_distributions(sampled["student"], sampled["teacher"], structure, bonds, r_max=r_max)
    md = {"time_ps": time_ps, "nve_ps": nve_ps, "nve_from": nve_from, "temperature_K": temperature, "dt_fs": dt,
          "seed": seed,
          "thermostat": "langevin", "friction_per_fs": friction, "log_every": log_every, "chunk_steps": chunk,
          "same_seed": "student and teacher start from the same velocities and, under NVT, get the same noise"}
    sampling = {"frames": {role: len(frames) for role, frames in sampled.items()}, "discarded_ps": discard_ps,
                "frame_interval_ps": stride * log_every * dt / 1000.0}
    report = _report(student, teacher, structure, trajectories, runs, distributions, bonds, criteria, md, sampling)
    return StabilityResult(report, trajectories, distributions)


def _run_summary(trajectory: Trajectory, steps: int, dynamics: Dynamics, n_atoms: int) -> dict:
    rows, failure = trajectory.rows, trajectory.failure
    out = {"steps": steps, "simulated_ps": float(rows[-1, 1] / 1000.0) if len(rows) else 0.0,
           "time_to_failure_ps": None if failure is None else failure["time_ps"], "failure": failure,
           "mean_temperature_K": float(np.mean(rows[:, 2])) if len(rows) else None,
           "max_temperature_K": float(np.max(rows[:, 2])) if len(rows) else None, "wall_s": trajectory.wall_s}
    if dynamics.ensemble == "nve":
        out["drift_meV_per_atom_ps"] = energy_drift(rows, n_atoms) if len(rows) > 1 else None
        out["max_excursion_meV_per_atom"] = (float(np.max(np.abs(rows[:, 5] - rows[0, 5]))) * 1000.0 / n_atoms
                                             if len(rows) else None)
    return out


def _report(student: EnergyModel, teacher: EnergyModel, structure: Structure, trajectories: dict, runs: dict,
            distributions: dict, bonds: Bonds, criteria: Criteria, md: dict, sampling: dict) -> dict:
    models = {}
    for role, model in (("student", student), ("teacher", teacher)):
        models[role] = {"name": model.name}
        for ensemble, (dynamics, steps) in runs.items():
            if f"{role} {ensemble}" in trajectories:
                models[role][ensemble] = _run_summary(trajectories[f"{role} {ensemble}"], steps, dynamics,
                                                      structure.n_atoms)

    def table(kind: str) -> dict:
        return {name: {"l1": h.l1, **_means(h)} for name, h in distributions[kind].items()}

    def line(role: str, ensemble: str) -> str | None:
        failure = models[role].get(ensemble, {}).get("failure")
        return None if failure is None else failure["line"]

    pairs = table("pairs")
    worst = max(((v["l1"], k) for k, v in pairs.items() if v["l1"] is not None), default=(None, None))
    kind = "rdf" if structure.periodic else "pair-distance"
    lengths, angles = bond_geometry(np.asarray(structure.positions)[None], structure, bonds)
    x = next(iter(distributions["pairs"].values())).x if distributions["pairs"] else None
    return {
        "summary": {
            "student": student.name, "teacher": teacher.name, "system": structure.name,
            "simulated_ps": models["student"]["nvt"]["simulated_ps"],
            "time_to_failure_ps": models["student"]["nvt"]["time_to_failure_ps"],
            "failure": line("student", "nvt"), "nve_failure": line("student", "nve"),
            "teacher_failure": line("teacher", "nvt"), "teacher_nve_failure": line("teacher", "nve"),
            "rdf_l1": worst[0], "rdf_l1_pair": worst[1], "distribution": kind,
            "drift_meV_per_atom_ps": models["student"].get("nve", {}).get("drift_meV_per_atom_ps"),
            "teacher_drift_meV_per_atom_ps": models["teacher"].get("nve", {}).get("drift_meV_per_atom_ps"),
        },
        "structure": {"name": structure.name, "atoms": structure.n_atoms, "periodic": structure.periodic,
                      "bonds": int(len(bonds.pairs)), "angles": int(len(bonds.angles)),
                      "bond_types": {k: int(v.shape[1]) for k, v in lengths.items()},
                      "angle_types": {k: int(v.shape[1]) for k, v in angles.items()}},
        "md": md,
        "criteria": {"bond_factor": criteria.bond_factor, "max_stretch": criteria.max_stretch,
                     "min_distance_A": criteria.min_distance,
                     "max_temperature_K": criteria.safety.temperature_limit(runs["nvt"][0]),
                     "max_energy_jump_eV_per_atom": criteria.safety.max_energy_jump,
                     "checked": "every logged step: temperature, energy jump and finiteness (MD safety), bonds "
                                "stretched beyond max_stretch x their start length (bonds: pairs within "
                                "bond_factor x the sum of covalent radii at the start), atoms closer than "
                                "min_distance_A; a failed model is not integrated further"},
        "models": models,
        "distributions": {
            "kind": kind, **sampling,
            "normalisation": ("L1 = ∫|p_student - p_teacher| dx / ∫ p_teacher dx over the range; "
                              + ("g(r): all periodic images within r_max, g -> 1 for an ideal gas"
                                 if structure.periodic else
                                 "a molecule has no density: pair-distance distributions (1/Å, normalised to "
                                 "the number of pairs) instead of g(r)")
                              + "; bond lengths (1/Å) and angles (1/degree) normalised to unit area"),
            "r_max_A": None if x is None else float(x[-1] + 0.5 * (x[1] - x[0])),
            "pairs": pairs, "bond_lengths": table("bond_lengths"), "angles": table("angles"),
        },
        "units": {"energy": "eV", "length": "Å", "time": "ps (steps in fs)", "temperature": "K",
                  "drift": "meV/atom/ps", "angles": "degrees"},
    }


def _means(h: Histogram) -> dict:
    """The mean of each density over its range (bond lengths, angles): a readable summary of a shift."""
    def mean(p):
        return float(np.sum(p * h.x) / np.sum(p)) if np.sum(p) > 0 else None

    return {"student_mean": mean(h.student), "teacher_mean": mean(h.teacher)}


# --------------------------------------------------------------------------------------------------
# Files


def write_stability(result: StabilityResult, out: str, command: str | None = None) -> dict[str, str]:
    """OUT/stability.json (strict JSON, with the command) and the PNGs; returns {what: path}."""
    os.makedirs(out, exist_ok=True)
    report = {"command": command, **result.report}
    paths = {"report": os.path.join(out, REPORT)}
    paths["temperature"] = os.path.join(out, FIGURES["temperature"])
    _save(temperature_figure(result), paths["temperature"])
    if result.distributions["pairs"]:
        paths["pairs"] = os.path.join(out, FIGURES["pairs"])
        _save(pairs_figure(result), paths["pairs"])
    if result.distributions["bond_lengths"]:
        paths["bonds"] = os.path.join(out, FIGURES["bonds"])
        _save(bonds_figure(result), paths["bonds"])
    report["figures"] = {k: os.path.basename(v) for k, v in paths.items() if k != "report"}
    write_json_atomic(paths["report"], report)
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLOURS = {"student": "C3", "teacher": "k"}


def temperature_figure(result: StabilityResult):
    """Temperature traces: NVT and NVE, student and teacher, a failure marked where it happened."""
    plt = _pyplot()
    ensembles = [e for e in ("nvt", "nve") if f"student {e}" in result.trajectories]
    fig, axes = plt.subplots(1, len(ensembles), figsize=(6 * len(ensembles), 4), squeeze=False)
    for ax, ensemble in zip(axes[0], ensembles):
        for role in ("teacher", "student"):  # the student on top, dashed: where they coincide both show
            trajectory = result.trajectories[f"{role} {ensemble}"]
            ax.plot(trajectory.rows[:, 1] / 1000.0, trajectory.rows[:, 2], color=COLOURS[role], lw=0.9,
                    ls="--" if role == "student" else "-", label=role)
            if trajectory.failure is not None:
                ax.axvline(trajectory.failure["time_ps"], color=COLOURS[role], ls="--", lw=0.8)
                ax.annotate(f"{role} failed: {trajectory.failure['criterion']}", (trajectory.failure["time_ps"], 0.95),
                            xycoords=("data", "axes fraction"), fontsize="small", color=COLOURS[role], ha="right")
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("temperature (K)")
        ax.set_title(f"{ensemble.upper()}, {result.report['md']['temperature_K']:g} K start"
                     + (" and thermostat" if ensemble == "nvt" else ""))
        ax.legend(fontsize="small")
    fig.suptitle(result.report["structure"]["name"])
    fig.tight_layout()
    return fig


def _grid(plt, n: int, columns: int = 3):
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, min(columns, max(n, 1)), figsize=(4.2 * min(columns, max(n, 1)), 3.4 * rows),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _overlay(ax, name: str, h: Histogram, xlabel: str, ylabel: str) -> None:
    ax.plot(h.x, h.teacher, color=COLOURS["teacher"], lw=1.2, label="teacher")
    ax.plot(h.x, h.student, color=COLOURS["student"], lw=1.0, ls="--", label="student")
    ax.set_title(f"{name}: L1 {h.l1:.3f}" if h.l1 is not None else f"{name}: nothing to compare")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")


def pairs_figure(result: StabilityResult):
    """g(r) (periodic) or pair-distance distributions (molecules), one panel per element pair."""
    plt = _pyplot()
    pairs = result.distributions["pairs"]
    periodic = result.report["structure"]["periodic"]
    fig, axes = _grid(plt, len(pairs))
    for ax, (name, h) in zip(axes, pairs.items()):
        _overlay(ax, name, h, "r (Å)", "g(r)" if periodic else "pair-distance density (1/Å)")
    fig.suptitle(f"{result.report['structure']['name']}: "
                 + ("radial distribution functions" if periodic else "pair-distance distributions (a molecule)"))
    fig.tight_layout()
    return fig


def bonds_figure(result: StabilityResult, most: int = 6):
    """Bond-length and bond-angle distributions of the `most` most numerous types of each (all are in the
    report)."""
    plt = _pyplot()
    lengths, angles = result.distributions["bond_lengths"], result.distributions["angles"]
    counts = {**result.report["structure"]["bond_types"], **result.report["structure"]["angle_types"]}
    shown = [("bond", n, lengths[n]) for n in sorted(lengths, key=lambda n: -counts.get(n, 0))[:most]]
    shown += [("angle", n, angles[n]) for n in sorted(angles, key=lambda n: -counts.get(n, 0))[:most]]
    fig, axes = _grid(plt, len(shown))
    for ax, (kind, name, h) in zip(axes, shown):
        if kind == "bond":
            _overlay(ax, f"bond {name}", h, "length (Å)", "density (1/Å)")
        else:
            _overlay(ax, f"angle {name}", h, "angle (degrees)", "density (1/degree)")
    fig.suptitle(f"{result.report['structure']['name']}: bond lengths and angles (NVT)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Collected reports (issue 13's stability-<gpu>.json)


def stability_entry(report: dict, student: str, system: str, /, **extra) -> dict:
    """One report as a row of a collected list: {"student", "system", "simulated_ps", "time_to_failure_ps",
    "rdf_l1", "drift_meV_per_atom_ps"}, the failures, the MD settings, the L1 difference of every element pair
    ("l1_by_pair") and bond type ("bond_length_l1"), and `extra` (e.g. the command, device, kernel)."""
    summary, md, distributions = report["summary"], report["md"], report["distributions"]
    return {"student": student, "system": system, "simulated_ps": summary["simulated_ps"],
            "time_to_failure_ps": summary["time_to_failure_ps"], "rdf_l1": summary["rdf_l1"],
            "rdf_l1_pair": summary["rdf_l1_pair"], "distribution": summary["distribution"],
            "drift_meV_per_atom_ps": summary["drift_meV_per_atom_ps"],
            "teacher_drift_meV_per_atom_ps": summary["teacher_drift_meV_per_atom_ps"],
            "failure": summary["failure"], "nve_failure": summary["nve_failure"],
            "teacher_failure": summary["teacher_failure"], "teacher_nve_failure": summary["teacher_nve_failure"],
            "temperature_K": md["temperature_K"], "nvt_ps": md["time_ps"], "nve_ps": md["nve_ps"],
            "dt_fs": md["dt_fs"], "l1_by_pair": {k: v["l1"] for k, v in distributions["pairs"].items()},
            "bond_length_l1": {k: v["l1"] for k, v in distributions["bond_lengths"].items()}, **extra}


def collect_stability(path: str, entry: dict) -> list:
    """`entry` added to the list of stability rows at `path`, replacing the one of the same student, system and
    temperature (under a lock: reports of several systems may run side by side); the list."""
    from distiller.files import update_json

    def key(e: dict) -> tuple:
        return e.get("student"), e.get("system"), e.get("temperature_K")

    return update_json(path, lambda collected: [e for e in collected or [] if key(e) != key(entry)] + [entry])


# --------------------------------------------------------------------------------------------------
# A run directory's student against its teacher


def structure_label(structure_file: str, index: int, count: int) -> str:
    """The report's directory name: the file's stem, with the index where the file holds several structures."""
    stem = os.path.splitext(os.path.basename(structure_file))[0]
    return stem if count == 1 else f"{stem}-{index}"


def evaluate_stability(run_dir: str, structure_file: str, *, index: int = 0, time_ps: float = 10.0,
                       temperature: float = 300.0, dt: float = 0.5, teacher: EnergyModel | str | None = None,
                       seed: int = 0, nve_ps: float | None = None, out: str | None = None,
                       progress: bool = False, command: str | None = None, kernel: str | None = None,
                       **options) -> StabilityResult:
    """The stability report of a run's student against `teacher` (default: the run's teacher) from structure
    `index` of `structure_file`, written to `out` (default RUN/stability/<structure>/). Everything is checked
    (the run, the file and index, the numbers, both models' elements, `out`) before any MD or any write. A
    student that fails in MD is a result: it is recorded, nothing is raised. Each finished MD run is kept in
    OUT/runs/ (OUT locked while the report runs): called again after a stop, the report continues after the
    runs that had finished. kernel: the student's edge kernels ("xla", "pallas"; default: those it was trained
    with). options: `stability_report`'s."""
    def status(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    for name, value in (("time_ps", time_ps), ("temperature", temperature), ("dt", dt)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {value!r}")
    if nve_ps is not None and not (math.isfinite(nve_ps) and nve_ps >= 0):
        raise ValueError(f"--nve-ps must be a number >= 0, got {nve_ps!r}")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    run = RunDirectory(run_dir)
    run_config = run.read_config()
    structures = read_structures(structure_file)
    if not -len(structures) <= index < len(structures):
        raise IndexError(f"{structure_file} holds {len(structures)} structures; index {index} does not exist")
    structure = structures[index]
    label = structure_label(structure_file, index % len(structures), len(structures))
    out = out or os.path.join(run_dir, "stability", label)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file; --out takes a directory")
    teacher = teacher or run_config.teacher
    teacher_name = teacher.name if isinstance(teacher, EnergyModel) else teacher
    status(f"loading the student of {run_dir} and the teacher {teacher_name}")
    teacher_model = as_model(teacher)
    student = load_student(run_dir, kernel=kernel)
    for model in (student, teacher_model):  # both refuse what they cannot take before either computes
        model.check([structure])
    os.makedirs(out, exist_ok=True)
    lock = lock_exclusively(os.path.join(out, LOCK))
    if lock is None:
        raise BlockingIOError(f"{out}: another stability report is writing there (it holds {LOCK})")
    with lock:  # finished MD runs are kept in OUT/runs/: a stopped report, called again, continues after them
        result = stability_report(student, teacher_model, structure, time_ps=time_ps, temperature=temperature,
                                  dt=dt, seed=seed, nve_ps=nve_ps, status=status, progress=progress,
                                  kept=os.path.join(out, KEPT), **options)
        result.report["structure"].update(file=os.path.abspath(structure_file), index=index, label=label)
        result.report["summary"]["run_dir"] = os.path.abspath(run_dir)
        result.report["out"] = os.path.abspath(out)
        status(f"writing {out}")
        write_stability(result, out, command=command)
    return result
