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

Replicas (`simulate_replicas`): N independent structures of one atom count and pbc as one program, the same
chunk function `jax.vmap`-ed over a leading replica axis. JAX-MD states and neighbour lists are pytrees, so each
replica keeps its own positions, momenta, thermostat state, RNG stream and list; what differs between the
replicas' structures and temperatures (atomic numbers, cell, kT) goes in as vmapped arguments, so one compiled
program serves every ladder. What is shared is static: the list's capacities (they fit the most demanding
replica) and the decision to rebuild (`psum` over the replica axis keeps it a `lax.cond`: any stale replica
rebuilds all, which changes no energy). The sticky overflow flags are reduced over replicas, so one regrowth
redoes the chunk for all, and the host loop (`_integrate`) is `simulate`'s, replica by replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Iterator, NamedTuple, Sequence

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
    last logged step that was handed on (None when step 0 itself failed); `replica` the failing replica's index
    in `simulate_replicas` (None for `simulate`)."""

    def __init__(self, where: str, step: int, time_fs: float, cause: str, last_step: int | None, *,
                 replica: int | None = None):
        super().__init__(f"{where}: MD failed at step {step} ({time_fs:g} fs): {cause}")
        self.where, self.step, self.time_fs, self.cause, self.last_step = where, step, time_fs, cause, last_step
        self.replica = replica

    def within(self, where: str) -> "MDFailure":
        """The same failure, named by `where` (e.g. a sampler's replica)."""
        return MDFailure(where, self.step, self.time_fs, self.cause, self.last_step, replica=self.replica)


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


REPLICA_AXIS = "replica"  # the vmapped axis of `simulate_replicas`' program (the neighbour lists' psum)


def _chunk_function(energy_fn, apply_fn, log_every: int, replica_axis: str | None):
    """run(state, nbrs, n_logged, kw): n_logged * log_every steps and the observables at the start and at every
    logged step (not jitted). kw: the arguments of one replica (`kT`, `numbers`, `cell`, `box`; empty for
    `simulate`), passed to the integrator, the energy and the list's update."""
    def observe(state, nbrs, kw):
        kinetic = jax_md.quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)
        return state.position, state.momentum, state.force, energy_fn(state.position, neighbor=nbrs, **kw), kinetic

    def run(state, nbrs, n_logged: int, kw):
        update_kw = {k: kw[k] for k in ("cell", "numbers") if k in kw}
        if replica_axis is not None:
            update_kw["replica_axis"] = replica_axis

        def one_step(carry, _):
            state, nbrs = carry
            state = apply_fn(state, neighbor=nbrs, **kw)
            return (state, nbrs.update(state.position, **update_kw)), None

        def logged_step(carry, _):
            carry, _ = jax.lax.scan(one_step, carry, None, length=log_every)
            return carry, observe(*carry, kw)

        start = observe(state, nbrs, kw)
        carry, logged = jax.lax.scan(logged_step, (state, nbrs), None, length=n_logged)
        return carry, start, logged

    return run


def _integration(model: EnergyModel, structure: Structure, dynamics: Dynamics, log_every: int):
    """(neighbor_fn, init_fn, run_chunk, force_fn) for a structure: the functions jit compiles, built once."""
    _, shift_fn = space(structure)
    neighbor_fn, energy_fn = potential(model, structure, dynamics.dr_threshold)
    init_fn, apply_fn = integrator(energy_fn, shift_fn, dynamics)
    force_fn = jax.jit(jax_md.quantity.force(energy_fn))
    chunk = _chunk_function(energy_fn, apply_fn, log_every, replica_axis=None)
    run_chunk = jax.jit(lambda state, nbrs, n_logged: chunk(state, nbrs, n_logged, {}), static_argnums=2)
    return neighbor_fn, init_fn, run_chunk, force_fn


