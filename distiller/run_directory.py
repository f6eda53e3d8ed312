"""A training run's directory: the one place that knows its files.

    RUN/config.json          the Experiment (config.from_dict reads it back)
    RUN/teacher_files.json   the sha256 of the teacher's model files (online runs): a run resumes with the same weights
    RUN/reference.json       the student's per-element reference energies (float64, fitted once at the start)
    RUN/checkpoints/STEP/    orbax: item "params" (the student: the weights' moving average) and item
                             "optimizer" (the trained weights, optimizer state and step); the student alone
                             is loaded without the optimizer; checksums.json: the sha256 of its every file
    RUN/validation.extxyz    the validation set with the teacher's labels (written once, at the start)
    RUN/best/STEP/, best.json
                             the student at its best validation step (orbax item "params"), and its metrics
    RUN/capacity/STEP.json   the capacities STEP was trained with, so a resumed run pads exactly as the
                             uninterrupted one did (padding changes reduction shapes, hence float rounding)
    RUN/metrics.jsonl        one JSON row per logged step
    RUN/damaged/STEP/        checkpoints found damaged when a run resumed, set aside (kept for inspection)
    RUN/.lock                held by the trainer using the directory (RunLock)

Orbax writes a checkpoint to a temporary directory and renames it, so a killed run leaves either a whole
checkpoint or none; every other file is written atomically (distiller.files). A checkpoint damaged afterwards
(a truncated copy, a flipped bit) fails its checksums: restoring falls back to the newest intact one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.core import FrozenDict

from distiller import config as experiments
from distiller import neighbours as nl
from distiller.batch import BatchShape, pad_structures, with_neighbours
from distiller.capacity import Capacity
from distiller.files import lock_exclusively, sha256, write_json_atomic, write_text_atomic
from distiller.model import EnergyModel
from distiller.reference import ReferenceEnergies
from distiller.structure import Structure
from distiller.students import StudentConfig, init_params, student_model

CAPACITIES_KEPT = 4
CHECKSUMS = "checksums.json"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked: another config, busy, deleted, damaged."""


class CheckpointError(RunDirectoryError):
    """A checkpoint (or its capacities) whose files are missing, truncated or altered."""


