"""Benchmark of the fused Pallas edge kernels against the XLA references, on one GPU, in one command.

    python bench/kernels.py --structures .shared/structures --out bench/results/kernels-h200.json
    python bench/kernels.py --ops directional_cfconv --out bench/results/kernels-painn-h200.json   # PaiNN's message
    python bench/kernels.py --tiny --ops cfconv directional_cfconv --out /tmp/k.json   # CPU smoke test (interpreter)

--ops picks the layers: "cfconv" (SchNet's layer, the SchNet student below; its rows at the top level of the
JSON) and "directional_cfconv" (PaiNN's whole message, one fused kernel per pass, with the PaiNN 64x3 student;
its rows under the "directional_cfconv" key). --tiny runs everything on the CPU on watertiny, the kernels in
Pallas' interpreter (no sweep, two repeats): it checks the script, its numbers are not speeds.

On the device machine (jax/triton from its image, the project's other packages as carried wheels):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site && python3 bench/kernels.py \
        --structures .shared/structures --sweep waterhuge --sweep-s 110 --correctness watersmall \
        --repeats 15 --out $OUT/kernels-h200.json

Steps (each one guarded: a failure is recorded in the JSON and the run goes on):
  1. device, versions, a large device-to-device copy (the HBM ceiling used below);
  2. correctness on the GPU, fresh random inputs: forward, first-order VJP and a second-order quantity
     (parameter gradient of a force-like loss), Pallas (float32) and XLA (float32, default matmul precision)
     against a float64 reference computed on the host CPU, as relative errors ||out - ref|| / ||ref||;
  3. at the --sweep sizes, a sweep of launch configurations (blocks, warps, stages, layout, dot precision)
     for each derivative depth of the layer (stopping --sweep-s seconds after the start); then per water box,
     with the nearest swept size's best: the layer forward, forward+backward, the student's energy+forces
     (what MD needs) and a training step (energy, forces, parameter gradients), Pallas against XLA; median
     of repeated runs after warm-up (wall clock, host dispatch included), and the device time per call
     from a profiler trace (the GPU's kernels alone: ~0.1-0.15 ms of a one-layer call is dispatch);
  4. counted bytes and FLOPs of the layer against the measured copy bandwidth and both times: "unique"
     bytes (each array once) and "issued" bytes (what the kernels load: a feature row per edge); cfconv only.
The layer rows also time "layer_second_order", the second-order quantity of step 2 (what a training step on
forces runs per layer).

The cfconv student is SchNetConfig(features=64, layers=2, n_rbf=16, cutoff=5 Å), the directional_cfconv one
PaiNNConfig(features=64, layers=3, n_rbf=16, cutoff=5 Å) (experiments/aspirin.py's); their edge kernels are the
dispatcher's "pallas" set with the tuned config: cfconv takes the neighbour list's receiver order as it is and
runs the symmetric transpose; the edge vectors' difference sums the position gradient per atom in both orders.
So energy+forces and a training step each sort once (the sender order), inside the step (PaiNN's message takes
the edge vectors, and its first derivative walks the sender order too: edge_op's generic VJP passes). The layer
rows are timed with the edge orders built once, as a caller that keeps them per neighbour update does.
"graph_build_ms" is a full build (both sorts) for reference.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distiller.capacity import make_batch  # noqa: E402
from distiller.derivatives import predictions  # noqa: E402
from distiller.structure import read_structures  # noqa: E402
from distiller.students import PaiNNConfig, SchNetConfig, edge_lengths, init_params, student_model  # noqa: E402
from distiller import speed  # noqa: E402
from distiller.precision import full_precision  # noqa: E402
from pallas_kernels import KERNELS, pallas_set  # noqa: E402
from pallas_kernels.cfconv import cfconv_reference  # noqa: E402
from pallas_kernels.cfconv.pallas import cfconv_pallas, default_config  # noqa: E402
from pallas_kernels.directional_cfconv import directional_cfconv_reference  # noqa: E402
from pallas_kernels.directional_cfconv.pallas import directional_cfconv_pallas  # noqa: E402
from pallas_kernels.edges.edge_op import KernelConfig, PallasConfig  # noqa: E402
from pallas_kernels.edges.graph import edge_graph  # noqa: E402

SIZES = ("watersmall", "waterbox", "waterbig", "waterhuge")
STUDENT = dict(features=64, layers=2, n_rbf=16, cutoff=5.0)
PAINN_STUDENT = dict(features=64, layers=3, n_rbf=16, cutoff=STUDENT["cutoff"])  # one neighbour list for both

# Candidates per derivative depth (block_edges, block_atoms, num_warps, num_stages, layout); the first is
# DEFAULT_CONFIG's. A candidate that asks for more shared memory than the GPU has fails to compile and is
# recorded under "errors" (with the Gaussian/MLP filter, 128-edge blocks did for the VJP passes).
SWEEP = {
    0: [(64, 16, 4, 2, "flat"), (128, 16, 4, 2, "flat"), (128, 32, 8, 2, "flat"), (64, 16, 4, 3, "flat"),
        (32, 16, 4, 2, "flat")],
    1: [(32, 16, 4, 2, "flat"), (64, 16, 4, 2, "flat"), (64, 16, 8, 2, "flat"), (128, 16, 8, 2, "flat"),
        (16, 16, 4, 2, "flat")],
    2: [(32, 16, 4, 1, "flat"), (64, 16, 4, 1, "flat"), (16, 16, 4, 1, "flat"), (32, 16, 8, 1, "flat")],
}


def timeit(fn, *args, repeats=30, warmup=3):
    """Median, p10 and p90 wall time (s) of fn(*args) with the result ready; compile time separately."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = speed.call_seconds(lambda: fn(*args), repeats, warmup)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90)), compile_s


