"""Orb teacher speed: labelling throughput, the torch -> JAX handover, and Orb against a distiller student.

    python bench/orb.py --out bench/results/orb-h200.json    # the GPU run (sized for 1-3 minutes on one H200)
    python bench/orb.py --tiny --out /tmp/orb-cpu.json       # toy sizes: a CPU smoke run (~3 min on 2 cores)

Teacher: orb:random/orb-v3-conservative (the real orb-v3 conservative architecture with seeded random weights;
speed does not depend on their values), at distiller's precision float32-highest and at orb's own default
float32-high (TF32 matmuls on GPUs). Every time is the median of --repeats calls after warm-up
(`distiller.speed.median_seconds`), the device synchronised (torch and JAX) before the clock stops.

a. Labelling: `OrbTeacher.label` of a set in batches (one orb `predict` per batch of at most 32 structures or
   4096 atoms) against one structure per call; structures/s and atoms/s. Also the host part alone: orb's graphs
   of the set built on the host and batched (`OrbTeacher.graphs`). Sets: 64 rattled aspirins, 32 rattled and
   strained Si crystals (2x2x2 cubic, 64 atoms), 8 rattled watersmall boxes (648 atoms); --tiny: 4, 2 (8
   atoms) and 1 watertiny (81).
b. Handing results to JAX: a forces-like (N, 3) float32 tensor on the teacher's device handed over by DLPack
   (`distiller.teachers.torch_bridge.to_jax`; on a CPU it goes through numpy) against a host copy
   (`jnp.asarray(tensor.cpu().numpy())`), N from 1500 to 120000 atoms; and within a whole labelling call:
   `label_arrays` (DLPack) against `label` (host float64 numpy) followed by `jnp.asarray` of its arrays.
c. Orb against a student of the quickstart's size (SchNetConfig(cutoff=5.0, features=64, layers=3,
   n_rbf=24), elements H O Si Cu, fresh weights) on one structure each: waterbox (1500 atoms), Si 4x4x4 cubic
   (512) and Cu 6x6x6 cubic (864). Orb: energy, forces and stress per call as a user gets them
   (`label_arrays([s])`: graph built on the host, predict, results to JAX), and the model alone on a graph
   already on the device (`OrbTeacher.predict_graphs`, orb's `predict`). Student: one jitted call, neighbour
   list included (`distiller.speed.model_timer`), energy+forces and energy+forces+stress. Ratio = Orb ms /
   student ms.
   --tiny: watertiny (81 atoms), Si and Cu cubic unit cells (8 and 4 atoms).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# JAX takes 75 % of a GPU's memory when it first touches it; Orb (PyTorch) runs on the same GPU and needs room.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.build import bulk  # noqa: E402

from distiller.data.sampling import RattleConfig, sample  # noqa: E402
from distiller.files import write_json_atomic  # noqa: E402
from distiller.speed import device_name, fresh_student, median_seconds, model_timer, versions  # noqa: E402
from distiller.structure import Structure, read_structures  # noqa: E402
from distiller.students import SchNetConfig  # noqa: E402
from distiller.teachers.orb import load_orb  # noqa: E402
from distiller.teachers.torch_bridge import to_jax  # noqa: E402

TEACHER = "orb:random/orb-v3-conservative"
PRECISIONS = ("float32-highest", "float32-high")
STUDENT = SchNetConfig(cutoff=5.0, features=64, layers=3, n_rbf=24, elements=(1, 8, 14, 29))


# --------------------------------------------------------------------------------------------------
# Structures


def crystal(symbol: str, repeat: int) -> Structure:
    kind, a = {"Si": ("diamond", 5.431), "Cu": ("fcc", 3.615)}[symbol]
    atoms = bulk(symbol, kind, a=a, cubic=True).repeat(repeat)
    return Structure.from_ase(atoms, name=f"{symbol} {repeat}x{repeat}x{repeat}")


def shared(directory: str, name: str) -> Structure:
    return read_structures(os.path.join(directory, f"{name}.extxyz"))[0]


def labelling_sets(directory: str, tiny: bool) -> dict[str, list[Structure]]:
    """Rattled copies (and strained cells for the crystal), as the experiments label them."""
    counts = {"aspirin": 4, "si": 2, "water": 1} if tiny else {"aspirin": 64, "si": 32, "water": 8}
    water, si = ("watertiny", crystal("Si", 1)) if tiny else ("watersmall", crystal("Si", 2))
    aspirin, water_box = shared(directory, "aspirin"), shared(directory, water)
    return {
        f"aspirin x{counts['aspirin']}": sample(aspirin, RattleConfig(counts["aspirin"], 0.05), key=0),
        f"Si {si.n_atoms} x{counts['si']}": sample(si, RattleConfig(counts["si"], 0.1, strain=0.03), key=0),
        f"{water} x{counts['water']}": sample(water_box, RattleConfig(counts["water"], 0.05, strain=0.02), key=0),
    }


def comparison_structures(directory: str, tiny: bool) -> list[Structure]:
    if tiny:
        return [shared(directory, "watertiny"), crystal("Si", 1), crystal("Cu", 1)]
    return [shared(directory, "waterbox"), crystal("Si", 4), crystal("Cu", 6)]


# --------------------------------------------------------------------------------------------------
# Timing


def synchronised(fn):
    """fn, then wait for the GPU's queued torch work: a timed call ends when the device has finished."""
    def call():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return call


