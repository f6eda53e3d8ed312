"""Molecular dynamics with JAX-MD's integrators, in `lax.scan` chunks, for any distiller model.

    for records in simulate(model, structure, Dynamics(ensemble="nvt", temperature=300), steps=10_000):
        ...  # one `Records` per chunk (the first holds step 0 alone)

Inside a chunk there is no Python per step: `lax.scan` over logged steps, each a `lax.scan` over `log_every`
integrator steps (JAX-MD's `apply_fn(state, neighbor=nbrs)` then `nbrs.update(position)`). Between chunks
the host checks the neighbour list's (sticky) overflow flag; on overflow it re-allocates with larger
capacities and redoes the chunk from its start, so an accepted chunk never used a truncated list.

Units are ASE's: eV, Å, amu, and time in ASE's unit (Å sqrt(amu/eV) = 10.18 fs): `dt = dt_fs * ase.units.fs`,
`kT = ase.units.kB * T`, and JAX-MD momenta are ASE's momenta (amu Å / ASE time unit). Masses are ASE's
(`ase.data.atomic_masses`). Temperature counts 3N degrees of freedom (JAX-MD's and ASE's convention). Initial
velocities are Maxwell-Boltzmann without centre-of-mass motion, scaled so that T(0) is the requested temperature.

Blow-ups (a time step too large, a model with holes) stop the run: every logged step is checked against a
`Safety` rule before it is handed on, and the first one that fails raises `MDFailure` after the steps before it
were yielded. A chunk whose neighbour list overflowed is checked before any capacity is grown for it: exploded
coordinates are a blow-up, not a capacity to grow (they would ask for more memory than exists, or overflow int32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Iterator, NamedTuple

import ase.data
import jax
import jax.numpy as jnp
import jax_md
import numpy as np
from ase import units

from distiller.batch import near_origin
from distiller.capacity import until_fits
from distiller.load import as_model
from distiller.md.potential import DEFAULT_SKIN, memoised, potential, space
from distiller.model import EnergyModel
from distiller.structure import Structure

ENSEMBLES = ("nve", "nvt")
THERMOSTATS = ("langevin", "nose-hoover")


@contextlib.contextmanager
def _quiet():
    """JAX-MD's kinetic energy asks for float64 sums, which JAX without x64 truncates with a warning each trace."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64", category=UserWarning)
        yield


@dataclasses.dataclass(frozen=True)
class Dynamics:
    """How to integrate: ensemble, temperature, time step (fs), thermostat."""

    ensemble: str = "nve"  # "nve" or "nvt"
    temperature: float = 300.0  # K: initial Maxwell-Boltzmann velocities, and the thermostat's target (nvt)
    dt: float = 0.5  # fs
    thermostat: str = "langevin"  # nvt: "langevin" (JAX-MD's BAOAB) or "nose-hoover" (JAX-MD's chain)
    friction: float = 0.01  # 1/fs, Langevin
    tau: float = 100.0  # fs, Nose-Hoover chain time constant
    dr_threshold: float = DEFAULT_SKIN  # Å, neighbour-list skin

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.thermostat not in THERMOSTATS:
            raise ValueError(f"thermostat must be one of {THERMOSTATS}, got {self.thermostat!r}")
        if not self.temperature >= 0 or not self.dt > 0 or not self.friction > 0 or not self.tau > 0:
            raise ValueError(f"invalid dynamics: temperature={self.temperature} K (>= 0), dt={self.dt} fs (> 0), "
                             f"friction={self.friction} /fs (> 0), tau={self.tau} fs (> 0)")


@dataclasses.dataclass(frozen=True)
class Safety:
    """When an MD run has blown up; every logged step is checked (see `first_failure`)."""

    max_temperature: float | None = None  # K; None: 5000 K, or 3x the target temperature where that is higher
    max_energy_jump: float = 1.0  # eV/atom: largest change of the total energy between consecutive logged steps

    def __post_init__(self):
        if self.max_temperature is not None and not self.max_temperature > 0 or not self.max_energy_jump > 0:
            raise ValueError(f"invalid safety limits: max_temperature={self.max_temperature} K (> 0), "
                             f"max_energy_jump={self.max_energy_jump} eV/atom (> 0)")

    def temperature_limit(self, dynamics: Dynamics) -> float:
        if self.max_temperature is not None:
            return float(self.max_temperature)
        return max(5000.0, 3.0 * dynamics.temperature)


# Bins a neighbour list may ask for: 2^24 bins of ~200 Å^3 hold millions of atoms; more means exploded
# coordinates (a molecule's bins grow with its bounding box).
MAX_BINS = 2**24


