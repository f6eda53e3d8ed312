"""distiller.profiling: a trace's device time per kernel and kind, from a perfetto trace written the way
jax.profiler writes a GPU's (a /device: process whose stream threads hold the kernels, beside host events and
summary lines that repeat them), and a real trace of CPU work."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from distiller import profiling


def _trace(path, kernels, repeats_on_summary_line=True):
    """A perfetto trace with `kernels` [(name, µs)] on GPU stream 7, host events, and (optionally) the same
    kernels again on a non-stream line of the device (as GPU traces' "XLA Ops" lines do)."""
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
              {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
              {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction(step)", "ts": 0, "dur": 5000.0}]
    for k, (name, us) in enumerate(kernels):
        events.append({"ph": "X", "pid": 2, "tid": 7, "name": name, "ts": 10 * k, "dur": us})
        if repeats_on_summary_line:
            events.append({"ph": "X", "pid": 2, "tid": 9, "name": name, "ts": 10 * k, "dur": us})
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_time_per_kernel_and_kind_counts_each_stream_kernel_once(tmp_path):
    path = tmp_path / "perfetto_trace.json.gz"
    kernels = [("edge_op_d1_r", 300.0), ("edge_op_d0_r", 100.0), ("edge_op_d0_r", 100.0),
               ("sm90_xmma_gemm_f32f32", 50.0), ("loop_add_fusion_4", 30.0), ("input_scatter_fusion_9", 20.0)]
    _trace(path, kernels)
    summary = profiling.summarise(str(path), steps=2, wall_s=1e-3)
    assert summary["device_ms_per_step"] == pytest.approx(0.3)  # 600 µs over 2 steps, the host event left out
    assert summary["kernel_launches_per_step"] == 3.0
    assert summary["wall_ms_per_step"] == pytest.approx(0.5)
    by_name = {k["name"]: k for k in summary["kernels"]}
    assert by_name["edge_op_d0_r"]["calls_per_step"] == 1.0 and by_name["edge_op_d0_r"]["us_per_step"] == 100.0
    assert [k["name"] for k in summary["kernels"]][0] == "edge_op_d1_r"  # longest first
    kinds = {k["kind"]: k["us_per_step"] for k in summary["kinds"]}
    assert kinds == {"pallas edge passes": 250.0, "GEMM": 25.0, "XLA fusions": 15.0, "reductions, scatters": 10.0}
    assert sum(k["share"] for k in summary["kinds"]) == pytest.approx(1.0)
    assert "edge_op_d1_r" in profiling.kernel_table(summary)


def test_kernels_beyond_the_top_are_summed_into_one_row(tmp_path, monkeypatch):
    path = tmp_path / "perfetto_trace.json.gz"
    _trace(path, [(f"fusion_{k}", float(10 + k)) for k in range(6)], repeats_on_summary_line=False)
    monkeypatch.setattr(profiling, "TOP_KERNELS", 4)
    kernels = profiling.summarise(str(path), steps=1, wall_s=1.0)["kernels"]
    assert [k["name"] for k in kernels] == ["fusion_5", "fusion_4", "fusion_3", "fusion_2", "(2 other kernels)"]
    assert kernels[-1]["us_per_step"] == 21.0 and kernels[-1]["calls_per_step"] == 2.0


def test_a_traced_cpu_run_reports_its_wall_time_and_no_device_kernels(tmp_path):
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()  # compiled outside the trace
    summary = profiling.traced(lambda: f(x), str(tmp_path / "trace"), steps=1)
    assert summary["trace"].endswith("perfetto_trace.json.gz") and summary["wall_ms_per_step"] > 0
    assert summary["kernels"] == [] and summary["device_ms_per_step"] == 0.0
    assert "no device events" in profiling.kernel_table(summary)


def test_a_folder_without_a_trace_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        profiling._trace_file(str(tmp_path))


def test_profile_md_writes_the_kernel_summary_beside_the_trace(tmp_path, structures_dir, monkeypatch, capsys):
    """`distiller profile --md`'s wiring (md_speed's trace: tests/test_md.py): what it runs, what it writes and says."""
    from distiller import speed
    from distiller.cli import main

    folder = tmp_path / "trace" / "plugins" / "profile" / "now"
    folder.mkdir(parents=True)
    _trace(folder / "perfetto_trace.json.gz", [("edge_op_d1_r", 300.0)], repeats_on_summary_line=False)
    calls = []

    def md_speed(model, structure, replicas, steps, chunk, dt, system, trace):
        calls.append((model.name, structure.n_atoms, replicas, steps, chunk, system, trace))
        return {"system": system, "ms_per_step": 1.0,
                "profile": profiling.summarise(str(folder / "perfetto_trace.json.gz"), steps, 1e-3)}

    monkeypatch.setattr(speed, "md_speed", md_speed)
    out = tmp_path / "trace"
    assert main(["profile", "--md", str(structures_dir / "watertiny.extxyz"), "--model", "fennol-pmc:ani1x/0",
                 "--steps", "10", "--replicas", "2", "--out", str(out)]) == 0
    assert calls == [("fennol-pmc:ani1x/0", 81, 2, 10, 10, "watertiny.extxyz x2", str(out))]
    captured = capsys.readouterr()
    assert "MD of fennol-pmc:ani1x/0 on watertiny.extxyz x2 (162 atoms): 10 steps to compile, 10 timed, then 10 " \
           "traced" in captured.err
    summary = json.loads((folder / "kernels.json").read_text())
    assert summary["md"] == {"system": "watertiny.extxyz x2", "ms_per_step": 1.0}
    assert summary["kernels"][0]["name"] == "edge_op_d1_r"
    assert "edge_op_d1_r" in captured.out and f"device time per kernel in {folder / 'kernels.json'}" in captured.out
