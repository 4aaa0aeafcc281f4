r"""Launch report: what every loss's CUDA path would do on an H200, read from its compiled code
on a machine without a GPU (DESIGN §5, "Kernel health").

For every loss family at every headline shape (forward + backward), each Triton launch is
captured exactly as the CUDA path issues it (:mod:`benchmarks.launch_capture`: CUDA tile tables,
Triton's specialization and divisibility attributes, grid), compiled for sm_90 with the installed
Triton, and reported with its programs and waves on 132 SMs, warps/stages, registers, spills,
shared memory, whether the products became ``wgmma``, and the SASS hot loop's instruction mix.
Per family: the eager PyTorch ops around the kernels, host syncs and host-to-device copies per
forward + backward, and a predicted time as a fraction of the roofline floor.

Usage::

    python benchmarks/launch_report.py                  # headline shapes -> benchmarks/results/launch-report.{md,json}
    python benchmarks/launch_report.py --other-python /tmp/triton36/bin/python   # + spills under a second Triton
    python benchmarks/launch_report.py --check --cases all --no-write   # CI: exit 1 on a compile failure or a spill
    python benchmarks/launch_report.py --check --no-write --other-python X   # ... under this Triton and X's

``--other-python X`` captures every case again in interpreter ``X`` and compiles every launch
with X's Triton (the spills column's second figure); ``--check`` fails on a capture error, a
compile failure or a spill under either Triton.

Two kinds of rows are not plain Triton rows:

* **W-MSE** runs CUDA C++ kernels (``csrc/``, compiled by nvcc on first use and by
  ``.ci/step-10-compile-cuda.sh`` in CI), not Triton. Its row captures the CUDA path around them
  -- the custom op ``fastssl::wmse_cholesky_loss`` over a stand-in for the extension that
  allocates as its binding does (:class:`CapturedWMSEExtension`) -- for the eager ops and host
  syncs; its launches, waves and times are the kernels' own launch plan and cost model
  (:data:`WMSE_CUDA_PLAN`, from ``kernels/wmse_cuda.py``).
* **Barlow Twins / VICReg where ``auto`` picks the torch path** (cuBLAS) by its cost rule
  (``fastssl/decorrelation.py``, ``auto_prefers_triton``): the ``auto`` row shows the torch path
  with the rule's two predicted times, and targets (a)-(d) do not apply to it ("n/a"); a second
  row runs ``backend="triton"``, the Triton path, and is judged in full.

The time model (deliberately simple; every constant is in :data:`MODEL`)
------------------------------------------------------------------------
Floor: ``max(F / R_mm, B / R_copy)`` with :mod:`benchmarks.roofline`'s FLOPs and bytes,
``R_mm`` = 790 TFLOP/s for bf16/fp16 and half of it for float32 inputs, ``R_copy`` = 4.3 TB/s.

Each launch with matrix products (``tt.dot`` in its Triton IR) is given a share of the family's
floor FLOPs proportional to its number of ``tt.dot`` operations (each product is assumed to sweep
the same volume: the backward of NT-Xent recomputes the logits and multiplies once more, so it
gets 2/3). Its time is that share divided by ``R_peak × fill × loop efficiency``:

* ``fill = P / (132 · ceil(P / 132))`` for P programs: below one wave, idle SMs; above, the
  last wave's imbalance.
* loop efficiency, from the SASS hot loop (per warp: ``I`` instructions, ``U`` MUFU ops, the
  matrix instructions' tensor-core cycles ``T``; wgmma m64nNk16 keeps an SM's tensor cores N/2
  cycles busy): the loop's other instructions issue at one per cycle per scheduler and MUFU at
  one warp instruction per 8 cycles, so an iteration needs ``X = max(I - matrix, 8·U)`` issue
  cycles beside ``T``. Pipelined (no wait-for-all inside the loop): ``T / max(T, X)``. When the
  loop waits for every wgmma (``WARPGROUP.DEPBAR.LE gsb0, 0x0``) its matrix and other work
  serialize, and only the other ``G`` resident warpgroups (occupancy × warps / 4) overlap them:
  ``T / max(T, X, (T + X) / G)``. ``mma.sync`` (HMMA, 8 cycles per warp instruction) runs at
  half the wgmma rate; float32 products on the FMA units (no matrix instruction) at
  ``61.8 TFLOP/s × FFMA / max(I, 8·U)``.

Every other launch streams its tensor arguments once: ``bytes / (4.3 TB/s × min(1, P·warps /
(132 · 8)))`` (eight resident warps per SM to cover the memory latency), where a program is
taken to touch at most 256 KiB of each flat (1-D) tensor (the workspaces, shared by several
launches, are passed whole but read in parts); operands of two or more dimensions count whole.
Each eager op that computes (not allocations or views) costs ``max(2 µs, bytes / 4.3 TB/s, FLOPs / (0.7 R_mm))`` of
GPU time, every launch at least 2 µs. Host time: 4 µs per eager op, 8 µs per Triton launch,
4 µs per CUDA C++ launch, 15 µs per custom-op call. Predicted = ``max(GPU, host)`` when the host never waits, else
``GPU + host + 10 µs`` per host sync (the host cannot run ahead of the device). A prediction below
the floor (the per-program byte cap undercounting a streaming launch) is shown at the floor, marked.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: import the repository's packages
    sys.path.insert(0, str(REPO_ROOT))

MODEL = {
    "sm_count": 132,
    "bf16_matmul_flops_per_s": 790e12,
    "fp32_matmul_flops_per_s": 395e12,  # "half for float32": TF32 tensor cores
    "fma_fp32_flops_per_s": 61.8e12,  # 132 SMs x 128 FMA/clk x 2 x 1.83 GHz
    "copy_bytes_per_s": 4.3e12,
    "hmma_rate_vs_wgmma": 0.5,
    "mufu_cycles_per_warp_instruction": 8,
    "warps_per_sm_for_full_bandwidth": 8,
    "min_kernel_us": 2.0,
    "eager_op_host_us": 4.0,
    "triton_launch_host_us": 8.0,
    "extension_launch_host_us": 4.0,  # a C++ <<<...>>> launch from the extension's binding
    "custom_op_host_us": 15.0,
    "host_sync_us": 10.0,
    "eager_matmul_efficiency": 0.7,
}

TARGET_MAX_EAGER_OPS = 16


# --------------------------------------------------------------------------------------------
# Cases: the DESIGN §5 headline shapes, and small awkward shapes for the compile tests
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    label: str
    dtype: str
    shape: Tuple[Tuple[str, int], ...]
    headline: bool = True
    #: The ``backend=`` the loss is called with: "auto" (what a user gets), or "triton" for the
    #: Triton path where auto's cost rule picks the torch path (cuBLAS) at that shape.
    backend: str = "auto"

    @property
    def name(self) -> str:
        return f"{self.family} {self.label} {self.dtype}" + ("" if self.backend == "auto" else f" backend={self.backend}")


def _c(family: str, dtype: str, headline: bool = True, label: Optional[str] = None, backend: str = "auto",
       **shape: int) -> Case:
    text = label or ", ".join(f"{k}={v}" for k, v in shape.items())
    return Case(family, text, dtype, tuple(shape.items()), headline, backend)


def _triton_twin(case: Case) -> Optional[Case]:
    """Where auto's cost rule (fastssl/decorrelation.py, ``auto_prefers_triton``) runs the torch
    path (cuBLAS) at a Barlow Twins / VICReg headline shape, the same shape on the Triton path
    (``backend="triton"``): targets (a)-(d) are that path's."""
    rule = auto_rule(case)
    if rule is None or rule["choice"] == "triton":
        return None
    return dataclasses.replace(case, backend="triton")


