"""The training loop: steps, logging and checkpoints of a run directory, resumes that continue exactly.

The data order depends only on (seed, step) in both modes, and the capacities are saved with every
checkpoint, so a resumed run continues exactly where the checkpoint left it (distiller.run_directory).

Nothing of a run is lost or mixed up: one trainer at a time per run directory (its lock), a resume only with the
config and teacher files it was started with, a stop at the first step that is not finite (no checkpoint of it),
and SIGINT / SIGTERM checkpoint the step in progress before stopping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from typing import Iterator

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from distiller.config import Experiment, as_compared, to_dict
from distiller.files import write_json_atomic
from distiller.run_directory import DivergedError, RunDirectory, RunDirectoryError, RunLock
from distiller.structure import Structure, write_structures
from distiller.teachers.registry import teacher_files
from distiller.train.schedules import after_validation
from distiller.train.step import Distillation, TrainState, check_pool, checkpoint_items, from_checkpoint
from distiller.train.validation import Validation, read_validation_set


# What may differ from the run's config.json on --resume: how long and how often, not what is trained.
RESUMABLE = ("name", "run_dir", "steps", "time_limit", "log_every", "checkpoint_every", "validation.every",
             "tensorboard")


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after checkpointing the step it was in. str(): the one-line message;
    `signal`: the signal's number (a command exits with 128 + it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum


def run(config: Experiment, resume: bool = False, progress: bool = True, stop_after: int | None = None,
        job: Distillation | None = None, overwrite: bool = False) -> TrainState:
    """Train (or continue training) the run in `config.run_dir`; returns the final state.

    `resume`: continue from the run directory's newest intact checkpoint (a fresh start if it has none), with
    the config it was started with but for RESUMABLE fields (`steps` only growing) and the same teacher files;
    anything else is a RunDirectoryError raised before any work.
    `overwrite`: start afresh in a run directory that holds another run's checkpoints, deleting them; without
    it (and without `resume`) such a directory is a FileExistsError, raised before any work.
    `stop_after` ends the job after that many steps of this call, as a kill would (after a checkpoint);
    `config.time_limit` likewise after the first step that ends past it, with a checkpoint of that step.
    `job`: a Distillation of `config` already made (its teacher loaded), to use again afterwards.

    Stops, with nothing lost: SIGINT or SIGTERM during the steps checkpoints the step in progress and raises
    Interrupted (a KeyboardInterrupt; a second signal stops at once, unsaved). A loss or gradient norm that is
    not finite raises DivergedError at its step, before it is logged; weights that are not finite are never
    checkpointed. Another trainer on the directory, or its deletion during training: RunDirectoryError.
    """
    run_dir = RunDirectory(config.run_dir)
    with RunLock(run_dir) as lock:
        return _run(config, run_dir, lock, resume, progress, stop_after, job, overwrite)


def _run(config: Experiment, run_dir: RunDirectory, lock: RunLock, resume: bool, progress: bool,
         stop_after: int | None, job: Distillation | None, overwrite: bool) -> TrainState:
    previous = run_dir.latest_step()
    if previous is not None and not resume:
        if not overwrite:
            raise FileExistsError(f"{config.run_dir} holds a run's checkpoints (up to step {previous}): resume it "
                                  "(--resume), start it again (--overwrite: deletes them) or choose another run "
                                  "directory (--run-dir)")
        run_dir.clear_checkpoints()
    resuming = resume and previous is not None
    teacher = {} if config.dataset else teacher_files(config.teacher)  # offline, the dataset records its teacher's
    if resuming:
        check_resume(config, run_dir, previous, teacher)
    job = job or Distillation.create(config)
    # Before config.json: a validation structure either model cannot take is refused with nothing written.
    validation_set = read_validation_set(config, run_dir, job.teacher, fresh=not resuming) \
        if config.validation.every else None
    start = 0
    if resuming:
        job.use_reference(run_dir.read_reference())
        template = job.state_template()
        start, ema, optimizer = run_dir.restore(template.ema, checkpoint_items(template), set_aside_damaged=True)
        state = from_checkpoint(ema, optimizer)
        run_dir.truncate_metrics(start)
        capacity = run_dir.load_capacity(start)
        if capacity is not None:
            job.data.restore_capacity(capacity)
    run_dir.write_config(config)
    run_dir.write_teacher_files(teacher)
    if not resuming:
        state = job.initial_state()
        run_dir.write_reference(job.reference)
        if os.path.exists(run_dir.metrics_path):
            os.remove(run_dir.metrics_path)
        shutil.rmtree(run_dir.file("tensorboard"), ignore_errors=True)
    checkpoints = run_dir.checkpoints()  # after restoring: damaged checkpoints set aside are not its steps
    validation = None if validation_set is None else Validation(validation_set, job.student(), run_dir)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.name,
               disable=not progress, dynamic_ncols=True)
    inputs_iter = job.data.batches(start)
    last = {"checkpoint": start if resuming else None, "step": start}
    # metrics.jsonl is the record; TensorBoard shows its rows. A resumed run's rows after its checkpoint replace
    # those logged before the stop (purge_step), as they do in metrics.jsonl.
    board = _tensorboard(config, run_dir, start + 1 if resuming else None)
    opt = config.optimizer
    with open(run_dir.metrics_path, "a") as log, board, _signals_stop_after_the_step() as signals:
        t0 = time.perf_counter()

        def record(done: int, state: TrainState, metrics: dict) -> tuple[TrainState, bool]:
            """Log, validate and checkpoint a checked step; (the state, its plateau updated by a validation; True
            when the job should stop after it)."""
            out_of_time = config.time_limit > 0 and time.perf_counter() - t0 >= config.time_limit
            validated = validation is not None and (done % config.validation.every == 0 or done == config.steps)
            logged = done % config.log_every == 0 or done == config.steps or validated
            checkpointed = done % config.checkpoint_every == 0 or done == config.steps or out_of_time or bool(signals)
            # A replica that blew up (MD sampling) first: its labels, hence the loss, are not finite either.
            check_pool(job, done, state, last["checkpoint"])
            _check_finite(config, done, metrics, last["checkpoint"])
            if checkpointed:  # before anything of the step is written
                _check_finite_weights(config, done, state, last["checkpoint"])
            if logged or checkpointed:
                lock.check(done)
            if logged:
                row = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                if validated:
                    row.update(validation(done, state.ema))
                    state = state._replace(plateau=after_validation(
                        state.plateau, row["val_forces_rmse"], opt.plateau_patience, opt.plateau_factor,
                        opt.plateau_min_scale))
                row["seconds"] = round(time.perf_counter() - t0, 3)
                log.write(json.dumps(row) + "\n")
                log.flush()
                board.write(row)
                postfix = {"loss": f"{row['loss']:.4g}", "F_rmse": f"{row['forces_rmse']:.3f}"}
                if validated:
                    postfix["val_F_rmse"] = f"{row['val_forces_rmse']:.3f}"
                bar.set_postfix(postfix)
            if checkpointed:
                # Capacities first: a checkpoint on disk always has the capacities it was trained with.
                run_dir.save_capacity(done, job.data.capacity_state())
                run_dir.save_checkpoint(checkpoints, done, state.ema, checkpoint_items(state))
                board.flush()
                last["checkpoint"] = done
            last["step"] = done
            if out_of_time and done < config.steps:
                tqdm.write(f"{config.name}: time limit of {config.time_limit:g} s reached at step {done} of "
                           f"{config.steps} (checkpointed; --resume continues)")
            return state, bool(out_of_time or signals or (stop_after is not None and done - start >= stop_after))

        # Steps are dispatched ahead of reading their overflow flags (`steps_in_flight`). A step that
        # overflowed (rare: capacities grow) is redone at grown capacities and the steps after it again from
        # its result: the numbers are those of stepping one at a time. So are the steps after a validation that
        # changed the plateau state (they started from the state before it).
        in_flight = steps_in_flight()
        pending = []  # dispatched, unchecked steps, oldest first: (step, state before it, inputs, key, outputs)
        stopped = False
        for step in bar:
            inputs, key = next(inputs_iter), job.step_key(step)
            before = pending[-1][4][0] if pending else state
            pending.append((step, before, inputs, key, job.dispatch_step(before, inputs, key)))
            while len(pending) > in_flight and not stopped:
                oldest = pending.pop(0)
                checked, metrics, redone = _checked_step(job, oldest)
                # On a stop, what is still pending is dropped, as by a kill.
                state, stopped = record(oldest[0] + 1, checked, metrics)
                if redone or state.plateau is not checked.plateau:
                    pending = _redispatched(job, state, pending)
            if stopped:
                break
        while pending and not stopped:
            oldest = pending.pop(0)
            checked, metrics, redone = _checked_step(job, oldest)
            state, stopped = record(oldest[0] + 1, checked, metrics)
            if redone or state.plateau is not checked.plateau:
                pending = _redispatched(job, state, pending)
    if job.offline:
        write_json_atomic(run_dir.file("loader.json"), job.data.loader.report())
    if signals and last["step"] < config.steps:
        raise Interrupted(f"{config.name}: {signal.Signals(signals[0]).name} at step {last['step']} of {config.steps}: "
                          f"checkpointed and stopped; --resume continues", signals[0])
    return state


def check_resume(config: Experiment, run_dir: RunDirectory, previous: int, teacher: dict[str, str]) -> None:
    """Refuse to resume the run in `run_dir` (checkpointed up to `previous`) with `config` where it differs from
    the run's config.json in more than RESUMABLE, or `teacher` ({file: sha256}) from its teacher_files.json."""
    try:
        stored = _flat(to_dict(run_dir.read_config()))
    except FileNotFoundError:
        raise RunDirectoryError(f"{run_dir.path}: checkpoints but no config.json, so nothing to check a resume "
                                "against; start the run again (--overwrite) or choose another run directory") from None
    except (ValueError, TypeError, KeyError) as err:
        raise RunDirectoryError(f"{run_dir.file('config.json')}: cannot be read ({err})") from None
    wanted = _flat(to_dict(config))
    changed = [k for k in sorted(set(stored) | set(wanted))
               if as_compared(k, stored.get(k)) != as_compared(k, wanted.get(k)) and k not in RESUMABLE]
    if changed:
        differences = "; ".join(f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        raise RunDirectoryError(f"{run_dir.path}: --resume with a config that differs from the run's config.json in "
                                f"{differences}; only {', '.join(RESUMABLE)} may change: start a new run (--run-dir) "
                                "or this one again (--overwrite)")
    if config.steps < previous:
        raise RunDirectoryError(f"{run_dir.path}: steps={config.steps} is below the run's checkpoint of step "
                                f"{previous}; on --resume steps can only grow")
    for file, recorded in (run_dir.read_teacher_files() or {}).items():
        now = teacher.get(file)
        if now != recorded:
            found = "no longer one of its files" if now is None else f"its sha256 is now {now[:12]}…"
            raise RunDirectoryError(f"{file}: the teacher's model file changed since the run started (sha256 "
                                    f"{recorded[:12]}… in {run_dir.file('teacher_files.json')}, {found}); a run "
                                    "resumes only with the teacher it was trained with")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _diverged(config: Experiment, what: str, step: int, checkpoint: int | None) -> DivergedError:
    kept = "no checkpoint was written" if checkpoint is None else f"the last checkpoint (step {checkpoint}) is kept"
    return DivergedError(f"{config.name}: {what} at step {step}: training diverged and stopped, {kept}; lower "
                         f"optimizer.learning_rate ({config.optimizer.learning_rate:g}) or raise optimizer.warmup_steps")


def _check_finite(config: Experiment, step: int, metrics: dict, checkpoint: int | None) -> None:
    for key, what in (("loss", "the loss is not finite"), ("gradient_norm", "the gradient norm is not finite")):
        if not np.isfinite(float(metrics[key])):
            raise _diverged(config, what, step, checkpoint)


def _check_finite_weights(config: Experiment, step: int, state: TrainState, checkpoint: int | None) -> None:
    """Before a checkpoint: the weights (trained and averaged) are finite, else nothing is written."""
    if not all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((state.params, state.ema))):
        raise _diverged(config, "the parameters are not finite", step, checkpoint)


