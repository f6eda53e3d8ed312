"""Does the student repel where its MD failed? Teacher and student energies as one molecule is pushed onto another.

    python bench/contact_scan.py --run runs/water/painn-128x3 --structures frame.extxyz --pair 860 1477 \
        --out bench/results/contact-scan-cpu-water.json          # also writes the .png beside it

A stability report names the contact that ended a student's MD ("atoms H860 and H1477 are 0.49 Å apart"). From a
frame shortly before it (`--structures`, `--index`), the molecule of the second atom (it and every atom bonded to
it, `distiller.stability.find_bonds`) is moved rigidly along the minimum-image line between the two atoms, so that
their distance takes each value of `--distances`; nothing else moves. Both models' energies along that path,
each relative to its own energy of the unmoved frame (eV), are written and plotted. A student whose curve stays flat
or falls where the teacher's rises has a hole there: nothing pushed the atoms apart, and its MD went in.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from ase.data import chemical_symbols

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/diagnosis.py

import diagnosis  # noqa: E402
from diagnosis import save_figure  # noqa: E402

from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.predict import Predictor  # noqa: E402
from distiller.run_directory import RunDirectory, load_student  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.stability import minimum_image_vectors  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def molecule_of(structure, atom: int) -> list[int]:
    """`atom` and every atom bonded to it, directly or through others (`diagnosis.molecules`)."""
    molecule = diagnosis.molecules(structure)
    return np.flatnonzero(molecule == molecule[atom]).tolist()


def pair_vector(structure, a: int, b: int) -> np.ndarray:
    """R_b - R_a to the nearest periodic image of b (Å), as the stability report measures its contacts."""
    return minimum_image_vectors(structure.positions[b] - structure.positions[a],
                                 structure.cell if structure.periodic else None)


def approach(structure, a: int, b: int, distances: np.ndarray) -> list:
    """Copies of `structure` with b's molecule moved rigidly along the a-b line so that |R_b - R_a| is each
    distance (Å); their labels dropped."""
    line = pair_vector(structure, a, b)
    start = float(np.linalg.norm(line))
    moved = molecule_of(structure, b)
    out = []
    for d in distances:
        positions = structure.positions.copy()
        positions[moved] += (d - start) * line / start
        out.append(dataclasses.replace(structure, positions=positions, name=f"{structure.name} d={d:.3f}",
                                       energy=None, forces=None, stress=None))
    return out


def energies(model, structures) -> np.ndarray:
    return np.asarray([s.energy for s in Predictor(model)(structures)], np.float64)


def plot(distances, teacher, student, start: float, path: str, title: str) -> None:
    plt = diagnosis.pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(distances, teacher, "k-o", ms=3, label="teacher")
    ax.plot(distances, student, "r--s", ms=3, label="student")
    ax.set_xlabel("distance of the pair (Å)")
    ax.axvline(start, color="0.6", lw=0.8, ls=":", label="the frame's own distance")
    ax.set_ylabel("energy relative to the unmoved frame (eV)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = diagnosis.parser(__doc__, "structure file holding the frame")
    parser.add_argument("--index", type=int, default=0, help="which structure of the file (default 0)")
    parser.add_argument("--pair", type=int, nargs=2, required=True, metavar=("A", "B"),
                        help="the two atoms (0-based, as the stability report names them); B's molecule moves")
    parser.add_argument("--distances", type=float, nargs="+",
                        default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.3, 2.6],
                        help="pair distances to scan (Å)")
    parser.add_argument("--teacher", help="teacher spec (default: the run's)")
    args = diagnosis.parse(parser)  # bad input before any model loads
    structures = read_structures(args.structures)
    if not -len(structures) <= args.index < len(structures):
        parser.error(f"--index {args.index}: {args.structures} holds {len(structures)} structures")
    structure = structures[args.index]
    a, b = args.pair
    if not (0 <= a < structure.n_atoms and 0 <= b < structure.n_atoms and a != b):
        parser.error(f"--pair {a} {b}: two different atoms of the {structure.n_atoms} of {structure.name}")
    distances = np.asarray(sorted(args.distances), np.float64)
    if distances[0] <= 0:
        parser.error("--distances must be > 0")
    moved = molecule_of(structure, b)
    if a in moved:
        parser.error(f"--pair {a} {b}: both atoms are in one molecule; the scan moves B's molecule against A's")

    teacher_spec = args.teacher or RunDirectory(args.run).read_config().teacher
    path = approach(structure, a, b, distances)
    start = float(np.linalg.norm(pair_vector(structure, a, b)))
    symbols = [f"{chemical_symbols[structure.numbers[k]]}{k}" for k in (a, b)]
    print(f"{structure.name}: {symbols[0]}-{symbols[1]} at {start:.2f} Å; moving {len(moved)} atoms to "
          f"{len(distances)} distances, the student, then the teacher {teacher_spec}", flush=True)
    # Each model's energy of the frame itself (nothing moved) is its zero: uphill is away from where its MD was.
    student = energies(load_student(args.run), [structure, *path])
    teacher = energies(load_model(teacher_spec), [structure, *path])
    student, teacher = student[1:] - student[0], teacher[1:] - teacher[0]
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name(), "versions": versions(), "run": args.run, "teacher": teacher_spec,
        "structure": {"file": args.structures, "index": args.index, "name": structure.name},
        "pair": {"atoms": [a, b], "names": symbols, "distance_A": start}, "moved_atoms": moved,
        "distances_A": distances.tolist(), "teacher_eV": teacher.tolist(), "student_eV": student.tolist(),
        "units": "eV, relative to the model's energy of the unmoved frame; Å",
    }
    write_json_atomic(args.out, report)
    png = diagnosis.png_beside(args.out)
    plot(distances, teacher, student, start, png, f"{symbols[0]}-{symbols[1]} ({symbols[1]}'s molecule moved), "
                                                   f"student {os.path.basename(os.path.abspath(args.run))}")
    for d, t, s in zip(distances, teacher, student):
        print(f"  {d:5.2f} Å   teacher {t:+9.3f} eV   student {s:+9.3f} eV")
    print(f"written {args.out} and {png}")


if __name__ == "__main__":
    main()
