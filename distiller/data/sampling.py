"""Samplers: seed structures in, candidate structures (unlabelled) out, reproducible from a key.

    candidates = sample(seeds, RattleConfig(count=100, stdev=0.05, strain=0.02), teacher=None, key=0)
    candidates = sample("watersmall.extxyz", MDConfig(count=50, temperature=400), "fennol-pmc:ani1x", key=1)

Methods, each configured by a frozen dataclass (its `method` names it in provenance):
  RattleConfig       Gaussian displacements, plus a random symmetric cell strain for periodic seeds
                     (`distiller.data.perturb.perturb`, the same rattle the online trainer applies in jit);
  NormalModeConfig   ANI-style normal-mode sampling: relax with the model (FIRE), Hessian of the model at the
                     minimum, modes populated at temperature T;
  MDConfig           NVT molecular dynamics with the model (JAX-MD, `distiller.md`), snapshots every k steps,
                     trajectories of one atom count and pbc integrated as one program;
  RattleRelaxConfig  rattle-relax-repeat families: rattle, a few FIRE steps, rattle again...; every rattled and
                     every partly relaxed frame is kept, reaching the off-equilibrium regions MD at T misses.

Every candidate's `info["provenance"]` says where it came from: {"method", "params" (the config), "source"
(the seed's file and index, or its name), "seed" (the sampling key), "sample" (its index among the seed's
candidates), method-specific details, "parent" (the seed's own provenance, if it had one)}. Candidates carry
no labels: label them with a teacher (`distiller.label`).

Reproducibility: the key of candidate j of seed i is fold_in(fold_in(key, i), j) (families and cycles fold in
likewise), so a candidate does not depend on how many others were drawn. Validity: every candidate passes
`Structure.validated()` and has no two atoms closer than `min_distance` (0.5 Å); a rattle or normal-mode draw
that fails is redrawn from fold_in(its key, attempt) (provenance "attempt"), a failing MD or relaxation frame is
an error naming the seed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from tqdm import tqdm

from distiller import batch as batching
from distiller.data.perturb import perturb
from distiller.load import as_model
from distiller.structure import Structure, StructureError, closest_pair, read_structures
from distiller.vibrations import vibrational_modes

MIN_DISTANCE = 0.5  # Å
MAX_ATTEMPTS = 20


# --------------------------------------------------------------------------------------------------
# Configurations


@dataclasses.dataclass(frozen=True)
class RattleConfig:
    """`count` copies of each seed, every atom displaced by N(0, stdev²) Å per direction; periodic cells also
    strained by a random symmetric ε with entries uniform in [-strain, strain] (positions follow the cell)."""

    count: int = 10
    stdev: float = 0.05  # Å
    strain: float = 0.0
    method: ClassVar[str] = "rattle"

    def __post_init__(self):
        _check_positive(self, count=self.count)
        _check_non_negative(self, stdev=self.stdev, strain=self.strain)


@dataclasses.dataclass(frozen=True)
class NormalModeConfig:
    """ANI's normal-mode sampling (Smith et al., Chem. Sci. 2017): at the model's minimum, mode i (force
    constant K_i, unit Cartesian direction q_i) is displaced by ±sqrt(3 c_i N kB T / K_i), with c_i uniform
    random numbers scaled to sum to a uniform number in [0, 1], so the harmonic energy is at most 3/2 N kB T.
    The 6 zero modes (5 for a linear molecule, 3 for a periodic cell) are skipped; force constants below
    `min_force_constant` (soft or slightly negative modes of an imperfect minimum) are raised to it."""

    count: int = 10
    temperature: float = 300.0  # K
    relax_fmax: float = 0.01  # eV/Å
    relax_steps: int = 2000
    min_force_constant: float = 0.5  # eV/Å²
    method: ClassVar[str] = "normal_modes"

    def __post_init__(self):
        _check_positive(self, count=self.count, relax_fmax=self.relax_fmax, min_force_constant=self.min_force_constant)
        _check_non_negative(self, temperature=self.temperature, relax_steps=self.relax_steps)


@dataclasses.dataclass(frozen=True)
class MDConfig:
    """NVT MD with the model from each seed: `replicas` independent trajectories (velocities and noise seeded
    by fold_in(key, seed, replica)), each with `equilibration` steps discarded, then `count` snapshots, one every
    `interval` steps. `temperature` may be a ladder, a tuple of temperatures: then each seed runs `replicas`
    trajectories at each rung, replica t * replicas + r at rung t (a ladder of one is the plain temperature,
    trajectory for trajectory), so a whole ladder shares the programs below.

    Up to `parallel` trajectories of one atom count and pbc (a seed's replicas, and seeds alike) are integrated
    as one program (`distiller.md.simulate_replicas`): the same trajectories to float32 rounding, one
    compilation, and for a host (torch, ASE) teacher one teacher call per step for all of them instead of one
    each (what that saves is per-call cost: a torch teacher's round trip and launches on a GPU; on a CPU the
    work grows with the atoms and little changes). A blow-up in one stops its program (whose other
    trajectories are then lost too)."""

    count: int = 10  # snapshots per trajectory
    temperature: float | tuple[float, ...] = 300.0  # K, or a ladder of them (`replicas` trajectories at each)
    interval: int = 20  # steps between snapshots
    equilibration: int = 200  # steps, a multiple of interval
    dt: float = 0.5  # fs
    thermostat: str = "langevin"  # or "nose-hoover"
    friction: float = 0.01  # 1/fs (Langevin)
    tau: float = 100.0  # fs, Nose-Hoover chain time constant
    chunk: int = 500  # steps per compiled lax.scan
    replicas: int = 1  # trajectories per seed
    parallel: int = 64  # trajectories integrated together as one program (1: one after the other)
    method: ClassVar[str] = "md"

    def __post_init__(self):
        _check_positive(self, count=self.count, interval=self.interval, dt=self.dt, chunk=self.chunk,
                        replicas=self.replicas, parallel=self.parallel, friction=self.friction, tau=self.tau)
        if isinstance(self.temperature, (list, tuple)):
            if not self.temperature:
                raise ValueError("MDConfig.temperature: a ladder needs at least one temperature, got ()")
            object.__setattr__(self, "temperature", tuple(float(t) for t in self.temperature))  # from JSON: a list
        for rung in self.temperatures:
            _check_non_negative(self, temperature=rung)
        _check_non_negative(self, equilibration=self.equilibration)
        if self.equilibration % self.interval:
            raise ValueError(f"MDConfig: equilibration ({self.equilibration}) must be a multiple of interval "
                             f"({self.interval})")

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The ladder's rungs (one for a plain temperature)."""
        return self.temperature if isinstance(self.temperature, tuple) else (float(self.temperature),)

    @property
    def trajectories(self) -> int:
        """Trajectories per seed: `replicas` at each rung."""
        return self.replicas * len(self.temperatures)

    def temperature_of(self, replica: int) -> float:
        """The temperature of a seed's trajectory `replica` (t * replicas + r: rung t)."""
        return self.temperatures[replica // self.replicas]

    def dynamics(self, temperature: float):
        from distiller.md.simulate import Dynamics

        return Dynamics(ensemble="nvt", temperature=temperature, dt=self.dt, thermostat=self.thermostat,
                        friction=self.friction, tau=self.tau)


@dataclasses.dataclass(frozen=True)
class RattleRelaxConfig:
    """`families` chains per seed of `cycles` rounds: rattle (stdev Å, strain for periodic cells, as in
    RattleConfig), then `relax_steps` FIRE steps with the model; both frames of every round are kept."""

    families: int = 2
    cycles: int = 5
    stdev: float = 0.1  # Å
    strain: float = 0.0
    relax_steps: int = 5
    method: ClassVar[str] = "rattle_relax"

    def __post_init__(self):
        _check_positive(self, families=self.families, cycles=self.cycles, relax_steps=self.relax_steps)
        _check_non_negative(self, stdev=self.stdev, strain=self.strain)


def _check_positive(config, **values):
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{type(config).__name__}.{name} must be > 0, got {value}")


def _check_non_negative(config, **values):
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 0, got {value}")


# --------------------------------------------------------------------------------------------------
# Shared pieces


def _as_key(key) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _key_record(key) -> Any:
    if isinstance(key, (int, np.integer)):
        return int(key)
    return np.asarray(jax.random.key_data(_as_key(key))).tolist()


def _seeds(seeds) -> list[tuple[Structure, dict]]:
    """(structure, source) pairs from structure files and/or Structures."""
    if isinstance(seeds, (str, os.PathLike, Structure)):
        seeds = [seeds]
    out = []
    for item in seeds:
        if isinstance(item, Structure):
            source = item.info.get("source")
            out.append((item.validated(), dict(source) if isinstance(source, dict) else {"name": item.name}))
        else:
            path = os.path.abspath(os.fspath(item))
            out.extend((s, {"path": path, "index": k, "name": s.name}) for k, s in enumerate(read_structures(path)))
    if not out:
        raise ValueError("no seed structures given")
    return out


# info keys of a seed that describe the seed itself (labels, its own MD step...), not its candidates
_SEED_ONLY = ("energy_spread", "source", "provenance", "step", "time_fs", "relax")


def _candidate(seed: Structure, source: dict, config, key, sample: int, positions, cell=None,
               **details) -> Structure:
    provenance = {"method": config.method, "params": dataclasses.asdict(config), "source": source,
                  "seed": _key_record(key), "sample": sample, **details}
    if "provenance" in seed.info:
        provenance["parent"] = seed.info["provenance"]
    info = {k: v for k, v in seed.info.items() if k not in _SEED_ONLY}
    return Structure(numbers=np.array(seed.numbers), positions=np.asarray(positions, np.float64),
                     cell=np.array(seed.cell if cell is None else cell, np.float64), pbc=np.array(seed.pbc),
                     name=f"{seed.name}|{config.method}:{sample}", info={**info, "provenance": provenance})


def is_valid(structure: Structure, min_distance: float = MIN_DISTANCE) -> bool:
    try:
        _require_valid(structure, min_distance, "structure")
    except StructureError:
        return False
    return True


def _require_valid(structure: Structure, min_distance: float, what: str) -> Structure:
    structure.validated()
    d = closest_pair(structure, min_distance)[2]
    if d < min_distance:
        raise StructureError(f"{structure.name}: {what} has atoms {d:.3f} Å apart (< {min_distance} Å)")
    return structure


def _keys(key, *indices) -> jax.Array:
    key = _as_key(key)
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key


@jax.jit
def _perturbed(template, positions, cell, key, stdev, strain):
    """perturb() of the first graph of `template` (one structure, padded) at `positions` and `cell`."""
    n = positions.shape[0]
    batch = template._replace(positions=template.positions.at[:n].set(positions), cell=template.cell.at[0].set(cell))
    out = perturb(batch, key, stdev, strain)
    return out.positions[:n], out.cell[0]


class _Rattler:
    """perturb() of one seed's atoms at any positions and cell (one compilation per atom count)."""

    def __init__(self, seed: Structure, stdev: float, strain: float):
        self.seed, self.stdev, self.strain = seed, stdev, strain
        self.template = jax.tree.map(jnp.asarray, batching.pad_structures([seed]))

    def __call__(self, positions, cell, key) -> tuple[np.ndarray, np.ndarray]:
        """(positions, cell): the cell is returned as given where nothing strains it (molecules, strain 0)."""
        binning = np.asarray(cell, np.float32) if self.seed.periodic else np.asarray(self.template.cell[0])
        new_positions, new_cell = _perturbed(self.template, np.asarray(positions, np.float32), binning, key,
                                             np.float32(self.stdev), np.float32(self.strain))
        strained = self.seed.periodic and self.strain > 0
        return np.asarray(new_positions, np.float64), (np.asarray(new_cell, np.float64) if strained
                                                       else np.array(cell, np.float64))


def _redrawn(make, key, min_distance: float, seed: Structure, method: str) -> Structure:
    """make(key, attempt) -> candidate; redraw from fold_in(key, attempt) until the candidate is valid."""
    for attempt in range(MAX_ATTEMPTS):
        candidate = make(key if attempt == 0 else jax.random.fold_in(key, attempt), attempt)
        if is_valid(candidate, min_distance):
            return candidate
    raise StructureError(f"{seed.name}: {MAX_ATTEMPTS} {method} draws in a row had atoms closer than "
                         f"{min_distance} Å (or a singular cell); the displacements are too large for this seed")


# --------------------------------------------------------------------------------------------------
# Samplers


def rattle(seeds, config: RattleConfig, key=0, *, min_distance: float = MIN_DISTANCE) -> list[Structure]:
    out = []
    for i, (seed, source) in enumerate(_seeds(seeds)):
        rattler = _Rattler(seed, config.stdev, config.strain)
        for j in range(config.count):
            def make(k, attempt, j=j):
                positions, cell = rattler(seed.positions, seed.cell, k)
                return _candidate(seed, source, config, key, j, positions, cell, attempt=attempt)

            out.append(_redrawn(make, _keys(key, i, j), min_distance, seed, config.method))
    return out


@functools.partial(jax.jit, static_argnums=1)
def _mode_coefficients(key, n_modes: int):
    """ANI's c_i (uniform, scaled to sum to a uniform number in [0, 1]) and random signs, for n_modes modes."""
    k_c, k_total, k_sign = jax.random.split(key, 3)
    c = jax.random.uniform(k_c, (n_modes,))
    c = c / jnp.sum(c) * jax.random.uniform(k_total)
    return c, jnp.where(jax.random.bernoulli(k_sign, 0.5, (n_modes,)), 1.0, -1.0)


def normal_modes(seeds, config: NormalModeConfig, model, key=0, *,
                 min_distance: float = MIN_DISTANCE) -> list[Structure]:
    from distiller.md.minimize import hessian, relax

    model = as_model(model)
    out = []
    for i, (seed, source) in enumerate(_seeds(seeds)):
        relaxed = relax(model, seed, fmax=config.relax_fmax, steps=config.relax_steps)
        reached = relaxed.info["relax"]["fmax"]
        if reached > config.relax_fmax:
            warnings.warn(f"{seed.name}: relaxation with {model.name} reached a largest force of {reached:.3g} eV/Å "
                          f"after {config.relax_steps} steps (asked {config.relax_fmax}); modes are taken there")
        directions, constants = vibrational_modes(relaxed, hessian(model, relaxed))
        stiffness = np.maximum(np.abs(constants), config.min_force_constant)
        energy = 3.0 * seed.n_atoms * units.kB * config.temperature
        details = {"relaxed_fmax": reached, "modes": int(len(constants)),
                   "softest_force_constant": float(np.min(constants))}

        for j in range(config.count):
            def make(k, attempt, j=j):
                c, sign = (np.asarray(x, np.float64) for x in _mode_coefficients(k, len(stiffness)))
                amplitude = sign * np.sqrt(c * energy / stiffness)
                positions = relaxed.positions + np.einsum("m,mnk->nk", amplitude, directions)
                return _candidate(seed, source, config, key, j, positions, attempt=attempt, **details)

            out.append(_redrawn(make, _keys(key, i, j), min_distance, seed, config.method))
    return out


def teacher_md(seeds, config: MDConfig, model, key=0, *, min_distance: float = MIN_DISTANCE) -> list[Structure]:
    """Candidates in the order seed, replica, step (sample j = replica * count + snapshot), however the
    trajectories were grouped into programs (`_md_programs`): the keys are per trajectory, not per program."""
    model = as_model(model)
    seeds = _seeds(seeds)
    candidates: dict[tuple[int, int], list[Structure]] = {}
    for trajectories in _md_programs(seeds, config):
        candidates.update(_md_program(model, seeds, trajectories, config, key, min_distance))
    return [c for i in range(len(seeds)) for replica in range(config.trajectories) for c in candidates[i, replica]]


def _md_programs(seeds: list[tuple[Structure, dict]], config: MDConfig) -> list[list[tuple[int, int]]]:
    """The trajectories (seed index, replica) grouped into programs of at most `config.parallel`: one program
    needs one atom count and pbc (`simulate_replicas`), so groups are by those, in the seeds' order."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, (seed, _) in enumerate(seeds):
        shape = (seed.n_atoms, tuple(np.asarray(seed.pbc, bool).tolist()))
        groups.setdefault(shape, []).extend((i, replica) for replica in range(config.trajectories))
    return [group[k:k + config.parallel] for group in groups.values()
            for k in range(0, len(group), config.parallel)]


def _md_program(model, seeds: list[tuple[Structure, dict]], trajectories: list[tuple[int, int]], config: MDConfig,
                key, min_distance: float) -> dict[tuple[int, int], list[Structure]]:
    """The candidates of each trajectory (seed index, replica), all integrated as one program (`simulate_each`:
    replica k equals `simulate` with its key to float32 rounding, and a host teacher labels all of them in one
    call per step). A blow-up names its seed and replica."""
    from distiller.md.simulate import MDFailure, frames, simulate_each

    steps = config.equilibration + config.count * config.interval
    structures = [seeds[i][0] for i, _ in trajectories]
    keys = [_keys(key, i, replica) for i, replica in trajectories]
    temperatures = [config.temperature_of(replica) for _, replica in trajectories]
    # A program of one rung keeps the temperature in its dynamics; rungs differ per trajectory as arguments.
    ladder = {"temperatures": temperatures} if len(set(temperatures)) > 1 else {}
    chunks = simulate_each(model, structures, config.dynamics(temperatures[0]), steps, keys=keys,
                           log_every=config.interval, chunk=config.chunk, **ladder)
    out: dict[tuple[int, int], list[Structure]] = {trajectory: [] for trajectory in trajectories}
    # a status line (stderr): a set's MD is minutes of one program with nothing else to show
    bar = tqdm(total=steps, unit="step", file=sys.stderr, mininterval=2.0,
               desc=f"teacher MD {structures[0].name} x{len(trajectories)} ({model.name})")
    try:
        for records in chunks:
            bar.update(int(records[0].step[-1]) - bar.n)
            for (i, replica), trajectory_records in zip(trajectories, records):
                seed, source = seeds[i]
                kept = out[i, replica]
                # a ladder's frames name their rung (a plain temperature is in params)
                rung = {"temperature_K": config.temperature_of(replica)} if len(config.temperatures) > 1 else {}
                for frame in frames(seed, trajectory_records, config.dt):
                    step = frame.info["step"]
                    if step <= config.equilibration:
                        continue
                    candidate = _candidate(seed, source, config, key, replica * config.count + len(kept),
                                           frame.positions, replica=replica, step=step, time_fs=step * config.dt,
                                           model=model.name, **rung)
                    kept.append(_require_valid(candidate, min_distance, f"MD with {model.name} at step {step}"))
    except MDFailure as err:
        i, replica = trajectories[0 if err.replica is None else err.replica]
        raise MDFailure(f"{seeds[i][0].name} (MD replica {replica} with {model.name})", err.step, err.time_fs,
                        err.cause, err.last_step, replica=replica) from err
    finally:
        bar.close()
    return out


def rattle_relax(seeds, config: RattleRelaxConfig, model, key=0, *,
                 min_distance: float = MIN_DISTANCE) -> list[Structure]:
    from distiller.md.minimize import Relaxer

    model = as_model(model)
    out = []
    for i, (seed, source) in enumerate(_seeds(seeds)):
        rattler = _Rattler(seed, config.stdev, config.strain)
        relaxer = Relaxer(model, seed, chunk=config.relax_steps)
        for f in range(config.families):
            positions, cell = seed.positions, seed.cell
            for c in range(config.cycles):
                j = 2 * (f * config.cycles + c)

                def make(k, attempt, positions=positions, cell=cell, j=j, c=c):
                    new_positions, new_cell = rattler(positions, cell, k)
                    return _candidate(seed, source, config, key, j, new_positions, new_cell, family=f, cycle=c,
                                      stage="rattled", attempt=attempt)

                rattled = _redrawn(make, _keys(key, i, f, c), min_distance, seed, config.method)
                positions, cell = rattled.positions, rattled.cell
                positions, largest, _ = relaxer(positions, cell if seed.periodic else None,
                                                steps=config.relax_steps)
                relaxed = _candidate(seed, source, config, key, j + 1, positions, cell, family=f, cycle=c,
                                     stage="relaxed", fmax=largest)
                out += [rattled, _require_valid(relaxed, min_distance, f"relaxation of family {f}, cycle {c}")]
    return out


SAMPLERS = {RattleConfig: rattle, NormalModeConfig: normal_modes, MDConfig: teacher_md,
            RattleRelaxConfig: rattle_relax}


def sample(seeds, method_config, teacher=None, key=0, *, min_distance: float = MIN_DISTANCE) -> list[Structure]:
    """Candidates from seeds (structure files and/or Structures) by the method `method_config` configures.

    teacher: the energy model that drives normal modes, MD and rattle-relax (an EnergyModel, a teacher spec such
    as "fennol-pmc:ani1x/0" or a student run directory); rattling needs none. key: an int or a JAX key.
    """
    sampler = SAMPLERS.get(type(method_config))
    if sampler is None:
        raise TypeError(f"unknown sampling configuration {type(method_config).__name__} "
                        f"(known: {', '.join(c.__name__ for c in SAMPLERS)})")
    if sampler is rattle:
        return rattle(seeds, method_config, key, min_distance=min_distance)
    if teacher is None:
        raise ValueError(f"{method_config.method} sampling needs an energy model (teacher=...)")
    return sampler(seeds, method_config, teacher, key, min_distance=min_distance)
