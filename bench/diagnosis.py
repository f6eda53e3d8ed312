"""What the student diagnoses in bench/ share (ensemble_spread.py, contact_scan.py, force_parts.py): the command
line's run directory, structure file and JSON output, checked by name before any model loads; a structure's
molecules; the PNG beside the JSON, and how they draw."""

from __future__ import annotations

import argparse
import os

import numpy as np


def parser(doc: str, structures: str) -> argparse.ArgumentParser:
    """A parser with --run, --structures (described by `structures`) and --out; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the student's run directory")
    parser.add_argument("--structures", required=True, help=structures)
    parser.add_argument("--out", required=True, help="JSON file to write (a PNG, where there is one, goes beside it)")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, or a one-line error naming the one that cannot be right: the run, the file, the output."""
    args = parser.parse_args()
    if not os.path.isdir(args.run):
        parser.error(f"--run {args.run}: no such run directory")
    if not os.path.isfile(args.structures):
        parser.error(f"--structures {args.structures}: no such file")
    if not args.out.endswith(".json") or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: needs a .json file in an existing directory")
    return args


def molecules(structure) -> np.ndarray:
    """(N,) molecule index of every atom: the connected groups of the bonds the stability report finds
    (`distiller.stability.find_bonds`, covalent radii, minimum image)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from distiller.stability import find_bonds

    pairs = find_bonds(structure).pairs
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(structure.n_atoms,) * 2)
    return connected_components(graph, directed=False)[1]


def png_beside(out: str) -> str:
    return os.path.splitext(out)[0] + ".png"


def pyplot():
    """matplotlib.pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