class MDFailure(FloatingPointError):
    """A blown-up MD run, as one line: where (structure), the step, its time and the cause. `last_step` is the
    last logged step that was handed on (None when step 0 itself failed)."""

    def __init__(self, where: str, step: int, time_fs: float, cause: str, last_step: int | None):
        super().__init__(f"{where}: MD failed at step {step} ({time_fs:g} fs): {cause}")
        self.where, self.step, self.time_fs, self.cause, self.last_step = where, step, time_fs, cause, last_step

    def within(self, where: str) -> "MDFailure":
        """The same failure, named by `where` (e.g. a sampler's replica)."""
        return MDFailure(where, self.step, self.time_fs, self.cause, self.last_step)


class Records(NamedTuple):
    """Logged steps of one chunk, on the host (numpy). Positions in Å, momenta in ASE units, energies in eV."""

    step: np.ndarray  # (R,) int
    position: np.ndarray  # (R, N, 3)
    momentum: np.ndarray  # (R, N, 3)
    force: np.ndarray  # (R, N, 3) eV/Å
    potential: np.ndarray  # (R,) eV, float64 totals (the model's reference energies included)
    kinetic: np.ndarray  # (R,) eV
    redone: int = 0  # times the chunk was redone after a capacity overflow


THERMO_COLUMNS = ("step", "time_fs", "temperature_K", "potential_eV", "kinetic_eV", "total_eV")


def thermo(records: Records, n_atoms: int, dt_fs: float) -> np.ndarray:
    """(R, 6) rows of THERMO_COLUMNS."""
    temperature = 2.0 * records.kinetic / (3 * n_atoms * units.kB)
    return np.stack([records.step, records.step * dt_fs, temperature, records.potential, records.kinetic,
                     records.potential + records.kinetic], axis=1)


def first_failure(records: Records, n_atoms: int, dynamics: Dynamics, safety: Safety,
                  previous_total: float | None = None, energies: bool = True) -> tuple[int, str] | None:
    """(index, cause) of the first logged step of `records` that shows a blow-up, or None.

    previous_total: the total energy (eV) of the logged step before the first (None: the first is not compared).
    energies: False for steps computed with an overflowed (truncated) list, whose energies are not to be
    trusted; positions and temperature still tell an explosion."""
    rows = thermo(records, n_atoms, dynamics.dt)
    limit = safety.temperature_limit(dynamics)
    before = np.concatenate([[np.nan if previous_total is None else previous_total], rows[:-1, 5]])
    jumps = (rows[:, 5] - before) / n_atoms
    for k, row in enumerate(rows):
        if not (np.all(np.isfinite(records.position[k])) and np.all(np.isfinite(row[2:]))):
            return k, "positions or energy became non-finite"
        if row[2] > limit:
            return k, f"temperature {row[2]:,.0f} K (limit {limit:,.0f} K)"
        if energies and abs(jumps[k]) > safety.max_energy_jump:
            return k, (f"total energy changed by {jumps[k]:+,.3g} eV/atom since the last logged step "
                       f"(limit {safety.max_energy_jump:g} eV/atom)")
    return None


def energy_drift(rows: np.ndarray, n_atoms: int) -> float:
    """Slope of the total energy against time (least squares), in meV/atom/ps, from thermo rows."""
    rows = np.asarray(rows, np.float64)
    if rows.shape[0] < 2:
        raise ValueError("energy drift needs at least two logged steps")
    time_ps = rows[:, 1] / 1000.0
    slope = np.polyfit(time_ps, rows[:, 5] - rows[0, 5], 1)[0]  # eV/ps; relative to the start for precision
    return float(slope * 1000.0 / n_atoms)


def masses(structure: Structure) -> np.ndarray:
    return np.asarray(ase.data.atomic_masses[np.asarray(structure.numbers)], np.float64)


def maxwell_boltzmann(key: jax.Array, mass: jax.Array, temperature: float) -> jax.Array:
    """(N, 3) momenta (ASE units) drawn at `temperature` K, without centre-of-mass motion, then scaled so that
    the kinetic temperature (3N degrees of freedom) is exactly `temperature`: a run's starting temperature does
    not depend on the seed's luck (81 atoms alone give +-30 K)."""
    kT = units.kB * temperature
    p = jnp.sqrt(mass[:, None] * kT) * jax.random.normal(key, (mass.shape[0], 3), jnp.float32)
    if mass.shape[0] > 1:
        p = p - jnp.mean(p, axis=0)
    kinetic = 0.5 * jnp.sum(p**2 / mass[:, None])
    target = 1.5 * mass.shape[0] * kT
    return p * jnp.where(kinetic > 0, jnp.sqrt(target / jnp.where(kinetic > 0, kinetic, 1.0)), 0.0)


