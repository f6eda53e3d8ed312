"""A training run's directory: the one place that knows its files.

    RUN/config.json          the Experiment (config.from_dict reads it back)
    RUN/reference.json       the student's per-element reference energies (float64, fitted once at the start)
    RUN/checkpoints/STEP/    orbax: item "params" (the student: the weights' moving average) and item
                             "optimizer" (the trained weights, optimizer state and step); the student alone
                             is loaded without the optimizer
    RUN/validation.extxyz    the validation set with the teacher's labels (written once, at the start)
    RUN/best/STEP/, best.json
                             the student at its best validation step (orbax item "params"), and its metrics
    RUN/capacity/STEP.pkl    the capacities STEP was trained with, so a resumed run pads exactly as the
                             uninterrupted one did (padding changes reduction shapes, hence float rounding)
    RUN/metrics.jsonl        one JSON row per logged step

Orbax writes a checkpoint to a temporary directory and renames it, so a killed run leaves either a whole
checkpoint or none; every other file is written atomically (distiller.files).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from distiller import config as experiments
from distiller import neighbours as nl
from distiller.batch import pad_structures, with_neighbours
from distiller.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from distiller.model import EnergyModel
from distiller.reference import ReferenceEnergies
from distiller.structure import Structure
from distiller.students import StudentConfig, init_params, student_model

CAPACITIES_KEPT = 4


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def metrics_path(self) -> str:
        return self.file("metrics.jsonl")

    def is_run(self) -> bool:
        return os.path.isfile(self.file("config.json"))

    # -- config and reference energies ----------------------------------------------------------------
    def write_config(self, config: experiments.Experiment) -> None:
        os.makedirs(self.path, exist_ok=True)
        write_json_atomic(self.file("config.json"), experiments.to_dict(config))

    def read_config(self) -> experiments.Experiment:
        if not self.is_run():
            raise FileNotFoundError(f"{self.path}: not a distiller run directory (no config.json)")
        with open(self.file("config.json")) as f:
            return experiments.from_dict(json.load(f))

    def write_reference(self, reference: ReferenceEnergies) -> None:
        write_json_atomic(self.file("reference.json"), {"unit": "eV per atom", "energies": reference.to_dict()})

    def read_reference(self) -> ReferenceEnergies:
        path = self.file("reference.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (the student's reference energies)")
        with open(path) as f:
            return ReferenceEnergies.from_dict(json.load(f)["energies"])

    # -- checkpoints ------------------------------------------------------------------------------------
    def checkpoints(self, keep: int = 2) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        return ocp.CheckpointManager(os.path.abspath(self.file("checkpoints")), options=options,
                                     item_names=("params", "optimizer"))

    def latest_step(self) -> int | None:
        if not os.path.isdir(self.file("checkpoints")):
            return None
        return self.checkpoints().latest_step()

    def save_checkpoint(self, manager: ocp.CheckpointManager, step: int, params: Any, optimizer: Any) -> None:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                   optimizer=ocp.args.StandardSave(optimizer)), force=True)
        manager.wait_until_finished()

    def restore(self, params_like: Any, optimizer_like: Any = None, step: int | None = None) -> tuple[int, Any, Any]:
        """(step, params, optimizer state) of `step` (default: the latest) into the structures of the templates;
        the optimizer state only if `optimizer_like` is given (else None)."""
        manager = self.checkpoints()
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.file('checkpoints')}")
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        items = {"params": ocp.args.StandardRestore(abstract(params_like))}
        if optimizer_like is not None:
            items["optimizer"] = ocp.args.StandardRestore(abstract(optimizer_like))
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return step, restored["params"], restored["optimizer"] if optimizer_like is not None else None

    def clear_checkpoints(self) -> None:
        for stale in ("checkpoints", "capacity", "best"):
            shutil.rmtree(self.file(stale), ignore_errors=True)
        for stale in ("best.json", "validation.extxyz"):
            if os.path.exists(self.file(stale)):
                os.remove(self.file(stale))

    # -- the best student (validation) --------------------------------------------------------------------
    def _best(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
        return ocp.CheckpointManager(os.path.abspath(self.file("best")), options=options, item_names=("params",))

    def save_best(self, step: int, params: Any, metrics: dict) -> None:
        """The student of `step` as the best so far; best.json (written last) names it."""
        manager = self._best()
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        manager.wait_until_finished()
        write_json_atomic(self.file("best.json"), {"step": step, **metrics})

    def read_best(self) -> dict | None:
        """best.json ({"step", metrics}), None before the first validation."""
        path = self.file("best.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def restore_best(self, params_like: Any) -> tuple[int, Any]:
        best = self.read_best()
        if best is None:
            raise FileNotFoundError(f"{self.path}: no best student (the run has no validation set)")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_like)
        restored = self._best().restore(best["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
        return best["step"], restored["params"]

    # -- capacities -------------------------------------------------------------------------------------
    def _capacity_path(self, step: int) -> str:
        return self.file("capacity", f"{step}.pkl")

    def save_capacity(self, step: int, state: Any) -> None:
        """Capacities are small static pytrees of ints; one file per checkpointed step, the newest few kept."""
        path = self._capacity_path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_bytes_atomic(path, pickle.dumps(state))
        saved = sorted(int(n[:-4]) for n in os.listdir(os.path.dirname(path)) if n.endswith(".pkl"))
        for old in saved[:-CAPACITIES_KEPT]:
            os.remove(self._capacity_path(old))

    def load_capacity(self, step: int) -> Any | None:
        path = self._capacity_path(step)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return pickle.load(f)

    # -- metrics ----------------------------------------------------------------------------------------
    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (the checkpoint a run resumes from), so no step appears twice."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(self.metrics_path, "".join(rows))

    def read_metrics(self) -> list[dict]:
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]


def params_template(config: StudentConfig) -> Any:
    """Parameters of the student's structure (shapes and dtypes) to restore into, made without any data: one
    atom of the student's first element will do."""
    atom = Structure(np.array([config.elements[0]]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool),
                     name="probe")
    probe = jax.tree.map(jnp.asarray, pad_structures([atom]))
    probe, _ = with_neighbours(probe, config.cutoff, nl.NeighbourCapacity(edges=1, bins=1, bin_size=2, reach=1))
    return init_params(config, jax.random.key(0), probe)


def load_student(run_dir: str | os.PathLike, step: int | None = None) -> EnergyModel:
    """The trained student of a run directory as an EnergyModel: the checkpoint of `step`; by default the best
    one on the validation set where the run has one, else the latest."""
    run = RunDirectory(run_dir)
    config = run.read_config()
    if step is None and run.read_best() is not None:
        _, params = run.restore_best(params_template(config.student))
    else:
        _, params, _ = run.restore(params_template(config.student), step=step)
    return student_model(config.student, params, run.read_reference(), name=os.path.abspath(run.path))