HEADLINE_CASES: List[Case] = [
    _c("ntxent", "bfloat16", label="2N=8192, d=128", n=4096, d=128),
    _c("ntxent", "bfloat16", label="2N=1048576, d=128", n=524288, d=128),
    _c("infonce", "bfloat16", label="N=256, K=65536, d=128", n=256, k=65536, d=128),
    *[_c(fam, dt, n=n, d=8192) for fam in ("barlow_twins", "vicreg") for n in (2048, 256)
      for dt in ("float32", "bfloat16")],
    _c("swav", "float32", label="B=4096, K=3000, 3 iterations", b=4096, k=3000),
    *[_c("dino", dt, label="12 views x 64, K=65536", views=12, b=64, k=65536) for dt in ("float32", "bfloat16")],
    *[_c("ibot", dt, label="64 x 196 tokens (40% masked), K=65536", images=64, tokens=196, k=65536)
      for dt in ("float32", "bfloat16")],
    _c("wmse", "float32", label="d=128, w=256, 4 sub-batches", d=128, w_size=256, sub_batches=4),
]

# Awkward shapes: rows or views equal to 1 (ints specialized to constants), odd widths (no
# 16-divisibility), every kernel dtype.
SMALL_CASES: List[Case] = [
    _c("ntxent", "float32", False, n=3, d=5),
    _c("ntxent", "bfloat16", False, n=1, d=1000),
    _c("ntxent", "float16", False, n=17, d=64),
    _c("infonce", "float16", False, n=1, k=16, d=8),
    _c("infonce", "float32", False, n=5, k=33, d=300),
    _c("uniformity", "bfloat16", False, n=9, d=33),
    _c("barlow_twins", "bfloat16", False, n=2, d=7),
    _c("barlow_twins", "float32", False, n=5, d=33),
    _c("vicreg", "float16", False, n=3, d=17),
    _c("vicreg", "float32", False, n=70, d=20),
    _c("swav", "bfloat16", False, b=5, k=17),
    _c("swav", "float16", False, b=1, k=16),
    _c("dino", "float16", False, views=2, b=3, k=17),
    _c("dino", "bfloat16", False, views=1, b=1, k=16),
    _c("ibot", "bfloat16", False, images=3, tokens=9, k=17),
    _c("ibot", "float16", False, images=3, tokens=1, k=16),  # one masked token: rows = 1
]


def _inputs(case: Case):
    """(loss callable, leaves that get gradients) for ``case`` on (captured) CUDA tensors."""
    import torch

    import fastssl.functional as FS
    from benchmarks import _harness

    shape = dict(case.shape)
    dtype = getattr(torch, case.dtype)
    device = torch.device("cuda")

    def randn(*size, grad=True):
        return torch.randn(*size, device=device).to(dtype).requires_grad_(grad)

    if case.family in _harness.FAMILIES:
        family = _harness.FAMILIES[case.family]
        inputs = family.make_inputs(shape, dtype, device)
        leaves = [t for t in _harness._tensors(inputs) if t.requires_grad]
        return (lambda: family.fastssl(*inputs, backend=case.backend)), leaves
    if case.family == "infonce":
        query, key = randn(shape["n"], shape["d"]), randn(shape["n"], shape["d"])
        bank = randn(shape["k"], shape["d"], grad=False)
        return (lambda: FS.infonce_loss(query, key, bank, 0.07, backend="auto")), [query, key]
    if case.family == "uniformity":
        from fastssl.ntxent import uniformity_loss

        z = randn(shape["n"], shape["d"])
        return (lambda: uniformity_loss(z, 2.0, backend="auto")), [z]
    if case.family == "ibot":
        images, tokens, k = shape["images"], shape["tokens"], shape["k"]
        side = int(round(math.sqrt(tokens)))
        masked = int(round(0.4 * images * tokens))
        mask = torch.empty(images, side, side, dtype=torch.bool, device=device)
        teacher, student = randn(masked, k, grad=False), randn(masked, k)
        # The drop-in module, as a training step runs it: loss, student gradient, center EMA.
        from fastssl.prototype import IBOTPatchLoss

        criterion = IBOTPatchLoss(output_dim=k, backend="auto")
        criterion.center.center = torch.zeros(1, k, device=device)  # the buffer on the (captured) GPU
        return (lambda: criterion(teacher, student, mask)), [student]
    raise ValueError(f"unknown family {case.family!r}")