def integrator(energy_fn, shift_fn, dynamics: Dynamics):
    """JAX-MD's (init_fn, apply_fn) for the dynamics, with one calling convention: init(key, R, mass, **kw)."""
    dt = dynamics.dt * units.fs
    kT = units.kB * dynamics.temperature
    if dynamics.ensemble == "nve":
        init_fn, apply_fn = jax_md.simulate.nve(energy_fn, shift_fn, dt)
        return (lambda key, R, mass, **kw: init_fn(key, R, kT, mass=mass, **kw)), apply_fn
    if dynamics.thermostat == "langevin":
        init_fn, apply_fn = jax_md.simulate.nvt_langevin(energy_fn, shift_fn, dt, kT,
                                                         gamma=dynamics.friction / units.fs)
    else:
        init_fn, apply_fn = jax_md.simulate.nvt_nose_hoover(energy_fn, shift_fn, dt, kT, tau=dynamics.tau * units.fs)
    return (lambda key, R, mass, **kw: init_fn(key, R, mass=mass, **kw)), apply_fn


def _integration(model: EnergyModel, structure: Structure, dynamics: Dynamics, log_every: int):
    """(neighbor_fn, init_fn, run_chunk, force_fn) for a structure: the functions jit compiles, built once."""
    _, shift_fn = space(structure)
    neighbor_fn, energy_fn = potential(model, structure, dynamics.dr_threshold)
    init_fn, apply_fn = integrator(energy_fn, shift_fn, dynamics)
    force_fn = jax.jit(jax_md.quantity.force(energy_fn))

    def observe(state, nbrs):
        kinetic = jax_md.quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        return state.position, state.momentum, state.force, energy_fn(state.position, neighbor=nbrs), kinetic

    @functools.partial(jax.jit, static_argnums=2)
    def run_chunk(state, nbrs, n_logged: int):
        """n_logged * log_every steps; the observables at the start and at every logged step."""
        def one_step(carry, _):
            state, nbrs = carry
            state = apply_fn(state, neighbor=nbrs)
            return (state, nbrs.update(state.position)), None

        def logged_step(carry, _):
            carry, _ = jax.lax.scan(one_step, carry, None, length=log_every)
            return carry, observe(*carry)

        start = observe(state, nbrs)
        carry, logged = jax.lax.scan(logged_step, (state, nbrs), None, length=n_logged)
        return carry, start, logged

    return neighbor_fn, init_fn, run_chunk, force_fn


def run_regrowing(run, state, nbrs, neighbor_fn, force, name: str, **allocate_kwargs):
    """One chunk `run(state, nbrs) -> (new_state, new_nbrs, rest)`, redone while its neighbour list overflowed.

    Each redo starts again from `state` with capacities that fit what the chunk needed (the model's measured
    at both ends of the chunk, with a margin that widens on every retry: `neighbor_fn.allocate(...,
    **allocate_kwargs)`); the start's forces were computed with the old list, so `force(position, nbrs)`
    recomputes them. Returns (new_state, new_nbrs, rest, redos).
    """
    def compute(start):
        state, nbrs = start
        result = run(state, nbrs)
        return result, result[1].did_buffer_overflow

    def grow(start, result, attempt):
        state, _ = start
        nbrs = neighbor_fn.allocate(state.position, previous=result[1], margin=1.25 + 0.25 * attempt,
                                    also=[result[0].position], **allocate_kwargs)
        return state.set(force=force(state.position, nbrs)), nbrs

    (new_state, new_nbrs, rest), _, redos = until_fits(
        compute, (state, nbrs), grow, what=name,
        describe=lambda start: f"neighbours {start[1].capacity}, model {start[1].model_capacity}")
    return new_state, new_nbrs, rest, redos


