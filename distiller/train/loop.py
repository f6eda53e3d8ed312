"""The training loop: steps, logging and checkpoints of a run directory, resumes that continue exactly.

The data order depends only on (seed, step) in both modes, and the capacities are saved with every
checkpoint, so a resumed run continues exactly where the checkpoint left it (distiller.run_directory).
"""

from __future__ import annotations

import json
import os
import time

import jax
from tqdm import tqdm

from distiller.config import Experiment
from distiller.files import write_json_atomic
from distiller.run_directory import RunDirectory
from distiller.structure import Structure, write_structures
from distiller.train.step import Distillation, TrainState
from distiller.train.validation import Validation, read_validation_set


def run(config: Experiment, resume: bool = False, progress: bool = True, stop_after: int | None = None,
        job: Distillation | None = None, overwrite: bool = False) -> TrainState:
    """Train (or continue training) the run in `config.run_dir`; returns the final state.

    `resume`: continue from the run directory's last checkpoint (a fresh start if it has none).
    `overwrite`: start afresh in a run directory that holds another run's checkpoints, deleting them; without
    it (and without `resume`) such a directory is a FileExistsError, raised before any work.
    `stop_after` ends the job after that many steps of this call, as a kill would (after a checkpoint);
    `config.time_limit` likewise after the first step that ends past it, with a checkpoint of that step.
    `job`: a Distillation of `config` already made (its teacher loaded), to use again afterwards.
    """
    run_dir = RunDirectory(config.run_dir)
    previous = run_dir.latest_step()
    if previous is not None and not resume:
        if not overwrite:
            raise FileExistsError(f"{config.run_dir} holds a run's checkpoints (up to step {previous}): resume it "
                                  "(--resume), start it again (--overwrite: deletes them) or choose another run "
                                  "directory (--run-dir)")
        run_dir.clear_checkpoints()
    job = job or Distillation.create(config)
    resuming = resume and previous is not None
    # Before config.json: a validation structure either model cannot take is refused with nothing written.
    validation_set = read_validation_set(config, run_dir, job.teacher, fresh=not resuming) \
        if config.validation.every else None
    run_dir.write_config(config)
    checkpoints = run_dir.checkpoints()
    start = 0
    if resuming:
        job.use_reference(run_dir.read_reference())
        template = job.state_template()
        start, ema, (params, opt_state, step) = run_dir.restore(
            template.ema, (template.params, template.opt_state, template.step))
        state = TrainState(params, opt_state, step, ema)
        run_dir.truncate_metrics(start)
        capacity = run_dir.load_capacity(start)
        if capacity is not None:
            job.data.restore_capacity(capacity)
    else:
        state = job.initial_state()
        run_dir.write_reference(job.reference)
        if os.path.exists(run_dir.metrics_path):
            os.remove(run_dir.metrics_path)
    validation = None if validation_set is None else Validation(validation_set, job.student(), run_dir)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.name,
               disable=not progress, dynamic_ncols=True)
    inputs_iter = job.data.batches(start)
    with open(run_dir.metrics_path, "a") as log:
        t0 = time.perf_counter()

        def record(done: int, state: TrainState, metrics: dict) -> bool:
            """Log, validate and checkpoint a checked step; True when the job should stop after it."""
            out_of_time = config.time_limit > 0 and time.perf_counter() - t0 >= config.time_limit
            validated = validation is not None and (done % config.validation.every == 0 or done == config.steps)
            if done % config.log_every == 0 or done == config.steps or validated:
                row = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                if validated:
                    row.update(validation(done, state.ema))
                row["seconds"] = round(time.perf_counter() - t0, 3)
                log.write(json.dumps(row) + "\n")
                log.flush()
                postfix = {"loss": f"{row['loss']:.4g}", "F_rmse": f"{row['forces_rmse']:.3f}"}
                if validated:
                    postfix["val_F_rmse"] = f"{row['val_forces_rmse']:.3f}"
                bar.set_postfix(postfix)
            if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
                # Capacities first: a checkpoint on disk always has the capacities it was trained with.
                run_dir.save_capacity(done, job.data.capacity_state())
                run_dir.save_checkpoint(checkpoints, done, state.ema, (state.params, state.opt_state, state.step))
            if out_of_time and done < config.steps:
                tqdm.write(f"{config.name}: time limit of {config.time_limit:g} s reached at step {done} of "
                           f"{config.steps} (checkpointed; --resume continues)")
            return out_of_time or (stop_after is not None and done - start >= stop_after)

        # Steps are dispatched ahead of reading their overflow flags (`steps_in_flight`). A step that
        # overflowed (rare: capacities grow) is redone at grown capacities and the steps after it again from
        # its result: the numbers are those of stepping one at a time.
        in_flight = steps_in_flight()
        pending = []  # dispatched, unchecked steps, oldest first: (step, state before it, inputs, key, outputs)
        stopped = False
        for step in bar:
            inputs, key = next(inputs_iter), job.step_key(step)
            before = pending[-1][4][0] if pending else state
            pending.append((step, before, inputs, key, job.dispatch_step(before, inputs, key)))
            while len(pending) > in_flight and not stopped:
                oldest = pending.pop(0)
                state, metrics, redone = _checked_step(job, oldest)
                stopped = record(oldest[0] + 1, state, metrics)  # what is still pending is dropped, as by a kill
                if redone:
                    pending = _redispatched(job, state, pending)
            if stopped:
                break
        while pending and not stopped:
            oldest = pending.pop(0)
            state, metrics, _ = _checked_step(job, oldest)
            record(oldest[0] + 1, state, metrics)
    if job.offline:
        write_json_atomic(run_dir.file("loader.json"), job.data.loader.report())
    return state


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
