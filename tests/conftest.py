import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DISTILLER_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("FENNOL_PMC_DIR", str(SHARED / "teachers" / "fennol-pmc"))


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    return SHARED


@pytest.fixture(scope="session")
def structures_dir(shared) -> pathlib.Path:
    return shared / "structures"
