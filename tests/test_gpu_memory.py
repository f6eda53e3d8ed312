"""The GPU memory policy for JAX beside a torch teacher (distiller.gpu_memory), checked on the CPU through the
environment it sets and when it sets it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distiller import gpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_policy_keeps_a_users_setting_and_is_applied_only_before_jax_initialises():
    assert gpu_memory.decide({}, False, False) == ("set", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    for name in gpu_memory.USER_SETTINGS:
        assert gpu_memory.decide({name: "0.5"}, False, False) == ("user", {})
        assert gpu_memory.decide({name: "0.5"}, True, True) == ("user", {})
    assert gpu_memory.decide({"XLA_PYTHON_CLIENT_PREALLOCATE": ""}, False, False)[0] == "set"  # empty = unset
    assert gpu_memory.decide({}, True, True) == ("too late", {})
    assert gpu_memory.decide({}, True, False) == ("no gpu", {})


def _fresh_python(code: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in gpu_memory.USER_SETTINGS}
    environ.update(env, PYTHONPATH=ROOT + os.pathsep + environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


REPORT = ("import json, os, warnings\n"
          "from jax._src import xla_bridge\n"
          "print(json.dumps({'outcome': outcome, 'env': os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'),\n"
          "                  'initialised': xla_bridge.backends_are_initialized(), 'warnings': caught}))\n")


def test_before_jax_initialises_preallocation_is_turned_off_without_initialising_jax():
    code = ("import warnings\nimport jax\nfrom distiller.gpu_memory import make_room_for_torch\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    outcome = make_room_for_torch()\ncaught = [str(x.message) for x in w]\n" + REPORT)
    got = _fresh_python(code)
    assert got == {"outcome": "set", "env": "false", "initialised": False, "warnings": []}
    assert _fresh_python(code, XLA_PYTHON_CLIENT_MEM_FRACTION="0.3")["outcome"] == "user"


def test_importing_what_an_experiment_imports_leaves_jax_uninitialised():
    # experiments/materials.py imports these before it loads its torch teacher; one that initialised JAX's
    # backend on import (jax_md does) would leave torch 25 % of a GPU (an out-of-memory seen on the H200).
    code = ("import json\nimport distiller.train.loop, distiller.evaluate, distiller.label, distiller.speed\n"
            "import distiller.run_directory, distiller.teachers.registry, distiller.students\n"
            "from jax._src import xla_bridge\nprint(json.dumps(xla_bridge.backends_are_initialized()))\n")
    assert _fresh_python(code) is False


def test_after_jax_initialised_on_a_cpu_nothing_changes_and_nothing_warns():
    code = ("import warnings\nimport jax, jax.numpy as jnp\njnp.zeros(1).block_until_ready()\n"
            "from distiller.gpu_memory import make_room_for_torch\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    outcome = make_room_for_torch()\ncaught = [str(x.message) for x in w]\n" + REPORT)
    assert _fresh_python(code) == {"outcome": "no gpu", "env": None, "initialised": True, "warnings": []}


def test_the_warning_says_what_to_set(monkeypatch):
    monkeypatch.setattr(gpu_memory, "_jax_state", lambda: (True, True))
    for name in gpu_memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(RuntimeWarning, match="XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        assert gpu_memory.make_room_for_torch() == "too late"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ


def test_a_large_structure_is_probed_on_a_cut_at_its_density_and_refused_before_work_when_it_cannot_fit(water):
    torch_bridge = pytest.importorskip("distiller.teachers.torch_bridge", reason="torch is not installed")
    from distiller.structure import Structure

    box = water.tiled((4, 4, 4)).replace(name="water 4x4x4")  # 5,184 atoms
    probe = torch_bridge.memory_probe(box, 2048)
    density = box.n_atoms / abs(np.linalg.det(box.cell))
    assert abs(probe.n_atoms - 2048) < 0.15 * 2048 and probe.periodic
    assert np.isclose(probe.n_atoms / abs(np.linalg.det(probe.cell)), density, rtol=0.15)
    molecule = Structure(numbers=box.numbers, positions=box.positions, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
                         name="a big cluster")
    assert torch_bridge.memory_probe(molecule, 1000).n_atoms == 1000
    assert torch_bridge.memory_probe(water, 2048) is water  # small enough already
    torch_bridge.memory_verdict("orb:x", box, 1000.0, 2048, free=10**8, device="cuda:0")  # 6.7 MB fits
    with pytest.raises(MemoryError, match=r"structure 'water 4x4x4' \(5,184 atoms\) needs about .* GiB on cuda:0 "
                                          r"for teacher orb:x .* but 0.0 GiB are free"):
        torch_bridge.memory_verdict("orb:x", box, 1e6, 2048, free=10**6, device="cuda:0")


def test_the_cli_applies_the_policy_for_commands_that_load_a_torch_teacher(tmp_path):
    from distiller.cli import _names_torch_teacher, build_parser

    parse = build_parser().parse_args
    assert _names_torch_teacher(parse(["label", "--structures", "in.extxyz", "--teacher", "sevenn:7net-0", "--out", "d"]))
    assert _names_torch_teacher(parse(["md", "--model", "orb:random/orb-v3-conservative", "--structure", "s.xyz", "--steps", "10",
                                       "--out", "o"]))
    assert not _names_torch_teacher(parse(["label", "--structures", "in.extxyz", "--teacher", "fennol-pmc:ani1x", "--out", "d"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"teacher": "sevenn:7net-0"}))
    assert _names_torch_teacher(parse(["evaluate", str(run), "--structures", "s.xyz"]))
