"""Quickstart: distil the FeNNol-PMC ANI-1x ensemble into a small student on rattled aspirin and water.

Run with `distiller distill experiments/quickstart.py` (or `python experiments/quickstart.py`, which also
evaluates on held-out structures and measures the speed-up). A few minutes on a 2-core CPU.
"""

import os

from distiller.config import Experiment, LossConfig, OptimizerConfig, SamplingConfig
from distiller.students import SchNetConfig

SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

config = Experiment(
    name="quickstart",
    teacher="fennol-pmc:ani1x",
    structures=(f"{SHARED}/structures/aspirin.extxyz", f"{SHARED}/structures/watertiny.extxyz"),
    sampling=SamplingConfig(rattle=0.08, strain=0.02),
    student=SchNetConfig(cutoff=5.0, features=64, layers=3, n_rbf=24, elements=(1, 6, 7, 8)),
    loss=LossConfig(energy_weight=1.0, forces_weight=10.0),
    optimizer=OptimizerConfig(learning_rate=5e-3, warmup_steps=30, final_learning_rate=1e-4),
    steps=1600,
    batch_size=2,
    seed=0,
    run_dir="runs/quickstart",
    checkpoint_every=100,
    log_every=10,
    held_out=16,
)

if __name__ == "__main__":
    from distiller.quickstart import main

    main(config)
