"""Energy per atom of identical periodic tilings: exact energies make a supercell's E/N its cell's.

    python bench/tilings.py --models fennol-pmc:ani1x/0 fennol-pmc:ani1x runs/quickstart \
        --tilings watertiny:4x4x4 waterbig:2x2x1 --out bench/results/tilings-cpu.json

For each model and tiling: E/N of the cell and of the supercell (float64 totals from `distiller.predict`) and
their difference. Before exact energies (float32 sums with the reference energies inside) ANI-1x's differed by
7 meV/atom (watertiny 4x4x4) and 41 meV/atom (waterbig to 19,200 atoms).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from distiller.files import write_json_atomic  # noqa: E402
from distiller.load import load_model  # noqa: E402
from distiller.predict import Predictor  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.structure import parse_tiled_name, read_structures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fennol-pmc:ani1x/0"])
    parser.add_argument("--tilings", nargs="+", default=["watertiny:4x4x4", "waterbig:2x2x1"])
    parser.add_argument("--structures-dir", default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--out", help="JSON file to write (after every row)")
    args = parser.parse_args()
    try:  # every tiling checked before any model loads
        tilings = [parse_tiled_name(text) for text in args.tilings]
    except ValueError as err:
        parser.error(f"--tilings: {err}")
    untiled = [text for text, (_, repeat) in zip(args.tilings, tilings) if repeat is None]
    if untiled:
        parser.error(f"--tilings {untiled[0]!r}: give the tiling, NAME:AxBxC (e.g. watertiny:4x4x4)")
    report = {"command": " ".join(["python"] + sys.argv), "device": device_name(), "versions": versions(), "rows": []}
    for spec in args.models:
        model = load_model(spec)
        predictor = Predictor(model, max_atoms=1 << 20)
        for name, repeat in tilings:
            cell = read_structures(os.path.join(args.structures_dir, f"{name}.extxyz"))[0]
            big = cell.tiled(repeat)
            t0 = time.perf_counter()
            small_out, big_out = predictor([cell])[0], predictor([big])[0]
            row = {"model": spec, "cell": name, "repeat": list(repeat), "atoms": big.n_atoms,
                   "cell_energy_per_atom": small_out.energy / cell.n_atoms,
                   "tiling_energy_per_atom": big_out.energy / big.n_atoms,
                   "difference_eV_per_atom": big_out.energy / big.n_atoms - small_out.energy / cell.n_atoms,
                   "seconds": round(time.perf_counter() - t0, 2)}
            report["rows"].append(row)
            print(f"{spec:<28} {name} x {repeat} ({big.n_atoms} atoms): E/N {row['cell_energy_per_atom']:.7f} "
                  f"against {row['tiling_energy_per_atom']:.7f} eV/atom, difference "
                  f"{row['difference_eV_per_atom']:+.2e}", flush=True)
            if args.out:
                write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