def _replica_integration(model: EnergyModel, template: Structure, dynamics: Dynamics, log_every: int):
    """(neighbor_fn, init, run_chunk, force, rebuild) for replicas of `template`'s atom count and pbc, vmapped
    over a leading replica axis; each takes the replicas' arguments `kw` (stacked) last."""
    _, shift_fn = space(template)
    neighbor_fn, energy_fn = potential(model, template, dynamics.dr_threshold)
    init_fn, apply_fn = integrator(energy_fn, shift_fn, dynamics)
    force_fn = jax_md.quantity.force(energy_fn)
    chunk = _chunk_function(energy_fn, apply_fn, log_every, replica_axis=REPLICA_AXIS)

    @functools.partial(jax.jit, static_argnums=2)
    def run_chunk(states, nbrs, n_logged: int, kw):
        return jax.vmap(lambda s, nb, kw: chunk(s, nb, n_logged, kw), axis_name=REPLICA_AXIS)(states, nbrs, kw)

    @jax.jit
    def init(keys, mass, temperature, R, nbrs, kw):
        def one(key, mass, temperature, R, nbrs, kw):
            key_velocities, key_noise = jax.random.split(key)  # as simulate() splits its key
            momenta = maxwell_boltzmann(key_velocities, mass, temperature)
            return init_fn(key_noise, R, mass, momenta=momenta, neighbor=nbrs, **kw)
        return jax.vmap(one)(keys, mass, temperature, R, nbrs, kw)

    force = jax.jit(jax.vmap(lambda R, nbrs, kw: force_fn(R, neighbor=nbrs, **kw)))
    rebuild = jax.jit(jax.vmap(lambda R, nbrs, kw: nbrs.update(R, rebuild=True, **kw)))  # lists at R (_ReplicaLists)
    return neighbor_fn, init, run_chunk, force, rebuild


class _ReplicaLists:
    """`neighbor_fn.allocate` for a stack of replicas: one NeighbourList whose arrays have a leading replica
    axis and whose (static, shared) capacities fit every replica.

    Capacities are measured on the host (`neighbor_fn.allocate`) for a few replicas, each allocation starting
    from the previous one (`previous=`) so that the last fits them all: at the start every distinct
    configuration (N copies of one start are measured once); after an overflow the replicas that needed the
    most of some capacity and those whose model capacity overflowed (the others are covered by the list's
    `needed`, a running maximum over every replica; a redo that still overflows grows again). Every replica's
    list is then built at those capacities in one vmapped rebuild."""

    def __init__(self, neighbor_fn, rebuild, list_kw: list[dict]):
        self.neighbor_fn, self.rebuild, self.list_kw = neighbor_fn, rebuild, list_kw
        self.stacked_kw = jax.tree.map(lambda *xs: jnp.stack(xs), *list_kw)

    def _measured(self, R, also, previous) -> list[int]:
        if previous is None:
            distinct: dict = {}
            for k in range(len(R)):
                key = (R[k].tobytes(), *(a[k].tobytes() for a in also),
                       *(np.asarray(v).tobytes() for v in self.list_kw[k].values()))
                distinct.setdefault(key, k)
            return list(distinct.values())
        needed = np.asarray(previous.needed)
        most = {int(np.argmax(needed[:, c])) for c in range(needed.shape[1])}
        return sorted(most | set(np.flatnonzero(np.asarray(previous.model_overflow)).tolist()))

    def allocate(self, R, *, previous=None, margin=None, also=(), capacity=None, model_capacity=None):
        R, also = np.asarray(R), [np.asarray(a) for a in also]
        fitted = None
        if previous is not None:  # what every replica's overflowed list needed, as one list's
            fitted = dataclasses.replace(jax.tree.map(lambda x: x[0], previous),
                                         needed=jnp.max(previous.needed, axis=0))
        measured = self._measured(R, also, previous)
        for k in measured:
            fitted = self.neighbor_fn.allocate(jnp.asarray(R[k]), previous=fitted, margin=margin,
                                               also=[jnp.asarray(a[k]) for a in also], capacity=capacity,
                                               model_capacity=model_capacity, **self.list_kw[k])
        template = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(R),) + x.shape), fitted)
        if previous is None and len(measured) == 1:  # copies of one configuration: its list is everyone's
            return template
        return self.rebuild(jnp.asarray(R), template, self.stacked_kw)


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
        return result, jnp.any(result[1].did_buffer_overflow)  # over replicas, where stacked

    def grow(start, result, attempt):
        state, _ = start
        nbrs = neighbor_fn.allocate(state.position, previous=result[1], margin=1.25 + 0.25 * attempt,
                                    also=[result[0].position], **allocate_kwargs)
        return state.set(force=force(state.position, nbrs)), nbrs

    (new_state, new_nbrs, rest), _, redos = until_fits(
        compute, (state, nbrs), grow, what=name,
        describe=lambda start: f"neighbours {start[1].capacity}, model {start[1].model_capacity}")
    return new_state, new_nbrs, rest, redos


