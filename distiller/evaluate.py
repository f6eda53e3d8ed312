"""Compare a student with its teacher on a set of structures: report.json and parity plots.

Accuracy retained = 1 − ‖F_student − F_teacher‖ / ‖F_teacher‖, the norms taken as root-mean-square
over all atoms and components of the set (so one number for the set, not an average of ratios).
Where the teacher gave stress (periodic cells), the summary also compares it, likewise over all components.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from ase import units

from distiller.files import write_json_atomic
from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.run_directory import RunDirectory, load_student
from distiller.structure import Structure, read_structures


def force_metrics(student_forces: np.ndarray, teacher_forces: np.ndarray) -> dict:
    """Metrics over stacked (N, 3) force arrays in eV/Å."""
    diff = student_forces - teacher_forces
    norm_t = np.linalg.norm(teacher_forces, axis=1)
    norm_s = np.linalg.norm(student_forces, axis=1)
    cosine = np.sum(student_forces * teacher_forces, axis=1) / np.maximum(norm_t * norm_s, 1e-12)
    return {
        "forces_mae": float(np.mean(np.abs(diff))),
        "forces_rmse": float(np.sqrt(np.mean(diff**2))),
        "forces_cosine": float(np.mean(cosine)),
        "accuracy_retained": float(1.0 - np.sqrt(np.sum(diff**2) / max(np.sum(teacher_forces**2), 1e-300))),
        "teacher_forces_rms": float(np.sqrt(np.mean(teacher_forces**2))),
    }


def stress_metrics(student_stress: np.ndarray, teacher_stress: np.ndarray) -> dict:
    """Metrics over stacked (G, 3, 3) stress arrays in eV/Å³ (RMSE also in GPa)."""
    diff = student_stress - teacher_stress
    rmse = float(np.sqrt(np.mean(diff**2)))
    return {
        "stress_rmse": rmse,
        "stress_rmse_gpa": rmse / units.GPa,
        "stress_accuracy_retained": float(1.0 - np.sqrt(np.sum(diff**2) / max(np.sum(teacher_stress**2), 1e-300))),
        "teacher_stress_rms": float(np.sqrt(np.mean(teacher_stress**2))),
    }


def compare(student: Sequence[Structure], teacher: Sequence[Structure]) -> dict:
    """Report comparing labelled student and teacher versions of the same structures."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student structures against {len(teacher)} teacher structures")
    n = np.array([s.n_atoms for s in teacher])
    e_s = np.array([s.energy for s in student])
    e_t = np.array([s.energy for s in teacher])
    f_s = np.concatenate([s.forces for s in student])
    f_t = np.concatenate([s.forces for s in teacher])
    per_atom = (e_s - e_t) / n
    summary = {
        "structures": int(len(teacher)),
        "atoms": int(n.sum()),
        "energy_mae_per_atom": float(np.mean(np.abs(per_atom))),
        "energy_rmse_per_atom": float(np.sqrt(np.mean(per_atom**2))),
        **force_metrics(f_s, f_t),
    }
    stressed = [(s.stress, t.stress) for s, t in zip(student, teacher) if s.stress is not None and t.stress is not None]
    if stressed:
        summary["stressed_structures"] = len(stressed)
        summary.update(stress_metrics(*(np.stack(x) for x in zip(*stressed))))
    rows = []
    for s, t in zip(student, teacher):
        rows.append({"name": t.name, "n_atoms": t.n_atoms, "energy_teacher": t.energy, "energy_student": s.energy,
                     **force_metrics(s.forces, t.forces)})
    return {"summary": summary, "structures": rows}


def parity_plot(student: Sequence[Structure], teacher: Sequence[Structure], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f_s = np.concatenate([s.forces for s in student]).ravel()
    f_t = np.concatenate([s.forces for s in teacher]).ravel()
    n = np.array([t.n_atoms for t in teacher])
    e_t = np.array([t.energy for t in teacher]) / n
    e_s = np.array([s.energy for s in student]) / n
    # Energies of different compositions differ by hundreds of eV/atom; show each relative to the teacher's
    # mean for its composition, so the plot shows the spread the student has to reproduce.
    composition = [tuple(np.unique(t.numbers, return_counts=True)[1]) + tuple(np.unique(t.numbers)) for t in teacher]
    for key in set(composition):
        group = np.array([c == key for c in composition])
        offset = e_t[group].mean()
        e_t[group] -= offset
        e_s[group] -= offset
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, x, y, label in ((axes[0], f_t, f_s, "force component (eV/Å)"), (axes[1], e_t, e_s, "energy − composition mean (eV/atom)")):
        ax.scatter(x, y, s=4, alpha=0.5)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"teacher {label}")
        ax.set_ylabel(f"student {label}")
        ax.set_aspect("equal", adjustable="datalim")
    metrics = force_metrics(f_s.reshape(-1, 3), f_t.reshape(-1, 3))
    axes[0].set_title(f"forces: RMSE {metrics['forces_rmse']:.3f} eV/Å, retained {100 * metrics['accuracy_retained']:.1f} %")
    axes[1].set_title(f"energies: MAE {1000 * np.mean(np.abs(e_s - e_t)):.2f} meV/atom")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_run(run_dir: str, structures_path: str, teacher: EnergyModel | str | None = None,
                 out: str | None = None) -> dict:
    """Label `structures_path` with the teacher (default: the run's), predict with the run's student, write
    report.json and parity.png. `teacher`: a spec or a loaded EnergyModel (e.g. Orb from a local checkpoint)."""
    run = RunDirectory(run_dir)
    run_config = run.read_config()
    structures = read_structures(structures_path)
    teacher = as_model(teacher or run_config.teacher)
    student = load_student(run_dir)
    for model in (teacher, student):  # both refuse what they cannot take before either computes
        model.check(structures)
    reference = Predictor(teacher)(structures)
    predicted = Predictor(student)(structures)
    report = compare(predicted, reference)
    report["summary"] = {"run_dir": os.path.abspath(run_dir), "teacher": teacher.name,
                         "structures_file": os.path.abspath(structures_path), **report["summary"]}
    out = out or os.path.join(run_dir, "evaluation")
    os.makedirs(out, exist_ok=True)
    parity_plot(predicted, reference, os.path.join(out, "parity.png"), title=f"{run_config.name} vs {teacher.name}")
    write_json_atomic(os.path.join(out, "report.json"), report)
    return report
