"""Student architectures are a registry: one registered from outside the package (a pair potential over edge
vectors, defined here) round-trips through config.json and `--set`, trains, loads and runs in the calculator,
and no other code names it."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from distiller import students
from distiller.calculator import Calculator
from distiller.config import Experiment, LossConfig, OptimizerConfig, apply_override, from_dict, to_dict
from distiller.run_directory import RunDirectory, load_student
from distiller.structure import read_structures
from distiller.students import SchNetConfig, StudentConfig, edge_lengths
from distiller.train.loop import run
from pallas_kernels.cfconv import envelope


@dataclasses.dataclass(frozen=True)
class PairConfig(StudentConfig):
    hidden: int = 8
    architecture = "pair-test"

    def network(self) -> nn.Module:
        return PairPotential(self)


class PairPotential(nn.Module):
    """E_i = 1/2 Σ_j φ_{Z_i}(r_ij) · envelope(r_ij): invariant, smooth at the cutoff, over edge vectors."""

    config: PairConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask, atom_mask):
        c = self.config
        r = edge_lengths(vectors, edge_mask)
        h = nn.Embed(len(c.elements), c.hidden)(species)
        x = nn.tanh(nn.Dense(c.hidden)(r[:, None] / c.cutoff)) * h[receivers] * h[senders]
        pair = nn.Dense(1)(x)[:, 0] * envelope(r, c.cutoff) * edge_mask
        return 0.5 * jnp.zeros(species.shape[0], pair.dtype).at[receivers].add(pair)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(students._ARCHITECTURES, PairConfig.architecture, PairConfig)
    return PairConfig


def test_registry_lists_round_trips_and_switches_architectures(registered, tmp_path):
    assert "schnet" in students.architectures() and "pair-test" in students.architectures()
    config = Experiment(name="pairs", student=PairConfig(cutoff=4.0, hidden=5), run_dir=str(tmp_path))
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    assert to_dict(config)["student"]["architecture"] == "pair-test"
    switched = apply_override(Experiment(name="x", student=SchNetConfig(cutoff=4.5)), "student.architecture=pair-test")
    assert switched.student == PairConfig(cutoff=4.5)  # the common fields carried over
    assert apply_override(switched, "student.hidden=3").student.hidden == 3
    with pytest.raises(ValueError, match="unknown student architecture 'nope'.*pair-test.*schnet"):
        students.config_from_dict({"architecture": "nope"})
    with pytest.raises(ValueError, match="PairConfig has no field.*features"):
        students.config_from_dict({"architecture": "pair-test", "features": 3})


def test_a_registered_architecture_trains_loads_and_runs_in_the_calculator(registered, tmp_path, structures_dir):
    config = Experiment(
        name="pairs", teacher="fennol-pmc:ani1x/0", structures=(str(structures_dir / "aspirin.extxyz"),),
        student=PairConfig(cutoff=4.0), loss=LossConfig(energy_weight=1.0, forces_weight=10.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2), steps=6, batch_size=2, seed=1,
        run_dir=str(tmp_path / "run"), checkpoint_every=3, log_every=1)
    run(config, progress=False)
    rows = RunDirectory(config.run_dir).read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    model = load_student(config.run_dir)
    assert isinstance(model.source, PairConfig) and model.source == config.student
    atoms = read_structures(structures_dir / "aspirin.extxyz")[0].to_ase()
    atoms.calc = Calculator(config.run_dir)
    assert np.isfinite(atoms.get_potential_energy()) and np.abs(atoms.get_forces()).max() > 0