class _Replicas(NamedTuple):
    """What the host loop needs to know of the replicas it integrates (one for `simulate`)."""

    what: str  # the run, for a CapacityError
    names: list[str]  # how an MDFailure names each replica
    n_atoms: int
    dynamics: list[Dynamics]  # each replica's (its own temperature)
    reference: np.ndarray  # (K,) float64 eV: each replica's reference energy (model.reference of its numbers)
    index: list[int | None]  # MDFailure.replica of each (None for `simulate`)


def _integrate(run, state, nbrs, neighbor_fn, force, replicas: _Replicas, steps: int, log_every: int,
               chunk: int, safety: Safety, batched: bool) -> Iterator[tuple[Records, ...]]:
    """The host loop of `simulate` and `simulate_replicas`: chunks of `run(state, nbrs, n_logged)`, redone with
    grown capacities after an overflow (`run_regrowing`), every logged step of every replica checked.

    batched: state, nbrs and the observables `run` returns have a leading replica axis (else one replica).
    Yields one Records per replica and chunk; stops at the first failure (the earliest step over the replicas,
    the lowest replica among equals) after yielding every replica's logged steps before it."""
    K, n_atoms = len(replicas.names), replicas.n_atoms
    limits = np.asarray([safety.temperature_limit(d) for d in replicas.dynamics])

    def split(step, observables, redone) -> list[Records]:
        arrays = [np.asarray(x) if batched else np.asarray(x)[None] for x in observables]
        return [_records(step, [x[k] for x in arrays], redone, replicas.reference[k]) for k in range(K)]

    def earliest(records: list[Records], previous_totals, energies=True, needed=None):
        """(index, replica, cause) of the first failing logged step over all replicas, or None."""
        suspects = _suspects(records, n_atoms, limits, safety, previous_totals, energies)
        best = None
        for r in np.flatnonzero(suspects | (np.zeros(K, bool) if needed is None else _absurd(needed))):
            found = first_failure(records[r], n_atoms, replicas.dynamics[r], safety,
                                  None if previous_totals is None else previous_totals[r], energies)
            if found is None and needed is not None and _absurd(needed)[r]:
                found = len(records[r].step) - 1, (f"coordinates exploded (the neighbour list would need "
                                                   f"{int(needed[r][1]):,} bins)")
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], int(r), found[1])
        return best

    def failure(records: list[Records], k: int, r: int, cause: str, last_step):
        step = int(records[r].step[k])
        return MDFailure(replicas.names[r], step, step * replicas.dynamics[r].dt, cause, last_step,
                         replica=replicas.index[r])

    def checked(records: list[Records], previous_totals, last_step):
        """Yields the sane head of `records`; raises at its first failing step; returns the last total energies."""
        found = earliest(records, previous_totals)
        if found is None:
            yield tuple(records)
            return [float(r.potential[-1] + r.kinetic[-1]) for r in records]
        k, r, cause = found
        if k:
            yield tuple(Records(*(x[:k] for x in rec[:6]), redone=rec.redone) for rec in records)
        raise failure(records, k, r, cause, int(records[r].step[k - 1]) if k else last_step)

    done, totals = 0, None
    while True:
        n = min(chunk, steps - done)
        step = done + log_every * np.arange(1, n // log_every + 1)

        def chunk_of(state, nbrs):
            with _quiet():
                (new_state, new_nbrs), start, logged = run(state, nbrs, n // log_every)
            if bool(jnp.any(new_nbrs.did_buffer_overflow)):  # a blow-up, or capacities to grow (run_regrowing)?
                records = split(step, logged, 0)
                found = earliest(records, None, energies=False,
                                 needed=np.asarray(new_nbrs.needed).reshape(K, -1) if len(step) else None)
                if found is not None:
                    raise _BlownUp(failure(records, *found, last_step=done), start)
            return new_state, new_nbrs, (start, logged)

        def first(start):
            return split(np.zeros(1, np.int64), [np.asarray(x)[None] if not batched else np.asarray(x)[:, None]
                                                 for x in start], 0)

        try:
            new_state, new_nbrs, (start, logged), attempt = run_regrowing(
                chunk_of, state, nbrs, neighbor_fn, force, replicas.what)
        except _BlownUp as blown:
            if done == 0 and not bool(jnp.any(nbrs.overflow)):  # step 0 is sane: its list (allocated for it) fitted
                yield from checked(first(blown.start), None, None)
            elif done == 0:
                blown.failure.last_step = None
            raise blown.failure from None
        if done == 0:  # step 0, logged once its list is known to be good
            totals = yield from checked(first(start), None, None)
        if n == 0:
            return
        totals = yield from checked(split(step, logged, attempt), totals, done)
        state, nbrs, done = new_state, new_nbrs, done + n
        if done == steps:
            return


def _suspects(records: list[Records], n_atoms: int, limits: np.ndarray, safety: Safety, previous_totals,
              energies: bool) -> np.ndarray:
    """(K,) bool: the replicas in which `first_failure` may find something (a superset; one vectorised pass, so
    that a thousand sane replicas cost one numpy expression per chunk, not a Python loop over their steps)."""
    position = np.stack([r.position for r in records])
    potential_energy = np.stack([r.potential for r in records])
    kinetic = np.stack([r.kinetic for r in records])
    total = potential_energy + kinetic
    temperature = 2.0 * kinetic / (3 * n_atoms * units.kB)
    bad = ~np.all(np.isfinite(position), axis=(1, 2, 3)) | ~np.all(np.isfinite(total) & np.isfinite(temperature),
                                                                     axis=1)
    bad |= np.any(temperature > limits[:, None], axis=1)
    if energies:
        before = np.full(len(records), np.nan) if previous_totals is None else np.asarray(previous_totals, np.float64)
        jumps = np.diff(np.concatenate([before[:, None], total], axis=1), axis=1) / n_atoms
        bad |= np.any(np.abs(jumps) > safety.max_energy_jump, axis=1)
    return bad


def _absurd(needed: np.ndarray) -> np.ndarray:
    """(K,) bool: neighbour lists that asked for what only exploded coordinates ask for."""
    return np.any(needed < 0, axis=1) | (needed[:, 1] > MAX_BINS)


def _prepared(model, log_every: int, chunk: int, steps: int):
    if steps < 0 or log_every < 1 or steps % log_every:
        raise ValueError(f"steps ({steps}) must be a non-negative multiple of log_every ({log_every})")
    return as_model(model), max(log_every, -(-int(chunk) // log_every) * log_every)


def _key(key) -> jax.Array:
    return jax.random.key(key) if isinstance(key, (int, np.integer)) else key


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
    model, chunk = _prepared(model, log_every, chunk, steps)
    structure = structure.validated()
    key = _key(key)

    neighbor_fn, init_fn, run_chunk, force_fn = memoised("simulate", model, structure, (dynamics, log_every),
                                                         lambda: _integration(model, structure, dynamics, log_every))
    mass = jnp.asarray(masses(structure), jnp.float32)
    R = jnp.asarray(near_origin(structure), jnp.float32)  # float32 far from the origin is coarse (batch.near_origin)
    nbrs = neighbor_fn.allocate(R, capacity=capacity, model_capacity=model_capacity)
    key_velocities, key_noise = jax.random.split(key)
    with _quiet():
        state = init_fn(key_noise, R, mass, momenta=maxwell_boltzmann(key_velocities, mass, dynamics.temperature),
                        neighbor=nbrs)
    replicas = _Replicas(structure.name, [structure.name], structure.n_atoms, [dynamics],
                         np.asarray([model.reference.energy(structure.numbers)], np.float64), [None])
    for records in _integrate(run_chunk, state, nbrs, neighbor_fn, lambda R, nbrs: force_fn(R, neighbor=nbrs),
                              replicas, steps, log_every, chunk, safety, batched=False):
        yield records[0]


def simulate_replicas(model, structures: Sequence[Structure], dynamics: Dynamics, steps: int, *,
                      keys: Sequence[int | jax.Array] | None = None, temperatures: Sequence[float] | None = None,
                      log_every: int = 10, chunk: int = 100, capacity=None, model_capacity=None,
                      safety: Safety = Safety()) -> Iterator[tuple[Records, ...]]:
    """Integrate N independent replicas as one compiled program; yield, chunk by chunk, one `Records` per replica.

        for records in simulate_replicas(model, [aspirin] * 8, Dynamics("nvt"), 1000, temperatures=ladder):
            records[k]  # replica k's logged steps of this chunk, exactly what `simulate` would yield for it

    structures: one per replica, all with the same atom count and pbc (positions, elements and cells may
    differ; `[structure] * n` for n replicas of one). Each replica has its own integrator state (positions,
    momenta, thermostat, Langevin RNG stream) and its own neighbour list (capacities are shared: they fit the
    most demanding replica; the lists rebuild together when one is stale, which changes no energy).
    keys: one seed (int) or JAX key per replica, default 0, 1, ..., N-1: replica k equals
    `simulate(model, structures[k], dynamics_k, steps, key=keys[k])` to float32 rounding, where dynamics_k is
    `dynamics` at temperatures[k]. temperatures: kelvin, one per replica (default dynamics.temperature): the
    initial velocities', and for NVT the thermostat's target (a Langevin or Nose-Hoover ladder); the
    default temperature limit of `safety` follows each replica's.
    Other arguments as for `simulate`.

    A blow-up in any replica stops the whole run: every replica's logged steps before the failing step are
    yielded (the same steps for all), then `MDFailure` is raised naming the replica (`failure.replica` is its
    index; the earliest failing step over all replicas, the lowest index among equals). The other replicas
    are not continued: to go on without one, start again from their last yielded states.
    """
    model, chunk = _prepared(model, log_every, chunk, steps)
    structures = _replica_structures(model, structures)
    K, template = len(structures), structures[0]
    keys = list(range(K)) if keys is None else list(keys)
    temperatures = [dynamics.temperature] * K if temperatures is None else [float(t) for t in temperatures]
    if len(keys) != K or len(temperatures) != K:
        raise ValueError(f"{K} replicas need {K} keys and {K} temperatures; got {len(keys)} keys and "
                         f"{len(temperatures)} temperatures")
    per_replica = [dataclasses.replace(dynamics, temperature=t) for t in temperatures]  # validates each
    # The program takes every replica's temperature as an argument (kT, the initial momenta): one program serves
    # every ladder, so it is built and memoised for a temperature it never uses.
    program = dataclasses.replace(dynamics, temperature=0.0)
    neighbor_fn, init, run_chunk, force, rebuild = memoised(
        "simulate_replicas", model, template, (program, log_every),
        lambda: _replica_integration(model, template, program, log_every))

    list_kw = [_list_arguments(s) for s in structures]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
        _step_arguments(kw, dynamics.ensemble, t) for kw, t in zip(list_kw, temperatures)])

    lists = _ReplicaLists(neighbor_fn, rebuild, list_kw)
    R = jnp.asarray(np.stack([near_origin(s) for s in structures]), jnp.float32)
    nbrs = lists.allocate(R, capacity=capacity, model_capacity=model_capacity)
    mass = jnp.asarray(np.stack([masses(s) for s in structures]), jnp.float32)
    with _quiet():
        state = init(jnp.stack([_key(k) for k in keys]), mass, jnp.asarray(temperatures, jnp.float32), R, nbrs,
                     stacked)
    what = f"MD of {K} replicas ({', '.join(dict.fromkeys(s.name for s in structures))})"
    replicas = _Replicas(what, [f"{s.name} (replica {k})" for k, s in enumerate(structures)], template.n_atoms,
                         per_replica, np.asarray([model.reference.energy(s.numbers) for s in structures], np.float64),
                         list(range(K)))
    yield from _integrate(lambda s, nb, n: run_chunk(s, nb, n, stacked), state, nbrs, lists,
                          lambda R, nb: force(R, nb, stacked), replicas, steps, log_every, chunk, safety,
                          batched=True)



def simulate_each(model, structures: Sequence[Structure], dynamics: Dynamics, steps: int, *,
                  keys: Sequence[int | jax.Array], **options) -> Iterator[tuple[Records, ...]]:
    """`simulate_replicas` of these structures, except that one structure runs as `simulate` (the same
    trajectory without vmap's batch axis, which costs a lone trajectory time: 1.8x for ANI-1x on an H200); a
    lone trajectory's MDFailure has `replica` None. options: `simulate_replicas`'s (temperatures only for more
    than one)."""
    if len(structures) == 1:
        for records in simulate(model, structures[0], dynamics, steps, key=keys[0], **options):
            yield (records,)
    else:
        yield from simulate_replicas(model, structures, dynamics, steps, keys=keys, **options)

def _list_arguments(structure: Structure) -> dict:
    """What of a replica's structure its neighbour list and energy take as arguments: numbers, and a cell."""
    kw = {"numbers": jnp.asarray(structure.numbers, jnp.int32)}
    if structure.periodic:
        kw["cell"] = jnp.asarray(structure.cell, jnp.float32)
    return kw


def _step_arguments(list_kw: dict, ensemble: str, temperature: float) -> dict:
    """A replica's arguments of an integrator step: its list's, JAX-MD's `box` (the periodic shift's, the
    cell's transpose) and, for NVT, its thermostat's kT."""
    kw = dict(list_kw)
    if "cell" in kw:
        kw["box"] = kw["cell"].T
    if ensemble == "nvt":
        kw["kT"] = jnp.float32(units.kB * temperature)
    return kw


def _replica_structures(model: EnergyModel, structures) -> list[Structure]:
    """The replicas' structures, validated: one program needs one atom count and one pbc."""
    if isinstance(structures, Structure) or not len(structures):
        raise TypeError("structures must be a non-empty sequence of Structures, one per replica "
                        "([structure] * n for n replicas of one)")
    structures = [s.validated() for s in structures]
    model.check(structures)
    first = structures[0]
    for k, s in enumerate(structures[1:], 1):
        if s.n_atoms != first.n_atoms or not np.array_equal(s.pbc, first.pbc):
            raise ValueError(f"replica {k} ({s.name}: {s.n_atoms} atoms, pbc {np.asarray(s.pbc).tolist()}) and "
                             f"replica 0 ({first.name}: {first.n_atoms} atoms, pbc {np.asarray(first.pbc).tolist()}) "
                             f"cannot share one MD program: replicas need the same atom count and pbc")
    return structures


class _BlownUp(Exception):
    """A chunk whose list overflowed blew up: `failure` to raise once `start` (its first step) is handed on."""

    def __init__(self, failure: MDFailure, start):
        super().__init__(str(failure))
        self.failure, self.start = failure, start


def _records(step, arrays, redone, reference: float) -> Records:
    position, momentum, force, potential, kinetic = arrays
    potential = reference + np.asarray(potential, np.float64)
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
