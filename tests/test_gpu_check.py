"""The GPU check's own machinery (``benchmarks/gpu_check.py``): the plan, the budget and skip
rules, the isolation of failing units (worker processes running the script's self-test units,
which need no torch), the comparisons that judge a Triton path, the register table read from
Triton's JIT cache, and the rendered summary. The whole dry run is CI's
``.ci/step-50-gpu-check-dry-run.sh``."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `pytest` without `python -m` does not put the root on the path
    sys.path.insert(0, REPO_ROOT)

from benchmarks import gpu_check as G  # noqa: E402
from benchmarks import launch_report  # noqa: E402


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def test_plan_covers_every_triton_family_and_every_headline_shape():
    units = G.build_plan(dry_run=False)
    ids = {u.id for u in units}
    assert len(ids) == len(units), "unit ids must be unique (they name the claims)"
    for family, sets in G.CHECK_FAMILIES.items():
        assert {f"check/{family}/{s}" for s in sets} <= ids
        assert f"nan/{family}" in ids
        for which in sets:
            assert G.CHECK_SHAPES[family][which], (family, which)
    assert {f"graph/{f}" for f in G.GRAPH_FAMILIES} <= ids
    for case in launch_report.HEADLINE_CASES:
        assert f"time/{case.name}" in ids and f"compiled/{case.name}" in ids
    for unit in units:
        assert unit.kind in G.UNIT_KINDS and unit.section in G.SECTIONS
        assert 0 < unit.estimate_s <= unit.timeout_s
    # The awkward shapes the DESIGN asks for are there: N = 1, 2, 3, 127; d = 1, 3, 129; strided.
    awkward = G.CHECK_SHAPES["ntxent"]["awkward"]
    assert {s["n"] for s, _, _ in awkward} >= {1, 2, 3, 127} and {s["d"] for s, _, _ in awkward} >= {1, 3, 129}
    assert any(strided for _, _, strided in awkward)


def test_every_headline_case_has_a_timing_recipe():
    cases = G.timing_cases(dry_run=False)
    assert all(c.harness_family for c in cases), [c.name for c in cases if not c.harness_family]
    tiny = G.timing_cases(dry_run=True)
    assert len({c.harness_family for c in tiny}) == len(tiny)  # one tiny case per family
    assert all(max(c.shape.values()) <= 64 for c in tiny)


def test_dry_run_shapes_are_tiny_and_keep_the_awkward_ones():
    for family, sets in G.CHECK_FAMILIES.items():
        for which in sets:
            shapes = G.check_shapes(family, which, dry_run=True)
            assert 1 <= len(shapes) <= 3
            for shape, dtype, _ in shapes:
                assert dtype != "float16" and all(v <= max(G._DRY_CAPS.values()) for v in shape.values())
                if family == "wmse":
                    assert shape["d"] < shape["w_size"]  # a whitening that exists
    assert ({"n": 1, "d": 1}, "float32", False) in G.check_shapes("ntxent", "awkward", dry_run=True)


# --------------------------------------------------------------------------------------------
# Budget: what may start, when a unit is stopped
# --------------------------------------------------------------------------------------------


def test_a_unit_starts_only_if_its_estimate_fits_before_its_deadlines():
    unit = G.Unit("u", "timing", "time", {}, estimate_s=10.0, timeout_s=60.0)
    deadlines = G.section_deadlines(1000.0, 100.0, ["timing"])
    assert deadlines["timing"] == pytest.approx(1000.0 + 100.0 * G.SECTIONS["timing"][1])
    assert G.can_start(unit, 1000.0, deadlines, global_deadline=1100.0)
    assert not G.can_start(unit, deadlines["timing"] - 9.0, deadlines, global_deadline=1100.0)
    assert not G.can_start(unit, 1000.0, deadlines, global_deadline=1005.0)  # the global deadline wins


def test_a_running_unit_is_stopped_at_its_timeout_or_its_section_deadline():
    unit = G.Unit("u", "timing", "time", {}, estimate_s=1.0, timeout_s=30.0)
    deadlines = {"timing": 1100.0}
    assert G.kill_time(unit, 1000.0, deadlines, 2000.0, grace_s=5.0) == 1030.0
    assert G.kill_time(unit, 1090.0, deadlines, 2000.0, grace_s=5.0) == 1105.0
    assert G.kill_time(unit, 1090.0, deadlines, 1101.0, grace_s=5.0) == 1101.0


# --------------------------------------------------------------------------------------------
# Isolation: units in worker processes (self-test units: no torch, fast)
# --------------------------------------------------------------------------------------------


def _selftest(uid: str, action: str, seconds: float = 0.0, estimate: float = 0.1, timeout: float = 20.0):
    return G.Unit(uid, "selftest", "selftest", {"action": action, "seconds": seconds}, estimate, timeout)


def test_failing_units_are_recorded_and_the_others_still_run(tmp_path, capsys):
    units = [
        _selftest("first-ok", "ok"),
        _selftest("raises", "raise"),
        _selftest("fails-a-check", "fail"),
        _selftest("crashes-its-process", "exit"),
        _selftest("after-the-crash", "ok"),
        _selftest("hangs", "ok", seconds=60.0, timeout=1.5),
        _selftest("after-the-hang", "ok"),
        _selftest("cannot-run-here", "skip"),
        _selftest("does-not-fit", "ok", estimate=1e6),
    ]
    code = G.run_check(tmp_path, units, total_s=30.0, workers=1, dry_run=True, grace_s=1.0)
    data = json.loads((tmp_path / "results.json").read_text())
    status = {uid: entry["status"] for uid, entry in data["units"].items()}
    assert status == {
        "first-ok": "ok", "raises": "error", "fails-a-check": "fail", "crashes-its-process": "crashed",
        "after-the-crash": "ok", "hangs": "timeout", "after-the-hang": "ok", "cannot-run-here": "skipped",
        "does-not-fit": "skipped",
    }  # fmt: skip
    units_out = data["units"]
    assert "RuntimeError: a unit that raises" in units_out["raises"]["error"]  # the traceback is kept
    assert "exited with code 7" in units_out["crashes-its-process"]["reason"]
    assert units_out["hangs"]["result"] == {"partial": True}  # a killed unit leaves what it reported
    assert "not started" in units_out["does-not-fit"]["reason"]
    assert code == 1  # a failed check, an error and a crash fail the run
    summary = (tmp_path / "summary.md").read_text()
    assert "## Problems (4)" in summary and "### raises: error" in summary
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "summary.md", "log.txt", "workers.log"}
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("----") and printed[-2].startswith("case")  # the table comes last (no row here)
    assert any(line.startswith("FAIL: selftest") for line in printed)


def test_workers_that_die_before_their_first_unit_are_not_replaced_forever(tmp_path, monkeypatch):
    import subprocess

    spawned = []

    def broken_spawn(self, wait_for_go=False):
        spawned.append(1)
        process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"], start_new_session=True)
        return G._Worker(len(spawned), process, self.scratch / "none.jsonl")

    monkeypatch.setattr(G.WorkerPool, "spawn", broken_spawn)
    code = G.run_check(tmp_path, [_selftest("a", "ok"), _selftest("b", "ok")], total_s=20.0, workers=1, dry_run=True)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(spawned) == 3 and code == 1
    assert {e["status"] for e in data["units"].values()} == {"error"}
    assert "died before their first unit" in data["units"]["a"]["reason"]


def test_a_run_of_passing_units_exits_zero(tmp_path):
    code = G.run_check(tmp_path, [_selftest("a", "ok"), _selftest("b", "skip")], total_s=20.0, workers=2, dry_run=True)
    assert code == 0


def test_a_carried_lightly_wheel_is_unpacked_for_the_workers_where_lightly_is_missing(tmp_path, monkeypatch):
    import importlib.util
    import zipfile

    wheels = tmp_path / ".whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "lightly-1.6.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("lightly/__init__.py", "__version__ = '1.6.0'\n")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightly" else real_find_spec(name, *a))
    site = G.unpack_lightly_wheel(tmp_path / "site", wheels)
    assert site == tmp_path / "site" and (site / "lightly" / "__init__.py").is_file()
    assert str(site) in G._worker_env(False, [site])["PYTHONPATH"].split(os.pathsep)
    assert G.unpack_lightly_wheel(tmp_path / "none", tmp_path / "no-wheels") is None


# --------------------------------------------------------------------------------------------
# Judging a Triton path
# --------------------------------------------------------------------------------------------


def test_error_norms_treat_unexpected_non_finite_values_as_infinite_error():
    want = torch.tensor([1.0, 2.0, float("nan")])
    assert G.error_norms(torch.tensor([1.0, 2.0, float("nan")]), want) == (0.0, pytest.approx(math.sqrt(5)))
    assert G.error_norms(torch.tensor([1.0, float("nan"), 0.0]), want)[0] == math.inf
    error, scale = G.error_norms(torch.tensor([1.0, 2.5, 0.0]), want)
    assert error == pytest.approx(0.5) and scale == pytest.approx(math.sqrt(5))


def test_tolerance_is_twice_the_torch_error_or_the_dtype_floors():
    assert G.within_tolerance(2e-3, 1e-3, 1.0, 10, "float32")
    assert not G.within_tolerance(3e-3, 1e-3, 1.0, 10, "float32")
    assert G.within_tolerance(1e-2, 0.0, 1.0, 10, "bfloat16")  # bf16 floor 2e-2
    assert G.within_tolerance(2e-6, 0.0, 0.0, 16, "float32")  # 0 in exact arithmetic: rounding noise
    assert not G.within_tolerance(1e-3, 0.0, 0.0, 16, "float32")


def _square_recipe(unwritten: bool) -> "G.CheckRecipe":
    """A stand-in loss: sum of squares; its "triton" side adds a buffer from a kernel module's
    ``_new_buffer`` -- left unwritten when ``unwritten`` -- times zero."""
    from fastssl.kernels import sinkhorn

    def make(shape, dtype, device, strided):
        return [torch.randn(shape["n"], shape["d"], device=device).to(dtype).requires_grad_(True)], {}

    def run(tensors, extras, backend):
        value = (tensors[0].float() ** 2).sum()
        if backend == "triton":
            buffer = sinkhorn._new_buffer((), dtype=torch.float32, device=tensors[0].device)
            if not unwritten:
                buffer.fill_(1.0)
            value = value + 0.0 * buffer
        return value

    return G.CheckRecipe(make, run)


def test_an_output_the_kernel_leaves_unwritten_fails_the_comparison():
    device = torch.device("cpu")
    good = G.compare_paths("square", _square_recipe(unwritten=False), {"n": 3, "d": 5}, "float32", False, device)
    assert good["passed"] and good["errors"][0]["triton"] < 1e-6
    bad = G.compare_paths("square", _square_recipe(unwritten=True), {"n": 3, "d": 5}, "float32", False, device)
    assert not bad["passed"] and bad["errors"][0]["triton"] == math.inf
    from fastssl.kernels import sinkhorn

    assert sinkhorn._new_buffer is torch.empty  # the poison is removed afterwards


# --------------------------------------------------------------------------------------------
# Registers from the JIT cache
# --------------------------------------------------------------------------------------------


def test_compiled_kernels_reads_registers_spills_and_constants_from_the_jit_cache():
    source = types.SimpleNamespace(constants={(2,): 64, (3,): True}, fn=types.SimpleNamespace(arg_names=["x", "n", "BLOCK", "MASK"]))
    metadata = types.SimpleNamespace(num_warps=4, num_stages=3, shared=16384)
    kernel = types.SimpleNamespace(n_regs=96, n_spills=8, metadata=metadata, src=source, hash="abcdef0123456789ff")
    jit = types.SimpleNamespace(device_caches={0: ({"key": kernel}, None, None, None, None)})
    module = types.SimpleNamespace(_kernel=jit, helper=len)
    found = G.compiled_kernels({"fastssl.kernels.fake": module, "other.module": module})
    assert found == [{
        "kernel": "fastssl.kernels.fake._kernel", "hash": "abcdef0123456789", "n_regs": 96, "n_spills": 8,
        "num_warps": 4, "num_stages": 3, "shared": 16384, "constexprs": {"BLOCK": 64, "MASK": True},
    }]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The summary and the table printed last
# --------------------------------------------------------------------------------------------


def _results() -> dict:
    name = "ntxent 2N=8192, d=128 bfloat16"
    impls = {"triton": {"median_ms": 0.5, "peak_mb": 10.0}, "torch": {"median_ms": 1.0}, "eager": {"median_ms": 5.0},
             "lightly": {"skipped": "lightly cannot be loaded: lightly is not installed"}}  # fmt: skip
    return {
        "meta": {"commit": "abc", "dry_run": False, "deadline_s": 450},
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "sms": 132},
        "rates": {"bfloat16_tflops": 800.0, "float32_tflops": 50.0, "copy_gbps": 4000.0},
        "predictions": {name: {"path": "triton", "predicted_s": 226e-6, "percent_of_floor": 19.2}},
        "units": {
            f"time/{name}": {"section": "timing", "status": "ok", "result": {
                "case": {"family": "ntxent", "dtype": "bfloat16"}, "flops": 2.0e11, "bytes": 4.0e6, "impls": impls}},
            f"compiled/{name}": {"section": "compiled", "status": "ok", "result": {"impls": {"compiled": {"median_ms": 2.0}}}},
            "check/ntxent/small": {"section": "correctness", "status": "ok", "result": {"cases": []}},
            "check/ntxent/awkward": {"section": "correctness", "status": "fail", "result": {"cases": [
                {"shape": {"n": 1, "d": 1}, "dtype": "float32", "passed": False, "contract": [],
                 "errors": [{"what": "grad[0]", "triton": 1.0, "torch": 1e-7, "ok": False}]}]}},
            "graph/ntxent": {"section": "graphs", "status": "ok", "result": {"captured": True}},
            "check/ntxent/headline": {"section": "correctness", "status": "skipped", "reason": "not started"},
        },
        "registers": [{"kernel": "fastssl.kernels.ntxent._pair_lse_fwd_kernel", "n_regs": 93, "n_spills": 0,
                       "num_warps": 4, "num_stages": 3, "shared": 65536, "constexprs": {"BLOCK_M": 64}}],
    }  # fmt: skip


def test_headline_rows_compute_speedups_floor_and_verdicts():
    (row,) = G.headline_rows(_results())
    assert row["vs_eager"] == pytest.approx(10.0) and row["vs_compiled"] == pytest.approx(4.0)
    assert row["vs_torch"] == pytest.approx(2.0) and row["vs_lightly"] is None
    # floor: max(2e11 / 800e12, 4e6 / 4000e9) = 0.25 ms, so Triton at 0.5 ms is at 50 %.
    assert row["floor_ms"] == pytest.approx(0.25) and row["percent_of_floor"] == pytest.approx(50.0)
    assert row["predicted_ms"] == pytest.approx(0.226) and row["measured_for_prediction_ms"] == 0.5
    assert row["checks"] == "FAIL 1/3" and row["graph"] == "pass 1/1"
    assert row["cells"]["lightly"] == "n/a"


def test_summary_and_table_render_every_section():
    data = _results()
    summary = G.render_summary(data)
    for heading in ("# GPU check: NVIDIA H200", "## Headline shapes", "## Peak memory", "## Correctness",
                    "## CUDA graphs", "## Registers and spills (1 compiled kernels", "## Problems (1)", "## Skipped (1)",
                    "## Timing rows not measured (1)"):  # fmt: skip
        assert heading in summary, heading
    assert "| ntxent 2N=8192, d=128 bfloat16 | 0.500 | 1.00 | 5.00 | 2.00 | n/a | 10.0x | 4.0x | - | 2.0x | 0.250 | 50% | 0.226 (triton) | 0.500 | FAIL 1/3 | pass 1/1 |" in summary
    assert "grad[0] 1.0e+00 vs 1.0e-07" in summary
    table = G.render_table(data).splitlines()
    assert table[0].split()[:6] == ["case", "triton", "torch", "eager", "compiled", "lightly"]
    assert "10.0x" in table[2] and "50%" in table[2] and "FAIL 1/3" in table[2]