@contextlib.contextmanager
def _signals_stop_after_the_step() -> Iterator[list[int]]:
    """While inside: SIGINT and SIGTERM are recorded in the yielded list (the loop checkpoints the step it is in
    and stops) instead of ending the process; a second one raises KeyboardInterrupt at once. Handlers can only
    be set in the main thread; elsewhere signals keep their usual effect."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without a checkpoint")
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


class _Board:
    """The run's TensorBoard scalars (RUN/tensorboard/), or nothing (config.tensorboard False)."""

    def __init__(self, writer: SummaryWriter | None):
        self.writer = writer

    def write(self, row: dict) -> None:
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(name, value, row["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def __enter__(self) -> "_Board":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(config: Experiment, run_dir: RunDirectory, purge_step: int | None) -> _Board:
    """`purge_step`: the first step a resumed run logs again; TensorBoard hides what was logged from it on."""
    if not config.tensorboard:
        return _Board(None)
    # Event files are named by the second they are opened in: without a suffix, a call starting within the
    # same second as the previous one would truncate its file.
    return _Board(SummaryWriter(run_dir.file("tensorboard"), purge_step=purge_step,
                                filename_suffix=f".{time.time_ns()}"))


def steps_in_flight() -> int:
    """How many training steps `run` dispatches before reading the oldest one's overflow flag.

    1 on accelerators: the host prepares and launches step k while the device computes step k-1 (reading
    the flag after every step leaves the device idle during every dispatch: the quickstart's steps took
    10.7 instead of 8.8 ms on an H200, bench/results/train-loop-h200.json). 0 on a CPU, where the two steps
    would share its cores (6-14 % slower there, 2 cores).
    """
    return 0 if jax.default_backend() == "cpu" else 1


def _checked_step(job: Distillation, dispatched) -> tuple[TrainState, dict, bool]:
    """A dispatched step's (state, metrics), recomputed by `apply_step` if it overflowed; redone: whether it was."""
    _, state_before, inputs, key, (new_state, metrics, overflow) = dispatched
    if not bool(overflow):
        return new_state, metrics, False
    new_state, metrics, _ = job.apply_step(state_before, inputs, key)
    return new_state, metrics, True


def _redispatched(job: Distillation, state: TrainState, pending: list) -> list:
    """The pending steps dispatched again, one after the other from `state` (they started from a discarded one)."""
    out = []
    for step, _, inputs, key, _ in pending:
        out.append((step, state, inputs, key, job.dispatch_step(state, inputs, key)))
        state = out[-1][4][0]
    return out


def write_held_out(job: Distillation, path: str) -> list[Structure]:
    """The run's held-out structures (drawn like the training ones from another seed online, or the dataset's
    structures kept out of training offline), written to `path`."""
    structures = job.data.held_out(job.config.held_out)
    write_structures(path, structures)
    return structures
