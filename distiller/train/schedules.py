"""What changes over a run besides the cosine learning rate: loss weights ramped from a start to a final value
(computed inside the step from its count), and the reduce-on-plateau scale of the learning rate (a host-side rule
applied at each validation, its state part of the training state and checkpointed with it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Ramp:
    """A loss weight over the run: `start` to `final` (None: `start` throughout) linearly or along half a cosine
    (flat at both ends)."""

    start: float
    final: float | None = None
    shape: str = "linear"  # or "cosine"

    @property
    def ramps(self) -> bool:
        return self.final is not None and self.final != self.start

    def at(self, fraction):
        """The weight at `fraction` (step / steps, clipped to [0, 1]) of the run; `fraction` may be traced."""
        if not self.ramps:
            return self.start
        fraction = jnp.clip(fraction, 0.0, 1.0)
        shape = fraction if self.shape == "linear" else 0.5 * (1.0 - jnp.cos(math.pi * fraction))
        return self.start + (self.final - self.start) * shape


class Plateau(NamedTuple):
    """Reduce-on-plateau state: the learning rate's scale, the best validation force RMSE so far (eV/Å) and how
    many validations since it. Fixed-dtype arrays: a changed scale enters the jitted step without recompiling."""

    scale: np.ndarray = np.asarray(1.0, np.float32)
    best: np.ndarray = np.asarray(np.inf, np.float32)
    waited: np.ndarray = np.asarray(0, np.int32)


def after_validation(plateau: Plateau, forces_rmse: float, patience: int, factor: float,
                     min_scale: float) -> Plateau:
    """The state after a validation of force RMSE `forces_rmse`: a new best (strictly lower) resets the wait;
    `patience` validations without one multiply the scale by `factor` (not below `min_scale`) and wait again.
    patience 0: the rule is off (the scale stays 1)."""
    if patience == 0:
        return plateau
    scale, best, waited = np.float32(plateau.scale), np.float32(plateau.best), int(plateau.waited) + 1
    if np.float32(forces_rmse) < best:
        best, waited = np.float32(forces_rmse), 0
    elif waited >= patience:
        scale, waited = max(scale * np.float32(factor), np.float32(min_scale)), 0
    return Plateau(np.asarray(scale, np.float32), np.asarray(best, np.float32), np.asarray(waited, np.int32))
