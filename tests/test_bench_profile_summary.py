"""bench.profile_summary: kernel selection, categories, busy/idle arithmetic, loading, and a real CPU profile."""

import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from bench import profile_summary

HOST_PID, GPU_PID = 1, 2
STREAM_A, STREAM_B, XLA_OPS, XLA_MODULES = 10, 11, 20, 21
# Far from zero, as real traces are: the window must not depend on the epoch.
T0 = 5_000_000.0


def _kernel(tid, name, start, duration, **args):
    return {"ph": "X", "pid": GPU_PID, "tid": tid, "ts": T0 + start, "dur": duration, "name": name, "args": args}


def _metadata(name, pid, value, tid=None):
    event = {"ph": "M", "pid": pid, "name": name, "args": {"name": value}}
    if tid is not None:
        event["tid"] = tid
    return event


# Two streams, times in microseconds. Busy: [0, 600) + [700, 1250) + [1300, 1450) + [1600, 1700)
# = 600 + 550 + 150 + 100 = 1400 of a 1700 window, so 300 idle.
STREAM_KERNELS = [
    _kernel(STREAM_A, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0, 400),
    _kernel(STREAM_A, "loop_add_fusion_3", 500, 100, hlo_op="add_fusion.3"),
    _kernel(STREAM_A, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wg_knob_7_64x128x128_4x1x1_kernel0_0",
            700, 300),
    _kernel(STREAM_A, "gemm_fusion_dot_12", 1000, 200, hlo_op="gemm_fusion_dot.12"),
    # A kernel name that says nothing: the HLO op name decides.
    _kernel(STREAM_A, "sm90_generic_kernel", 1300, 100, hlo_op="cublas-gemm.1"),
    _kernel(STREAM_B, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 300, 250),
    _kernel(STREAM_B, "Memset", 1150, 100),
    _kernel(STREAM_B, "loop_add_fusion_3", 1400, 50, hlo_op="add_fusion.3"),
    _kernel(STREAM_B, "redzone_checker", 1600, 100),
]
# Per category (us): gemm 400 + 200 + 100, fusion 100 + 50, attention 300, collective 250, memcpy 100, other 100.
CATEGORY_US = {"gemm": 700, "attention": 300, "fusion": 150, "memcpy": 100, "collective": 250, "other": 100}
KERNEL_US = 1600


def _synthetic_trace():
    return [
        _metadata("process_name", HOST_PID, "/host:CPU"),
        _metadata("thread_name", HOST_PID, "python", tid=1),
        _metadata("process_name", GPU_PID, "/device:GPU:0"),
        _metadata("thread_name", GPU_PID, "Stream #13(Compute)", tid=STREAM_A),
        _metadata("thread_name", GPU_PID, "Stream #14(Compute,Nccl)", tid=STREAM_B),
        _metadata("thread_name", GPU_PID, "XLA Ops", tid=XLA_OPS),
        _metadata("thread_name", GPU_PID, "XLA Modules", tid=XLA_MODULES),
        # Host work, earlier and longer than any kernel, named like one: counting it would change everything.
        {"ph": "X", "pid": HOST_PID, "tid": 1, "ts": T0 - 1000, "dur": 5000, "name": "gemm_fusion_dot_12", "args": {}},
        # The derived lines repeat the kernels.
        _kernel(XLA_OPS, "gemm_fusion_dot.12", 1000, 200),
        _kernel(XLA_MODULES, "jit_train_step", -50, 1800),
        # Not complete events.
        {"ph": "i", "pid": GPU_PID, "tid": STREAM_A, "ts": T0, "name": "marker"},
    ] + STREAM_KERNELS


def test_device_kernels_are_the_stream_events_only():
    kernels = profile_summary.device_kernels(_synthetic_trace())
    assert kernels == STREAM_KERNELS


def test_device_process_without_stream_threads_keeps_all_its_events():
    trace = [_metadata("process_name", GPU_PID, "/device:GPU:0"), _kernel(99, "loop_add_fusion", 0, 10)]
    assert profile_summary.device_kernels(trace) == trace[1:]


@pytest.mark.parametrize("name, args, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", {}, "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", {}, "gemm"),
    ("cutlass3x_sm90_tensorop_h64x128x16gemm_f16_f16_f16_void_f16_128x128x64_1x1x1_0_nnn_align8", {}, "gemm"),
    ("cublasLt::splitKreduce_kernel", {}, "gemm"),
    ("triton_gemm_dot_5", {}, "gemm"),
    # cuDNN convolutions are implicit GEMMs; "fprop" must not make them attention.
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", {}, "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg_knob_3_64x128x128_4x1x1_kernel0_0", {}, "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", {}, "attention"),
    ("ncclDevKernel_AllGather_RING_LL", {}, "collective"),
    ("kernel_7", {"hlo_op": "all-reduce-start.2"}, "collective"),
    ("MemcpyD2D", {}, "memcpy"),
    ("memset32_aligned1D", {}, "memcpy"),
    ("input_reduce_fusion_4", {}, "fusion"),
    ("small_reduce_fusion", {}, "fusion"),
    ("loop_convert_fusion_1", {}, "fusion"),
    ("wrapped_transpose", {}, "fusion"),
    ("copy_18", {}, "fusion"),
    # The source scope in HLO metadata names the model part, not the kernel kind.
    ("kernel_9", {"long_name": '%custom-call.3 = f32[8] custom-call(), metadata={op_name="jit(f)/attention/x"}'},
     "other"),
    ("kernel_9", {"long_name": '%custom-call.4 = (bf16[8], u8[0]) custom-call(), custom_call_target="__cublas$gemm"'},
     "gemm"),
    ("redzone_checker", {}, "other"),
])
def test_categorise(name, args, category):
    assert profile_summary.categorise({"name": name, "args": args}) == category


