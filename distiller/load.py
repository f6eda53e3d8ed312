"""Any energy model by name: a teacher spec or a student's run directory.

    load_model("fennol-pmc:ani1x")      load_model("orb:random/orb-v3-conservative")      load_model("runs/quickstart")
"""

from __future__ import annotations

import os

from distiller.model import EnergyModel


def load_model(spec_or_run_dir: str | os.PathLike) -> EnergyModel:
    """A student run directory (holding config.json) or a teacher spec (`fennol-pmc:ani1x/0`, `orb:...`)."""
    name = os.fspath(spec_or_run_dir)
    if os.path.isdir(name):
        from distiller.run_directory import RunDirectory, load_student

        if not RunDirectory(name).is_run():
            raise FileNotFoundError(f"{name}: a directory but not a distiller run (no config.json)")
        return load_student(name)
    from distiller.teachers.registry import known_prefixes, load_teacher

    if name.partition(":")[0] not in known_prefixes():  # `runs/typo` is a missing run more often than a spec
        raise FileNotFoundError(f"{name!r} is neither a run directory (no such directory) nor a teacher spec "
                                f"PREFIX:NAME (prefixes: {', '.join(known_prefixes())})")
    return load_teacher(name)


def as_model(model: EnergyModel | str | os.PathLike) -> EnergyModel:
    """An EnergyModel as it is; a spec or run directory loaded."""
    if isinstance(model, EnergyModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"expected an EnergyModel, a teacher spec or a run directory, got {type(model).__name__}")
