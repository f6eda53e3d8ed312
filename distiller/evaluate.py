"""Compare a student with its teacher on a set of structures: report.json and parity plots.

Accuracy retained = 1 − ‖F_student − F_teacher‖ / ‖F_teacher‖, the norms taken as root-mean-square
over all atoms and components of the set (so one number for the set, not an average of ratios).
Where the teacher gave stress (periodic cells), the summary also compares it, likewise over all components.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import ase
import numpy as np
from ase import units

from distiller.data.dataset import is_dataset, open_dataset
from distiller.files import write_json_atomic
from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.run_directory import RunDirectory, load_student
from distiller.structure import Structure, StructureError, read_structures


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
    """Metrics over stacked (G, 3, 3) stress arrays in eV/Å³ (MAE and RMSE over the components also in GPa)."""
    diff = student_stress - teacher_stress
    rmse = float(np.sqrt(np.mean(diff**2)))
    return {
        "stress_mae_gpa": float(np.mean(np.abs(diff))) / units.GPa,
        "stress_rmse": rmse,
        "stress_rmse_gpa": rmse / units.GPa,
        "stress_accuracy_retained": float(1.0 - np.sqrt(np.sum(diff**2) / max(np.sum(teacher_stress**2), 1e-300))),
        "teacher_stress_rms": float(np.sqrt(np.mean(teacher_stress**2))),
    }


def summarise(student: Sequence[Structure], teacher: Sequence[Structure]) -> dict:
    """Energy, force and (where both have it) stress metrics over labelled student and teacher structures."""
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
    return summary


def compare(student: Sequence[Structure], teacher: Sequence[Structure]) -> dict:
    """Report comparing labelled student and teacher versions of the same structures: the summary over all of
    them, per system (chemical formula, `system_names`) where there are several, and per structure."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student structures against {len(teacher)} teacher structures")
    summary = summarise(student, teacher)
    systems = np.array(system_names(teacher))
    if len(set(systems)) > 1:
        summary["systems"] = {name: summarise([student[k] for k in np.flatnonzero(systems == name)],
                                              [teacher[k] for k in np.flatnonzero(systems == name)])
                              for name in sorted(set(systems))}
    rows = []
    for s, t in zip(student, teacher):
        rows.append({"name": t.name, "n_atoms": t.n_atoms, "energy_teacher": t.energy, "energy_student": s.energy,
                     **force_metrics(s.forces, t.forces)})
    return {"summary": summary, "structures": rows}


def system_names(structures: Sequence[Structure]) -> list[str]:
    """Each structure's system for plots: its chemical formula (Hill order), so that rattled copies of one
    molecule or crystal form one group, whatever their names."""
    return [ase.Atoms(numbers=s.numbers).get_chemical_formula(mode="hill") for s in structures]


LEGEND_SYSTEMS = 10  # more systems than this are one legend entry, "others"