class DivergedError(FloatingPointError):
    """A run whose loss, gradient norm or weights are not finite (NaN or infinity)."""


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

    # -- config, teacher files and reference energies -------------------------------------------------
    def write_config(self, config: experiments.Experiment) -> None:
        os.makedirs(self.path, exist_ok=True)
        write_json_atomic(self.file("config.json"), experiments.to_dict(config))

    def read_config(self) -> experiments.Experiment:
        if not self.is_run():
            raise FileNotFoundError(f"{self.path}: not a distiller run directory (no config.json)")
        with open(self.file("config.json")) as f:
            return experiments.from_dict(json.load(f))

    def write_teacher_files(self, files: dict[str, str]) -> None:
        write_json_atomic(self.file("teacher_files.json"), {"sha256": files})

    def read_teacher_files(self) -> dict[str, str] | None:
        """{file: sha256} of the teacher the run was started with; None for runs that recorded none (offline)."""
        path = self.file("teacher_files.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)["sha256"]

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
        _write_checksums(self.file("checkpoints", str(step)))

    def restore(self, params_like: Any, optimizer_like: Any = None, step: int | None = None,
                set_aside_damaged: bool = False) -> tuple[int, Any, Any]:
        """(step, params, optimizer state) of `step` (default: the newest intact checkpoint) into the structures
        of the templates; the optimizer state only if `optimizer_like` is given (else None): that is restoring
        to train on, which needs the step's capacities too. A damaged checkpoint is skipped with a one-line
        warning naming its bad file; `set_aside_damaged` (a resuming trainer) moves it to RUN/damaged/, so that
        the steps it held are trained and checkpointed again."""
        steps = [step] if step is not None else sorted(self.checkpoints().all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.file('checkpoints')}")
        items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
        if optimizer_like is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer_like))
        for candidate in steps:
            directory = self.file("checkpoints", str(candidate))
            whole = False  # its files verified: if orbax cannot restore them, they are not of this student
            try:
                verified = _verify_checksums(directory)
                if optimizer_like is not None:
                    self.load_capacity(candidate)
                whole = verified
                restored = _orbax_restore(self.checkpoints(), candidate, items, directory)
            except CheckpointError as err:
                if step is not None or candidate == steps[-1] or whole:
                    raise
                if set_aside_damaged:
                    os.makedirs(self.file("damaged"), exist_ok=True)
                    os.replace(directory, self.file("damaged", str(candidate)))
                kept = f"; moved to {self.file('damaged', str(candidate))}" if set_aside_damaged else ""
                warnings.warn(f"{err}: using the checkpoint before it{kept}", RuntimeWarning, stacklevel=2)
                continue
            return candidate, restored["params"], restored["optimizer"] if optimizer_like is not None else None
        raise AssertionError("unreachable")

    def clear_checkpoints(self) -> None:
        for stale in ("checkpoints", "capacity", "best", "damaged"):
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
        _write_checksums(self.file("best", str(step)))
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
        directory = self.file("best", str(best["step"]))
        _verify_checksums(directory)
        items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
        return best["step"], _orbax_restore(self._best(), best["step"], items, directory)["params"]

    # -- capacities -------------------------------------------------------------------------------------
    def _capacity_path(self, step: int) -> str:
        return self.file("capacity", f"{step}.json")

    def save_capacity(self, step: int, state: Any) -> None:
        """Capacities are small static structures of ints; one file per checkpointed step, the newest few kept."""
        path = self._capacity_path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, capacity_to_json(state), indent=None)
        saved = sorted(int(n[:-5]) for n in os.listdir(os.path.dirname(path)) if n.endswith(".json"))
        for old in saved[:-CAPACITIES_KEPT]:
            os.remove(self._capacity_path(old))

    def load_capacity(self, step: int) -> Any | None:
        path = self._capacity_path(step)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return capacity_from_json(json.load(f))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: damaged capacities of checkpoint {step} ({type(err).__name__}: {err})") \
                from None

    # -- metrics ----------------------------------------------------------------------------------------
    def _metric_rows(self) -> list[dict]:
        """The rows of metrics.jsonl; a torn last line (a kill mid-write: its step was never checkpointed) is
        left out, a bad line before it is an error."""
        with open(self.metrics_path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise RunDirectoryError(f"{self.metrics_path}, line {number}: not a JSON row") from None
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (the checkpoint a run resumes from), so no step appears twice, and a
        torn last line."""
        if not os.path.exists(self.metrics_path):
            return
        rows = [row for row in self._metric_rows() if row["step"] <= step]
        write_text_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))

    def read_metrics(self) -> list[dict]:
        return self._metric_rows()


class RunLock:
    """One trainer's exclusive use of a run directory (RUN/.lock, held until `release` or the process's death) and
    the directory it locked: `check` fails once that directory was deleted or replaced, where a trainer writing on
    would leave checkpoints without their config.json or metrics."""

    def __init__(self, run: RunDirectory):
        os.makedirs(run.path, exist_ok=True)
        self.run = run
        self._lock = lock_exclusively(run.file(".lock"))
        if self._lock is None:
            raise RunDirectoryError(f"{run.path}: another trainer is using this run directory (it holds "
                                    f"{run.file('.lock')}); wait for it to finish or stop it")
        self._identity = _identity(run.path)

    def check(self, step: int) -> None:
        if _identity(self.run.path) != self._identity or not self.run.is_run():
            raise RunDirectoryError(f"{self.run.path}: the run directory was deleted or replaced during training "
                                    f"(its config.json is gone); stopped at step {step}, nothing written after it")

    def release(self) -> None:
        self._lock.close()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


# -- checkpoint checksums and restoring -------------------------------------------------------------------
def _abstract(tree: Any) -> Any:
    """The restore target of `tree`: its shapes and dtypes, every leaf on this process's first device. A leaf
    without a sharding would take the saving process's from the checkpoint's metadata, which another machine
    cannot build (orbax's "Topology mismatch": a run trained on a GPU could not resume or be evaluated on a CPU)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(x):
        struct = ocp.utils.to_shape_dtype_struct(x)
        return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=device)

    return jax.tree.map(target, tree)


