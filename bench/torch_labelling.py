"""Large structures labelled by torch teachers in a process that also runs a JAX student on the same GPU.

    python bench/torch_labelling.py --out bench/results/torch-labelling-h200.json   # the GPU run (~3 min, H200)
    python bench/torch_labelling.py --tiny --out /tmp/torch-labelling.json          # toy sizes, a CPU smoke run

What a user meets with `distiller evaluate --teacher sevenn:7net-0` or online torch labelling: JAX and torch in one
process on one GPU. The teachers are loaded first, so distiller's memory policy (distiller.gpu_memory:
preallocation off unless the user chose otherwise) is in place before JAX initialises the GPU; then a JAX student
(a fresh PaiNN 64x3, 5 Å: speed and memory do not depend on its weights) runs on waterhuge (12,000 atoms) and its
results stay alive on the GPU while each teacher labels waterhuge tiled 2x1x1 (24,000 atoms) and 2x2x2 (96,000
atoms), energy, forces and stress, one structure per call; waterhuge itself (12,000 atoms) first, for scale. Before each structure the teacher checks that it fits
(`TorchTeacher.check_memory`: bytes per atom measured on a small cut of the same structure, against the device's
free memory); one that cannot fit is refused with that message before any work, and the row records it. After
each teacher the student runs again (JAX still has what it needs). Each row: the outcome, seconds, torch's peak
memory, JAX's memory in use. --tiny: watertiny (81 atoms) tiled 2x1x1 and 2x2x2, on whatever device there is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TEACHERS = ("sevenn:7net-0", "orb:random/orb-v3-conservative")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    args = parser.parse_args(argv)

    from distiller import gpu_memory
    from distiller.teachers.registry import load_teacher

    outcome = gpu_memory.make_room_for_torch()  # what each torch teacher's loader does first
    policy = {"outcome": outcome, **{k: os.environ[k] for k in gpu_memory.USER_SETTINGS if k in os.environ}}
    teachers = {spec: load_teacher(spec) for spec in args.teachers.split(",")}  # before JAX touches the GPU

    import jax
    import torch

    from distiller.files import write_json_atomic
    from distiller.speed import device_name, fresh_student, model_timer, versions
    from distiller.structure import read_structures
    from distiller.students import PaiNNConfig

    shared = os.environ.get("DISTILLER_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    base = "watertiny" if args.tiny else "waterhuge"
    seed = read_structures(os.path.join(shared, "structures", f"{base}.extxyz"))[0]
    tiled = {f"{base} {'x'.join(map(str, r))}": seed.tiled(r) for r in ((1, 1, 1), (2, 1, 1), (2, 2, 2))}

    student = fresh_student(PaiNNConfig(cutoff=5.0, features=64, layers=3, n_rbf=16, elements=(1, 8)), [seed])
    student_call = model_timer(student, [seed])
    kept = student_call()  # compiles and runs; its outputs stay on the device through the labelling below

    def jax_bytes():
        stats = jax.devices()[0].memory_stats() or {}
        return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}

    cuda = torch.cuda.is_available()
    rows = []
    report = {"command": "python bench/torch_labelling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": device_name(), "versions": versions(), "memory_policy": policy,
              "student": {"model": student.name, "structure": seed.name, "atoms": seed.n_atoms,
                          "jax_memory": jax_bytes()}, "rows": rows}
    for spec, teacher in teachers.items():
        for name, structure in tiled.items():
            row = {"teacher": spec, "system": name, "atoms": structure.n_atoms}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:  # label checks that the structure fits before it labels (TorchTeacher.check_memory)
                labelled = teacher.label([structure])[0]
            except MemoryError as err:
                row.update(outcome="refused before starting", message=str(err))
                rows.append(row)
                print(row, flush=True)
                continue
            row.update(outcome="labelled", seconds=round(time.perf_counter() - start, 3),  # memory probe included
                       energy_per_atom_eV=labelled.energy / structure.n_atoms,
                       torch_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                       jax_memory=jax_bytes())
            rows.append(row)
            print(row, flush=True)
        start = time.perf_counter()
        jax.block_until_ready(student_call())
        rows.append({"student after": spec, "seconds": round(time.perf_counter() - start, 4)})
    del kept
    write_json_atomic(args.out, report)
    print(f"results: {args.out}")
    return report


if __name__ == "__main__":
    main()