def timed(fn, repeats: int, warmup: int = 1) -> float:
    return median_seconds(synchronised(fn), repeats, warmup)


def labelling(teacher, sets: dict[str, list[Structure]], repeats: int) -> list[dict]:
    rows = []
    for name, structures in sets.items():
        atoms = sum(s.n_atoms for s in structures)
        graphs_s = timed(lambda: teacher.graphs(structures), repeats)
        batched_s = timed(lambda: teacher.label(structures), repeats)
        single_s = timed(lambda: [teacher.label([s]) for s in structures], repeats)
        rows.append({"set": name, "structures": len(structures), "atoms": atoms, "graphs_ms": 1e3 * graphs_s,
                     "batched_ms": 1e3 * batched_s, "one_by_one_ms": 1e3 * single_s,
                     "batched_structures_per_s": len(structures) / batched_s, "batched_atoms_per_s": atoms / batched_s,
                     "one_by_one_structures_per_s": len(structures) / single_s,
                     "one_by_one_atoms_per_s": atoms / single_s, "batching_speedup": single_s / batched_s,
                     "graphs_share_of_batched": graphs_s / batched_s})
        r = rows[-1]
        print(f"  {name:<18}{atoms:>7} atoms  batched {r['batched_ms']:9.1f} ms ({r['batched_atoms_per_s']:9.0f} "
              f"atoms/s)  one by one {r['one_by_one_ms']:9.1f} ms  x{r['batching_speedup']:.1f}  host graphs "
              f"{r['graphs_ms']:.1f} ms", flush=True)
    return rows


def host_arrays(teacher, structures: list[Structure]) -> dict[str, jax.Array]:
    """What `label_arrays` gives, the long way: labels copied to the host by `label`, then to JAX."""
    labelled = teacher.label(structures)
    return {"energy": jnp.asarray(np.array([s.energy for s in labelled])),
            "forces": jnp.asarray(np.concatenate([s.forces for s in labelled])),
            "stress": jnp.asarray(np.stack([s.stress if s.stress is not None else np.zeros((3, 3))
                                            for s in labelled]))}


