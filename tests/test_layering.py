"""The package's layering, read from its source: every import statement (also those inside functions) of every
module. Lower layers never import higher ones: nothing but the entry points imports the trainer, and the core
(batches, models, derivatives, capacities, prediction) names no teacher, student, MD or training module."""

import ast
import pathlib

import distiller

PACKAGE = pathlib.Path(distiller.__file__).parent
ENTRY_POINTS = {"distiller.cli", "distiller.quickstart"}
CORE = {"distiller.batch", "distiller.model", "distiller.derivatives", "distiller.capacity", "distiller.predict",
        "distiller.reference", "distiller.neighbours", "distiller.structure", "distiller.precision", "distiller.files"}


def module_imports() -> dict[str, set[str]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
        out[name] = names
    return out


def offenders(imports: dict[str, set[str]], importers, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {name}" for module, names in imports.items() if importers(module)
                  for name in names if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_nothing_below_the_trainer_imports_it():
    imports = module_imports()
    assert "distiller.train.step" in imports and "distiller.md.simulate" in imports  # the walk found the package
    below = lambda m: not m.startswith("distiller.train") and m not in ENTRY_POINTS
    assert offenders(imports, below, ("distiller.train",)) == []


def test_the_core_names_no_model_family():
    imports = module_imports()
    families = ("distiller.students", "distiller.teachers", "distiller.md", "distiller.train", "distiller.data",
                "distiller.run_directory", "distiller.load")
    assert offenders(imports, lambda m: m in CORE, families) == []


def test_the_walk_sees_function_level_imports():
    source = "def f():\n    from distiller.train.step import Distillation\n"
    found = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert offenders({"distiller.md.x": found}, lambda m: True, ("distiller.train",)) == [
        "distiller.md.x imports distiller.train.step"]
