import os
import pathlib
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DISTILLER_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("FENNOL_PMC_DIR", str(SHARED / "teachers" / "fennol-pmc"))
# Two workers share two cores (pytest's -n 2): a torch teacher with its own two threads per worker oversubscribes
# them, and its idle threads spin (the Orb tests took 28 s with torch's default, 11 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def compilation_cache():
    """XLA's persistent compilation cache, for this session only: a program compiled again (a new Distillation's
    step, a model after `jax.clear_caches`) loads the same executable instead of compiling it, so the numbers
    are unchanged and the suite takes minutes less. An empty directory per session: nothing carries over."""
    import jax

    with tempfile.TemporaryDirectory(prefix="distiller-xla-cache-") as path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        yield path
        jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture
def torch_state_is_left_alone():
    """For torch teachers' tests: whatever the teacher did, torch's default dtype, TF32 flags and matmul
    precision are the caller's afterwards."""
    from distiller.teachers.torch_bridge import torch_state

    before = torch_state()
    yield
    assert torch_state() == before


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    return SHARED


@pytest.fixture(scope="session")
def structures_dir(shared) -> pathlib.Path:
    return shared / "structures"


@pytest.fixture(scope="session")
def aspirin(structures_dir):
    """The shared aspirin molecule (21 atoms)."""
    from distiller.structure import read_structures

    return read_structures(structures_dir / "aspirin.extxyz")[0]


@pytest.fixture(scope="session")
def water(structures_dir):
    """The shared periodic water box of 81 atoms (watertiny)."""
    from distiller.structure import read_structures

    return read_structures(structures_dir / "watertiny.extxyz")[0]


@pytest.fixture(autouse=True, scope="module")
def release_compilations():
    """Drop every compiled program after each test module. XLA's CPU executables each map ~100 memory regions;
    the suite compiles thousands of programs, and one process past the kernel's vm.max_map_count (65,530)
    crashes inside the next compilation (seen: a segfault in test_teacher_fennol after the contract suite)."""
    yield
    import jax

    jax.clear_caches()


# Test files by time alone (seconds on the 2-core development machine, OMP_NUM_THREADS=1), longest first: pytest-xdist
# (--dist loadfile) hands files out in collection order, so a long file handed out last (alphabetically, test_train)
# keeps one worker busy while the other has nothing left; handed out first, the short ones fill in around them.
# Files not listed (seconds or less each) follow in their usual order; the tests of a file keep their order.
LONGEST_FIRST = (
    "test_contract.py",  # 218
    "test_train.py",  # 128
    "test_sampling.py",  # 77
    "test_md_sampling.py",  # 61
    "test_label_hvp.py",  # 54
    "test_md.py",  # 53
    "test_label.py",  # 51
    "test_active.py",  # 50
    "test_stability.py",  # 48
    "test_cfconv_kernel.py",  # 45
    "test_md_replicas.py",  # 38
    "test_precision.py",  # 36
    "test_loader.py",  # 34
    "test_directional_cfconv_kernel.py",  # 33
    "test_md_failures.py",  # 32
    "test_architectures.py",  # 29
    "test_neighbours.py",  # 28
    "test_data_safety.py",  # 21
)


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together, in order