def handover(teacher, sets: dict[str, list[Structure]], sizes: list[int], repeats: int) -> dict:
    device = torch.device(teacher.device)
    path = "dlpack" if device.type == "cuda" and any(d.platform == "gpu" for d in jax.devices()) else "numpy"
    arrays = []
    for n in sizes:
        tensor = torch.randn(n, 3, device=device)
        dlpack_s = timed(lambda: to_jax(tensor), 4 * repeats, warmup=3)
        host_s = timed(lambda: jnp.asarray(tensor.cpu().numpy()), 4 * repeats, warmup=3)
        assert np.array_equal(np.asarray(to_jax(tensor)), tensor.cpu().numpy())
        arrays.append({"atoms": n, "bytes": 12 * n, "to_jax_ms": 1e3 * dlpack_s, "host_copy_ms": 1e3 * host_s})
        print(f"  ({n}, 3) float32: to_jax ({path}) {1e3 * dlpack_s:.3f} ms, host copy {1e3 * host_s:.3f} ms",
              flush=True)
    calls = []
    for name, structures in sets.items():
        arrays_s = timed(lambda: teacher.label_arrays(structures), repeats)
        host_s = timed(lambda: host_arrays(teacher, structures), repeats)
        calls.append({"set": name, "label_arrays_ms": 1e3 * arrays_s, "label_then_host_copy_ms": 1e3 * host_s})
        print(f"  {name:<18} label_arrays {1e3 * arrays_s:9.1f} ms, label + host copy {1e3 * host_s:9.1f} ms",
              flush=True)
    return {"path": path, "arrays": arrays, "labelling_calls": calls}


def orb_model_timer(teacher, structure: Structure):
    """Orb's model alone: energy, forces and stress of a graph already on the device (orb's own `predict`,
    through the bridge, which knows the orb-models version)."""
    graph = teacher.graphs([structure])
    return lambda: teacher.predict_graphs(graph)


def orb_against_student(teachers: dict, structures: list[Structure], repeats: int) -> list[dict]:
    rows = []
    for s in structures:
        student = fresh_student(STUDENT, [s])
        row = {"system": s.name, "atoms": s.n_atoms,
               "student_ef_ms": 1e3 * timed(model_timer(student, [s]), repeats, warmup=3),
               "student_efs_ms": 1e3 * timed(model_timer(student, [s], stress=True), repeats, warmup=3)}
        for precision, teacher in teachers.items():
            call = 1e3 * timed(lambda: teacher.label_arrays([s]), repeats)
            alone = 1e3 * timed(orb_model_timer(teacher, s), repeats)
            row[precision] = {"orb_call_ms": call, "orb_model_ms": alone,
                              "orb_call_over_student": call / row["student_efs_ms"],
                              "orb_model_over_student": alone / row["student_efs_ms"]}
            print(f"  {s.name:<22}{s.n_atoms:>6} atoms  orb {precision:<16} call {call:9.2f} ms  model {alone:9.2f} ms"
                  f"  student E+F+S {row['student_efs_ms']:7.3f} ms (E+F {row['student_ef_ms']:.3f})  ratio "
                  f"{call / row['student_efs_ms']:.0f}x (model {alone / row['student_efs_ms']:.0f}x)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU smoke run)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--structures-dir",
                        default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"), "structures"))
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    repeats = 1 if args.tiny else args.repeats

    sets = labelling_sets(args.structures_dir, args.tiny)
    teachers = {p: load_orb(f"{TEACHER}?precision={p}") for p in args.precisions}
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name(), "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": versions(), "teacher": TEACHER, "repeats": repeats,
        "student": {k: getattr(STUDENT, k) for k in ("cutoff", "features", "layers", "n_rbf", "elements", "kernel")},
        "labelling": {}, "handover": None, "orb_vs_student": None,
    }

    def save():  # after every section: a run cut short keeps what it measured
        if args.out:
            write_json_atomic(args.out, report)

    for precision, teacher in teachers.items():
        print(f"a. labelling, {precision}", flush=True)
        report["labelling"][precision] = labelling(teacher, sets, repeats)
        save()
    print("b. handover to JAX", flush=True)
    sizes = [81, 1500] if args.tiny else [1500, 12000, 120000]
    report["handover"] = handover(teachers[args.precisions[0]], sets, sizes, repeats)
    save()
    print("c. Orb against the student", flush=True)
    report["orb_vs_student"] = orb_against_student(teachers, comparison_structures(args.structures_dir, args.tiny),
                                                   repeats)
    save()
    if args.out:
        print(f"written {args.out}")

if __name__ == "__main__":
    main()