def parity_figure(student: Sequence[Structure], teacher: Sequence[Structure], title: str = ""):
    """Forces and energies, student against teacher, coloured by system (see `system_names`), with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    systems = np.array(system_names(teacher))
    n = np.array([t.n_atoms for t in teacher])
    # Energies of different compositions differ by hundreds of eV/atom; each is shown relative to the teacher's
    # mean for its composition, in meV/atom, so the plot shows the spread the student has to reproduce.
    e_t = np.array([t.energy for t in teacher]) / n
    e_s = np.array([s.energy for s in student]) / n
    for system in set(systems):
        group = systems == system
        offset = e_t[group].mean()
        e_t[group] = 1000 * (e_t[group] - offset)
        e_s[group] = 1000 * (e_s[group] - offset)
    counts = {system: int(np.sum(systems == system)) for system in set(systems)}
    shown = sorted(counts, key=lambda k: (-counts[k], k))[:LEGEND_SYSTEMS]

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, values, label in ((axes[0], "forces", "force component (eV/Å)"),
                              (axes[1], "energies", "energy − composition mean (meV/atom)")):
        groups = [(system, systems == system, f"C{k}") for k, system in enumerate(shown)]
        rest = ~np.isin(systems, shown)
        if rest.any():
            groups.append((f"{len(counts) - len(shown)} other systems", rest, "grey"))
        all_x, all_y = [], []
        for system, members, colour in groups:
            if values == "forces":
                x = np.concatenate([t.forces for t, m in zip(teacher, members) if m]).ravel()
                y = np.concatenate([s.forces for s, m in zip(student, members) if m]).ravel()
            else:
                x, y = e_t[members], e_s[members]
            ax.scatter(x, y, s=4 if values == "forces" else 12, alpha=0.5, color=colour,
                       label=f"{system} ({int(members.sum())})")
            all_x.append(x)
            all_y.append(y)
        x, y = np.concatenate(all_x), np.concatenate(all_y)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"teacher {label}")
        ax.set_ylabel(f"student {label}")
        ax.set_aspect("equal", adjustable="datalim")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=5))
    axes[0].legend(title="system (structures)", fontsize="small", markerscale=3, loc="upper left")
    metrics = force_metrics(np.concatenate([s.forces for s in student]), np.concatenate([t.forces for t in teacher]))
    axes[0].set_title(f"forces: RMSE {metrics['forces_rmse']:.3f} eV/Å, retained {100 * metrics['accuracy_retained']:.1f} %")
    axes[1].set_title(f"energies: MAE {np.mean(np.abs(e_s - e_t)):.2f} meV/atom")
    fig.text(0.5, 0.01, "energies per atom, each relative to the teacher's mean over the structures of its composition",
             ha="center", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def parity_plot(student: Sequence[Structure], teacher: Sequence[Structure], path: str, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = parity_figure(student, teacher, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluation_set(path: str) -> tuple[list[Structure], str | None]:
    """The structures of a structure file or of a dataset directory (`distiller label`), and the teacher that
    labelled the dataset (None for a file)."""
    if os.path.isdir(path):
        if not is_dataset(path):
            raise FileNotFoundError(f"{path}: a directory, but not a dataset (no manifest-*.json); --structures takes "
                                    f"a structure file or a dataset directory written by `distiller label`")
        dataset = open_dataset(path)
        return list(dataset), dataset.teacher
    return read_structures(path), None


def non_finite_fields(summary: dict) -> list[str]:
    return [k for k, v in summary.items() if isinstance(v, float) and not np.isfinite(v)]


def evaluate_run(run_dir: str, structures_path: str, teacher: EnergyModel | str | None = None,
                 out: str | None = None, progress: bool = False) -> dict:
    """Label `structures_path` (a structure file or a dataset directory) with the teacher (default: the run's),
    predict with the run's student, write report.json and parity.png. `teacher`: a spec or a loaded EnergyModel
    (e.g. Orb from a local checkpoint). A dataset labelled by that teacher is compared with its own labels.
    Everything is checked and computed before anything is written. progress: status lines on stderr."""
    def status(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    run = RunDirectory(run_dir)
    run_config = run.read_config()
    structures, labelled_by = evaluation_set(structures_path)
    if not structures:
        raise ValueError(f"{structures_path}: no structures to evaluate on")
    teacher = teacher or run_config.teacher
    teacher_name = teacher.name if isinstance(teacher, EnergyModel) else teacher
    own_labels = labelled_by == teacher_name and all(s.energy is not None and s.forces is not None
                                                     for s in structures)
    teacher_model = None if own_labels else as_model(teacher)
    student = load_student(run_dir)
    for model in (teacher_model, student):  # both refuse what they cannot take before either computes
        if model is not None:
            model.check(structures)
    if own_labels:
        status(f"evaluating on {len(structures)} structures of {structures_path}, labelled by {teacher_name}")
        reference = structures
    else:
        status(f"labelling {len(structures)} structures of {structures_path} with {teacher_name} (compiles first)")
        reference = Predictor(teacher_model)(structures)
    status(f"predicting them with the student of {run_dir}")
    try:
        predicted = Predictor(student)(structures)
    except StructureError as err:  # non-finite energies or forces: broken weights, nothing to report
        raise StructureError(f"the student of {run_dir} cannot be evaluated, nothing written: {err}") from None
    report = compare(predicted, reference)
    bad = non_finite_fields(report["summary"])
    if bad:
        raise ValueError(f"the student of {run_dir} gives non-finite {', '.join(bad)} on {structures_path}; "
                         f"nothing written")
    report["summary"] = {"run_dir": os.path.abspath(run_dir), "teacher": teacher_name,
                         "structures_file": os.path.abspath(structures_path),
                         "labels": "dataset" if own_labels else "teacher", **report["summary"]}
    out = out or os.path.join(run_dir, "evaluation")
    os.makedirs(out, exist_ok=True)
    parity_plot(predicted, reference, os.path.join(out, "parity.png"), title=f"{run_config.name} vs {teacher_name}")
    write_json_atomic(os.path.join(out, "report.json"), report)
    return report
