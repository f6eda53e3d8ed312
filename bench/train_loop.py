"""Training-loop throughput: `run` (one step in flight) against `apply_step` one step at a time.

    python bench/train_loop.py --steps 600 --out bench/results/train-loop-h200.json

The quickstart experiment (online distillation from the 8-member ANI-1x ensemble, aspirin and watertiny,
batch 2), with the student's `kernel` "pallas" and "xla", in one process. `run` dispatches step k on step
k-1's result before reading k-1's overflow flag; the reference loop reads each step's flag before the next
dispatch (as `run` did before), logging every 10 steps in both. ms/step is the steady state: from a quarter
of the run to its end (`run`: its metrics' seconds column; the loop: wall clock), after a 20-step warm-up run
that grows the capacities. The step compiles again at the start of each run, before the timed part:
`initial_state` refits the student's reference energies, which the jitted step closes over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from distiller.files import write_json_atomic  # noqa: E402
from distiller.speed import device_name, versions  # noqa: E402
from distiller.train.loop import run  # noqa: E402
from distiller.train.step import Distillation  # noqa: E402
from experiments.quickstart import config as quickstart  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out")
    args = parser.parse_args()
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": device_name(),
              "versions": versions(), "experiment": "quickstart", "results": {}}
    work = tempfile.mkdtemp(prefix="train-loop-")
    for kernel in ("pallas", "xla"):
        config = dataclasses.replace(quickstart, steps=args.steps, run_dir=os.path.join(work, kernel),
                                     checkpoint_every=10**6, log_every=10,
                                     student=dataclasses.replace(quickstart.student, kernel=kernel))
        job = Distillation.create(config)
        run(dataclasses.replace(config, steps=20, run_dir=os.path.join(work, f"warm-{kernel}")), progress=False,
            job=job)
        run(config, progress=False, job=job)
        with open(os.path.join(config.run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        a, b = rows[len(rows) // 4], rows[-1]
        in_flight = (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
        state, inputs = job.initial_state(), job.data.batches(0)
        for step in range(args.steps):
            if step == a["step"]:
                jax.block_until_ready(state)
                t0 = time.perf_counter()
            state, metrics, _ = job.apply_step(state, next(inputs), job.step_key(step))
            if (step + 1) % 10 == 0:
                {k: float(v) for k, v in metrics.items()}  # what run's logging reads
        jax.block_until_ready(state)
        one_at_a_time = (time.perf_counter() - t0) / (args.steps - a["step"])
        report["results"][kernel] = {"steps_timed": args.steps - a["step"],
                                     "run_one_in_flight_ms_per_step": 1e3 * in_flight,
                                     "apply_step_one_at_a_time_ms_per_step": 1e3 * one_at_a_time}
        print(kernel, json.dumps(report["results"][kernel]), flush=True)
        if args.out:
            write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