class CapturedWMSEExtension:
    """Stands in for the compiled W-MSE extension (``csrc/wmse_whitening.cpp``) during a capture.

    The extension's kernels are CUDA C++ (compiled by nvcc, ``.ci/step-10-compile-cuda.sh``), not
    Triton: nothing to capture or compile here. What the capture needs is the binding's effect on
    the eager side, reproduced exactly: the forward allocates four float32 tensors (loss, means,
    covariances, workspace), the backward two (the gradient in x's dtype, a float32 scratch),
    each an ``at::empty`` -- one dispatched ATen op -- and launches its kernels (three forward,
    two backward, see :data:`WMSE_CUDA_PLAN`) on the current stream without a host sync. Each
    call is recorded in ``Capture.extension_calls``.
    """

    def __init__(self, session) -> None:
        self.session = session

    def _record(self, name: str) -> None:
        if self.session.counting:
            self.session.capture.extension_calls.append(f"fastssl_wmse_kernels.{name} ({self.session.phase})")

    def forward(self, x, perms, views, w, eps, with_loss, loss_scale, stream):
        import torch

        from fastssl.kernels import wmse_cuda

        blocks, d = wmse_cuda.num_blocks(perms, views, w), x.shape[1]
        total = wmse_cuda.forward_layout(blocks, views, w, d, with_loss)["total"]
        self._record("forward")
        return [torch.empty((), dtype=torch.float32, device=x.device),
                torch.empty((blocks, d), dtype=torch.float32, device=x.device),
                torch.empty((blocks, d, d), dtype=torch.float32, device=x.device),
                torch.empty((total,), dtype=torch.float32, device=x.device)]

    def backward(self, grad_loss, grad_z, workspace, x, perms, views, w, eps, iterations, stream):
        import torch

        from fastssl.kernels import wmse_cuda

        blocks, d = wmse_cuda.num_blocks(perms, views, w), x.shape[1]
        self._record("backward")
        grad_x = torch.empty((x.shape[0], d), dtype=x.dtype, device=x.device)
        # The scratch's size (backward_layout in the .cu) does not change the count: one allocation.
        torch.empty((blocks * (d * d + d),), dtype=torch.float32, device=x.device)
        return grad_x


def capture_case(case: Case):
    from benchmarks import launch_capture

    def run(session):
        loss_fn, leaves = _inputs(case)
        launch_capture.forward_backward(session, loss_fn, leaves)

    if case.family != "wmse":
        return launch_capture.capture_call(run)

    # W-MSE's CUDA path: the custom op fastssl::wmse_cholesky_loss over the extension, which
    # cannot be built without a GPU; the stand-in allocates and records as the binding does.
    from fastssl.kernels import wmse_cuda

    def run_with_extension(session):
        original = wmse_cuda.load_extension
        wmse_cuda.load_extension = lambda: CapturedWMSEExtension(session)
        try:
            run(session)
        finally:
            wmse_cuda.load_extension = original

    return launch_capture.capture_call(run_with_extension)


# --------------------------------------------------------------------------------------------
# Floors and the time model
# --------------------------------------------------------------------------------------------


