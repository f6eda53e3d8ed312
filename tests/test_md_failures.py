"""Blown-up MD stops with one line naming the step, time and cause; nothing after the last sane step is kept."""

import json
import re

import ase.io
import numpy as np
import pytest
from ase import units

from distiller import cli
from distiller.md.simulate import Dynamics, MDFailure, Records, Safety, first_failure

TEACHER = "fennol-pmc:ani1x/0"


def _records(temperatures, totals, n_atoms=3, positions=None):
    """Logged steps 0, 10, ... with these temperatures (K) and total energies (eV)."""
    kinetic = 1.5 * n_atoms * units.kB * np.asarray(temperatures, np.float64)
    r = len(kinetic)
    position = np.zeros((r, n_atoms, 3)) if positions is None else positions
    zeros = np.zeros((r, n_atoms, 3))
    return Records(10 * np.arange(r), position, zeros, zeros, np.asarray(totals, np.float64) - kinetic, kinetic)


def test_first_failure_names_the_first_step_that_breaks_a_limit():
    dynamics, safety = Dynamics(temperature=300), Safety()
    assert first_failure(_records([300, 320, 4900], [-10.0, -10.1, -9.0]), 3, dynamics, safety) is None
    k, cause = first_failure(_records([300, 320, 41_000, 9e9], [-10.0, -10.0, -10.0, 0.0]), 3, dynamics, safety)
    assert (k, cause) == (2, "temperature 41,000 K (limit 5,000 K)")
    k, cause = first_failure(_records([300, 320], [-10.0, -1.0]), 3, dynamics, safety)
    assert k == 1 and cause.startswith("total energy changed by +3 eV/atom") and "(limit 1 eV/atom)" in cause
    # against the previous chunk's last total energy, and not at all for energies of an overflowed list
    assert first_failure(_records([300], [-1.0]), 3, dynamics, safety, previous_total=-10.0)[0] == 0
    assert first_failure(_records([300], [-1.0]), 3, dynamics, safety, previous_total=-10.0, energies=False) is None
    nan = np.zeros((2, 3, 3))
    nan[1, 0, 0] = np.nan
    assert first_failure(_records([300, 300], [-10.0, -10.0], positions=nan), 3, dynamics, safety) == (
        1, "positions or energy became non-finite")
    # the default limit follows a hot target; an explicit one is the user's
    assert Safety().temperature_limit(Dynamics(temperature=3000)) == 9000
    assert Safety(max_temperature=800).temperature_limit(Dynamics(temperature=3000)) == 800
    with pytest.raises(ValueError, match="max_energy_jump"):
        Safety(max_energy_jump=0)
    failure = MDFailure("aspirin", 1240, 620.0, "temperature 41,000 K (limit 5,000 K)", 1230)
    assert str(failure) == "aspirin: MD failed at step 1240 (620 fs): temperature 41,000 K (limit 5,000 K)"
    assert str(failure.within("aspirin (MD replica 2)")).startswith("aspirin (MD replica 2): MD failed at step 1240")


@pytest.mark.parametrize("name", ["watertiny", "aspirin"])
def test_cli_md_at_dt_20_fails_with_the_step_and_keeps_nothing_after_it(tmp_path, structures_dir, capsys, name):
    """Issue 13: `distiller md --dt 20` ended with exit 0 at 1.5e8 K (watertiny), or crashed inside the
    neighbour list (a molecule). Now: exit 1, one line, the trajectory and thermo log end at the last sane step."""
    out = tmp_path / "md"
    rc = cli.main(["md", "--model", TEACHER, "--structure", str(structures_dir / f"{name}.extxyz"), "--dt", "20",
                   "--steps", "400", "--chunk", "10", "--log-every", "5", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    match = re.fullmatch(rf"distiller: error: {name}\.extxyz:0: MD failed at step (\d+) \((\d+) fs\): (.+)", err)
    assert match and "\n" not in err, err
    step = int(match[1])
    assert int(match[2]) == 20 * step
    failure = json.loads((out / "md.json").read_text())["failure"]
    assert failure["step"] == step and failure["cause"] == match[3]
    last = failure["last_step"]
    assert last is not None and last < step
    thermo = np.loadtxt(out / "thermo.log", ndmin=2)
    assert thermo[-1, 0] == last and np.all(thermo[:, 2] < 5000)
    assert [a.info["step"] for a in ase.io.read(out / "trajectory.extxyz", ":")] == thermo[:, 0].tolist()