def simulate(model, structure: Structure, dynamics: Dynamics, steps: int, *, log_every: int = 10,
             chunk: int = 100, key: int | jax.Array = 0, capacity=None, model_capacity=None,
             safety: Safety = Safety()) -> Iterator[Records]:
    """Integrate `steps` steps from `structure`; yield the logged steps chunk by chunk (step 0 first).

    model: an EnergyModel, teacher spec or student run directory. key: seed of the initial
    velocities and of the Langevin noise. chunk: steps per compiled `lax.scan` (rounded up to a multiple of
    log_every). capacity, model_capacity: the neighbour list's and the model's starting capacities (default:
    measured at the start); too small ones are grown when a chunk overflows, and the chunk is redone.
    safety: when the run has blown up; the logged steps before the first failing one are yielded, then
    `MDFailure` is raised.
    """
    model = as_model(model)
    structure = structure.validated()
    if steps < 0 or log_every < 1 or steps % log_every:
        raise ValueError(f"steps ({steps}) must be a non-negative multiple of log_every ({log_every})")
    chunk = max(log_every, -(-int(chunk) // log_every) * log_every)
    key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key

    neighbor_fn, init_fn, run_chunk, force_fn = memoised("simulate", model, structure, (dynamics, log_every),
                                                         lambda: _integration(model, structure, dynamics, log_every))
    mass = jnp.asarray(masses(structure), jnp.float32)
    R = jnp.asarray(near_origin(structure), jnp.float32)  # float32 far from the origin is coarse (batch.near_origin)
    nbrs = neighbor_fn.allocate(R, capacity=capacity, model_capacity=model_capacity)
    key_velocities, key_noise = jax.random.split(key)
    with _quiet():
        state = init_fn(key_noise, R, mass, momenta=maxwell_boltzmann(key_velocities, mass, dynamics.temperature),
                        neighbor=nbrs)

    def failure(records, k, cause, last_step):
        step = int(records.step[k])
        return MDFailure(structure.name, step, step * dynamics.dt, cause, last_step)

    def checked(records, previous_total, last_step):
        """Yields the sane head of `records`; raises at its first failing step; returns the last total energy."""
        found = first_failure(records, structure.n_atoms, dynamics, safety, previous_total)
        if found is None:
            yield records
            return float(records.potential[-1] + records.kinetic[-1])
        k, cause = found
        if k:
            yield Records(*(x[:k] for x in records[:6]), redone=records.redone)
        raise failure(records, k, cause, int(records.step[k - 1]) if k else last_step)

    done, total = 0, None
    while True:
        n = min(chunk, steps - done)
        step = done + log_every * np.arange(1, n // log_every + 1)

        def chunk_of(state, nbrs):
            with _quiet():
                (new_state, new_nbrs), start, logged = run_chunk(state, nbrs, n // log_every)
            if bool(new_nbrs.did_buffer_overflow):  # a blow-up, or capacities to grow (run_regrowing)?
                records = _records(step, [np.asarray(x) for x in logged], 0, structure, model)
                found = first_failure(records, structure.n_atoms, dynamics, safety, energies=False)
                needed = np.asarray(new_nbrs.needed)
                if found is None and len(step) and (np.any(needed < 0) or needed[1] > MAX_BINS):
                    found = len(step) - 1, (f"coordinates exploded (the neighbour list would need "
                                            f"{int(needed[1]):,} bins)")
                if found is not None:
                    raise _BlownUp(failure(records, *found, last_step=done), start)
            return new_state, new_nbrs, (start, logged)

        def first(start):
            return _records(np.zeros(1, np.int64), [np.asarray(x)[None] for x in start], 0, structure, model)

        try:
            new_state, new_nbrs, (start, logged), attempt = run_regrowing(
                chunk_of, state, nbrs, neighbor_fn, lambda R, nbrs: force_fn(R, neighbor=nbrs), structure.name)
        except _BlownUp as blown:
            if done == 0 and not bool(nbrs.overflow):  # step 0 is sane: its list (allocated for it) fitted
                yield from checked(first(blown.start), None, None)
            elif done == 0:
                blown.failure.last_step = None
            raise blown.failure from None
        if done == 0:  # step 0, logged once its list is known to be good
            total = yield from checked(first(start), None, None)
        if n == 0:
            return
        total = yield from checked(_records(step, [np.asarray(x) for x in logged], attempt, structure, model),
                                   total, done)
        state, nbrs, done = new_state, new_nbrs, done + n
        if done == steps:
            return


class _BlownUp(Exception):
    """A chunk whose list overflowed blew up: `failure` to raise once `start` (its first step) is handed on."""

    def __init__(self, failure: MDFailure, start):
        super().__init__(str(failure))
        self.failure, self.start = failure, start


def _records(step, arrays, redone, structure, model) -> Records:
    position, momentum, force, potential, kinetic = arrays
    potential = model.reference.energy(structure.numbers) + np.asarray(potential, np.float64)
    return Records(step, position, momentum, force, potential, kinetic, redone=redone)


def frames(structure: Structure, records: Records, dt_fs: float, every: int = 1) -> list[Structure]:
    """The logged steps whose step is a multiple of `every`, as Structures labelled with the MD model's energy
    and forces; `info` gains `step` and `time_fs`. A molecule is where it started (it ran near the origin, moved
    there by whole Å); periodic atoms are wrapped into the cell."""
    offset = 0.0 if structure.periodic else structure.positions - near_origin(structure)
    out = []
    for k, step in enumerate(np.asarray(records.step).tolist()):
        if step % every:
            continue
        out.append(structure.replace(
            positions=np.asarray(records.position[k], np.float64) + offset, name=f"{structure.name}@{step}",
            energy=float(records.potential[k]), forces=np.asarray(records.force[k], np.float64), stress=None,
            info={**structure.info, "step": step, "time_fs": step * dt_fs}))
    return out
