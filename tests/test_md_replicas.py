"""Multi-replica MD (issue 14 item 2): N replicas as one program, each exactly what `simulate` gives it alone.

One ANI-1x member on aspirin, NVT Langevin, one compiled replica program for every test here (three replicas,
chunks of 100 steps logged every 10: the temperatures, the structures and the Safety limits are arguments of
it, not part of it)."""

import json
import re

import ase.io
import numpy as np
import pytest
from ase import units

from distiller.cli import main
from distiller.load import load_model
from distiller.md import Dynamics, MDFailure, simulate, simulate_replicas

TEACHER = "fennol-pmc:ani1x/0"
NVT = Dynamics("nvt", temperature=300.0, dt=0.5)
RUN = {"log_every": 10, "chunk": 100}


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER)


def _joined(chunks, field):
    return np.concatenate([getattr(records, field) for records in chunks])


def _temperature(chunks, n_atoms):
    return 2.0 * _joined(chunks, "kinetic") / (3 * n_atoms * units.kB)


def test_each_replica_is_what_simulate_gives_it_and_seeds_differ(teacher, aspirin):
    """The correctness anchor: replica k of a batched run equals `simulate` with replica k's key, to float32
    rounding, over 300 Langevin steps (noise, thermostat and neighbour-list rebuilds included); replicas with
    other seeds are other trajectories."""
    keys = [11, 12, 13]
    batched = list(simulate_replicas(teacher, [aspirin] * 3, NVT, 300, keys=keys, **RUN))
    assert [len(records) for records in batched] == [3] * 4
    assert [records[1].step.tolist() for records in batched] == [[0]] + [list(range(s + 10, s + 101, 10))
                                                                        for s in (0, 100, 200)]
    replicas = [[records[k] for records in batched] for k in range(3)]
    for k in (0, 2):
        alone = list(simulate(teacher, aspirin, NVT, 300, key=keys[k], **RUN))
        np.testing.assert_array_equal(_joined(alone, "step"), _joined(replicas[k], "step"))
        np.testing.assert_allclose(_joined(replicas[k], "position"), _joined(alone, "position"), atol=1e-4)
        np.testing.assert_allclose(_joined(replicas[k], "momentum"), _joined(alone, "momentum"), atol=1e-3)
        np.testing.assert_allclose(_joined(replicas[k], "force"), _joined(alone, "force"), atol=1e-3)
        np.testing.assert_allclose(_joined(replicas[k], "potential"), _joined(alone, "potential"), rtol=0, atol=1e-3)
    starts = [replica[0].momentum[0] for replica in replicas]
    assert np.abs(starts[0] - starts[1]).max() > 1e-2  # other seeds: other velocities ...
    np.testing.assert_allclose([_temperature(r, aspirin.n_atoms)[0] for r in replicas], 300.0, rtol=1e-4)  # one T
    ends = [replica[-1].position[-1] for replica in replicas]
    assert np.abs(ends[0] - ends[1]).max() > 1e-2 and np.abs(ends[1] - ends[2]).max() > 1e-2  # ... other paths


def test_a_langevin_ladder_holds_each_replica_at_its_own_temperature(teacher, aspirin):
    """Each replica's thermostat targets its own temperature: over the last 150 fs of 300 fs the mean
    temperature is near each target (a replica thermostatted at another one would be ~1/3 off at 1000 K)."""
    ladder = [200.0, 500.0, 1000.0]
    chunks = list(simulate_replicas(teacher, [aspirin] * 3, NVT, 600, keys=[1, 2, 3], temperatures=ladder, **RUN))
    for k, target in enumerate(ladder):
        temperature = _temperature([records[k] for records in chunks], aspirin.n_atoms)
        assert temperature[0] == pytest.approx(target, rel=1e-4)
        late = temperature[31:].mean()  # steps 310..600
        assert 0.7 * target < late < 1.3 * target, (target, late)


