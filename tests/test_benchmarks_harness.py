"""The benchmark suite's own machinery: roofline counts, the memory measure, the row runner, the
lightly loader and the markdown/PNG renderer. Fast (no real benchmark runs)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `pytest` without `python -m` does not put the root on the path
    sys.path.insert(0, REPO_ROOT)

from benchmarks import _harness, lightly_loader, memory, render, roofline  # noqa: E402

FP32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
MIB = 1 << 20


def _lightly_installed() -> bool:
    return lightly_loader.lightly_version() is not None


# --------------------------------------------------------------------------------------------
# Roofline counts, derived by hand on tiny shapes
# --------------------------------------------------------------------------------------------


def test_ntxent_cost_by_hand():
    # n = 2 per view: M = 4 rows, d = 3. Logits 4x4 from 3-vectors: 16 dot products of 3
    # multiply-adds = 96 FLOPs forward, the same backward; bytes: 12 inputs + 12 gradients.
    c = roofline.cost("ntxent", {"n": 2, "d": 3}, FP32)
    assert c.flops == 192
    assert c.bytes == 24 * 4
    assert roofline.cost("ntxent", {"n": 2, "d": 3}, BF16).bytes == 24 * 2


def test_decorrelation_costs_take_the_cheaper_side():
    # n=2, d=3: cross path 6*2*9 = 108 FLOPs, Gram path 8*4*3 = 96 -> Gram.
    assert roofline.cost("barlow_twins", {"n": 2, "d": 3}, FP32).flops == 96
    # n=4, d=2: cross path 6*4*4 = 96, Gram path 8*16*2 = 256 -> cross.
    assert roofline.cost("barlow_twins", {"n": 4, "d": 2}, FP32).flops == 96
    # VICReg: 2 views x (forward 2nd·min + backward 2nd·min) = 8*2*3*2 = 96.
    assert roofline.cost("vicreg", {"n": 2, "d": 3}, FP32).flops == 96
    for loss in ("barlow_twins", "vicreg"):
        assert roofline.cost(loss, {"n": 2, "d": 3}, FP32).bytes == 4 * 6 * 4  # 2 inputs + 2 grads


def test_elementwise_costs_by_hand():
    swav = roofline.cost("swav", {"b": 3, "k": 5}, FP32)
    assert (swav.flops, swav.bytes) == (0, 2 * 2 * 15 * 4)  # 2 crops, read + write
    sink = roofline.cost("sinkhorn", {"b": 3, "k": 5}, FP32)
    assert (sink.flops, sink.bytes) == (0, 2 * 15 * 4)
    # DINO: T = 2 teachers, S = 3 students of 2x5: forward 2*T*S*10 = 120, backward the same;
    # bytes: 2 teachers + 3 students read, 3 gradients written = 8 tensors of 10 floats.
    dino = roofline.cost("dino", {"views": 3, "b": 2, "k": 5}, FP32)
    assert (dino.flops, dino.bytes) == (240, 8 * 10 * 4)


def test_wmse_cost_by_hand():
    # d = 2, w = 4, one sub-batch per view (2 blocks): per block 8*4*4 = 128 product FLOPs and
    # 4*8/3 for Cholesky and its backward; bytes: input (8x2) read, its gradient written.
    c = roofline.cost("wmse", {"d": 2, "w_size": 4, "sub_batches": 1}, FP32)
    assert math.isclose(c.flops, 2 * (128 + 32 / 3))
    assert c.bytes == 2 * 8 * 2 * 4


def test_floor_is_the_larger_of_compute_and_traffic():
    c = roofline.Cost(flops=1000.0, bytes=10.0)
    assert roofline.floor_seconds(c, matmul_flops_per_s=100.0, copy_bytes_per_s=100.0) == 10.0  # compute
    assert roofline.floor_seconds(c, matmul_flops_per_s=1e6, copy_bytes_per_s=2.0) == 5.0  # traffic


def test_every_benchmarked_loss_has_a_cost():
    assert set(roofline.COSTS) == set(_harness.FAMILIES)
    with pytest.raises(ValueError, match="no roofline cost"):
        roofline.cost("nope", {}, FP32)


def test_rate_measurements_are_positive_and_cached():
    assert 0 < roofline.matmul_flops_per_s(CPU, FP32, size=64, repeats=1) < math.inf
    assert 0 < roofline.copy_bytes_per_s(CPU, nbytes=1 << 16, repeats=1) < math.inf
    # Explicit sizes measure afresh and do not replace the per-process cache.
    before = dict(roofline._MATMUL_FLOPS_PER_S)
    roofline.matmul_flops_per_s(CPU, FP32, size=32, repeats=1)
    assert roofline._MATMUL_FLOPS_PER_S == before


# --------------------------------------------------------------------------------------------
# Memory measure
# --------------------------------------------------------------------------------------------


def test_peak_memory_sees_a_known_allocation():
    kept = []
    peak, method = memory.peak_memory_bytes(lambda: kept.append(torch.empty(MIB, dtype=torch.float32)), CPU)
    assert method in ("cpu_allocator_profiler", "cpu_live_tensors_dispatch")
    assert 4 * MIB <= peak < 4 * MIB + 64 * 1024


def test_peak_memory_replays_frees():
    def two_temporaries_in_turn():
        a = torch.ones(MIB) * 2  # 4 MiB, dies before the next one is made
        del a
        b = torch.ones(MIB) * 3
        del b

    peak, _ = memory.peak_memory_bytes(two_temporaries_in_turn, CPU)
    # Each `ones(...) * k` holds two 4 MiB buffers at once; the first pair is freed before the
    # second, so the peak is 8 MiB, not 16.
    assert 8 * MIB <= peak < 9 * MIB


def test_peak_memory_ignores_storage_made_before_the_call():
    x = torch.randn(MIB)
    peak, _ = memory.peak_memory_bytes(lambda: x.mul_(2), CPU)
    assert peak < 64 * 1024


def test_dispatch_fallback_tracks_live_storage():
    def work():
        a = torch.randn(MIB)  # 4 MiB
        b = a.exp()  # +4 MiB
        v = b[: MIB // 2]  # a view: no new storage
        del a
        return torch.cat([v, v])  # +4 MiB while a is gone: still 8 MiB live

    with memory.LiveTensorTracker() as tracker:
        out = work()
    assert tracker.peak_bytes == 8 * MIB
    assert out.numel() == MIB


# --------------------------------------------------------------------------------------------
# Row runner (with a stand-in for pytest-benchmark's fixture)
# --------------------------------------------------------------------------------------------


class FakeBenchmark:
    """Just what run_case uses of pytest-benchmark's fixture; records every round's inputs."""

    disabled = False

    def __init__(self):
        self.extra_info = {}
        self.group = None
        self.calls = []
        self.pedantic_kwargs = None

    def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
        self.pedantic_kwargs = dict(rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
        for _ in range(warmup_rounds + rounds):
            args, kwargs = setup()
            self.calls.append(args)
            target(*args, **kwargs)


@pytest.fixture
def fixed_rates(monkeypatch):
    monkeypatch.setenv("FASTSSL_BENCH_SECONDS", "0")  # the fewest rounds: 3
    monkeypatch.setattr(roofline, "matmul_flops_per_s", lambda device, dtype: 1e9)
    monkeypatch.setattr(roofline, "copy_bytes_per_s", lambda device: 1e6)


TINY_NTXENT = _harness.Case("ntxent", (("n", 8), ("d", 4)), FP32)


@pytest.mark.parametrize("impl", ["reference", "fastssl-torch"])
def test_run_case_fills_extra_info_and_draws_fresh_inputs(fixed_rates, impl):
    bench = FakeBenchmark()
    _harness.run_case(bench, TINY_NTXENT, impl)
    info = bench.extra_info
    assert info["loss"] == "ntxent" and info["impl"] == impl and info["dtype"] == "float32"
    assert info["shape"] == {"n": 8, "d": 4}
    # n=8: M=16, flops 4*256*4 = 4096 at 1e9/s; bytes 2*16*4*4 = 512 at 1e6/s -> 0.512 ms.
    assert math.isclose(info["floor_ms"], 0.512)
    assert info["flops"] == 4096 and info["min_bytes"] == 512
    assert info["peak_mem_mb"] > 0 and info["peak_mem_method"].startswith("cpu_")
    assert bench.group == "ntxent n=8,d=4 float32"
    assert bench.pedantic_kwargs["iterations"] == 1 and bench.pedantic_kwargs["rounds"] == 3
    firsts = [args[0] for args in bench.calls]
    assert all(x.abs().sum() > 0 for x in firsts), "inputs must never be zeros"
    assert all(not torch.equal(firsts[0], x) for x in firsts[1:]), "every round draws new inputs"
    assert all(x.grad is not None for x in firsts), "the timed call runs the backward"


def test_run_case_records_rows_that_cannot_run(fixed_rates, monkeypatch):
    monkeypatch.setattr(_harness, "SKIPPED", [])
    if not torch.cuda.is_available():
        with pytest.raises(pytest.skip.Exception, match="need a CUDA device"):
            _harness.run_case(FakeBenchmark(), TINY_NTXENT, "fastssl-triton")

    def failing_compile(fn):
        def compiled(*args):
            raise RuntimeError("backend exploded\nlong traceback text")

        return compiled

    monkeypatch.setattr(_harness.torch, "compile", failing_compile)
    with pytest.raises(pytest.skip.Exception, match="torch.compile failed: RuntimeError: backend exploded"):
        _harness.run_case(FakeBenchmark(), TINY_NTXENT, "reference-compiled")
    reasons = [s["reason"] for s in _harness.SKIPPED]
    assert any("torch.compile failed" in r for r in reasons)
    assert all(s["shape"] == {"n": 8, "d": 4} and s["loss"] == "ntxent" for s in _harness.SKIPPED)


def test_run_case_skips_out_of_memory_and_raises_real_failures(fixed_rates, monkeypatch):
    monkeypatch.setattr(_harness, "SKIPPED", [])

    def out_of_memory(a, b):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    def broken(a, b):
        raise ZeroDivisionError("a real bug")

    family = _harness.FAMILIES["ntxent"]
    monkeypatch.setitem(_harness.FAMILIES, "ntxent", _harness.Family("ntxent", family.make_inputs, out_of_memory, family.fastssl, None))
    with pytest.raises(pytest.skip.Exception, match="out of memory"):
        _harness.run_case(FakeBenchmark(), TINY_NTXENT, "reference")
    monkeypatch.setitem(_harness.FAMILIES, "ntxent", _harness.Family("ntxent", family.make_inputs, broken, family.fastssl, None))
    with pytest.raises(ZeroDivisionError):
        _harness.run_case(FakeBenchmark(), TINY_NTXENT, "reference")
    with pytest.raises(pytest.skip.Exception, match="lightly has no ntxent"):
        _harness.run_case(FakeBenchmark(), TINY_NTXENT, "lightly")


def test_disabled_benchmarks_run_each_row_once():
    bench = FakeBenchmark()
    bench.disabled = True
    _harness.run_case(bench, TINY_NTXENT, "reference")
    assert bench.pedantic_kwargs == {"rounds": 1, "warmup_rounds": 0, "iterations": 1}
    assert "floor_ms" not in bench.extra_info


def test_benchmark_shapes_include_the_tracked_ones():
    cpu = {(loss, shape_dtype[1], tuple(shape_dtype[0].items())) for loss, pts in _harness.CPU_POINTS.items() for shape_dtype in pts}
    assert ("ntxent", FP32, (("n", 8192), ("d", 128))) in cpu  # 2N = 16384
    assert ("barlow_twins", FP32, (("n", 256), ("d", 8192))) in cpu
    assert ("vicreg", FP32, (("n", 256), ("d", 8192))) in cpu
    gpu = {(loss, tuple(s.items())) for loss, pts in _harness.GPU_POINTS.items() for s, _ in pts}
    for point in [
        ("ntxent", (("n", 4096), ("d", 128))),
        ("ntxent", (("n", 65536), ("d", 128))),
        ("barlow_twins", (("n", 2048), ("d", 8192))),
        ("vicreg", (("n", 256), ("d", 8192))),
        ("swav", (("b", 4096), ("k", 3000))),
        ("dino", (("views", 12), ("b", 64), ("k", 65536))),
        ("wmse", (("d", 128), ("w_size", 256), ("sub_batches", 4))),
    ]:
        assert point in gpu


# --------------------------------------------------------------------------------------------
# The families' wiring: reference, public function and lightly compute the same loss
# --------------------------------------------------------------------------------------------

TINY = {
    "ntxent": {"n": 4, "d": 3},
    "barlow_twins": {"n": 5, "d": 3},
    "vicreg": {"n": 5, "d": 3},
    "swav": {"b": 6, "k": 4},
    "sinkhorn": {"b": 6, "k": 4},
    "dino": {"views": 3, "b": 2, "k": 5},
    # One sub-batch per view: the loss does not depend on the random permutation.
    "wmse": {"d": 2, "w_size": 4, "sub_batches": 1},
}


@pytest.mark.parametrize("loss", sorted(TINY))
def test_family_wiring_agrees(loss):
    family = _harness.FAMILIES[loss]
    inputs = family.make_inputs(TINY[loss], torch.float64, CPU)
    for x in _harness._tensors(inputs):
        assert x.abs().sum() > 0
    expected = family.reference(*inputs)
    got = family.fastssl(*inputs, backend="reference")
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-8)
    if _lightly_installed():
        theirs = family.lightly(TINY[loss], CPU)(*inputs).reshape(expected.shape)  # lightly's SwAV loss has shape (1,)
        torch.testing.assert_close(theirs.double(), expected.double(), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not _lightly_installed(), reason="lightly is not installed")
def test_lightly_loader_leaves_sys_modules_clean():
    before = {k for k in sys.modules if k.startswith("lightly.models")}
    assert lightly_loader.load("DINOLoss").__name__ == "DINOLoss"
    assert {k for k in sys.modules if k.startswith("lightly.models")} == before
    with pytest.raises(KeyError):
        lightly_loader.load("NoSuchLoss")


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


def _bench(impl, median_s, *, n=4, floor_ms=1.0, peak=12.5, loss="ntxent"):
    return {
        "group": "g",
        "name": f"test[{impl}]",
        "stats": {"median": median_s, "rounds": 7},
        "extra_info": {
            "loss": loss,
            "impl": impl,
            "dtype": "float32",
            "shape": {"n": n, "d": 2},
            "peak_mem_mb": peak,
            "floor_ms": floor_ms,
            "flops": 2e9,
            "min_bytes": 3e6,
        },
    }


def _synthetic_results():
    return {
        "machine_info": {"gpu": None, "commit": "abc123-dirty", "torch": "2.13", "triton": "3.9", "lightly": "1.6.0",
                         "date": "2026-01-01T00:00:00+00:00", "cpu": {"brand_raw": "Test CPU"},
                         "rates": {"matmul_tflops": {"cpu float32": 0.05}, "copy_gbps": {"cpu": 6.0}}},
        "benchmarks": [
            _bench("fastssl-torch", 0.002),
            _bench("reference", 0.010),
            _bench("reference-compiled", 0.005),
            _bench("reference", 0.040, n=8),
            _bench("fastssl-torch", 0.004, n=8),
            {"name": "unrelated", "stats": {"median": 1.0}, "extra_info": {}},
        ],
        "skipped": [{"loss": "ntxent", "impl": "lightly", "dtype": "float32", "shape": {"n": 4, "d": 2},
                     "reason": "lightly cannot be loaded: no module | named x"}],
    }


def test_render_table_rows_and_columns():
    text = render.render_markdown(_synthetic_results())
    lines = text.splitlines()
    assert "| device | CPU: Test CPU |" in text and "`abc123-dirty`" in text
    header = next(line for line in lines if line.startswith("| impl |"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(render.COLUMNS)
    assert text.index("### n = 4, d = 2 · float32") < text.index("### n = 8, d = 2 · float32")
    section = text[text.index("### n = 4, d = 2") : text.index("### n = 8, d = 2")]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| impl")]
    assert [row.split("|")[1].strip() for row in table] == ["reference", "reference-compiled", "lightly", "fastssl-torch"]
    torch_row = [c.strip() for c in table[3].strip("|").split("|")]
    # median 2 ms; reference 10 ms -> 5x, compiled 5 ms -> 2.5x, lightly not run; floor 1 ms -> 50 %.
    assert torch_row == ["fastssl-torch", "2.00", "5.00×", "2.50×", "—", "50.0 %", "12.5", "7"]
    assert "not run: lightly cannot be loaded: no module \\| named x" in table[2]
    assert "Roofline floor 1.00 ms (2 GFLOP, 3 MB)" in section
    assert "unrelated" not in text


def test_plot_specs_need_two_sizes():
    results = _synthetic_results()
    specs = render.plot_specs(render.rows(results))
    assert [s[0] for s in specs] == ["ntxent_d2_float32"]
    results["benchmarks"] = [b for b in results["benchmarks"] if b["extra_info"].get("shape", {}).get("n") != 8]
    assert render.plot_specs(render.rows(results)) == []


def test_render_command_line_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_synthetic_results()))
    summary = tmp_path / "out" / "summary.md"
    summary.parent.mkdir()
    assert render.main([str(results_path), "-o", str(summary), "--plots", str(tmp_path / "out" / "plots")]) == 0
    png = tmp_path / "out" / "plots" / "ntxent_d2_float32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![NT-Xent, d = 2, float32](plots/ntxent_d2_float32.png)" in summary.read_text()
