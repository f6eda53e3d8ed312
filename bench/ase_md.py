"""ASE's own MD through distiller's calculator: milliseconds per VelocityVerlet step, after warm-up.

    python bench/ase_md.py --model runs/quickstart --structure aspirin --steps 200 --out bench/results/ase-md-cpu.json

The calculator compiles once per padded shape, so after the first step an ASE step costs the model's call plus
ASE's and distiller's host work (padding, checks). Reported: the median, minimum and maximum of the per-step
times, the energy drift of the NVE run, device and versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ase import units  # noqa: E402
from ase.md.velocitydistribution import thermalize_momenta  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402

from distiller.calculator import Calculator  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a student run directory or a teacher spec")
    parser.add_argument("--structure", default="aspirin", help="a file name of the shared structures folder")
    parser.add_argument("--structures-dir", default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dt", type=float, default=0.5, help="fs")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()

    atoms = read_structures(os.path.join(args.structures_dir, f"{args.structure}.extxyz"))[0].to_ase()
    atoms.calc = Calculator(args.model)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=args.dt * units.fs)
    dynamics.run(args.warmup)  # compiles
    times, energies = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        dynamics.run(1)
        times.append(time.perf_counter() - t0)
        energies.append(atoms.get_total_energy())
    ms = 1e3 * np.asarray(times)
    drift = (energies[-1] - energies[0]) / len(atoms) * 1e3
    report = {"command": " ".join(["python"] + sys.argv), "device": device_name(), "versions": versions(),
              "model": args.model, "structure": args.structure, "atoms": len(atoms), "steps": args.steps,
              "dt_fs": args.dt, "ms_per_step": {"median": float(np.median(ms)), "min": float(ms.min()),
                                                "max": float(ms.max())},
              "total_energy_change_meV_per_atom": float(drift)}
    print(f"{args.model} on {args.structure} ({len(atoms)} atoms), ASE VelocityVerlet: {np.median(ms):.2f} ms/step "
          f"(min {ms.min():.2f}, max {ms.max():.2f}); total energy moved {drift:+.3f} meV/atom in {args.steps} steps")
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
