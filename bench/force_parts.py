"""Which part of the force does a student miss: the pull between molecules, or the forces within them?

    python bench/force_parts.py --run runs/water/painn-128x3 \
        --structures runs/water/test-watersmall-300K.extxyz --frames 10 \
        --out bench/results/force-parts-cpu-water.json

Molecules are the bonded groups of each frame (`distiller.stability.find_bonds`, covalent radii). On each
molecule the force splits, atom by atom, into the part that moves the whole molecule, (m_i / M) F_mol with F_mol
the sum of the molecule's forces, and the rest, which bends, stretches and turns it. The first comes from other
molecules alone (intramolecular forces sum to zero), the second mostly from within. For the student against the
teacher (the run's, or --teacher) the report gives accuracy retained (1 - ‖ΔF‖/‖F‖, as evaluate reports it), the
error's norm and the teacher's norm for each part, and each part's squared error over the total's. The two parts
are orthogonal per molecule in the mass-weighted sense (Σ F·F / m), not atom by atom, so the two shares need not
add up to 1.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from ase.data import atomic_masses

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/diagnosis.py

import diagnosis  # noqa: E402

from distiller.evaluate import force_metrics  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.predict import Predictor  # noqa: E402
from distiller.run_directory import RunDirectory, load_student  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def split(forces: np.ndarray, molecule: np.ndarray, mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(moving, rest): each atom's share (m_i / M) of its molecule's total force, and what remains."""
    total = np.zeros((molecule.max() + 1, 3))
    np.add.at(total, molecule, forces)
    molecule_mass = np.bincount(molecule, weights=mass)
    moving = total[molecule] * (mass / molecule_mass[molecule])[:, None]
    return moving, forces - moving


def parts_report(student: np.ndarray, teacher: np.ndarray, molecule: np.ndarray, mass: np.ndarray) -> dict:
    """{"moving", "rest", "total"}: accuracy retained, error and teacher rms per atom (eV/Å), and for the parts
    their squared error over the total's."""
    def part(s: np.ndarray, t: np.ndarray) -> dict:
        return {"accuracy_retained": force_metrics(s, t)["accuracy_retained"],
                "error_rms": float(np.sqrt(np.mean(np.sum((s - t) ** 2, axis=-1)))),
                "teacher_rms": float(np.sqrt(np.mean(np.sum(t ** 2, axis=-1))))}

    error_total = float(np.sum((student - teacher) ** 2))
    out = {name: {**part(s, t), "share_of_squared_error": float(np.sum((s - t) ** 2)) / error_total}
           for name, s, t in zip(("moving", "rest"), split(student, molecule, mass), split(teacher, molecule, mass))}
    out["total"] = part(student, teacher)
    return out


def main() -> None:
    parser = diagnosis.parser(__doc__, "frames the student never saw (a structure file)")
    parser.add_argument("--frames", type=int, default=None, help="the first N frames only (default: all)")
    parser.add_argument("--teacher", help="teacher spec (default: the run's)")
    args = diagnosis.parse(parser)  # bad input before any model loads
    if args.frames is not None and args.frames < 1:
        parser.error(f"--frames ({args.frames}) must be >= 1")
    structures = read_structures(args.structures)[:args.frames]
    teacher_spec = args.teacher or RunDirectory(args.run).read_config().teacher
    print(f"{len(structures)} frames of {args.structures}: the student, then the teacher {teacher_spec}", flush=True)
    student = np.concatenate([s.forces for s in Predictor(load_student(args.run))(structures)])
    teacher = np.concatenate([s.forces for s in Predictor(load_model(teacher_spec))(structures)])
    per_frame = [diagnosis.molecules(s) for s in structures]
    first = np.cumsum([0] + [m.max() + 1 for m in per_frame[:-1]])  # each frame's molecules numbered after the last's
    molecule = np.concatenate([m + k for m, k in zip(per_frame, first)])
    mass = np.concatenate([atomic_masses[s.numbers] for s in structures])
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": device_name(),
              "versions": versions(), "run": args.run, "teacher": teacher_spec, "structures": args.structures,
              "frames": len(structures), "atoms": int(len(molecule)), "molecules": int(molecule.max() + 1),
              "parts": parts_report(student, teacher, molecule, mass), "units": "eV/Å"}
    write_json_atomic(args.out, report)
    for name, part in report["parts"].items():
        print(f"  {name:6s}: retained {100 * part['accuracy_retained']:.2f} %, error {1000 * part['error_rms']:.1f} "
              f"meV/Å of {1000 * part['teacher_rms']:.1f}"
              + (f", {100 * part['share_of_squared_error']:.1f} % of the squared error" if name != "total" else ""))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
