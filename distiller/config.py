"""Experiments are Python files that define `config`, an `Experiment` built from these frozen dataclasses.

`load_experiment(path, overrides)` runs the file and applies `--set a.b=value` overrides, so a run is
described by code (versioned, composable) and reproduced from `config.json` in its run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import numbers
import os
import types
import typing
from typing import Any, Callable, Sequence

from distiller import students
from distiller.students import SchNetConfig, StudentConfig


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


Condition = tuple[Callable[[Any], bool], str]  # a test and what it says, e.g. (lambda x: x >= 1, ">= 1")


def check_fields(config: Any, prefix: str, integers: dict[str, Condition] | None = None,
                 reals: dict[str, Condition] | None = None) -> None:
    """Refuse a field that is not an integer (`integers`) or a real number (`reals`), or fails its condition,
    naming it (`prefix` + name): experiment files and config.json are checked here as `--set` values are."""
    integers, reals = integers or {}, reals or {}
    for name, (ok, wanted) in {**integers, **reals}.items():
        value = getattr(config, name)
        kind = "an integer" if name in integers else "a number"
        if not (_is_int(value) if name in integers else _is_number(value)):
            raise ValueError(f"{prefix}{name} must be {kind} {wanted}, got {value!r}")
        if not ok(value):
            raise ValueError(f"{prefix}{name} must be {wanted}, got {value!r}")


AT_LEAST_0 = (lambda x: x >= 0, ">= 0")
AT_LEAST_1 = (lambda x: x >= 1, ">= 1")
POSITIVE = (lambda x: x > 0, "> 0")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How training structures are drawn from the seed structures, inside the jitted step."""

    rattle: float = 0.1  # Å, standard deviation of Gaussian displacements
    strain: float = 0.02  # largest symmetric strain component applied to periodic cells

    def __post_init__(self):
        # Below 1/3 every eigenvalue of I + ε stays positive (Gershgorin): a strained cell never folds flat.
        check_fields(self, "sampling.", reals={"rattle": AT_LEAST_0,
                                               "strain": (lambda x: 0 <= x < 1 / 3, "in [0, 1/3)")})


def check_ladder(config: Any, prefix: str) -> None:
    """The temperature ladder (`temperatures`) and the optional `max_temperature` of a pool of MD replicas
    (MDSampling, ActiveLearning)."""
    if config.max_temperature is not None:
        check_fields(config, prefix, reals={"max_temperature": POSITIVE})
    if not isinstance(config.temperatures, tuple) or not config.temperatures or \
            not all(_is_number(t) and t > 0 for t in config.temperatures):
        raise ValueError(f"{prefix}temperatures must be a non-empty tuple of temperatures > 0 K, got "
                         f"{config.temperatures!r}")


@dataclasses.dataclass(frozen=True)
class MDSampling:
    """Training structures drawn from a pool of replicas of the seed structures that move by teacher MD
    (Langevin, BAOAB) between optimiser steps, inside the jitted step (distiller.train.md_sampling).

    Replica r is a copy of seed r mod S (S seeds) at temperature temperatures[(r // S) mod T]: with
    replicas = S * T every seed runs at every temperature of the ladder. Each optimiser step advances every
    replica by `steps_between` MD steps, then draws batch_size distinct replicas (a function of (seed, step)),
    perturbs them by `rattle` and `strain` and has the teacher label them. A replica past the blow-up limits
    stops the run naming it."""

    replicas: int = 8  # pool size; at least batch_size (a step draws batch_size distinct replicas)
    temperatures: tuple[float, ...] = (300.0, 400.0, 500.0, 600.0)  # K, the ladder
    dt: float = 0.5  # fs
    friction: float = 0.01  # 1/fs, Langevin; 0: NVE (velocity Verlet)
    steps_between: int = 10  # MD steps per optimiser step (one lax.scan)
    equilibration: int = 0  # MD steps before the first optimiser step, a multiple of steps_between
    rattle: float = 0.0  # Å, Gaussian noise added to the drawn frames (not to the replicas)
    strain: float = 0.0  # largest symmetric strain component applied to drawn periodic frames
    # Blow-up limits (md.simulate's Safety, checked after every optimiser step): the hottest MD step of the
    # advance (None: 5000 K, or 3x the replica's temperature where that is higher), the change of a replica's
    # total energy over one advance, and the shortest interatomic distance.
    max_temperature: float | None = None  # K
    max_energy_jump: float = 1.0  # eV/atom
    min_distance: float = 0.5  # Å

    def __post_init__(self):
        check_fields(self, "sampling.", integers={"replicas": AT_LEAST_1, "steps_between": AT_LEAST_1,
                                                  "equilibration": AT_LEAST_0},
                     reals={"dt": POSITIVE, "friction": AT_LEAST_0, "rattle": AT_LEAST_0,
                            "strain": (lambda x: 0 <= x < 1 / 3, "in [0, 1/3)"), "max_energy_jump": POSITIVE,
                            "min_distance": AT_LEAST_0})
        check_ladder(self, "sampling.")
        if self.equilibration % self.steps_between:
            raise ValueError(f"sampling.equilibration must be a multiple of sampling.steps_between "
                             f"({self.steps_between}), got {self.equilibration}")