def test_summarise_synthetic_trace():
    summary = profile_summary.summarise(_synthetic_trace(), steps=2)

    assert sum(kernel["dur"] for kernel in STREAM_KERNELS) == KERNEL_US
    assert summary["source"] == "/device:GPU:0 (2 stream threads)"
    assert summary["steps"] == 2
    assert summary["window_ms"] == pytest.approx(1.7, rel=1e-12)
    assert summary["busy_ms"] == pytest.approx(1.4, rel=1e-12)
    assert summary["idle_ms"] == pytest.approx(0.3, rel=1e-9)
    assert summary["idle_fraction"] == pytest.approx(300 / 1700, rel=1e-9)

    assert list(summary["categories"]) == list(profile_summary.CATEGORIES)
    for category, total_us in CATEGORY_US.items():
        entry = summary["categories"][category]
        assert entry["ms_per_step"] == pytest.approx(total_us / 1e3 / 2, rel=1e-12), category
        assert entry["share_of_kernel_time"] == pytest.approx(total_us / KERNEL_US, rel=1e-12), category

    top = summary["top_kernels"]
    assert [kernel["name"] for kernel in top] == [
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wg_knob_7_64x128x128_4x1x1_kernel0_0",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL",
        "gemm_fusion_dot_12",
        "loop_add_fusion_3",
        # Equal totals (100 us): by name.
        "Memset", "redzone_checker", "sm90_generic_kernel",
    ]
    fusion = top[4]
    assert (fusion["category"], fusion["calls"]) == ("fusion", 2)
    assert fusion["total_ms"] == pytest.approx(0.15, rel=1e-12)
    assert fusion["ms_per_step"] == pytest.approx(0.075, rel=1e-12)


def test_summarise_rejects_traces_without_kernels_and_bad_step_counts():
    with pytest.raises(ValueError, match="no kernel events"):
        profile_summary.summarise(_synthetic_trace()[:8], steps=1)
    with pytest.raises(ValueError, match="steps"):
        profile_summary.summarise(_synthetic_trace(), steps=0)


def test_format_table_lists_categories_idle_and_top_kernels():
    table = profile_summary.format_table(profile_summary.summarise(_synthetic_trace(), steps=2))
    category_rows = table.splitlines()[4:10]
    # Largest first: the row to read is the top one.
    assert category_rows[:2] == ["| gemm | 0.350 | 43.8% |", "| attention | 0.150 | 18.8% |"]
    assert "| other | 0.050 | 6.2% |" in category_rows
    assert "idle 0.150 ms/step (17.6% of the window" in table
    assert "| loop_add_fusion_3 | fusion | 2 | 0.150 | 0.075 |" in table


def _write_gz(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, handle)


def test_load_trace_from_directory_takes_the_newest_perfetto_trace(tmp_path):
    old = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00" / "perfetto_trace.json.gz"
    new = tmp_path / "plugins" / "profile" / "2026_01_02_00_00_00" / "perfetto_trace.json.gz"
    _write_gz(old, [{"ph": "X", "name": "old"}])
    _write_gz(new, _synthetic_trace())
    os.utime(old, (1_000_000_000, 1_000_000_000))
    # TensorBoard's copy beside it is only the fallback.
    _write_gz(new.parent / "host.trace.json.gz", [{"ph": "X", "name": "tensorboard"}])

    assert profile_summary.load_trace(tmp_path) == _synthetic_trace()
    assert profile_summary.load_trace(old) == [{"ph": "X", "name": "old"}]


def test_load_trace_falls_back_to_tensorboard_trace_and_reads_plain_json(tmp_path):
    _write_gz(tmp_path / "run" / "host.trace.json.gz", [{"ph": "X", "name": "tensorboard"}])
    assert profile_summary.load_trace(tmp_path) == [{"ph": "X", "name": "tensorboard"}]

    plain = tmp_path / "trace.json"
    plain.write_text(json.dumps([{"ph": "X", "name": "bare array"}]))
    assert profile_summary.load_trace(plain) == [{"ph": "X", "name": "bare array"}]


def test_load_trace_names_the_path_when_nothing_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        profile_summary.load_trace(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json.gz"):
        profile_summary.load_trace(tmp_path / "missing.json.gz")


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    _write_gz(tmp_path / "log" / "perfetto_trace.json.gz", _synthetic_trace())
    json_path = tmp_path / "summary.json"
    profile_summary.main([str(tmp_path / "log"), "--steps=2", f"--json={json_path}"])

    assert "| gemm | 0.350 | 43.8% |" in capsys.readouterr().out
    assert json.loads(json_path.read_text()) == profile_summary.summarise(_synthetic_trace(), steps=2)


def test_real_cpu_profile(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    step(x).block_until_ready()  # compile outside the trace
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            step(x).block_until_ready()

    summary = profile_summary.summarise(profile_summary.load_trace(tmp_path), steps=3)
    assert summary["source"].startswith("CPU")
    assert summary["busy_ms"] > 0
    assert 0 <= summary["idle_fraction"] < 1
    assert sum(entry["share_of_kernel_time"] for entry in summary["categories"].values()) == pytest.approx(1.0)
    assert "| category | ms/step |" in profile_summary.format_table(summary)