def device_time(fn, *args, calls=10):
    """GPU time (s) per call of fn(*args): the GPU's events in a profiler trace, summed; None without a GPU.

    Kernels and copies only, no host dispatch and no gaps between launches: what the kernels themselves
    achieve (the roofline fractions use it). Also returns the number of device events per call.
    """
    if jax.default_backend() != "gpu":
        return None
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (trace,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    busy = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "GPU" in process.get(e["pid"], ""):
            busy["us"] += float(e.get("dur", 0.0))
            busy["events"] += 1
    return busy["us"] * 1e-6 / calls, busy["events"] / calls


def guarded(report, key, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - record and go on: one failure must not cost the device call
        report.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:3000]
        print(f"[error] {key}: {type(e).__name__}: {str(e)[:500]}", flush=True)
        traceback.print_exc(limit=3)
        return None


def versions():
    """distiller.speed.versions() and the devices."""
    return {**speed.versions(), "devices": [str(d) for d in jax.devices()], "device_kind": speed.device_name()}


def copy_bandwidth(n_bytes=1 << 30):
    """Bytes read + written per second of a large device-to-device copy (x -> x + 1), median of 20."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    med, *_ = timeit(f, x, repeats=20)
    return 2 * x.nbytes / med


# --------------------------------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
    name: str
    n_real: int
    batch: object
    graph: object
    n_edges_real: int


def load_problem(structures_dir, name):
    structures = read_structures(os.path.join(structures_dir, f"{name}.extxyz"))
    batch, _ = make_batch(structures, STUDENT["cutoff"])
    n_atoms = batch.numbers.shape[0]
    graph = jax.jit(functools.partial(edge_graph, sorted_by_receiver=True), static_argnums=3)(
        batch.senders, batch.receivers, batch.edge_mask, n_atoms)
    return Problem(name, sum(s.n_atoms for s in structures), batch, graph, int(np.sum(batch.edge_mask)))


def layer_inputs(problem, seed, features=64, n_rbf=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    n_atoms = problem.batch.numbers.shape[0]
    params = {"coefficients": jnp.asarray(rng.normal(size=(n_rbf, features)), dtype)}
    x = jnp.asarray(rng.normal(size=(n_atoms, features)), dtype)
    # Real geometry with jittered atoms, so every check sees lengths it has not seen before. The atoms move,
    # not the edges: both directions of a pair keep one length, as the symmetric transpose requires.
    b = problem.batch
    moved = b.positions + jnp.asarray(rng.uniform(-0.03, 0.03, b.positions.shape), dtype)
    r = jax.jit(lambda p: edge_lengths(b.edge_vectors(p), b.edge_mask))(moved)
    ct = jnp.asarray(rng.normal(size=(n_atoms, features)), dtype)
    return x, r, params, ct


def layer_fns(problem, config: PallasConfig | None):
    """(forward, fwd+bwd, second order) of one cfconv layer; config None = the XLA reference."""
    b = problem.batch
    graph = problem.graph

    @full_precision  # the XLA path at full float32, as the student runs it (not TF32)
    def conv(x, r, p):
        if config is None:
            return cfconv_reference(x, r, b.senders, b.receivers, b.edge_mask, p, cutoff=STUDENT["cutoff"])
        return cfconv_pallas(x, r, b.senders, b.receivers, b.edge_mask, p, cutoff=STUDENT["cutoff"],
                             graph=graph, config=config, symmetric=True)

    def vjp(x, r, p, ct):
        out, pull = jax.vjp(conv, x, r, p)
        return out, pull(ct)

    def second(x, r, p, ct):
        # A force-like loss: the parameters' gradient of a function of the first derivatives.
        def loss(p):
            _, (dx, dr, _) = vjp(x, r, p, ct)
            return jnp.sum(dr**2) + jnp.sum(dx**2)
        return jax.grad(loss)(p)

    return jax.jit(conv), jax.jit(vjp), jax.jit(second)


def directional_inputs(problem, seed, features=64, n_rbf=16, dtype=jnp.float32):
    """(scalars, vectors, along, edge vectors, params, output cotangents) of PaiNN's message at this size."""
    rng = np.random.default_rng(seed)
    n_atoms = problem.batch.numbers.shape[0]
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    b = problem.batch
    moved = b.positions + jnp.asarray(rng.uniform(-0.03, 0.03, b.positions.shape), dtype)  # as layer_inputs
    edge_vectors = jax.jit(b.edge_vectors)(moved)
    return (normal(n_atoms, features), normal(n_atoms, 3, features), normal(n_atoms, features), edge_vectors,
            {"coefficients": normal(n_rbf, 3, features)}, (normal(n_atoms, features), normal(n_atoms, 3, features)))


def directional_fns(problem, config: PallasConfig | None):
    """(forward, fwd+bwd, second order) of PaiNN's message (directional_cfconv); config None = the XLA reference."""
    b = problem.batch

    @full_precision
    def conv(s, v, q, x, p):
        args = (s, v, q, x, b.senders, b.receivers, b.edge_mask, p)
        if config is None:
            return directional_cfconv_reference(*args, cutoff=PAINN_STUDENT["cutoff"])
        return directional_cfconv_pallas(*args, cutoff=PAINN_STUDENT["cutoff"], graph=problem.graph, config=config)

    def vjp(s, v, q, x, p, ct):
        out, pull = jax.vjp(conv, s, v, q, x, p)
        return out, pull(ct)

    def second(s, v, q, x, p, ct):
        # As layer_fns: the parameters' gradient of a loss of the first derivatives (edge vectors: the forces').
        def loss(p):
            return sum(jnp.sum(d**2) for d in vjp(s, v, q, x, p, ct)[1][:4])
        return jax.grad(loss)(p)

    return jax.jit(conv), jax.jit(vjp), jax.jit(second)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One edge operation under test: inputs(problem, seed) -> (*inputs, output cotangent); fns(problem, config)
    -> jitted (forward, fwd+bwd, second order), config None for the XLA reference; the differentiable inputs'
    names; the student that runs it (kernel -> config); whether bytes and flops are counted for it."""

    name: str
    inputs: object
    fns: object
    labels: tuple
    student: object
    counted: bool


LAYERS = {
    "cfconv": Layer("cfconv", layer_inputs, layer_fns, ("features", "lengths", "params"),
                    lambda kernel: SchNetConfig(**STUDENT, kernel=kernel), counted=True),
    "directional_cfconv": Layer("directional_cfconv", directional_inputs, directional_fns,
                                ("scalars", "vectors", "along", "edge_vectors", "params"),
                                lambda kernel: PaiNNConfig(**PAINN_STUDENT, kernel=kernel), counted=False),
}


def rel_err(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / max(den, 1e-300)))


def correctness(problem, config, seed, second_order=True, layer=LAYERS["cfconv"]):
    """Relative errors of Pallas and XLA (float32, on the default device) against float64 on the host CPU."""
    *inputs, ct = layer.inputs(problem, seed)
    out = {}
    results = {}
    for name, cfg in (("pallas", config), ("xla", None)):
        fwd, vjp, sec = layer.fns(problem, cfg)
        results[name] = (fwd(*inputs), vjp(*inputs, ct)[1], sec(*inputs, ct) if second_order else None)
    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float64 if a.dtype.kind == "f"  # noqa
                                                                          else a.dtype), cpu), t)
        prob64 = dataclasses.replace(problem, batch=to64(problem.batch))
        *in64, ct64 = to64((*inputs, ct))
        fwd, vjp, sec = layer.fns(prob64, None)
        with jax.default_device(cpu):
            ref = (fwd(*in64), vjp(*in64, ct64)[1], sec(*in64, ct64) if second_order else None)
    for name, res in results.items():
        out[name] = {"forward": rel_err(res[0], ref[0]), "vjp": rel_err(res[1], ref[1])}
        for k, label in enumerate(layer.labels):
            out[name][f"vjp_{label}"] = rel_err(res[1][k], ref[1][k])
        if second_order:
            out[name]["second_order_params"] = rel_err(res[2], ref[2])
        finite = all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(res))
        out[name]["finite"] = finite
    return out


# ---------------------------------------------------------------------------------------------- counting


def counted_bytes(problem, features=64, n_rbf=16):
    """Bytes of the layer's passes, counted two ways (4-byte words).

    unique: the fewest bytes through HBM, each input read once and each output written once.
      forward: offsets, per real edge its position->edge id, far atom and length; features; output.
      backward (one receiver-order pass, the symmetric transpose): the same index/length words again, features
      and the output cotangent, the features' cotangent and one length cotangent per edge.
    issued: what the kernels ask the memory system for: as unique, but every gathered feature row counted
      once per edge (the far end's row of each edge; in the backward pass the features' and the cotangent's).
      Gathers mostly hit L2, so this can exceed HBM bandwidth; it is the traffic the kernel cannot avoid.
    """
    a, e, f = problem.batch.numbers.shape[0], problem.n_edges_real, features
    params = 4 * n_rbf * f
    fwd = 4 * (a + 1) + 12 * e + 4 * a * f * 2 + params
    bwd = 4 * (a + 1) + 12 * e + 4 * a * f * 3 + 4 * e + params
    gathered = 4 * e * f  # one feature row per edge
    return {"forward": fwd, "forward_backward": fwd + bwd,
            "issued_forward": fwd + gathered, "issued_forward_backward": fwd + bwd + 3 * gathered}


def counted_flops(problem, features=64, n_rbf=16):
    """Flops per real edge of the dense-basis formulation the kernels run: forward; forward+backward (x, r).

    Per edge: K basis values (~12 flops each), the (K) x (K, F) product, envelope (~20), weight x feature and
    the one-hot reduction row (~4 F). The backward pass recomputes the filter and runs the product once more
    for the basis' derivative.
    """
    e, f, k = problem.n_edges_real, features, n_rbf
    fwd = e * (12 * k + 2 * k * f + 20 + 4 * f)
    bwd = e * (2 * (12 * k + 2 * k * f) + 40 + 8 * f)
    return {"forward": fwd, "forward_backward": fwd + bwd}


# ------------------------------------------------------------------------------------------------ sweeping


def make_config(base: PallasConfig, depth, cand, precision=None):
    kc = KernelConfig(*cand)
    field = ("forward", "first", "second")[depth]
    cfg = dataclasses.replace(base, **{field: kc})
    if precision is not None:
        cfg = dataclasses.replace(cfg, precision=precision)
    return cfg


def sweep(problem, base: PallasConfig, report, deadline, seed=0, layer=LAYERS["cfconv"]):
    """Best KernelConfig per depth (forward, first VJP, second VJP) and the best precision, by time."""
    *inputs, ct = layer.inputs(problem, seed)
    rows = []
    best = base
    for depth in (0, 1, 2):
        results, first = [], None
        for cand in SWEEP[depth]:
            if time.time() > deadline:
                break
            cfg = make_config(best, depth, cand)
            fn, args = layer.fns(problem, cfg)[depth], (*inputs, ct) if depth else tuple(inputs)
            t = guarded(report, f"sweep/{layer.name}/{problem.name}/d{depth}/{cand}", timeit, fn, *args, repeats=10)
            if t is not None:
                # Every configuration must compute the same function: compare with the first one's output.
                out = fn(*args)
                first = out if first is None else first
                diff = rel_err(out, first)
                results.append((t[0], cand))
                rows.append({"depth": depth, "config": cand, "precision": best.precision, "median_s": t[0],
                             "compile_s": t[3], "rel_diff_vs_first": diff})
                print(f"  sweep {problem.name} depth {depth} {cand} {best.precision}: {t[0] * 1e3:.3f} ms "
                      f"(compile {t[3]:.1f} s, rel diff {diff:.1e})", flush=True)
        if results:
            best = make_config(best, depth, min(results)[1])
    # Precision: the other one with the chosen blocks, on the forward+backward.
    for precision in ("ieee",):
        if time.time() > deadline or precision == best.precision:
            continue
        cfg = dataclasses.replace(best, precision=precision)
        ref_t = timeit(layer.fns(problem, best)[1], *inputs, ct, repeats=10)[0]
        t = guarded(report, f"sweep/{layer.name}/{problem.name}/precision/{precision}", timeit,
                    layer.fns(problem, cfg)[1], *inputs, ct, repeats=10)
        if t is not None:
            rows.append({"depth": "fwd+bwd", "precision": precision, "median_s": t[0], "vs": best.precision,
                         "vs_median_s": ref_t})
            print(f"  sweep {problem.name} precision {precision}: {t[0] * 1e3:.3f} ms vs {best.precision} "
                  f"{ref_t * 1e3:.3f} ms", flush=True)
            if t[0] < ref_t:
                best = cfg
    return best, rows


# ----------------------------------------------------------------------------------------------- the bench


def student_fns(problem, kernel, layer=LAYERS["cfconv"]):
    config = layer.student(kernel)
    params = init_params(config, jax.random.key(0), problem.batch)
    # No params in the model: they are the jitted functions' argument (the training step differentiates them).
    model = student_model(config)

    def energy_forces(params, batch):
        out = predictions(model, params, batch)
        return out.energy, out.forces

    md = jax.jit(energy_forces)

    def loss(params, batch):
        energy, forces = energy_forces(params, batch)
        return jnp.mean((energy - batch.energy) ** 2) + jnp.mean(jnp.sum((forces - batch.forces) ** 2, axis=-1))

    train = jax.jit(jax.value_and_grad(loss))
    return params, md, train


def bench_size(problem, config: PallasConfig, bandwidth, report, repeats, layer=LAYERS["cfconv"]):
    row = {"atoms": problem.n_real, "padded_atoms": int(problem.batch.numbers.shape[0]),
           "edges_real": problem.n_edges_real, "edges_padded": int(problem.batch.edge_mask.shape[0]),
           "config": dataclasses.asdict(config)}
    *inputs, ct = layer.inputs(problem, 1)
    b = problem.batch
    g = guarded(report, f"{problem.name}/graph", timeit,
                jax.jit(edge_graph, static_argnums=3), b.senders, b.receivers, b.edge_mask, b.numbers.shape[0],
                repeats=repeats)
    if g:
        row["graph_build_ms"] = g[0] * 1e3
    nbytes = counted_bytes(problem) if layer.counted else None
    flops = counted_flops(problem) if layer.counted else None
    if layer.counted:
        row["counted_bytes"] = nbytes
        row["counted_flops"] = flops
    # A kernel name for this size's tuned config, registered the public way (the dispatcher's table).
    kernel_name = f"pallas-bench-{layer.name}-{problem.name}"
    KERNELS[kernel_name] = pallas_set(config)
    for path, cfg, kernel in (("pallas", config, kernel_name), ("xla", None, "xla")):
        fwd, vjp, second = layer.fns(problem, cfg)
        res = {}
        for key, fn, args in (("layer_forward", fwd, tuple(inputs)), ("layer_forward_backward", vjp, (*inputs, ct)),
                              ("layer_second_order", second, (*inputs, ct))):
            t = guarded(report, f"{layer.name}/{problem.name}/{path}/{key}", timeit, fn, *args, repeats=repeats)
            if t:
                res[key] = {"ms": t[0] * 1e3, "p10_ms": t[1] * 1e3, "p90_ms": t[2] * 1e3, "compile_s": t[3]}
                kind = {"layer_forward": "forward", "layer_forward_backward": "forward_backward"}.get(key)
                counted = layer.counted and kind is not None
                if counted:
                    res[key]["hbm_fraction"] = nbytes[kind] / t[0] / bandwidth
                    res[key]["issued_fraction"] = nbytes[f"issued_{kind}"] / t[0] / bandwidth
                    res[key]["tflops"] = flops[kind] / t[0] / 1e12
                d = guarded(report, f"{layer.name}/{problem.name}/{path}/{key}/device", device_time, fn, *args)
                if d:
                    res[key].update(device_ms=d[0] * 1e3, device_events=d[1])
                    if counted:
                        res[key].update(device_hbm_fraction=nbytes[kind] / d[0] / bandwidth,
                                        device_issued_fraction=nbytes[f"issued_{kind}"] / d[0] / bandwidth)
            if path == "xla" and key == "layer_forward":
                ca = guarded(report, f"{problem.name}/xla/cost", lambda: fn.lower(*args).compile().cost_analysis())
                if ca:
                    ca = ca[0] if isinstance(ca, list) else ca
                    res["xla_layer_forward_bytes_accessed"] = float(ca.get("bytes accessed", float("nan")))
        made = guarded(report, f"{layer.name}/{problem.name}/{path}/student", student_fns, problem, kernel, layer)
        if made:
            params, md, train = made
            for key, fn in (("energy_forces", md), ("train_step", train)):
                t = guarded(report, f"{layer.name}/{problem.name}/{path}/{key}", timeit, fn, params, b,
                            repeats=repeats)
                if t:
                    res[key] = {"ms": t[0] * 1e3, "p10_ms": t[1] * 1e3, "p90_ms": t[2] * 1e3, "compile_s": t[3],
                                "us_per_atom": t[0] * 1e6 / problem.n_real}
                    d = guarded(report, f"{layer.name}/{problem.name}/{path}/{key}/device", device_time, fn,
                                params, b)
                    if d:
                        res[key].update(device_ms=d[0] * 1e3, device_events=d[1])
            if path == "pallas":
                hlo = guarded(report, f"{layer.name}/{problem.name}/hlo",
                              lambda: md.lower(params, b).compile().as_text())
                if hlo:
                    # Launch count and whether XLA merged the layers' identical edge-order sorts.
                    row["student_md_sort_ops"] = [ln.strip()[:200] for ln in hlo.splitlines()
                                                  if " sort(" in ln or ("custom-call(" in ln and "sort" in ln.lower())]
                    row["student_md_triton_calls"] = hlo.count("__gpu$xla.gpu.triton")
                hlo = guarded(report, f"{layer.name}/{problem.name}/hlo_train",
                              lambda: train.lower(params, b).compile().as_text())
                if hlo:
                    row["student_train_triton_calls"] = hlo.count("__gpu$xla.gpu.triton")
        row[path] = res
        print(f"  {layer.name} {problem.name} {path}: " + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in res.items()
                                                        if isinstance(v, dict)), flush=True)
    del KERNELS[kernel_name]
    return row


def table(report):
    """The rows of one layer's section of the report (the top level for cfconv)."""
    lines = [f"{'size':<11} {'atoms':>6} | {'what':<22} | {'pallas ms':>10} {'xla ms':>10} {'speedup':>8} | "
             f"{'pallas us/at':>12} {'xla us/at':>10} | {'dev ms pal':>10} {'dev ms xla':>10} | "
             f"{'hbm% pal':>8} {'issued% pal':>11} {'issued% dev':>11}"]
    nan = float("nan")
    for name, row in report.get("sizes", {}).items():
        for key in ("layer_forward", "layer_forward_backward", "layer_second_order", "energy_forces", "train_step"):
            pa, xa = row.get("pallas", {}).get(key) or {}, row.get("xla", {}).get(key) or {}
            if not pa and not xa:
                continue
            pm, xm = pa.get("ms", nan), xa.get("ms", nan)
            pct = lambda d, k: 100 * d.get(k, nan)  # noqa: E731
            lines.append(f"{name:<11} {row['atoms']:>6} | {key:<22} | {pm:>10.3f} {xm:>10.3f} {xm / pm:>8.2f} | "
                         f"{pm * 1e3 / row['atoms']:>12.4f} {xm * 1e3 / row['atoms']:>10.4f} | "
                         f"{pa.get('device_ms', nan):>10.3f} {xa.get('device_ms', nan):>10.3f} | "
                         f"{pct(pa, 'hbm_fraction'):>8.1f} {pct(pa, 'issued_fraction'):>11.1f} "
                         f"{pct(pa, 'device_issued_fraction'):>11.1f}")
    return "\n".join(lines)


def bench_layer(layer, section, problems, args, bw, report, deadline, base: PallasConfig):
    """Correctness, sweep and per-size rows of one layer into `section` (a dict of the report)."""
    section["correctness"] = {}
    for name in args.correctness:
        if problems.get(name):
            c = guarded(report, f"{layer.name}/{name}/correctness", correctness, problems[name], base, seed=123,
                        layer=layer)
            section["correctness"][name] = c
            print(f"correctness {layer.name} {name}: {json.dumps(c)}", flush=True)
    tuned = {}
    section["sweep"] = {}
    for name in args.sweep:
        if problems.get(name):
            res = guarded(report, f"{layer.name}/{name}/sweep", sweep, problems[name], base, report, deadline,
                          layer=layer)
            if res:
                tuned[name], section["sweep"][name] = res
                print(f"tuned {layer.name} {name}: {tuned[name]}", flush=True)
    section["sizes"] = {}
    for name in args.sizes:
        problem = problems.get(name)
        if not problem:
            continue
        near = min(tuned, key=lambda k: abs(problems[k].n_real - problem.n_real)) if tuned else None
        config = tuned[near] if near else base
        section["sizes"][name] = guarded(report, f"{layer.name}/{name}/bench", bench_size, problem, config, bw,
                                         report, args.repeats, layer) or {}
    print(f"{layer.name}:\n{table(section)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", default=os.path.join(os.environ.get("DISTILLER_SHARED", "../shared"),
                                                             "structures"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--sweep", nargs="*", default=["waterhuge"],
                        help="sizes to tune on (others use the nearest tuned size's config)")
    parser.add_argument("--correctness", nargs="*", default=["watersmall"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sweep-s", type=float, default=150,
                        help="stop sweeping this many seconds after start (for all --ops together)")
    parser.add_argument("--ops", nargs="+", default=["cfconv"], choices=sorted(LAYERS),
                        help="the layers to benchmark (and their students)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: watertiny only, kernels interpreted, no sweep, 2 repeats")
    parser.add_argument("--out", default="bench/results/kernels-h200.json")
    args = parser.parse_args()
    if args.tiny:
        jax.config.update("jax_platforms", "cpu")
        args.sizes, args.correctness, args.sweep, args.repeats = ["watertiny"], ["watertiny"], [], 2
    start = time.time()
    deadline = start + args.sweep_s
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "versions": versions(),
              "student": STUDENT, "sizes": {}}
    print(json.dumps(report["versions"]), flush=True)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        report["wall_s"] = time.time() - start
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    bw = guarded(report, "copy_bandwidth", copy_bandwidth, 1 << (26 if args.tiny else 30))
    report["copy_bandwidth_Bps"] = bw
    bw = bw or 4.3e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    problems = {}
    for name in args.sizes:
        problems[name] = guarded(report, f"{name}/load", load_problem, args.structures, name)
    for op in args.ops:
        layer = LAYERS[op]
        # cfconv: the tuned defaults; PaiNN's message: what the dispatcher launches it with (cfconv's blocks
        # for its four output rows' width, default_config). --tiny: interpreted, also inside the students.
        base = PallasConfig() if op == "cfconv" else default_config(4 * PAINN_STUDENT["features"])
        base = dataclasses.replace(base, interpret=True) if args.tiny else base
        if op == "cfconv":
            section = report  # at the top level, as in the saved results
        else:
            section = report[op] = {"student": PAINN_STUDENT}
        guarded(report, f"{op}/layer", bench_layer, layer, section, problems, args, bw, report, deadline, base)
        save()
    save()


if __name__ == "__main__":
    main()