# The `sampling` field's kinds, as config.json names them ("kind"; a file without one is "rattle").
SAMPLINGS = {"rattle": SamplingConfig, "md": MDSampling}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    energy_weight: float = 1.0  # on (eV/atom)²
    forces_weight: float = 10.0  # on (eV/Å)², per component
    stress_weight: float = 0.0  # on (eV/Å³)², periodic graphs only; costs the teacher's strain derivative
    # On (eV/Å²)²: H·v of student against teacher along a random unit direction per structure and step (online
    # training only); costs a forward-over-reverse pass of both models.
    hvp_weight: float = 0.0
    # Weight schedules: a *_final weight is reached at the last step, ramped from the weight above over the run
    # (`weight_ramp`: "linear" or "cosine"), e.g. the usual late rise of energy_weight; None: constant.
    energy_weight_final: float | None = None
    forces_weight_final: float | None = None
    stress_weight_final: float | None = None
    hvp_weight_final: float | None = None
    weight_ramp: str = "linear"

    WEIGHTS: typing.ClassVar[tuple[str, ...]] = ("energy_weight", "forces_weight", "stress_weight", "hvp_weight")

    def __post_init__(self):
        check_fields(self, "loss.", reals={name: AT_LEAST_0 for name in self.WEIGHTS})
        check_fields(self, "loss.", reals={f"{name}_final": AT_LEAST_0 for name in self.WEIGHTS
                                           if getattr(self, f"{name}_final") is not None})
        if self.weight_ramp not in ("linear", "cosine"):
            raise ValueError(f"loss.weight_ramp must be 'linear' or 'cosine', got {self.weight_ramp!r}")

    def weighs(self, name: str) -> bool:
        """Whether the term `name` ("stress", "hvp"...) has a positive weight at some step of the run."""
        return getattr(self, f"{name}_weight") > 0 or (getattr(self, f"{name}_weight_final") or 0) > 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    final_learning_rate: float = 1e-4  # cosine decay to this
    gradient_clip: float = 10.0
    weight_decay: float = 0.0
    # Exponential moving average of the weights, the student that is evaluated and exported (checkpoint item
    # "params"); 0: the trained weights themselves. Its decay ramps up as min(ema_decay, (1 + t) / (10 + t)).
    ema_decay: float = 0.99
    # Reduce on plateau (runs with a validation set): after `plateau_patience` validations without a new best
    # force RMSE, the learning rate (the cosine schedule's) is multiplied by `plateau_factor`, down to
    # `plateau_min_scale` times the schedule's; 0: off.
    plateau_patience: int = 0
    plateau_factor: float = 0.5
    plateau_min_scale: float = 0.01

    def __post_init__(self):
        check_fields(self, "optimizer.", integers={"warmup_steps": AT_LEAST_0, "plateau_patience": AT_LEAST_0},
                     reals={"learning_rate": POSITIVE, "final_learning_rate": AT_LEAST_0,
                            "gradient_clip": POSITIVE, "weight_decay": AT_LEAST_0,
                            "ema_decay": (lambda x: 0 <= x < 1, "in [0, 1)"),
                            "plateau_factor": (lambda x: 0 < x < 1, "in (0, 1)"),
                            "plateau_min_scale": (lambda x: 0 < x <= 1, "in (0, 1]")})


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Offline training: how the grain loader reads the dataset (see distiller.data.loader)."""

    threads: int = 4  # grain threads reading and padding batches ahead of the step
    prefetch: int = 16  # batches read ahead
    max_atoms: int = 0  # if > 0, fewer than batch_size structures per batch for large structures

    def __post_init__(self):
        check_fields(self, "loader.", integers={"threads": AT_LEAST_0, "prefetch": AT_LEAST_1,
                                                "max_atoms": AT_LEAST_0})


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """A validation set: structures the training never samples (e.g. teacher MD from other seeds), labelled once
    by the teacher at the start (RUN/validation.extxyz), on which the averaged student is evaluated every
    `every` steps; the best one (lowest force RMSE) is kept in RUN/best/."""

    structures: tuple[str, ...] = ()  # structure files (any ASE-readable format)
    every: int = 0  # steps between evaluations; 0: no validation

    def __post_init__(self):
        check_fields(self, "validation.", integers={"every": AT_LEAST_0})
        if self.every > 0 and not self.structures:
            raise ValueError(f"validation.every={self.every} needs validation.structures")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    teacher: str = "fennol-pmc:ani1x"
    structures: tuple[str, ...] = ()  # online training: seed structure files (any ASE-readable format)
    # Offline training: a dataset directory written by `distiller label` (labels from any teacher; `teacher`
    # must name the dataset's). None: online training, labels from the FeNNol teacher inside the step.
    dataset: str | None = None
    loader: LoaderConfig = LoaderConfig()
    sampling: SamplingConfig | MDSampling = SamplingConfig()  # rattled seeds, or MD replicas of them
    student: StudentConfig = SchNetConfig()  # any registered architecture (distiller.students)
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000
    batch_size: int = 4  # seed structures per step
    seed: int = 0
    run_dir: str = "runs/experiment"
    checkpoint_every: int = 100
    log_every: int = 10
    held_out: int = 16  # structures sampled with a different seed for the final report
    validation: ValidationConfig = ValidationConfig()
    time_limit: float = 0.0  # seconds of training per call (`--time 30m`); 0: none. The schedules follow `steps`.
    tensorboard: bool = True  # the logged rows also as TensorBoard scalars in RUN/tensorboard/

    def __post_init__(self):
        check_fields(self, "", integers={"steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "seed": AT_LEAST_0,
                                         "checkpoint_every": AT_LEAST_1, "log_every": AT_LEAST_1,
                                         "held_out": AT_LEAST_0},
                     reals={"time_limit": AT_LEAST_0})
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"tensorboard must be True or False, got {self.tensorboard!r}")
        if isinstance(self.sampling, MDSampling):
            if self.dataset:
                raise ValueError(f"experiment {self.name!r}: sampling=MDSampling(...) needs the teacher in the step "
                                 "(online training, `structures`), not a dataset")
            if self.sampling.replicas < self.batch_size:
                raise ValueError(f"sampling.replicas must be >= batch_size ({self.batch_size}): each step draws "
                                 f"batch_size distinct replicas, got {self.sampling.replicas}")
        if self.optimizer.plateau_patience and not self.validation.every:
            raise ValueError(f"optimizer.plateau_patience={self.optimizer.plateau_patience} needs a validation set "
                             "(validation.structures and validation.every)")


@dataclasses.dataclass(frozen=True)
class ActiveLearning:
    """Rounds of teacher-checked student trajectories (distiller.train.active, `distiller active EXPERIMENT.py`).

    An experiment file defines it beside `config` as `active = ActiveLearning(...)` (defaults if it does not). A
    round: the run's student runs NVT (Langevin) MD from the seed structures, replica r being seed r mod S at
    temperatures[(r // S) mod T] (MDSampling's ladder); every `interval`-th step is a frame the teacher labels;
    the `select` frames with the largest `criterion` join the training pool and training resumes for
    `steps_per_round` steps. A replica that blows up (md.simulate's Safety, a bond stretched `max_stretch`x,
    atoms closer than `min_distance`) is a finding: its time to failure is reported, its frames up to the last
    sane one are kept. Only `rounds` may change when the job is continued."""

    rounds: int = 3
    steps_per_round: int = 1000  # training steps after each round's selection
    structures: tuple[str, ...] = ()  # MD seed structure files; (): the experiment's `structures`
    replicas: int = 4  # MD replicas per round (the ladder's convention above)
    temperatures: tuple[float, ...] = (300.0, 400.0, 500.0, 600.0)  # K
    md_steps: int = 2000  # MD steps per replica and round, a multiple of `interval`
    dt: float = 0.5  # fs
    friction: float = 0.01  # 1/fs, Langevin
    interval: int = 20  # MD steps between frames (step 0, the seed itself, is not a frame)
    select: int = 16  # frames per round that join the pool (all of them if fewer)
    criterion: str = "force_error"  # or "ensemble_spread" (an ensemble teacher's energy spread per atom)
    checkpoint: str = "best"  # the student that runs MD: "best" (RUN/best/, else the latest) or "latest"
    max_temperature: float | None = None  # K; None: 5000 K, or 3x the replica's temperature where higher
    max_energy_jump: float = 1.0  # eV/atom between frames
    min_distance: float = 0.5  # Å
    max_stretch: float = 1.5  # a bond longer than this x its length in the seed is broken

    CRITERIA: typing.ClassVar[tuple[str, ...]] = ("force_error", "ensemble_spread")
    CHECKPOINTS: typing.ClassVar[tuple[str, ...]] = ("best", "latest")
    RESUMABLE: typing.ClassVar[tuple[str, ...]] = ("rounds",)

    def __post_init__(self):
        check_fields(self, "active.", integers={"rounds": AT_LEAST_0, "steps_per_round": AT_LEAST_1,
                                                "replicas": AT_LEAST_1, "md_steps": AT_LEAST_1,
                                                "interval": AT_LEAST_1, "select": AT_LEAST_1},
                     reals={"dt": POSITIVE, "friction": POSITIVE, "max_energy_jump": POSITIVE,
                            "min_distance": POSITIVE, "max_stretch": (lambda x: x > 1, "> 1")})
        check_ladder(self, "active.")
        if not isinstance(self.structures, tuple) or not all(isinstance(s, str) for s in self.structures):
            raise ValueError(f"active.structures must be a tuple of structure files, got {self.structures!r}")
        if self.md_steps % self.interval:
            raise ValueError(f"active.md_steps must be a multiple of active.interval ({self.interval}), got "
                             f"{self.md_steps}")
        if self.criterion not in self.CRITERIA:
            raise ValueError(f"active.criterion must be one of {', '.join(self.CRITERIA)}, got {self.criterion!r}")
        if self.checkpoint not in self.CHECKPOINTS:
            raise ValueError(f"active.checkpoint must be one of {', '.join(self.CHECKPOINTS)}, got "
                             f"{self.checkpoint!r}")


def parse_arguments(argv: Sequence[str], flags: Sequence[str], options: Sequence[str], program: str) -> dict:
    """An experiment file's command line as {name: value}: True for each of `flags`, the next word for each of
    `options`; anything else, or an option without its value, a one-line SystemExit naming `program`."""
    args, rest = {}, list(argv)
    while rest:
        name = rest.pop(0)
        if name in flags:
            args[name] = True
        elif name in options:
            if not rest or rest[0].startswith("--"):
                raise SystemExit(f"{program}: {name} needs a value")
            args[name] = rest.pop(0)
        else:
            raise SystemExit(f"{program}: unknown argument {name!r} (known: {', '.join([*flags, *options])})")
    return args


def parse_duration(text: str) -> float:
    """'90s', '30m', '1.5h' or a number of seconds -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"a duration is a positive number with an optional unit s, m or h (e.g. 30m), got {text!r}")
    return seconds


def experiment_module(path: str) -> types.ModuleType:
    """The experiment file, run as a module."""
    spec = importlib.util.spec_from_file_location(f"experiment_{abs(hash(path))}", path)
    if not os.path.isfile(path) or spec is None or spec.loader is None:
        raise FileNotFoundError(f"experiment file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
    """Run an experiment file and return its `config`, with `key.sub=value` overrides applied."""
    path = os.fspath(path)
    module = experiment_module(path)
    config = getattr(module, "config", None)
    if not isinstance(config, Experiment):
        raise ValueError(f"{path} must define `config = Experiment(...)`")
    # Relative structure and dataset paths are relative to the experiment file, so a run works from any directory.
    here = os.path.dirname(os.path.abspath(path))
    config = dataclasses.replace(
        config, structures=tuple(s if os.path.isabs(s) else os.path.normpath(os.path.join(here, s)) for s in config.structures)
    )
    validation = tuple(s if os.path.isabs(s) else os.path.normpath(os.path.join(here, s))
                       for s in config.validation.structures)
    config = dataclasses.replace(config, validation=dataclasses.replace(config.validation, structures=validation))
    if config.dataset and not os.path.isabs(config.dataset):
        config = dataclasses.replace(config, dataset=os.path.normpath(os.path.join(here, config.dataset)))
    for item in overrides:
        config = apply_override(config, item)
    return config


def load_active_learning(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ActiveLearning:
    """The experiment file's `active = ActiveLearning(...)` (ActiveLearning() where it defines none), its
    structure files relative to the experiment file, with `field=value` overrides applied."""
    path = os.fspath(path)
    active = getattr(experiment_module(path), "active", ActiveLearning())
    if not isinstance(active, ActiveLearning):
        raise ValueError(f"{path}: `active` must be an ActiveLearning(...), got {type(active).__name__}")
    here = os.path.dirname(os.path.abspath(path))
    active = dataclasses.replace(active, structures=tuple(
        s if os.path.isabs(s) else os.path.normpath(os.path.join(here, s)) for s in active.structures))
    for item in overrides:
        active = apply_override(active, item)
    return active


def apply_override(config: Any, item: str) -> Any:
    """`a.b=value` → a copy of config with field a.b replaced (value parsed as a Python literal, and checked
    against the field's type: an error names the field before anything runs)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    return _replace_path(config, key.split("."), value, key, raw)


def _replace_path(obj: Any, path: list[str], value: Any, key: str, raw: str) -> Any:
    if isinstance(obj, StudentConfig) and path == ["architecture"]:
        return students.with_architecture(obj, value)
    if not dataclasses.is_dataclass(obj):
        raise KeyError(f"{key}: {'.'.join(key.split('.')[:-len(path)])} is a value, not a group of fields")
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise KeyError(f"{type(obj).__name__} has no field {path[0]!r} (fields: {', '.join(sorted(names))})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        return dataclasses.replace(obj, **{path[0]: _replace_path(current, path[1:], value, key, raw)})
    if dataclasses.is_dataclass(current):
        fields = [f.name for f in dataclasses.fields(current)]
        raise ValueError(f"{key} is a group of fields ({', '.join(fields)}): set one of them, e.g. {key}.{fields[0]}=...")
    try:
        hint = typing.get_type_hints(type(obj))[path[0]]
    except NameError:  # an annotation this module cannot resolve (a config defined elsewhere): no check here
        hint = Any
    return dataclasses.replace(obj, **{path[0]: _typed(value, hint, key, raw)})


def _typed(value: Any, hint: Any, key: str, raw: str) -> Any:
    """`value` (parsed from the text `raw`) as a field of type `hint` holds it; ValueError naming `key` if it
    cannot be one."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return None
    hint = next(h for h in options if h is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if _is_int(value) or (_is_number(value) and float(value).is_integer()):  # steps=1e4
            return int(value)
    elif hint is float:
        if _is_number(value):
            return float(value)
    elif hint is str:
        return value if isinstance(value, str) else raw  # name=2024 is the text as typed
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        items = value if isinstance(value, (list, tuple)) else [raw if item is str else value]
        return tuple(_typed(v, item, key, v if isinstance(v, str) else repr(v)) for v in items)
    else:
        return value  # a type without a check here (Any...): the dataclass's own check decides
    raise ValueError(f"{key} must be {_WHAT.get(hint, hint)}, got {raw!r}")


_WHAT = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}


def to_dict(config: Any) -> dict:
    """The config as JSON-ready data; a student config names its architecture."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, StudentConfig):
            value = value.to_dict()
        elif f.name == "sampling" and isinstance(value, tuple(SAMPLINGS.values())):
            value = {"kind": next(k for k, cls in SAMPLINGS.items() if type(value) is cls), **to_dict(value)}
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# Settings that name files (an Experiment's, flattened with dots, and ActiveLearning's): a resume compares the files
# they name, not their spelling (`experiments/../../shared/x` from an experiment file's default and `/home/u/shared/x`
# from DISTILLER_SHARED are the same structures).
FILE_FIELDS = ("structures", "dataset", "validation.structures")


def as_compared(key: str, value: Any) -> Any:
    """A setting's JSON value as a resume compares it: the real paths (from this directory) of FILE_FIELDS."""
    if key not in FILE_FIELDS or value is None:
        return value
    return os.path.realpath(value) if isinstance(value, str) else [os.path.realpath(v) for v in value]


def from_dict(data: dict) -> Experiment:
    """Rebuild an Experiment from `config.json`."""
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if isinstance(f.default, StudentConfig) and isinstance(v, dict):
                v = students.config_from_dict(v)
            elif cls is Experiment and f.name == "sampling" and isinstance(v, dict):
                v = dict(v)
                kind = v.pop("kind", "rattle")
                if kind not in SAMPLINGS:
                    raise ValueError(f"sampling.kind must be one of {', '.join(SAMPLINGS)}, got {kind!r}")
                v = build(SAMPLINGS[kind], v)
            elif dataclasses.is_dataclass(f.default) and isinstance(v, dict):
                v = build(type(f.default), v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(Experiment, data)
