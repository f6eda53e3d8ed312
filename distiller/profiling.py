"""Where the device time goes: a jax.profiler trace of some work, summarised per kernel.

    summary = traced(lambda: run_chunk(), out="bench/results/trace-waterhuge", steps=500)
    print(kernel_table(summary))

`traced` runs a function under `jax.profiler.trace` (the trace folder is kept for TensorBoard or
ui.perfetto.dev) and reads back the trace's device events: per kernel name its calls and total device time,
per kind (Pallas edge passes, GEMMs, sorts, XLA fusions, copies) the totals, and the device time per step.
Kernels of one kind overlap little on one GPU stream, so the device total is close to the busy time; the wall
time beside it says how much of a step the device is idle (launches, host work between chunks).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time
from typing import Callable

import jax

# Kernel kinds by a substring of the kernel's name, first match wins (names: Pallas calls keep theirs,
# e.g. edge_op_d1_s; XLA's are fusion names; cuBLAS/CUTLASS GEMMs and CUB sorts have library names).
KINDS = (
    ("pallas edge passes", ("edge_op",)),
    ("sort", ("sort", "radix", "onesweep")),
    ("GEMM", ("gemm", "cublas", "cutlass", "xmma", "sm90", "sm80", "ampere", "hopper", "__dot", "triton_dot")),
    ("copies", ("memcpy", "memset", "copy")),
    ("reductions, scatters", ("reduce", "scatter")),
    ("XLA fusions", ("fusion",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(key in low for key in keys):
            return kind
    return "other"


def _trace_file(folder: str) -> str:
    files = sorted(glob.glob(os.path.join(folder, "plugins", "profile", "*", "perfetto_trace.json.gz")),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}/plugins/profile/: did the trace run?")
    return files[-1]


def device_events(path: str) -> list[dict]:
    """The complete ("X") events of a perfetto trace's device processes (`/device:...`), on their stream threads
    where the trace names them (GPU traces also carry summary lines that repeat the kernels)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = [e for e in events if e.get("ph") == "X" and processes.get(e.get("pid"), "").startswith("/device:")]
    streams = [e for e in device if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    return streams or device


TOP_KERNELS = 40  # kernels listed by name in a summary; the rest are summed into one row


def summarise(path: str, steps: int, wall_s: float) -> dict:
    """Per-kernel and per-kind device time of the trace at `path` (µs; per step over `steps`): the TOP_KERNELS
    longest by name, the others as one row."""
    events = device_events(path)
    calls, total = collections.Counter(), collections.Counter()
    for e in events:
        calls[e["name"]] += 1
        total[e["name"]] += float(e.get("dur", 0.0))
    device_us = sum(total.values())
    kinds = collections.Counter()
    for name, us in total.items():
        kinds[kind_of(name)] += us
    share = (lambda us: us / device_us if device_us else 0.0)
    summary = {
        "trace": path, "steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps,
        "device_ms_per_step": 1e-3 * device_us / steps, "kernel_launches_per_step": sum(calls.values()) / steps,
        "kinds": [{"kind": k, "us_per_step": us / steps, "share": share(us)} for k, us in kinds.most_common()],
        "kernels": [{"name": name, "kind": kind_of(name), "calls_per_step": calls[name] / steps,
                     "us_per_step": us / steps, "share": share(us)} for name, us in total.most_common(TOP_KERNELS)],
    }
    rest = total.most_common()[TOP_KERNELS:]
    if rest:
        us = sum(us for _, us in rest)
        summary["kernels"].append({"name": f"({len(rest)} other kernels)", "kind": "other",
                                   "calls_per_step": sum(calls[name] for name, _ in rest) / steps,
                                   "us_per_step": us / steps, "share": share(us)})
    return summary


def traced(fn: Callable[[], object], out: str, steps: int) -> dict:
    """Run `fn` (already compiled: the trace should show steady state) under the profiler with its trace in
    `out`; `summarise` of it, `steps` being the steps `fn` runs."""
    os.makedirs(out, exist_ok=True)
    with jax.profiler.trace(out, create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        wall = time.perf_counter() - start
    return summarise(_trace_file(out), steps, wall)


def kernel_table(summary: dict, top: int = 12) -> str:
    """The summary as text: per-step device and wall time, the kinds, the `top` kernels."""
    if not summary["kernels"]:
        return (f"no device events in {summary['trace']} (a CPU run: its host events are in the trace itself); "
                f"wall {summary['wall_ms_per_step']:.3f} ms/step")
    lines = [f"device {summary['device_ms_per_step']:.3f} ms/step in {summary['kernel_launches_per_step']:.0f} "
             f"kernels, wall {summary['wall_ms_per_step']:.3f} ms/step"]
    lines += [f"  {k['kind']:<22}{k['us_per_step']:10.1f} µs {100 * k['share']:5.1f} %" for k in summary["kinds"]]
    lines += [f"    {k['name'][:60]:<60}{k['calls_per_step']:6.1f}x {k['us_per_step']:9.1f} µs "
              f"{100 * k['share']:5.1f} %" for k in summary["kernels"][:top]]
    return "\n".join(lines)