def _checkpoint_files(directory: str) -> list[str]:
    files = []
    for root, _, names in os.walk(directory):
        files += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(f for f in files if f != CHECKSUMS)


def _write_checksums(directory: str) -> None:
    write_json_atomic(os.path.join(directory, CHECKSUMS),
                      {f: sha256(os.path.join(directory, f)) for f in _checkpoint_files(directory)})


def _verify_checksums(directory: str) -> bool:
    """Whether every file of the checkpoint is as it was written (False: no checksums to verify), else a
    CheckpointError naming the first bad one. (A checkpoint killed before its checksums were written is whole,
    orbax having renamed it into place: it is restored unverified.)"""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            expected = json.load(f)
    except ValueError:
        raise CheckpointError(f"{path}: damaged (not JSON)") from None
    for name, digest in expected.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing from its checkpoint")
        if sha256(file) != digest:
            raise CheckpointError(f"{file}: damaged (truncated or altered: its sha256 is not the one recorded)")
    return True


def _orbax_restore(manager: ocp.CheckpointManager, step: int, items: dict, directory: str) -> Any:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax's errors name no file; the first line of its message says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{directory}: cannot be restored ({type(err).__name__}: {first})") from None


# -- capacities as JSON -----------------------------------------------------------------------------------
# The trainer's capacity state is either an online run's Capacity (neighbour list, and the teacher's own
# preprocessing sizes: a FennolCapacity or None), a tuple of them (MD sampling: the drawn batch's and the replica
# pool's) or an offline run's {BatchShape: NeighbourCapacity}. Their JSON form is explicit, FeNNol's states
# keeping their keys' types and order (a static argument compiles by value).


def capacity_to_json(state: Any) -> dict:
    if isinstance(state, Capacity):
        return {"online": {"neighbours": state.neighbours._asdict(), "model": _model_capacity_to_json(state.model)}}
    if isinstance(state, tuple) and all(isinstance(part, Capacity) for part in state):
        return {"parts": [capacity_to_json(part) for part in state]}
    if isinstance(state, dict):
        return {"buckets": [{"atoms": shape.atoms, "graphs": shape.graphs, "neighbours": neighbours._asdict()}
                            for shape, neighbours in state.items()]}
    raise TypeError(f"no JSON form for capacities of type {type(state).__name__}")


def capacity_from_json(data: dict) -> Any:
    if "parts" in data:
        return tuple(capacity_from_json(part) for part in data["parts"])
    if "online" in data:
        online = data["online"]
        return Capacity(nl.NeighbourCapacity(**online["neighbours"]), _model_capacity_from_json(online["model"]))
    return {BatchShape(b["atoms"], b["graphs"]): nl.NeighbourCapacity(**b["neighbours"]) for b in data["buckets"]}


def _model_capacity_to_json(capacity: Any) -> dict | None:
    if capacity is None:
        return None
    from distiller.teachers.fennol import FennolCapacity

    if not isinstance(capacity, FennolCapacity):
        raise TypeError(f"no JSON form for a teacher capacity of type {type(capacity).__name__}")
    return {"fennol": [_state_to_json(state) for state in capacity.layer_states]}


def _model_capacity_from_json(data: dict | None) -> Any:
    if data is None:
        return None
    from distiller.teachers.fennol import FennolCapacity

    return FennolCapacity(tuple(_state_from_json(state) for state in data["fennol"]))


