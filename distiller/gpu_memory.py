"""JAX and a PyTorch teacher sharing one GPU: the memory policy.

By default JAX preallocates 75 % of a GPU's memory the first time it touches the GPU. A torch teacher in the same
process (Orb, SevenNet, ... through distiller's torch bridge, e.g. `distiller evaluate --teacher orb:...` or
online torch labelling) then has the remaining quarter: Orb-v3 on 23,558 atoms asked for 5.9 GiB more with 134 GiB
in use, 26 GiB of it torch's. JAX reads its allocator settings from the environment once, when it initialises
its GPU backend, so the policy has to be in place before that:

    make_room_for_torch()   # called by every torch teacher's loader, and by the CLI before any JAX work

- The user's own setting wins: if XLA_PYTHON_CLIENT_PREALLOCATE, XLA_PYTHON_CLIENT_MEM_FRACTION,
  XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_ALLOCATOR is set, nothing changes.
- Otherwise, before JAX has initialised a backend: XLA_PYTHON_CLIENT_PREALLOCATE=false. JAX then allocates on
  demand (its BFC allocator grows and keeps what it took), torch's caching allocator does the same, and each gets
  what it uses. A fraction would instead fix the split in advance, and no split suits every teacher and size.
- If JAX already runs on a GPU with its default preallocation, it is too late to change: a one-line warning says
  what to set. On a machine without a GPU nothing needs doing.
"""

from __future__ import annotations

import os
import warnings

# The environment variables through which a user chooses JAX's GPU allocator (jaxlib's xla_client reads them).
USER_SETTINGS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_ALLOCATOR")
POLICY = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

TOO_LATE = ("JAX already holds 75 % of the GPU's memory (its default preallocation), so a torch teacher in this "
            "process may run out of memory: set XLA_PYTHON_CLIENT_PREALLOCATE=false (or "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.4) before starting Python, or load the teacher before anything runs "
            "on JAX")


def decide(environ, jax_initialised: bool, jax_on_gpu: bool) -> tuple[str, dict[str, str]]:
    """(what happens, the variables to set): "user" (a setting of the user's is kept), "set" (before JAX's
    backend exists), "too late" (JAX already preallocated a GPU) or "no gpu" (JAX initialised without one)."""
    if any(environ.get(name) for name in USER_SETTINGS):
        return "user", {}
    if not jax_initialised:
        return "set", dict(POLICY)
    return ("too late", {}) if jax_on_gpu else ("no gpu", {})


def _jax_state() -> tuple[bool, bool]:
    """(initialised, on a GPU), without initialising anything."""
    from jax._src import xla_bridge

    initialised = getattr(xla_bridge, "backends_are_initialized", lambda: bool(xla_bridge._backends))
    if not initialised():
        return False, False
    import jax

    try:
        return True, bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend
        return True, False


def make_room_for_torch() -> str:
    """Apply the module's policy (see the module docstring) and return what happened."""
    outcome, settings = decide(os.environ, *_jax_state())
    os.environ.update(settings)
    if outcome == "too late":
        warnings.warn(TOO_LATE, RuntimeWarning, stacklevel=2)
    return outcome
