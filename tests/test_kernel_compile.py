"""Compiled-mode checks without a GPU, on the launches the CUDA paths really issue.

The interpreter accepts programs the GPU compiler rejects (an int argument equal to 1 becomes a
constant, so ``n.to(tl.int64)`` fails to compile; tiles too large for the register file spill),
and a kernel compiled with hand-written signatures checks other code than what runs. These tests
use :mod:`benchmarks.launch_capture`: each loss's CUDA path runs on meta tensors that look like
CUDA ones, every Triton launch is recorded with Triton's own binder for sm_90 (CUDA tile tables,
ints specialized to 1, 16-divisibility of ints and pointers) and compiled for sm_90 with ptxas.

The capture needs ``TRITON_INTERPRET`` unset before the kernels are imported, so it runs in a
subprocess (conftest sets it for this process). Every subprocess gets a private
``TRITON_CACHE_DIR`` and ``TMPDIR`` under pytest's temporary directory; the tests check that
nothing is left in them and remove them. Triton 3.6 (the GPU machine's) compiles the same launches
in CI: ``.ci/step-20-triton36.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return "nvidia" in backends


def _run_isolated(args, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run ``python *args`` without the interpreter, with a private Triton cache and temporary
    directory (ptxas's .ptx/.cubin/.log files go there, not to the shared /tmp); assert nothing
    is left in the temporary directory afterwards, then remove both."""
    tmp = tmp_path / "tmp"
    cache = tmp_path / "triton-cache"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"TRITON_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "TRITON_DEFAULT_FP_FUSION": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    try:
        result = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
        # PyTorch keeps its own cache folder there (torchinductor_<user>); nothing else may remain.
        left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                      if p.is_file() and not p.relative_to(tmp).parts[0].startswith("torchinductor_"))
        assert not left, f"files left in the temporary directory: {left[:10]}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# The capture itself, on a kernel of this file (independent of the loss kernels' current tiles)
# --------------------------------------------------------------------------------------------

_CAPTURE_PROBE = r'''
import json, os, sys
import torch, triton, triton.language as tl
from fastssl._backend import triton_interpreter_enabled
from benchmarks import launch_capture as LC

@triton.jit
def scale_rows_kernel(X, Y, n_rows, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_row + cols, mask=cols < n_cols, other=0.0)
    tl.store(Y + row * n_cols + cols, x * 2.0, mask=cols < n_cols)

def launch(x):
    # Different tiles for the interpreter and for CUDA, as the loss kernels choose them.
    block = 16 if triton_interpreter_enabled() else triton.next_power_of_2(x.shape[1])
    y = torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    scale_rows_kernel[(x.shape[0],)](x, y, x.shape[0], x.shape[1], x.stride(0), BLOCK=block,
                                     num_warps=8 if x.is_cuda else 1)
    return y

@torch.library.custom_op("fastssl_test::double_rows", mutates_args=())
def double_rows(x: torch.Tensor) -> torch.Tensor:
    return launch(x)

@double_rows.register_fake
def _(x):
    return torch.empty_like(x)

out = {}

def run(session):
    x = torch.randn(1, 96, device="cuda", dtype=torch.bfloat16)          # one row: n_rows == 1
    big = torch.randn(4096, 200, device="cuda", dtype=torch.float16)
    with session.measuring("forward"):
        out["is_cuda"] = bool(x.is_cuda) and x.device.type == "cuda"
        launch(x)
        launch(big[:, 1:])                   # offset view: pointer not 16-byte aligned
        double_rows(big)                     # custom op: its CUDA implementation runs
        flag = (big.sum() > 0).item()        # host sync
        table = torch.tensor([1, 2, 3], device="cuda")   # host-to-device copy

capture = LC.capture_call(run)
out["error"] = capture.error
out["launches"] = [l.to_json() for l in capture.launches]
out["syncs"] = [s.kind + " " + s.op for s in capture.syncs]
out["ops"] = [(o.op, o.category) for o in capture.eager_ops]
out["custom_ops"] = capture.custom_ops
compiled = LC.compile_launch(capture.launches[0]) if "--compile" in sys.argv else None
out["compiled"] = {k: v for k, v in (compiled or {}).items() if k in ("registers", "spills", "error", "num_warps")}
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not _nvidia_backend_available():
        pytest.skip("Triton's NVIDIA backend is not installed")
    tmp_path = tmp_path_factory.mktemp("capture-probe")
    script = tmp_path / "capture_probe.py"  # @triton.jit needs its source in a file
    script.write_text(_CAPTURE_PROBE)
    result = _run_isolated([str(script), "--compile"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_capture_sees_cuda_tensors_and_cuda_tiles(probe):
    assert probe["error"] is None and probe["is_cuda"]
    first = probe["launches"][0]
    assert first["constexprs"]["BLOCK"] == 128  # the CUDA tile (the interpreter's would be 16)
    assert first["options"] == {"num_warps": 8}
    assert first["grid"] == [1, 1, 1]


def test_capture_applies_the_launch_specializations(probe):
    row1, offset_view, _ = probe["launches"]
    # n_rows == 1 is a constant in the compiled kernel; 96 and the pointers are 16-divisible.
    assert row1["constexprs"]["n_rows"] == 1 and row1["signature"]["n_rows"] == "constexpr"
    assert {"X", "Y", "n_cols", "stride_row"} <= set(row1["divisible_by_16"])
    assert row1["signature"]["X"] == "*bf16"
    # big[:, 1:] starts 2 bytes into its storage: X loses the divisibility (the fresh Y keeps
    # it); the row stride 200 and the 199 columns are no multiples of 16; 4096 rows are.
    assert "X" not in offset_view["divisible_by_16"] and "Y" in offset_view["divisible_by_16"]
    assert "stride_row" not in offset_view["divisible_by_16"] and "n_cols" not in offset_view["divisible_by_16"]
    assert "n_rows" in offset_view["divisible_by_16"]
    assert offset_view["signature"]["n_rows"] == "i32" and offset_view["signature"]["X"] == "*fp16"


def test_capture_runs_custom_ops_and_counts_ops_and_syncs(probe):
    assert len(probe["launches"]) == 3, "the custom op's CUDA implementation launched its kernel"
    assert any("fastssl_test::double_rows" in name for name in probe["custom_ops"])
    kinds = [s.split()[0] for s in probe["syncs"]]
    assert kinds.count("sync") == 1 and kinds.count("h2d") == 1, probe["syncs"]
    ops = [op for op, _ in probe["ops"]]
    assert ops.count("aten.empty") == 3 and "aten.sum" in ops and "aten.gt" in ops


def test_captured_launch_compiles_for_sm90(probe):
    compiled = probe["compiled"]
    assert "error" not in compiled, compiled.get("error")
    assert compiled["num_warps"] == 8 and compiled["registers"] > 0 and not compiled["spills"]


# --------------------------------------------------------------------------------------------
# Every loss, every headline and small shape: compile every captured launch, no spills
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_captured_launch_compiles_for_sm90_without_spills(tmp_path):
    """All families at the DESIGN §5 headline shapes and at small awkward ones (rows = 1, odd
    widths, every kernel dtype): a capture error, a compile failure or a spill fails."""
    if not _nvidia_backend_available():
        pytest.skip("Triton's NVIDIA backend is not installed")
    result = _run_isolated(
        [str(REPO / "benchmarks" / "launch_report.py"), "--cases", "all", "--check", "--no-write", "--quiet"],
        tmp_path, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "launch check" in result.stdout and ": ok" in result.stdout
