"""The validation set of a run: structures training never samples, labelled once by the teacher, on which the
averaged student is evaluated every `validation.every` steps; the best student (lowest force RMSE) is kept.

The labelled set is written to RUN/validation.extxyz at the start, so a resumed run validates on exactly the same
labels without asking the teacher again. Its metrics go into the training metrics' rows as `val_*`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from distiller.evaluate import compare
from distiller.load import as_model
from distiller.predict import Predictor
from distiller.run_directory import RunDirectory
from distiller.structure import Structure, read_structures, write_structures
from distiller.students import student_model

METRICS = ("accuracy_retained", "forces_rmse", "forces_mae", "energy_mae_per_atom")


def read_validation_set(config, run_dir: RunDirectory, teacher=None, fresh: bool = False) -> list[Structure]:
    """The run's labelled validation set: RUN/validation.extxyz (unless `fresh`: a new run labels afresh), or the
    configured files labelled by `teacher` (default: the experiment's, loaded) and written there. Refuses
    structures the student or the teacher cannot take before any labelling."""
    path = run_dir.file("validation.extxyz")
    if os.path.isfile(path) and not fresh:
        return read_structures(path)
    structures = [s for file in config.validation.structures for s in read_structures(file)]
    if not structures:
        raise ValueError(f"experiment {config.name!r}: validation.structures "
                         f"({', '.join(config.validation.structures)}) hold no structures")
    teacher = teacher if teacher is not None else as_model(config.teacher)
    for model in (student_model(config.student), teacher):
        model.check(structures)
    os.makedirs(run_dir.path, exist_ok=True)
    write_structures(path, Predictor(teacher)(structures))  # atomic: a killed run labels it again
    # The file's numbers (rounded by extxyz), not the teacher's: a resumed run validates against the same ones.
    return read_structures(path)


class Validation:
    """`validation(step, params)` -> the val_* metrics of the student with `params`; keeps the best in RUN/best/."""

    def __init__(self, structures: list[Structure], student, run_dir: RunDirectory):
        self.structures, self.run_dir = structures, run_dir
        self.predictor = Predictor(student)  # one model, params per call: compiled once per padded shape
        best = run_dir.read_best()
        self.best = best["forces_rmse"] if best else math.inf

    def __call__(self, step: int, params: Any) -> dict:
        summary = compare(self.predictor(self.structures, params), self.structures)["summary"]
        metrics = {name: summary[name] for name in METRICS}  # finite: the Predictor refuses non-finite labels
        # Strictly better only: a resumed run recomputing a step already validated keeps the first.
        if metrics["forces_rmse"] < self.best:
            self.best = metrics["forces_rmse"]
            self.run_dir.save_best(step, params, metrics)
        return {f"val_{name}": value for name, value in metrics.items()}
