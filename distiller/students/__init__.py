"""Students: small, fast, exactly invariant and energy-conserving models trained to imitate a teacher.

Architectures are registered by their config class (a `StudentConfig` subclass naming its `architecture` and
building its network, decorated with `@register`); nothing else in distiller names an architecture. A new one
is one module and one import line below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from distiller.students.base import (_ARCHITECTURES, StudentConfig, atom_energies, edge_lengths, init_params,
                                     register, student_model)
# The architectures: importing one registers it.
from distiller.students.painn import PaiNNConfig
from distiller.students.schnet import SchNetConfig


def architectures() -> list[str]:
    """The registered architecture names."""
    return sorted(_ARCHITECTURES)


def config_class(architecture: str) -> type[StudentConfig]:
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown student architecture {architecture!r} (registered: {', '.join(architectures())})")
    return _ARCHITECTURES[architecture]


def config_from_dict(values: Mapping[str, Any]) -> StudentConfig:
    """A student config from its `to_dict()` (config.json); the architecture defaults to SchNet."""
    values = dict(values)
    cls = config_class(values.pop("architecture", SchNetConfig.architecture))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)} (fields: {', '.join(sorted(names))})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def with_architecture(config: StudentConfig, architecture: str) -> StudentConfig:
    """`config` as another architecture: the common fields kept, the new architecture's own at their defaults."""
    common = {f.name: getattr(config, f.name) for f in dataclasses.fields(StudentConfig)}
    return config_class(architecture)(**common)


__all__ = ["StudentConfig", "PaiNNConfig", "SchNetConfig", "architectures", "atom_energies", "config_class", "config_from_dict",
           "edge_lengths", "init_params", "register", "student_model", "with_architecture"]