def _state_to_json(value: Any) -> Any:
    """A FeNNol layer state: dicts as [key, value] pairs (their keys are element numbers too), tuples tagged."""
    if isinstance(value, (dict, FrozenDict)):
        return {"pairs": [[key, _state_to_json(v)] for key, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_state_to_json(v) for v in value]}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"no JSON form for {type(value).__name__} in a teacher capacity")


def _state_from_json(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_state_from_json(v) for v in value["tuple"])
    if isinstance(value, dict):
        return FrozenDict({key: _state_from_json(v) for key, v in value["pairs"]})
    return value


# -- the student --------------------------------------------------------------------------------------
def params_template(config: StudentConfig) -> Any:
    """Parameters of the student's structure (shapes and dtypes) to restore into, made without any data: one
    atom of the student's first element will do."""
    atom = Structure(np.array([config.elements[0]]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool),
                     name="probe")
    probe = jax.tree.map(jnp.asarray, pad_structures([atom]))
    probe, _ = with_neighbours(probe, config.cutoff, nl.NeighbourCapacity(edges=1, bins=1, bin_size=2, reach=1))
    return init_params(config, jax.random.key(0), probe)


def load_student(run_dir: str | os.PathLike, step: int | None = None, kernel: str | None = None) -> EnergyModel:
    """The trained student of a run directory as an EnergyModel: the checkpoint of `step`; by default the best
    one on the validation set where the run has one (the newest intact checkpoint if it is damaged), else the
    newest intact checkpoint. Weights that are not finite (a diverged run) are refused. `kernel` runs it with
    another kernel set than it was trained with (the same function: e.g. "pallas" on a GPU)."""
    run = RunDirectory(run_dir)
    config = run.read_config()
    if kernel is not None:
        config = dataclasses.replace(config, student=dataclasses.replace(config.student, kernel=kernel))
    template = params_template(config.student)
    if step is None and run.read_best() is not None:
        try:
            step, params = run.restore_best(template)
        except CheckpointError as err:
            warnings.warn(f"{err}: using the newest checkpoint instead", RuntimeWarning, stacklevel=2)
            step, params, _ = run.restore(template)
    else:
        step, params, _ = run.restore(template, step=step)
    if not all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params)):
        raise DivergedError(f"{run.path}: the student of step {step} has weights that are not finite (NaN or "
                            f"infinity): the run diverged; train it again with a lower optimizer.learning_rate")
    return student_model(config.student, params, run.read_reference(), name=os.path.abspath(run.path))


def training_seconds(rows: list[dict]) -> float:
    """Wall-clock seconds of training over every call of a run, from its metrics.jsonl rows: each call's clock
    (`seconds`) starts at 0, so it falls back where a resumed call begins."""
    total, last = 0.0, 0.0
    for row in rows:
        seconds = row.get("seconds", last)
        if seconds < last:
            total += last
        last = seconds
    return round(total + last, 1)


def step_timing(rows: list[dict], checkpoint_every: int) -> dict:
    """Training ms/step from metrics.jsonl rows: over the logged intervals of each call after its first (which
    holds the compilation), leaving out those ending in a validation and those starting at a checkpoint. The
    median of the intervals' ms/step (robust to a recompilation after a capacity grew) and their overall mean."""
    intervals, previous = [], None
    for row in rows:
        if previous is not None and row["seconds"] >= previous["seconds"]:  # the same call
            validated = any(k.startswith("val_") for k in row)
            checkpointed = previous["step"] % checkpoint_every == 0
            if not validated and not checkpointed and row["step"] > previous["step"]:
                intervals.append((row["step"] - previous["step"], row["seconds"] - previous["seconds"]))
        previous = row
    if not intervals:
        return {"ms_per_step": None, "ms_per_step_mean": None, "timed_steps": 0}
    steps, seconds = np.array(intervals).T
    return {"ms_per_step": round(float(np.median(1000 * seconds / steps)), 3),
            "ms_per_step_mean": round(float(1000 * seconds.sum() / steps.sum()), 3), "timed_steps": int(steps.sum())}
