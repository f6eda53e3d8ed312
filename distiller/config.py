"""Experiments are Python files that define `config`, an `Experiment` built from these frozen dataclasses.

`load_experiment(path, overrides)` runs the file and applies `--set a.b=value` overrides, so a run is
described by code (versioned, composable) and reproduced from `config.json` in its run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

from distiller import students
from distiller.students import SchNetConfig, StudentConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How training structures are drawn from the seed structures, inside the jitted step."""

    rattle: float = 0.1  # Å, standard deviation of Gaussian displacements
    strain: float = 0.02  # largest symmetric strain component applied to periodic cells


@dataclasses.dataclass(frozen=True)
class LossConfig:
    energy_weight: float = 1.0  # on (eV/atom)²
    forces_weight: float = 10.0  # on (eV/Å)², per component
    stress_weight: float = 0.0  # on (eV/Å³)², periodic graphs only; costs the teacher's strain derivative
    # On (eV/Å²)²: H·v of student against teacher along a random unit direction per structure and step (online
    # training only); costs a forward-over-reverse pass of both models.
    hvp_weight: float = 0.0

    def __post_init__(self):
        for name in ("energy_weight", "forces_weight", "stress_weight", "hvp_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


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

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Offline training: how the grain loader reads the dataset (see distiller.data.loader)."""

    threads: int = 4  # grain threads reading and padding batches ahead of the step
    prefetch: int = 16  # batches read ahead
    max_atoms: int = 0  # if > 0, fewer than batch_size structures per batch for large structures


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """A validation set: structures the training never samples (e.g. teacher MD from other seeds), labelled once
    by the teacher at the start (RUN/validation.extxyz), on which the averaged student is evaluated every
    `every` steps; the best one (lowest force RMSE) is kept in RUN/best/."""

    structures: tuple[str, ...] = ()  # structure files (any ASE-readable format)
    every: int = 0  # steps between evaluations; 0: no validation

    def __post_init__(self):
        if self.every < 0 or (self.every > 0 and not self.structures):
            raise ValueError(f"validation.every={self.every} needs validation.structures (and every >= 0)")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    teacher: str = "fennol-pmc:ani1x"
    structures: tuple[str, ...] = ()  # online training: seed structure files (any ASE-readable format)
    # Offline training: a dataset directory written by `distiller label` (labels from any teacher; `teacher`
    # must name the dataset's). None: online training, labels from the FeNNol teacher inside the step.
    dataset: str | None = None
    loader: LoaderConfig = LoaderConfig()
    sampling: SamplingConfig = SamplingConfig()
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

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"experiment {self.name!r}: steps, batch_size, checkpoint_every and log_every must be "
                             f">= 1 (got {self.steps}, {self.batch_size}, {self.checkpoint_every}, {self.log_every})")
        if self.time_limit < 0:
            raise ValueError(f"experiment {self.name!r}: time_limit must be >= 0 seconds, got {self.time_limit}")


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


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Experiment:
    """Run an experiment file and return its `config`, with `key.sub=value` overrides applied."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(f"experiment_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"experiment file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "config", None)
    if not isinstance(config, Experiment):
        raise TypeError(f"{path} must define `config = Experiment(...)`")
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


def apply_override(config: Any, item: str) -> Any:
    """`a.b=value` → a copy of config with field a.b replaced (value parsed as a Python literal)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    return _replace_path(config, key.strip().split("."), value)


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    if isinstance(obj, StudentConfig) and path == ["architecture"]:
        return students.with_architecture(obj, value)
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise KeyError(f"{type(obj).__name__} has no field {path[0]!r} (fields: {', '.join(sorted(names))})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        return dataclasses.replace(obj, **{path[0]: _replace_path(current, path[1:], value)})
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        value = tuple(value)
    elif isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return dataclasses.replace(obj, **{path[0]: value})


def to_dict(config: Any) -> dict:
    """The config as JSON-ready data; a student config names its architecture."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, StudentConfig):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


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
            elif dataclasses.is_dataclass(f.default) and isinstance(v, dict):
                v = build(type(f.default), v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(Experiment, data)