def test_a_blow_up_in_one_replica_is_named_and_nothing_after_it_is_yielded(teacher, aspirin):
    """Replica 1 starts with one H 0.3 Å from its C: it blows up, the run stops naming it (step, time, cause),
    and every replica was handed on exactly the steps before the failing one."""
    positions = aspirin.positions.copy()
    bond = positions[14] - positions[0]  # the H nearest to C 0 (1.10 Å)
    positions[14] = positions[0] + 0.3 * bond / np.linalg.norm(bond)
    squeezed = aspirin.replace(positions=positions, name="squeezed aspirin")
    yielded = []
    with pytest.raises(MDFailure) as caught:
        for records in simulate_replicas(teacher, [aspirin, squeezed, aspirin], NVT, 300, keys=[0, 1, 2], **RUN):
            yielded.append(records)
    failure = caught.value
    assert failure.replica == 1
    match = re.fullmatch(r"squeezed aspirin \(replica 1\): MD failed at step (\d+) \(([\d.]+) fs\): (.+)",
                         str(failure))
    assert match, str(failure)
    assert int(match[1]) == failure.step and float(match[2]) == pytest.approx(0.5 * failure.step)
    assert failure.last_step is not None and failure.last_step < failure.step
    assert yielded and all(len(records) == 3 for records in yielded)
    for k in range(3):
        steps = _joined([records[k] for records in yielded], "step")
        assert steps.tolist() == list(range(0, failure.last_step + 1, 10))
        assert np.all(_temperature([records[k] for records in yielded], aspirin.n_atoms) < 5000)


def test_replicas_are_refused_early_and_by_name(teacher, aspirin, water):
    with pytest.raises(ValueError, match=r"replica 1 \(watertiny.extxyz:0: 81 atoms.*replica 0 \(aspirin.*21 atoms"):
        next(simulate_replicas(teacher, [aspirin, water], NVT, 10))
    with pytest.raises(ValueError, match="2 replicas need 2 keys and 2 temperatures; got 3 keys"):
        next(simulate_replicas(teacher, [aspirin] * 2, NVT, 10, keys=[0, 1, 2]))
    with pytest.raises(TypeError, match="sequence of Structures"):
        next(simulate_replicas(teacher, aspirin, NVT, 10))


def test_cli_writes_one_trajectory_per_replica_and_names_a_failing_one(tmp_path, structures_dir, capsys):
    """`distiller md --temperatures` (a ladder, seeds SEED, SEED+1, ...): OUT/replica-K/ each hold a complete
    thermo log and trajectory at their own temperature, md.json lists them; a replica over the temperature
    limit stops the run with exit 1 naming it, and is recorded in md.json; a bad ladder is refused first."""
    source = str(structures_dir / "aspirin.extxyz")
    command = ["md", "--model", TEACHER, "--structure", source, "--ensemble", "nvt", "--steps", "100",
               "--chunk", "100", "--log-every", "10", "--write-every", "50", "--seed", "7", "--quiet"]
    out = tmp_path / "ladder"
    ladder = [200.0, 500.0, 1000.0]
    assert main(command + ["--temperatures", "200,500,1000", "--out", str(out)]) == 0
    summary = json.loads((out / "md.json").read_text())
    assert [(r["replica"], r["seed"], r["temperature_K"], r["directory"]) for r in summary["replicas"]] == [
        (k, 7 + k, ladder[k], f"replica-{k}") for k in range(3)]
    for k, target in enumerate(ladder):
        rows = np.loadtxt(out / f"replica-{k}" / "thermo.log")
        np.testing.assert_array_equal(rows[:, 0], np.arange(0, 101, 10))
        assert rows[0, 2] == pytest.approx(target, rel=1e-4)
        frames = ase.io.read(out / f"replica-{k}" / "trajectory.extxyz", ":")
        assert [int(a.info["step"]) for a in frames] == [0, 50, 100]
        for a, row in zip(frames, rows[::5]):
            assert a.get_potential_energy() == pytest.approx(row[3], abs=1e-3)
        assert summary["replicas"][k]["final"]["step"] == 100
    assert not (out / "trajectory.extxyz").exists()

    refused = tmp_path / "refused"
    assert main(command + ["--replicas", "2", "--temperatures", "300,400,500", "--out", str(refused)]) == 2
    assert "3 temperatures for --replicas 2" in capsys.readouterr().err and not refused.exists()

    # Replica 2 starts at 2000 K, over the 1500 K limit: it fails at step 0, before anything is written.
    hot = tmp_path / "hot"
    assert main(command + ["--temperatures", "300,300,2000", "--max-temperature", "1500", "--out", str(hot)]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"distiller: error: aspirin\.extxyz:0 \(replica 2\): MD failed at step 0 \(0 fs\): "
                        r"temperature 2,000 K \(limit 1,500 K\)", err), err
    failure = json.loads((hot / "md.json").read_text())["failure"]
    assert failure["replica"] == 2 and failure["step"] == 0 and failure["last_step"] is None
    assert json.loads((hot / "md.json").read_text())["replicas"][2]["failure"] == failure
    assert not any((hot / f"replica-{k}" / "thermo.log").exists() for k in range(3))
