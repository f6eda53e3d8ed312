"""Where a student errs against an ensemble teacher: its force error against the members' spread, atom by atom.

    python bench/ensemble_spread.py --run runs/water/painn-128x3 \
        --structures runs/water/test-watersmall-300K.extxyz --frames 20 \
        --out bench/results/ensemble-spread-cpu-water.json      # also writes the .png beside it

The teacher is the run's ensemble (a FeNNol-PMC spec without a member index, e.g. fennol-pmc:ani1x); each member
(SPEC/0 .. SPEC/M-1) labels the frames, and their mean is the ensemble's forces. Per atom i:
    spread_i = sqrt(mean_k |F_k,i - F_mean,i|^2)    (how much the members disagree, eV/Å)
    error_i  = |F_student,i - F_mean,i|
Reported: accuracy retained (1 - ‖ΔF‖/‖F_mean‖) of the student and of every member against the mean; the
correlation of error and spread; the student's force scale (least squares, 1 = no bias); and error and spread
by quintile of spread, with the share the student keeps in each. A student whose kept share falls with the
spread is held back where the members disagree: the mean there averages disagreeing extrapolations, harder to
fit than where they agree. A flat share says the error is elsewhere.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/diagnosis.py

import diagnosis  # noqa: E402
from diagnosis import save_figure  # noqa: E402

from distiller.evaluate import force_metrics  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.predict import Predictor  # noqa: E402
from distiller.run_directory import RunDirectory, load_student  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def retained(predicted: np.ndarray, reference: np.ndarray) -> float:
    """1 - ‖ΔF‖/‖F‖ over all atoms and components (the fidelity issue's accuracy retained, as evaluate reports it)."""
    return force_metrics(predicted, reference)["accuracy_retained"]


def forces_of(model, structures) -> np.ndarray:
    return np.concatenate([s.forces for s in Predictor(model)(structures)])


def by_quantile(spread: np.ndarray, student: np.ndarray, mean: np.ndarray, parts: int = 5) -> list[dict]:
    """The atoms in `parts` bins of equal count by spread: mean spread, mean error |F_student - F_mean|, the
    student's retained share."""
    error = np.linalg.norm(student - mean, axis=-1)
    edges = np.quantile(spread, np.linspace(0.0, 1.0, parts + 1))
    which = np.clip(np.searchsorted(edges, spread, side="right") - 1, 0, parts - 1)
    return [{"quantile": q + 1, "atoms": int(np.sum(which == q)),
             "spread_mean": float(spread[which == q].mean()), "error_mean": float(error[which == q].mean()),
             "teacher_force_mean": float(np.linalg.norm(mean[which == q], axis=1).mean()),
             "accuracy_retained": retained(student[which == q], mean[which == q])} for q in range(parts)]


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = diagnosis.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2))
    spread = [r["spread_mean"] for r in rows]
    ax.plot(spread, [r["error_mean"] for r in rows], "o-", label="student error |F_s - F_mean|")
    ax.plot(spread, spread, "k--", lw=0.8, label="error = spread")
    for r in rows:
        ax.annotate(f"{100 * r['accuracy_retained']:.1f} %", (r["spread_mean"], r["error_mean"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("members' force spread per atom (eV/Å), quintile mean")
    ax.set_ylabel("student's force error per atom (eV/Å)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = diagnosis.parser(__doc__, "frames the student never saw (a structure file)")
    parser.add_argument("--frames", type=int, default=None, help="the first N frames only (default: all)")
    parser.add_argument("--members", type=int, default=8, help="members of the run's ensemble teacher")
    args = diagnosis.parse(parser)  # bad input before any model loads
    if args.frames is not None and args.frames < 1 or args.members < 2:
        parser.error(f"--frames ({args.frames}) must be >= 1 and --members ({args.members}) >= 2")
    teacher = RunDirectory(args.run).read_config().teacher
    if not teacher.startswith("fennol-pmc:") or "/" in teacher.split(":", 1)[1]:
        parser.error(f"{args.run}: its teacher {teacher!r} is not a FeNNol-PMC ensemble (a spec without /MEMBER)")
    structures = read_structures(args.structures)[:args.frames]

    print(f"{len(structures)} frames of {args.structures}: the student, then {args.members} members", flush=True)
    student = forces_of(load_student(args.run), structures)
    members = []
    for k in range(args.members):
        members.append(forces_of(load_model(f"{teacher}/{k}"), structures))
        print(f"  member {k}: done", flush=True)
    members = np.stack(members)
    mean = members.mean(axis=0)
    spread = np.sqrt(np.mean(np.sum((members - mean) ** 2, axis=-1), axis=0))
    rows = by_quantile(spread, student, mean)
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name(), "versions": versions(),
        "run": args.run, "teacher": teacher, "structures": args.structures, "frames": len(structures),
        "atoms": int(len(mean)),
        "student_accuracy_retained": retained(student, mean),
        "members_accuracy_retained": [retained(m, mean) for m in members],
        "error_spread_correlation": float(np.corrcoef(np.linalg.norm(student - mean, axis=-1), spread)[0, 1]),
        # A scale below 1 is forces too soft everywhere (a bias), not scatter: <F_s, F_mean> / <F_mean, F_mean>.
        "student_force_scale": float(np.sum(student * mean) / np.sum(mean * mean)),
        "by_spread_quintile": rows,
    }
    write_json_atomic(args.out, report)
    png = diagnosis.png_beside(args.out)
    run_name = os.path.join(*os.path.normpath(os.path.abspath(args.run)).split(os.sep)[-2:])  # e.g. water/painn-128x3
    plot(rows, png, f"{run_name} on {os.path.basename(args.structures)}")
    print(f"student retains {100 * report['student_accuracy_retained']:.2f} %, members "
          f"{100 * min(report['members_accuracy_retained']):.1f}-{100 * max(report['members_accuracy_retained']):.1f}"
          f" %; correlation of error and spread {report['error_spread_correlation']:.2f}; force scale "
          f"{report['student_force_scale']:.4f}")
    for r in rows:
        print(f"  quintile {r['quantile']}: spread {r['spread_mean']:.3f}  error {r['error_mean']:.3f} eV/Å  "
              f"retained {100 * r['accuracy_retained']:.1f} %")
    print(f"written {args.out} and {png}")


if __name__ == "__main__":
    main()