def floor_cost(case: Case) -> Tuple[float, float]:
    """(FLOPs, bytes) of one forward + backward, by benchmarks/roofline.py's rules."""
    import torch

    from benchmarks import roofline

    shape = dict(case.shape)
    dtype = getattr(torch, case.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    if case.family in roofline.COSTS:
        cost = roofline.cost(case.family, shape, dtype)
        return cost.flops, cost.bytes
    if case.family == "infonce":
        # logits q·bankᵀ (2NKd) and dq = G·bank (2NKd); read the bank, q and k, write dq and dk.
        n, k, d = shape["n"], shape["k"], shape["d"]
        return 4.0 * n * k * d, (k * d + 4.0 * n * d) * size
    if case.family == "uniformity":
        n, d = shape["n"], shape["d"]
        return 4.0 * n * n * d, 2.0 * n * d * size
    if case.family == "ibot":
        # Soft cross-entropy per masked token: read teacher and student, write the student's gradient.
        rows = round(0.4 * shape["images"] * shape["tokens"])
        return 0.0, 3.0 * rows * shape["k"] * size
    raise ValueError(case.family)


def matmul_rate(dtype: str) -> float:
    return MODEL["bf16_matmul_flops_per_s"] if dtype in ("bfloat16", "float16") else MODEL["fp32_matmul_flops_per_s"]


def fill_fraction(programs: int) -> float:
    sms = MODEL["sm_count"]
    return programs / (sms * max(1, math.ceil(programs / sms))) if programs else 0.0


def loop_efficiency(compiled: Dict[str, Any], warps: int, programs: int) -> Tuple[float, str, float]:
    """(fraction of the unit's peak the hot loop sustains, unit, unit peak FLOP/s relative to the
    bf16 wgmma peak) -- see the module docstring."""
    loop = compiled.get("hot_loop") or {}
    instructions = loop.get("instructions", 0)
    matrix = loop.get("matrix", 0)
    mufu_cycles = MODEL["mufu_cycles_per_warp_instruction"] * loop.get("mufu", 0)
    other = max(instructions - matrix, mufu_cycles)
    tensor = loop.get("matrix_cycles", 0.0)
    ops = loop.get("matrix_ops", [])
    if tensor and any(op.startswith("HGMMA") for op in ops):
        resident = max(1, min(compiled.get("occupancy_programs_per_sm") or 1, math.ceil(programs / MODEL["sm_count"])))
        groups = max(1, resident * warps // 4)
        if loop.get("wgmma_wait0"):
            return tensor / max(tensor, other, (tensor + other) / groups), "wgmma", 1.0
        return tensor / max(tensor, other), "wgmma", 1.0
    if tensor:
        return tensor / max(tensor, other), "mma.sync", MODEL["hmma_rate_vs_wgmma"]
    ffma = loop.get("ffma", 0)
    if instructions:
        return ffma / max(instructions, mufu_cycles, 1), "FMA", MODEL["fma_fp32_flops_per_s"] / MODEL["bf16_matmul_flops_per_s"]
    return 0.0, "none", 0.0


#: W-MSE's CUDA C++ launches (csrc/wmse_whitening.cu) and their predicted H200 times, from the
#: kernels' own cost model (the "Launch plan" table of kernels/wmse_cuda.py's docstring:
#: registers from ``nvcc -O3 -arch=sm_90 -Xptxas -v``, no spills; times at d = 128, w = 256,
#: 8 sub-batches). (name, phase, grid rule, registers, shared KB, µs, carries O(w·d²) products.)
WMSE_CUDA_PLAN = (
    ("gram_kernel<0>", "forward", "S x lower 32-tiles x 2 row halves", 113, 38, 2.0, True),
    ("factor_kernel<8,reg>", "forward", "S", 122, 3, 15.0, False),
    ("whiten_kernel<loss>", "forward", "S/V x w/4", 70, 74, 3.0, True),
    ("gram_kernel<1>", "backward", "S x lower 32-tiles x 2 row halves", 113, 38, 2.0, True),
    ("row_gradient_kernel", "backward", "S x w/8", 93, 70, 3.0, True),
)
WMSE_CUDA_NOTE = "CUDA C++ kernels (nvcc-compiled by .ci/step-10), not captured"


def wmse_cuda_launches(case: Case) -> List[Dict[str, Any]]:
    """The extension's launches at ``case``'s shape (2 views, w_iter = 1): S = 2·sub-batches
    blocks; the Gram kernels run one program per lower 32×32 tile of the d×d covariance and half
    of the w rows (the consumer adds the two halves), the whitening kernel one per 4 rows."""
    shape = dict(case.shape)
    views = 2
    blocks = views * shape["sub_batches"]
    tiles = -(-shape["d"] // 32)
    programs = {"S x lower 32-tiles x 2 row halves": blocks * tiles * (tiles + 1) // 2 * 2, "S": blocks,
                "S/V x w/4": blocks // views * -(-shape["w_size"] // 4), "S x w/8": blocks * -(-shape["w_size"] // 8)}
    headline = shape == {"d": 128, "w_size": 256, "sub_batches": 4}
    return [{"kernel": name, "phase": phase, "grid_rule": rule, "programs": programs[rule],
             "waves": programs[rule] / MODEL["sm_count"], "registers": regs, "shared_kb": smem,
             "predicted_s": us * 1e-6 if headline else None, "products": products}
            for name, phase, rule, regs, smem, us, products in WMSE_CUDA_PLAN]


def predict(case: Case, capture, compiled: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Per-launch and per-case predictions (seconds) from the captured and compiled numbers."""
    flops, nbytes = floor_cost(case)
    rate = matmul_rate(case.dtype)
    copy = MODEL["copy_bytes_per_s"]
    floor = max(flops / rate, nbytes / copy)
    dots = [compiled.get(launch.key, {}).get("dots", 0) for launch in capture.launches]
    total_dots = sum(dots)
    launches = []
    gpu = 0.0
    for launch, n_dots in zip(capture.launches, dots):
        info = compiled.get(launch.key, {})
        warps = int(info.get("num_warps") or launch.options.get("num_warps", 4))
        fill = fill_fraction(launch.programs)
        mem_fill = min(1.0, launch.programs * warps / (MODEL["sm_count"] * MODEL["warps_per_sm_for_full_bandwidth"]))
        t_mem = launch.tensor_bytes / (copy * max(mem_fill, 1e-9))
        entry: Dict[str, Any] = {"fill": fill, "mem_fill": mem_fill, "memory_s": t_mem}
        t = t_mem
        if n_dots and total_dots and flops:
            efficiency, unit, relative = loop_efficiency(info, warps, launch.programs)
            share = flops * n_dots / total_dots
            peak = MODEL["bf16_matmul_flops_per_s"] * relative
            if unit == "wgmma" and "TF32" in " ".join((info.get("hot_loop") or {}).get("matrix_ops", [])):
                peak = MODEL["fp32_matmul_flops_per_s"]
            t_compute = share / max(peak * fill * efficiency, 1e-9) if efficiency > 0 else float("inf")
            entry.update({"flops": share, "loop_efficiency": efficiency, "unit": unit, "compute_s": t_compute})
            t = max(t, t_compute)
        t = max(t, MODEL["min_kernel_us"] * 1e-6)
        entry["predicted_s"] = t
        gpu += t
        launches.append(entry)
    extension = wmse_cuda_launches(case) if capture.extension_calls and case.family == "wmse" else []
    for entry in extension:  # the CUDA C++ kernels' own predictions (kernels/wmse_cuda.py)
        t = max(entry["predicted_s"] or 0.0, MODEL["min_kernel_us"] * 1e-6)
        gpu += t
        launches.append({"predicted_s": t, "source": "kernels/wmse_cuda.py launch plan"})
    counted = [op for op in capture.eager_ops if op.category != "host"]
    for op in counted:
        if op.category in ("alloc", "view"):
            continue
        op_rate = rate * MODEL["eager_matmul_efficiency"]
        gpu += max(MODEL["min_kernel_us"] * 1e-6, op.bytes / copy, op.flops / op_rate)
    host = 1e-6 * (MODEL["eager_op_host_us"] * len(counted) + MODEL["triton_launch_host_us"] * len(capture.launches)
                   + MODEL["extension_launch_host_us"] * len(extension)
                   + MODEL["custom_op_host_us"] * len(capture.custom_ops))
    syncs = len(capture.syncs)
    if syncs:
        predicted = gpu + host + syncs * MODEL["host_sync_us"] * 1e-6
    else:
        predicted = max(gpu, host)
    # No schedule beats the floor: a sum below it means the per-program byte cap of the memory
    # model undercounts launches whose programs each stream more than PROGRAM_BYTES_PER_TENSOR.
    below_floor = predicted < floor
    return {
        "floor_s": floor, "floor_flops": flops, "floor_bytes": nbytes, "gpu_s": gpu, "host_s": host,
        "model_s": predicted, "below_floor": below_floor, "predicted_s": max(predicted, floor),
        "percent_of_floor": 100.0 * floor / max(predicted, floor) if predicted else None,
        "launches": launches,
    }


# --------------------------------------------------------------------------------------------
# Running: capture, compile, predict, judge
# --------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_cases(cases: Sequence[Case], compile_launches: bool = True, quiet: bool = False) -> Dict[str, Any]:
    from benchmarks import launch_capture

    log = (lambda m: None) if quiet else _progress
    results = []
    compiled: Dict[str, Dict[str, Any]] = {}
    for case in cases:
        start = time.perf_counter()
        capture = capture_case(case)
        log(f"captured {case.name}: {len(capture.launches)} launches, {len(capture.eager_ops)} ops "
            f"({time.perf_counter() - start:.1f} s){' ERROR ' + capture.error.splitlines()[0] if capture.error else ''}")
        if compile_launches:
            for launch in capture.launches:
                if launch.key not in compiled:
                    t0 = time.perf_counter()
                    compiled[launch.key] = launch_capture.compile_launch(launch)
                    info = compiled[launch.key]
                    log(f"  compiled {launch.name}: "
                        + (info["error"].splitlines()[0][:200] if "error" in info else
                           f"{info['registers']} regs, spills {info['spill_store_bytes']}/{info['spill_load_bytes']} B")
                        + f" ({time.perf_counter() - t0:.1f} s)")
        results.append((case, capture))
    return {"results": results, "compiled": compiled}


def auto_rule(case: Case) -> Optional[Dict[str, Any]]:
    """Barlow Twins / VICReg: ``auto``'s choice between the Triton kernels and the torch path
    (cuBLAS) on CUDA, and the two times the rule predicts (fastssl/decorrelation.py,
    ``predicted_seconds``; TF32 off, PyTorch's default)."""
    if case.family not in ("barlow_twins", "vicreg"):
        return None
    import torch

    from fastssl import decorrelation

    shape = dict(case.shape)
    n, d, dtype = shape["n"], shape["d"], getattr(torch, case.dtype)
    torch_s, triton_s = decorrelation.predicted_seconds(n, d, dtype, n < d, case.family == "vicreg")
    return {"torch_s": torch_s, "triton_s": triton_s, "choice": "triton" if triton_s <= torch_s else "torch",
            "rule": "fastssl/decorrelation.py: auto_prefers_triton (predicted_seconds)"}


#: Why a row's targets do not apply: the torch path chosen by auto's rule has no kernels.
RULE_NOT_APPLICABLE = "n/a: no kernels, cuBLAS path chosen by the rule"


def judge(case: Case, capture, compiled: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    heavy = [lp for lp in capture.launches if compiled.get(lp.key, {}).get("dots")]
    counted = [op for op in capture.eager_ops if op.category != "host"]
    waves = [lp.programs / MODEL["sm_count"] for lp in heavy]
    if capture.extension_calls and case.family == "wmse":
        waves = [entry["waves"] for entry in wmse_cuda_launches(case) if entry["products"]]
    spilled = sorted({lp.name for lp in capture.launches if compiled.get(lp.key, {}).get("spills")})
    failed = sorted({lp.name for lp in capture.launches if "error" in compiled.get(lp.key, {})})
    rule = auto_rule(case)
    # A torch row is exempt from (a)-(d) only when auto's cost rule chose it; the Triton path of
    # the same shape is then a row of its own (backend="triton"), judged in full.
    exempt = (rule is not None and rule["choice"] == "torch" and case.backend == "auto"
              and not capture.launches and not capture.error)
    return {
        "a_full_wave": (min(waves) >= 1.0) if waves else None,
        "min_heavy_waves": min(waves) if waves else None,
        "b_no_spills": not spilled,
        "spilled": spilled,
        "compile_failures": failed,
        "c_no_host_syncs": not capture.syncs,
        "d_eager_ops": len(counted),
        "d_ok": None if exempt else len(counted) <= TARGET_MAX_EAGER_OPS,
        "not_applicable": RULE_NOT_APPLICABLE if exempt else None,
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> Dict[str, Any]:
    import torch
    import triton

    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "kernels", "fastssl", "benchmarks"))
    return {
        "triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "commit": commit + ("-dirty" if dirty else ""), "date": datetime.date.today().isoformat(),
        "target": "sm_90 (H200, 132 SMs)",
    }


def case_json(case: Case, capture, compiled: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    prediction = predict(case, capture, compiled) if not capture.error else None
    launches = []
    for i, launch in enumerate(capture.launches):
        entry = launch.to_json()
        entry["waves"] = launch.programs / MODEL["sm_count"]
        entry["compiled"] = compiled.get(launch.key)
        if prediction:
            entry["model"] = prediction["launches"][i]
        launches.append(entry)
    by_category: Dict[str, int] = {}
    for op in capture.eager_ops:
        by_category[op.category] = by_category.get(op.category, 0) + 1
    counted = [op for op in capture.eager_ops if op.category != "host"]
    out = capture.to_json()
    out.update({
        "name": case.name, "family": case.family, "shape": case.label, "dtype": case.dtype, "headline": case.headline,
        "requested_backend": case.backend, "auto_rule": auto_rule(case),
        "extension_launches": wmse_cuda_launches(case) if capture.extension_calls and case.family == "wmse" else [],
        "backend": "triton" if capture.launches else ("cuda extension" if capture.extension_calls else "torch"),
        "launches": launches,
        "eager_op_count": {"total": len(counted), "forward": sum(op.phase == "forward" for op in counted),
                           "backward": sum(op.phase == "backward" for op in counted), "by_category": by_category},
        "host_syncs": sum(s.kind == "sync" for s in capture.syncs),
        "host_to_device_copies": sum(s.kind == "h2d" for s in capture.syncs),
        "prediction": prediction,
        "targets": judge(case, capture, compiled),
    })
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _us(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def _yes(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def launch_capture_cap_kib() -> int:
    from benchmarks import launch_capture

    return launch_capture.PROGRAM_BYTES_PER_TENSOR // 1024


def render_markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Launch report: the CUDA paths on an H200, read from the compiled code",
        "",
        f"Triton {env['triton']}, torch {env['torch']}, commit {env['commit']}, {env['date']}, target {env['target']}."
        + (f" Second Triton: {report['other']['triton']} (spills column)." if report.get("other") else ""),
        "Generated by `python benchmarks/launch_report.py` without a GPU: every launch captured as the CUDA path",
        "issues it and compiled for sm_90; the time model and its constants are in that file's docstring.",
        "Targets (DESIGN §5): (a) launches with matrix products fill ≥ 1 wave on 132 SMs; (b) no spills;",
        f"(c) no host syncs or host-to-device copies; (d) ≤ {TARGET_MAX_EAGER_OPS} eager ops per forward + backward.",
        "",
        "## Summary",
        "",
        "| loss | shape | dtype | path | launches | min waves (matrix launches) | spills "
        + (f"{env['triton']} / {report['other']['triton']}" if report.get("other") else env["triton"])
        + " | eager ops fwd+bwd | host syncs / H2D | predicted µs | floor µs | % of floor |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        t = case["targets"]
        p = case["prediction"] or {}
        spills = ", ".join(t["spilled"]) or "none"
        if t["compile_failures"]:
            spills += "; compile FAILED: " + ", ".join(t["compile_failures"])
        if report.get("other"):
            other = case.get("other_targets") or {}
            o_spills = ", ".join(other.get("spilled", [])) or "none"
            if other.get("compile_failures"):
                o_spills += "; compile FAILED: " + ", ".join(other["compile_failures"])
            spills = f"{spills} / {o_spills}"
        waves = "-" if t["min_heavy_waves"] is None else f"{t['min_heavy_waves']:.2f}" + ("" if t["a_full_wave"] else " ✗")
        ops = case["eager_op_count"]
        pct = p.get("percent_of_floor")
        path, n_launches = case["backend"], str(len(case["launches"]))
        rule = case.get("auto_rule")
        if case.get("requested_backend", "auto") != "auto":
            path += f" (backend='{case['requested_backend']}')"
        elif rule and rule["choice"] == "torch" and case["backend"] == "torch":
            path += (f" (auto's choice: the rule predicts torch {rule['torch_s'] * 1e3:.2f} ms, "
                     f"Triton {rule['triton_s'] * 1e3:.2f} ms)")
        if case.get("extension_launches"):
            n_launches = f"{len(case['extension_launches'])} {WMSE_CUDA_NOTE}"
            spills = "not compiled here (nvcc, .ci/step-10: a spill is an error)"
        d_mark = " n/a¹" if t.get("not_applicable") else ("" if t["d_ok"] else " ✗")
        lines.append(
            f"| {case['family']} | {case['shape']} | {case['dtype']} | {path} | {n_launches} | {waves} "
            f"| {spills} | {ops['forward']}+{ops['backward']}={ops['total']}{d_mark} "
            f"| {case['host_syncs']} / {case['host_to_device_copies']}{'' if t['c_no_host_syncs'] else ' ✗'} "
            f"| {_us(p.get('predicted_s'))}{'²' if p.get('below_floor') else ''} | {_us(p.get('floor_s'))} "
            f"| {'-' if pct is None else ('(≤ 100)' if p.get('below_floor') else f'{pct:.1f}')} |"
            + (f" capture error: {case['error'].splitlines()[0]}" if case.get("error") else ""))
    if any(case["targets"].get("not_applicable") for case in report["cases"]):
        lines += ["", f"¹ {RULE_NOT_APPLICABLE} (fastssl/decorrelation.py, `auto_prefers_triton`): at this shape "
                  "`auto` runs the torch path, whose products are cuBLAS calls; targets (a)–(d) are those of the "
                  "Triton path, the `backend='triton'` row of the same shape."]
    low = [f"{c['family']} {c['shape']} {c['dtype']} ({_us(c['prediction']['model_s'])} µs)" for c in report["cases"]
           if (c.get("prediction") or {}).get("below_floor")]
    if low:
        lines += ["", "² The model's sum falls below the floor, which no schedule beats: its memory term caps the "
                  f"bytes a program reads of one flat tensor at {launch_capture_cap_kib()} KiB (for workspaces passed "
                  "whole and read in parts), which undercounts launches whose programs each stream more. Shown at "
                  "the floor; the model's own sums: " + "; ".join(low) + "."]
    lines += ["", "## Per launch", ""]
    for case in report["cases"]:
        title = f"### {case['family']}, {case['shape']}, {case['dtype']}"
        if case.get("requested_backend", "auto") != "auto":
            title += f", backend='{case['requested_backend']}'"
        lines += [title, ""]
        rule = case.get("auto_rule")
        if rule:
            lines += [f"`auto`'s rule ({rule['rule']}): torch path {rule['torch_s'] * 1e3:.3f} ms, Triton path "
                      f"{rule['triton_s'] * 1e3:.3f} ms predicted -> `auto` runs the {rule['choice']} path"
                      + (f"; this row runs `backend='{case['requested_backend']}'`." if case.get("requested_backend", "auto") != "auto" else "."), ""]
        if case.get("extension_launches"):
            lines += [
                f"{WMSE_CUDA_NOTE}: the custom op `fastssl::wmse_cholesky_loss` runs over a stand-in for the compiled "
                "extension that allocates as its binding does; the launches below and their times are the kernels' "
                "own cost model (kernels/wmse_cuda.py, \"Launch plan\"; registers from `nvcc -Xptxas -v`, no spills).",
                "",
                "| # | kernel | phase | grid | programs | waves | regs | smem KB | products | predicted µs |",
                "|---:|---|---|---|---:|---:|---:|---:|---|---:|",
            ]
            for i, entry in enumerate(case["extension_launches"]):
                lines.append(f"| {i} | `{entry['kernel']}` | {entry['phase']} | {entry['grid_rule']} | {entry['programs']:,} "
                             f"| {entry['waves']:.2f} | {entry['registers']} | {entry['shared_kb']} "
                             f"| {'O(w·d²) products' if entry['products'] else '-'} | {_us(entry['predicted_s'])} |")
            lines.append("")
        if case.get("error"):
            lines += ["Capture failed:", "", "```", case["error"][:1500], "```", ""]
        if case["launches"]:
            lines += [
                "| # | kernel | phase | grid | programs | waves | warps/stages | regs | spills (st/ld B) | smem KB "
                "| products | hot loop: instr / matrix / MUFU / wait-all | model: unit, loop eff., fill | predicted µs |",
                "|---:|---|---|---|---:|---:|---|---:|---|---:|---|---|---|---:|",
            ]
            for i, launch in enumerate(case["launches"]):
                c = launch.get("compiled") or {}
                m = launch.get("model") or {}
                loop = c.get("hot_loop") or {}
                if "error" in c:
                    compiled_cells = "compile error | | | | "
                else:
                    products = "wgmma" if c.get("sass_wgmma") else "mma.sync" if c.get("sass_hmma") else ("FMA" if c.get("dots") else "-")
                    spill = f"{c.get('spill_store_bytes')}/{c.get('spill_load_bytes')}"
                    other = (launch.get("other_compiled") or {})
                    if other:
                        spill += " / " + ("error" if "error" in other else f"{other.get('spill_store_bytes')}/{other.get('spill_load_bytes')}")
                    compiled_cells = (f"{c.get('registers')} | {spill} | {c.get('shared_bytes', 0) / 1024:.1f} | {products} | "
                                      + (f"{loop.get('instructions')} / {loop.get('matrix')} / {loop.get('mufu')} / {loop.get('wgmma_wait0')}" if loop else "-"))
                model = (f"{m.get('unit')}, {m.get('loop_efficiency', 0):.2f}, {m.get('fill', 0):.2f}" if "unit" in m
                         else f"memory, fill {m.get('mem_fill', 0):.2f}" if m else "-")
                grid = "×".join(str(g) for g in launch["grid"])
                opts = launch["options"]
                warps = f"{c.get('num_warps', opts.get('num_warps', 4))}/{c.get('num_stages', opts.get('num_stages', 3))}"
                lines.append(f"| {i} | `{launch['kernel'].split(':')[-1]}` | {launch['phase']} | {grid} | {launch['programs']:,} "
                             f"| {launch['waves']:.2f} | {warps} | {compiled_cells} | {model} | {_us(m.get('predicted_s'))} |")
            lines.append("")
        ops = case["eager_op_count"]
        names: Dict[str, int] = {}
        for op in case["eager_ops"]:
            if op["category"] != "host":
                key = f"{op['op']} ({op['category']}, {op['phase']})"
                names[key] = names.get(key, 0) + 1
        lines.append(f"Eager ops: {ops['total']} ({', '.join(f'{k} {v}' for k, v in sorted(ops['by_category'].items()))}): "
                     + ", ".join(f"{k}{'' if v == 1 else f' ×{v}'}" for k, v in names.items()) + ".")
        if case["syncs"]:
            lines.append("Host syncs / host-to-device copies: "
                         + "; ".join(f"{s['kind']} `{s['op']}` at {s['site']} ({s['phase']})" for s in case["syncs"]) + ".")
        if case["custom_ops"]:
            lines.append("Custom ops: " + ", ".join(f"`{c}`" for c in case["custom_ops"]) + ".")
        if case.get("extension_calls"):
            lines.append("Extension calls: " + ", ".join(f"`{c}`" for c in case["extension_calls"]) + ".")
        notes = [w for w in case["warnings"] if "TRITON_DEFAULT_FP_FUSION" not in w]
        if notes:
            lines.append("Warnings: " + "; ".join(notes) + ".")
        lines.append("")
    return "\n".join(lines) + "\n"


def build_report(cases: Sequence[Case], other_python: Optional[str] = None, quiet: bool = False) -> Dict[str, Any]:
    run = run_cases(cases, quiet=quiet)
    report: Dict[str, Any] = {"environment": environment(), "model": MODEL, "cases": []}
    for case, capture in run["results"]:
        report["cases"].append(case_json(case, capture, run["compiled"]))
    if other_python:
        other = run_other(other_python, cases, quiet=quiet)
        report["other"] = other["environment"]
        by_name = {c["name"]: c for c in other["cases"]}
        for case, entry in zip(cases, report["cases"]):
            twin = by_name.get(case.name)
            if twin is None:
                continue
            entry["other_targets"] = twin["targets"]
            entry["other_error"] = twin.get("error")
            for launch, other_launch in zip(entry["launches"], twin["launches"]):
                if launch["kernel"] == other_launch["kernel"]:
                    launch["other_compiled"] = other_launch["compiled"]
    return report


def compile_only(cases: Sequence[Case], quiet: bool = False) -> Dict[str, Any]:
    """Capture and compile with this process's Triton; per case the launches' compile results
    and the spill/compile targets (what the second-Triton run and the CI check need)."""
    run = run_cases(cases, quiet=quiet)
    out = {"environment": environment(), "cases": []}
    for case, capture in run["results"]:
        out["cases"].append({
            "name": case.name, "error": capture.error, "targets": judge(case, capture, run["compiled"]),
            "launches": [{"kernel": lp.kernel, "compiled": {k: v for k, v in run["compiled"].get(lp.key, {}).items()
                                                            if k != "hot_loop"}} for lp in capture.launches],
        })
    return out


def run_other(python: str, cases: Sequence[Case], quiet: bool = False) -> Dict[str, Any]:
    """The compile results of the same cases under another interpreter (another Triton): that
    interpreter captures every case and compiles every launch with its own Triton."""
    names = [c.name for c in cases]
    with tempfile.TemporaryDirectory(prefix="fastssl-launch-other-") as folder:
        out = os.path.join(folder, "other.json")
        env = clean_env(folder)
        subprocess.run([python, str(Path(__file__).resolve()), "--compile-only-json", out, "--case-names", json.dumps(names)]
                       + (["--quiet"] if quiet else []), check=True, env=env, cwd=REPO_ROOT, timeout=1800)
        with open(out) as f:
            return json.load(f)


def clean_env(folder: str) -> Dict[str, str]:
    """Environment of a capture process: no interpreter, a private Triton cache and temp dir."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = os.path.join(folder, "triton-cache")
    tmp = os.path.join(folder, "tmp")
    os.makedirs(tmp, exist_ok=True)
    env.update({"TRITON_CACHE_DIR": cache, "TMPDIR": tmp, "TRITON_DEFAULT_FP_FUSION": env.get("TRITON_DEFAULT_FP_FUSION", "1")})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def check_failures(results: Dict[str, Any]) -> List[str]:
    """Compile failures, spills and capture errors under this process's Triton and, when the
    results carry them, under the other interpreter's (``--other-python``): what fails CI."""
    problems = []
    this = results.get("environment", {}).get("triton", "this Triton")

    def judge_cases(cases: Sequence[Dict[str, Any]], version: str, targets_key: str = "targets") -> None:
        for case in cases:
            name = case.get("name") or f"{case['family']} {case['shape']} {case['dtype']}"
            error = case.get("error" if targets_key == "targets" else "other_error")
            if error:
                problems.append(f"{name}: capture failed (Triton {version}): {error.splitlines()[0]}")
            t = case.get(targets_key)
            if t is None:
                continue
            for kernel in t["compile_failures"]:
                problems.append(f"{name}: {kernel} failed to compile (Triton {version})")
            for kernel in t["spilled"]:
                problems.append(f"{name}: {kernel} spills registers (Triton {version})")

    judge_cases(results["cases"], this)
    other = results.get("other_results")
    if other is not None:  # compile-only results of the other interpreter (--check --no-write)
        judge_cases(other["cases"], other["environment"]["triton"])
        missing = {c["name"] for c in results["cases"]} - {c["name"] for c in other["cases"]}
        problems += [f"{name}: not captured under Triton {other['environment']['triton']}" for name in sorted(missing)]
    elif results.get("other"):  # the full report: other_targets per case
        version = results["other"]["triton"]
        judge_cases(results["cases"], version, "other_targets")
        missing = [c["name"] for c in results["cases"] if c.get("other_targets") is None]
        problems += [f"{name}: not captured under Triton {version}" for name in missing]
    return problems


def headline_cases_with_twins() -> List[Case]:
    """The headline cases, each followed by its Triton twin where auto's rule picks the torch path."""
    out: List[Case] = []
    for case in HEADLINE_CASES:
        out.append(case)
        twin = _triton_twin(case)
        if twin is not None:
            out.append(twin)
    return out


def select_cases(which: str) -> List[Case]:
    headline = headline_cases_with_twins()
    return {"headline": headline, "small": SMALL_CASES, "all": headline + SMALL_CASES}[which]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", choices=("headline", "small", "all"), default="headline")
    parser.add_argument("--case-names", help="JSON list of case names (internal)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "launch-report"),
                        help="path prefix of the .md and .json written")
    parser.add_argument("--other-python", help="a Python whose Triton also compiles every launch (spills reported)")
    parser.add_argument("--check", action="store_true", help="exit 1 on a capture error, compile failure or spill")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--compile-only-json", help="(internal) capture + compile, write the results JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)
    if "TRITON_CACHE_DIR" not in os.environ:  # a private cache, removed at exit
        private = tempfile.TemporaryDirectory(prefix="fastssl-triton-cache-")
        os.environ["TRITON_CACHE_DIR"] = private.name
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = select_cases(args.cases)
    if args.case_names:
        wanted = set(json.loads(args.case_names))
        cases = [c for c in select_cases("all") if c.name in wanted]

    if args.compile_only_json or (args.check and args.no_write):
        results = compile_only(cases, quiet=args.quiet)
        if args.compile_only_json:
            with open(args.compile_only_json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        elif args.other_python:  # the same launches captured and compiled under the other Triton
            results["other_results"] = run_other(args.other_python, cases, quiet=args.quiet)
    else:
        report = build_report(cases, args.other_python, quiet=args.quiet)
        results = report
        if not args.no_write:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out + ".json", "w") as f:
                json.dump(report, f, indent=1, default=str)
            with open(args.out + ".md", "w") as f:
                f.write(render_markdown(report))
            _progress(f"wrote {args.out}.md and .json")
    if args.check:
        problems = check_failures(results)
        import triton

        other = results.get("other_results", {}).get("environment") or results.get("other")
        versions = triton.__version__ + (f" and {other['triton']} ({args.other_python})" if other else "")
        counts = [sum(len(c["launches"]) for c in results["cases"])]
        if "other_results" in results:
            counts.append(sum(len(c["launches"]) for c in results["other_results"]["cases"]))
        elif other:
            counts.append(sum(bool(lp.get("other_compiled")) for c in results["cases"] for lp in c["launches"]))
        print(f"launch check (Triton {versions}, {len(cases)} cases, {' + '.join(map(str, counts))} launches compiled): "
              + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for problem in problems:
            print("  " + problem)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
