"""Online MD sampling: training draws its structures from replicas of the seeds that move by teacher MD
(Langevin, BAOAB) between optimiser steps, inside the jitted step. The thermostat reaches its ladder, friction 0
conserves the energy, the drawn frames move from step to step, a stopped run resumes bit for bit (the replicas
are checkpointed), and a replica that blows up stops the run naming it."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distiller.config import Experiment, MDSampling, OptimizerConfig, apply_override, from_dict, to_dict
from distiller.md.simulate import MDFailure
from distiller.run_directory import RunDirectory
from distiller.students import SchNetConfig
from distiller.train import loop
from distiller.train.loop import run
from distiller.train.md_sampling import (MDCapacity, MDSampler, drawn, kinetic, layout_of, temperature,
                                         thermal_momenta, without_drift, wrapped)
from distiller.train.step import Distillation

LADDER = (300.0, 600.0)


def md_config(structures_dir, run_dir, **sampling) -> Experiment:
    """Two aspirin replicas (300 and 600 K), both drawn at every step: the pool and the drawn batch have one shape."""
    md = dict(replicas=2, temperatures=LADDER, dt=0.5, friction=0.02, steps_between=5, equilibration=10, rattle=0.02)
    return Experiment(
        name="md-test", teacher="fennol-pmc:ani1x/0", structures=(str(structures_dir / "aspirin.extxyz"),),
        sampling=MDSampling(**{**md, **sampling}),
        student=SchNetConfig(cutoff=4.0, features=16, layers=1, n_rbf=8),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, final_learning_rate=1e-3),
        steps=6, batch_size=2, seed=3, run_dir=str(run_dir), checkpoint_every=3, log_every=1, held_out=2,
        tensorboard=False)


def metrics(run_dir):
    path = RunDirectory(run_dir).metrics_path
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, structures_dir):
    """A whole MD-sampling run of 6 steps, and its Distillation (compiled) for the tests to go on with."""
    config = md_config(structures_dir, tmp_path_factory.mktemp("md") / "whole")
    job = Distillation.create(config)
    return config, job, run(config, progress=False, job=job)


def test_md_sampling_settings_are_refused_by_name(structures_dir, tmp_path):
    config = md_config(structures_dir, tmp_path / "run")
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config  # config.json names the kind
    assert apply_override(config, "sampling.temperatures=(250, 350)").sampling.temperatures == (250.0, 350.0)
    for setting, message in [
        ("sampling.temperatures=()", r"sampling.temperatures must be a non-empty tuple of temperatures > 0 K"),
        ("sampling.temperatures=(300, -5)", r"sampling.temperatures must be a non-empty tuple"),
        ("sampling.dt=0", r"sampling.dt must be > 0, got 0.0"),
        ("sampling.friction=-0.1", r"sampling.friction must be >= 0"),
        ("sampling.steps_between=0", r"sampling.steps_between must be >= 1"),
        ("sampling.equilibration=12", r"sampling.equilibration must be a multiple of sampling.steps_between \(5\)"),
        ("sampling.replicas=1", r"sampling.replicas must be >= batch_size \(2\)"),
        ("sampling.max_temperature=0", r"sampling.max_temperature must be > 0"),
        ("dataset='data/set'", r"sampling=MDSampling\(...\) needs the teacher in the step"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_override(config, setting)
    # A teacher outside JAX is refused as online training refuses it, before any work.
    host = dataclasses.replace(config, teacher="ase:ase.calculators.emt.EMT")
    with pytest.raises(ValueError, match=r"teacher ase:ase.calculators.emt.EMT is computed outside JAX"):
        Distillation.create(host)


def test_the_pools_momenta_drift_and_cells(aspirin, water):
    """Thermal momenta are exactly at each replica's temperature (3N − 3 degrees of freedom for a molecule, whose
    centre of mass stays at rest; 3N for a periodic cell), and periodic atoms wrap into their cell."""
    layout = layout_of([aspirin, water], LADDER, MDSampling(replicas=2, temperatures=LADDER))
    np.testing.assert_array_equal(np.asarray(layout.dof)[:2], [3 * 21 - 3, 3 * 81])
    p = thermal_momenta(layout, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(temperature(layout, p))[:2], LADDER, rtol=1e-5)
    molecule = np.asarray(layout.batch.graph_index) == 0
    assert np.abs(np.asarray(p)[molecule].sum(axis=0)).max() < 1e-4
    kicked = p + jnp.where(layout.batch.atom_mask[:, None], 1.0, 0.0)  # every atom pushed along (1, 1, 1)
    kept = np.asarray(without_drift(layout, kicked))
    assert np.abs(kept[molecule].sum(axis=0)).max() < 1e-3  # the molecule's drift removed
    np.testing.assert_array_equal(kept[~molecule], np.asarray(kicked)[~molecule])  # the periodic cell's kept
    cell = np.asarray(layout.batch.cell)[1]
    shifts = np.random.default_rng(0).integers(-3, 4, (81, 3)) @ cell
    x = np.asarray(layout.batch.positions).copy()
    x[21:102] += shifts
    back = np.asarray(wrapped(layout, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(back, np.asarray(wrapped(layout, layout.batch.positions)), atol=2e-4)
    fractional = back[21:102] @ np.linalg.inv(cell)
    assert fractional.min() >= -1e-6 and fractional.max() < 1.0
    np.testing.assert_array_equal(back[:21], x[:21])  # molecules are not wrapped


def test_langevin_brings_replicas_at_rest_to_their_temperatures(trained, structures_dir, tmp_path):
    config, job, state = trained
    sampler = MDSampler(md_config(structures_dir, tmp_path, friction=0.05), job.teacher, config.student.cutoff)
    pool = state.pool._replace(momenta=jnp.zeros_like(state.pool.momenta))  # the run's replicas, at rest
    temperatures = []
    for k in range(60):  # 150 fs; the thermostat's time constant 1 / (2 friction) is 10 fs
        pool = sampler.advanced(job.teacher_params, pool, jax.random.key(k), "thermostat test")
        temperatures.append(np.asarray(pool.temperature)[:2])
    temperatures = np.array(temperatures)
    assert np.all(temperatures[0] < 0.5 * np.array(LADDER))  # started cold
    late = temperatures[20:].mean(axis=0)  # the last 100 fs
    np.testing.assert_allclose(late, LADDER, rtol=0.25)
    assert late[1] > 1.5 * late[0]


def test_without_friction_the_total_energy_is_conserved(trained, structures_dir, tmp_path):
    config, job, state = trained
    sampler = MDSampler(md_config(structures_dir, tmp_path, friction=0.0), job.teacher, config.student.cutoff)
    pool, totals, kinetics = state.pool, [], []
    for k in range(40):  # 100 fs of velocity Verlet at 0.5 fs
        pool = sampler.advanced(job.teacher_params, pool, jax.random.key(k), "NVE test")
        totals.append(np.asarray(pool.total)[:2])
        kinetics.append(np.asarray(kinetic(sampler.layout, pool.momenta))[:2])
    totals, kinetics = np.array(totals) / 21, np.array(kinetics) / 21  # eV/atom
    drift = np.abs(totals - totals[0]).max(axis=0)
    exchanged = kinetics.max(axis=0) - kinetics.min(axis=0)  # what moved between kinetic and potential energy
    assert np.all(exchanged > 5e-3), exchanged
    assert np.all(drift < 2e-3) and np.all(drift < 0.1 * exchanged), (drift, exchanged)


def test_the_drawn_frames_move_between_steps(trained, aspirin):
    config, job, state = trained
    rows = metrics(config.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(100 < r["md_temperature"] < 1200 and r["md_min_distance"] > 0.7 for r in rows)
    inputs = job.data.inputs(6)
    after, _, _ = job.apply_step(state, inputs, job.step_key(6))
    later, _, _ = job.apply_step(after, job.data.inputs(7), job.step_key(7))
    assert int(later.pool.md_step) - int(after.pool.md_step) == 5 == int(after.pool.md_step) - int(state.pool.md_step)
    atoms = np.asarray(inputs.batch.atom_mask)
    first, second = (np.asarray(drawn(pool, inputs).positions)[atoms] for pool in (after.pool, later.pool))
    step = np.sqrt(np.mean(np.sum((second - first) ** 2, axis=1)))
    assert 2e-3 < step < 0.3, step  # Å in 2.5 fs: thermal motion, neither frozen nor exploding
    held_out = job.data.held_out(2)  # frames of another pool: moved away from the seed, and not the same
    seed = aspirin.positions - aspirin.positions.mean(axis=0)
    centred = [s.positions - s.positions.mean(axis=0) for s in held_out]
    assert len(held_out) == 2 and all(0.02 < np.sqrt(np.mean((c - seed) ** 2)) < 0.5 for c in centred)
    assert not np.allclose(centred[0], centred[1], atol=1e-3)


def test_a_stopped_run_resumes_exactly(trained, structures_dir, tmp_path, monkeypatch):
    """Stopped with a step in flight and resumed, the run is the uninterrupted one: metrics, weights, replicas.
    (One Distillation for all, to save compilations: a resume restores the state, the replicas included, and the
    capacities from the run directory.)"""
    whole, job, final = trained
    stopped = md_config(structures_dir, tmp_path / "stopped")
    monkeypatch.setattr(loop, "steps_in_flight", lambda: 1)
    run(stopped, progress=False, stop_after=4, job=job)
    assert RunDirectory(stopped.run_dir).latest_step() == 3
    assert RunDirectory(stopped.run_dir).load_capacity(3) == job.data.capacity_state()  # the batch's and the pool's
    resumed = run(stopped, resume=True, progress=False, job=job)
    assert type(job.data.capacity_state()) is MDCapacity
    a, b = metrics(whole.run_dir), metrics(stopped.run_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    for x, y in zip(jax.tree.leaves((final.params, final.ema, final.pool)),
                    jax.tree.leaves((resumed.params, resumed.ema, resumed.pool))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_replica_that_blows_up_stops_the_run_naming_it(trained, structures_dir, tmp_path, monkeypatch):
    """Replica 1 (aspirin at 600 K) given 30 times its thermal momenta (900 times the temperature) blows up in the
    first step: one line naming it, the step and the cause, and nothing of the step written."""
    config, job, _ = trained
    blown = dataclasses.replace(config, run_dir=str(tmp_path / "blown"))
    initial_state = Distillation.initial_state

    def hot(job):
        state = initial_state(job)
        replica = (np.asarray(job.data.layout.batch.graph_index) == 1)[:, None]
        return state._replace(pool=state.pool._replace(momenta=jnp.where(replica, 30.0, 1.0) * state.pool.momenta))

    monkeypatch.setattr(Distillation, "initial_state", hot)
    with pytest.raises(MDFailure) as failure:
        run(blown, progress=False, job=job)
    message = str(failure.value)
    assert re.fullmatch(r"md-test: MD sampling replica 1 \(aspirin[^,]*, 600 K\), training step 1: MD failed at step "
                        r"15 \(7\.5 fs\): temperature [\d,]+ K \(limit 5,000 K\); training stopped, no checkpoint "
                        r"was written; lower sampling\.dt \(0\.5 fs\) or the temperatures", message), message
    assert failure.value.replica == 1
    assert RunDirectory(blown.run_dir).latest_step() is None and metrics(blown.run_dir) == []
