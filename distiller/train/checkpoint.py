"""Orbax checkpoints of the training state. Orbax writes to a temporary directory and renames it, so a
killed run leaves either a whole checkpoint or none; `latest` resumes from the newest whole one."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(run_dir: str, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
    mgr.save(step, args=ocp.args.StandardSave(state), force=True)
    mgr.wait_until_finished()


def latest_step(run_dir: str) -> int | None:
    path = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(path):
        return None
    return manager(run_dir).latest_step()


def restore(run_dir: str, like, step: int | None = None):
    """Restore the state saved at `step` (default: the latest) into the structure of `like`."""
    mgr = manager(run_dir)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return step, mgr.restore(step, args=ocp.args.StandardRestore(abstract))
