"""Speed harness: teacher against student energy+forces on the same structures, in one process.

    python bench/speed.py --teacher fennol-pmc:ani1x/0 [--run RUN_DIR] \
        --systems aspirin aspirin*32 watersmall waterbox --out bench/results/speed-h200.json

A system is a structure file name in the shared structures folder, optionally `*N` for a batch of N copies.
Without --run the student is a fresh one of the quickstart's size (speed does not depend on its weights).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from distiller.files import write_json_atomic  # noqa: E402
from distiller.speed import add_student_arguments, compare_speed, student_from_arguments, table  # noqa: E402
from distiller.structure import read_structures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="fennol-pmc:ani1x/0")
    add_student_arguments(parser)
    parser.add_argument("--systems", nargs="+", default=["aspirin", "aspirin*32", "watersmall", "waterbox"])
    parser.add_argument("--structures-dir", default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-native", action="store_true", help="skip timing FeNNol's own API (faster runs)")
    parser.add_argument("--out", help="JSON file to write (after every system)")
    args = parser.parse_args()

    systems = {}
    for name in args.systems:
        base, _, copies = name.partition("*")
        structures = read_structures(os.path.join(args.structures_dir, f"{base}.extxyz"))
        systems[name] = structures * int(copies or 1)
    student = student_from_arguments(args)

    def save(report):
        print(table(report).splitlines()[-1], flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_json_atomic(args.out, report)

    report = compare_speed(args.teacher, student, systems, repeats=args.repeats, native=not args.no_native,
                           on_row=save)
    print(table(report))


if __name__ == "__main__":
    main()
