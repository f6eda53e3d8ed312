"""Where a student's energy+forces time goes: the same student with 0, 1 and 2 interaction layers, both kernels.

    python bench/student_layers.py --structure waterhuge --out bench/results/student-layers-h200.json

Layer 0 (no interaction block) is everything outside cfconv: edge vectors, embedding, readout, and for
energy+forces the backward pass to positions minus the edge-length part. Each added layer adds one cfconv
forward and its transpose; the first layer's features do not depend on positions, so its transpose computes
edge-length cotangents only, the later ones also the features' cotangent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from distiller.capacity import make_batch  # noqa: E402
from distiller.derivatives import predictions  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.speed import device_name, median_seconds, versions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402
from distiller.students import SchNetConfig, init_params, student_model  # noqa: E402
from bench.kernels import STUDENT  # noqa: E402  (the kernel bench's student, with fewer or more layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structure", default="waterhuge")
    parser.add_argument("--structures-dir",
                        default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args()
    structures = read_structures(os.path.join(args.structures_dir, f"{args.structure}.extxyz"))
    batch, _ = make_batch(structures, STUDENT["cutoff"])
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": device_name(),
              "versions": versions(), "structure": args.structure, "rows": []}
    for kernel in ("pallas", "xla"):
        for layers in args.layers:
            config = SchNetConfig(**{**STUDENT, "layers": layers}, kernel=kernel)
            params = init_params(config, jax.random.key(0), batch)
            model = student_model(config)  # params are the jitted functions' argument, as before
            e = jax.jit(lambda p, b: model.energies(p, b, None).energy)
            ef = jax.jit(lambda p, b: predictions(model, p, b)[:2])  # (energy, forces)
            row = {"kernel": kernel, "layers": layers,
                   "energy_ms": 1e3 * median_seconds(lambda: e(params, batch), args.repeats),
                   "energy_forces_ms": 1e3 * median_seconds(lambda: ef(params, batch), args.repeats)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
