"""Quickstart: distil the FeNNol-PMC ANI-1x ensemble into a small student on rattled aspirin and water.

Run with `distiller distill experiments/quickstart.py` (or `python experiments/quickstart.py`, which also
evaluates on held-out structures and measures the speed-up). A few minutes on a 2-core CPU.
"""

import os

from distiller.config import Experiment, LossConfig, OptimizerConfig, SamplingConfig
from distiller.students import PaiNNConfig

SHARED = os.environ.get("DISTILLER_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))

config = Experiment(
    name="quickstart",
    teacher="fennol-pmc:ani1x",
    structures=(f"{SHARED}/structures/aspirin.extxyz", f"{SHARED}/structures/watertiny.extxyz"),
    sampling=SamplingConfig(rattle=0.08, strain=0.02),
    # PaiNN 32x2 rather than SchNet 64x3: on aspirin it keeps more of the teacher at 15,000 GPU steps (94.4 against
    # 92.4 %, bench/results/README.md) and here (89.7 against 87.6 %), for 1.5x SchNet's CPU time per step.
    student=PaiNNConfig(cutoff=5.0, features=32, layers=2, n_rbf=16, elements=(1, 6, 7, 8)),
    # Per-atom energy errors of 5 meV weigh 100 · (5e-3)² = 2.5e-3 beside 10 · (0.4 eV/Å)² for forces: enough to
    # halve the energy error of a weight of 1 (7.9 -> 3.3 meV/atom) at the same force accuracy.
    loss=LossConfig(energy_weight=100.0, forces_weight=10.0),
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
