"""The benchmark suite's machinery: cases (loss, shape, dtype), the implementations compared on
each case, inputs, and the one function that times a row and fills its ``extra_info``.

Every row times one forward + backward of one implementation on fresh random inputs (drawn in
pytest-benchmark's ``setup``, outside the timed region, new for every round). On CUDA the timed
function ends with ``torch.cuda.synchronize()``. Implementations:

* ``reference`` -- :mod:`fastssl.reference`, eager;
* ``reference-compiled`` -- ``torch.compile`` of the same reference function (the row is
  skipped, with the error recorded, when compiling fails);
* ``lightly`` -- lightly 1.6's module, loaded by :mod:`benchmarks.lightly_loader` (skipped with
  the reason when lightly cannot be loaded or does not support the case);
* ``fastssl-torch`` / ``fastssl-triton`` -- :mod:`fastssl.functional` with ``backend="torch"`` /
  ``"triton"``; the Triton rows exist only where CUDA is available.

Rows that cannot run (out of memory -- e.g. the reference NT-Xent at 2N = 131072 --, a failed
compile, lightly missing) are skipped and listed with their reason in the results JSON under
``"skipped"`` (see ``conftest.py``), so the rendered summary shows them.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastssl.functional as FS
from fastssl import reference

from benchmarks import lightly_loader, memory, roofline

REPO_ROOT = Path(__file__).resolve().parents[1]

IMPLS_ALL = ("reference", "reference-compiled", "lightly", "fastssl-torch", "fastssl-triton")

# Hyperparameters: lightly's defaults, passed explicitly to every implementation.
NTXENT_TEMPERATURE = 0.5
BT_LAMBDA = 5e-3
VICREG_LAMBDA, VICREG_MU, VICREG_NU, VICREG_EPS = 25.0, 25.0, 1.0, 1e-4
SWAV_TEMPERATURE, SINKHORN_ITERATIONS, SINKHORN_EPSILON = 0.1, 3, 0.05
SWAV_CROPS = 2
SWAV_EMBEDDING_DIM = 128
DINO_TEACHER_TEMP, DINO_STUDENT_TEMP = 0.04, 0.1
WMSE_VIEWS = 2


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def impls() -> Tuple[str, ...]:
    """The implementations benchmarked on this machine (Triton rows need CUDA)."""
    return IMPLS_ALL if torch.cuda.is_available() else tuple(i for i in IMPLS_ALL if i != "fastssl-triton")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One (loss, shape, dtype) point; ``shape`` items in their reporting order."""

    loss: str
    shape_items: Tuple[Tuple[str, int], ...]
    dtype: torch.dtype

    @property
    def shape(self) -> Dict[str, int]:
        return dict(self.shape_items)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape_items)

    def __str__(self) -> str:
        return f"{self.label}-{self.dtype_name}"


def _cases(loss: str, points: Sequence[Tuple[Mapping[str, int], torch.dtype]]) -> List[Case]:
    return [Case(loss, tuple(shape.items()), dtype) for shape, dtype in points]


FP32, BF16 = torch.float32, torch.bfloat16

# DESIGN §5 shapes, plus sweeps for the plots (time and memory against batch size and d).
GPU_POINTS: Dict[str, list] = {
    "ntxent": [({"n": n, "d": 128}, BF16) for n in (1024, 4096, 16384, 65536)]
    + [({"n": 4096, "d": 128}, FP32)],
    "barlow_twins": [({"n": 256, "d": d}, FP32) for d in (1024, 2048, 4096, 8192)]
    + [({"n": 2048, "d": 8192}, FP32), ({"n": 256, "d": 8192}, BF16), ({"n": 2048, "d": 8192}, BF16)],
    "vicreg": [({"n": 256, "d": d}, FP32) for d in (1024, 2048, 4096, 8192)]
    + [({"n": 2048, "d": 8192}, FP32), ({"n": 256, "d": 8192}, BF16), ({"n": 2048, "d": 8192}, BF16)],
    "swav": [({"b": 4096, "k": 3000}, FP32)],
    "sinkhorn": [({"b": 4096, "k": 3000}, FP32)],
    "dino": [({"views": 12, "b": 64, "k": 65536}, FP32), ({"views": 12, "b": 64, "k": 65536}, BF16)],
    "wmse": [({"d": 128, "w_size": 256, "sub_batches": 4}, FP32)],
}

# Scaled down for a 2-core CPU, keeping the shapes the project tracks there: NT-Xent at
# 2N = 16384, d = 128 and Barlow Twins / VICReg at N = 256, d = 8192.
CPU_POINTS: Dict[str, list] = {
    "ntxent": [({"n": n, "d": 128}, FP32) for n in (512, 2048, 8192)],
    "barlow_twins": [({"n": 256, "d": d}, FP32) for d in (1024, 2048, 8192)],
    "vicreg": [({"n": 256, "d": d}, FP32) for d in (1024, 8192)],
    "swav": [({"b": 1024, "k": 3000}, FP32)],
    "sinkhorn": [({"b": 1024, "k": 3000}, FP32)],
    "dino": [({"views": 12, "b": 32, "k": 16384}, FP32)],
    "wmse": [({"d": 128, "w_size": 256, "sub_batches": 4}, FP32)],
}

# The shapes where a CPU user meets these losses in practice (ImageNet-style multi-crop SwAV,
# MoCo's queue); on a GPU at DESIGN §5's MoCo shape and with SwAV's 3000 prototypes.
GPU_POINTS.update(
    swav_multicrop=[({"b": 256, "k": 3000, "high": 2, "low": 6}, FP32)],
    ntxent_bank=[({"n": 256, "d": 128, "bank": 65536}, FP32)],
)
CPU_POINTS.update(
    swav_multicrop=[({"b": 256, "k": 1000, "high": 2, "low": 4}, FP32)],
    ntxent_bank=[({"n": 256, "d": 128, "bank": 16384}, FP32)],
)



def register_families(families: Mapping[str, "Family"], gpu_points: Mapping[str, list], cpu_points: Mapping[str, list],
                      costs: Mapping[str, Callable], lightly_files: Optional[Mapping[str, str]] = None) -> None:
    """Add a bench file's loss families to the harness (new keys only: the other families'
    entries are untouched): their inputs/implementations, GPU and CPU shapes, roofline costs
    and the lightly source file of each class."""
    FAMILIES.update(families)
    GPU_POINTS.update(gpu_points)
    CPU_POINTS.update(cpu_points)
    roofline.COSTS.update(costs)
    lightly_loader.LOSS_FILES.update(lightly_files or {})

def cases(loss: str) -> List[Case]:
    """The cases of ``loss`` for this machine (GPU shapes on CUDA, CPU shapes otherwise)."""
    points = GPU_POINTS if torch.cuda.is_available() else CPU_POINTS
    return _cases(loss, points[loss])


# --------------------------------------------------------------------------------------------
# Inputs and implementations of each loss
# --------------------------------------------------------------------------------------------


def _randn(shape, dtype: torch.dtype, device: torch.device, grad: bool) -> Tensor:
    x = torch.randn(*shape, device=device).to(dtype)
    return x.requires_grad_(grad)


def _pair_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(_randn((shape["n"], shape["d"]), dtype, device, True) for _ in range(2))


def _prototype_scores(b: int, k: int, dtype: torch.dtype, device: torch.device, grad: bool) -> Tensor:
    # SwAV's scores are cosines between normalized embeddings and normalized prototypes, so
    # |score| <= 1 and exp(score/ε) stays finite for every implementation (N(0,1) scores would
    # overflow the textbook Sinkhorn's unshifted exp at ε = 0.05).
    z = F.normalize(torch.randn(b, SWAV_EMBEDDING_DIM, device=device), dim=1)
    prototypes = F.normalize(torch.randn(k, SWAV_EMBEDDING_DIM, device=device), dim=1)
    return (z @ prototypes.T).to(dtype).requires_grad_(grad)


def _swav_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    return ([_prototype_scores(shape["b"], shape["k"], dtype, device, True) for _ in range(SWAV_CROPS)],)


def _swav_multicrop_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    """``high`` high-resolution and ``low`` low-resolution crops of ``b`` × ``k`` cosine scores."""
    b, k = shape["b"], shape["k"]
    crops = [_prototype_scores(b, k, dtype, device, True) for _ in range(shape["high"] + shape["low"])]
    return crops[: shape["high"]], crops[shape["high"] :]


def _ntxent_bank_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    """Two views (n, d) and a bank of ``bank`` L2-normalized keys (the reference's negatives;
    the modules keep their own bank of the same size)."""
    out0, out1 = _pair_inputs(shape, dtype, device)
    bank = F.normalize(torch.randn(shape["bank"], shape["d"], device=device), dim=1).to(dtype)
    return out0, out1, bank


def _sinkhorn_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    return (_prototype_scores(shape["b"], shape["k"], dtype, device, False),)


def _dino_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    b, k = shape["b"], shape["k"]
    teacher = [_randn((b, k), dtype, device, False) for _ in range(roofline.DINO_TEACHER_VIEWS)]
    student = [_randn((b, k), dtype, device, True) for _ in range(shape["views"])]
    center = 0.1 * torch.randn(k, device=device)
    return teacher, student, center


def _wmse_inputs(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> tuple:
    rows = WMSE_VIEWS * shape["sub_batches"] * shape["w_size"]
    # w_size travels with the inputs (a Python int: compiled code specializes on it).
    return _randn((rows, shape["d"]), dtype, device, True), shape["w_size"]


def _lightly_ntxent(shape, device):
    return lightly_loader.load("NTXentLoss")(temperature=NTXENT_TEMPERATURE).to(device)


def _lightly_barlow_twins(shape, device):
    return lightly_loader.load("BarlowTwinsLoss")(lambda_param=BT_LAMBDA).to(device)


def _lightly_vicreg(shape, device):
    return lightly_loader.load("VICRegLoss")(
        lambda_param=VICREG_LAMBDA, mu_param=VICREG_MU, nu_param=VICREG_NU, eps=VICREG_EPS
    ).to(device)


def _lightly_swav(shape, device):
    module = lightly_loader.load("SwaVLoss")(
        temperature=SWAV_TEMPERATURE, sinkhorn_iterations=SINKHORN_ITERATIONS, sinkhorn_epsilon=SINKHORN_EPSILON
    ).to(device)
    return lambda high: module(high, [])


def _lightly_swav_multicrop(shape, device):
    module = lightly_loader.load("SwaVLoss")(
        temperature=SWAV_TEMPERATURE, sinkhorn_iterations=SINKHORN_ITERATIONS, sinkhorn_epsilon=SINKHORN_EPSILON
    ).to(device)
    return lambda high, low: module(high, low)


def _lightly_ntxent_bank(shape, device):
    # lightly 1.6 fills a (size, dim) bank with normalized random keys at construction and
    # enqueues each call's keys after using the bank, as fastssl's module does.
    module = lightly_loader.load("NTXentLoss")(
        temperature=NTXENT_TEMPERATURE, memory_bank_size=(shape["bank"], shape["d"])
    ).to(device)
    return lambda out0, out1, bank: module(out0, out1)


def _lightly_sinkhorn(shape, device):
    fn = lightly_loader.load("sinkhorn")
    return lambda scores: fn(scores, SINKHORN_ITERATIONS, SINKHORN_EPSILON)


def _lightly_dino(shape, device):
    module = lightly_loader.load("DINOLoss")(
        output_dim=shape["k"],
        warmup_teacher_temp=DINO_TEACHER_TEMP,
        teacher_temp=DINO_TEACHER_TEMP,
        student_temp=DINO_STUDENT_TEMP,
    ).to(device)

    def call(teacher, student, center):
        # lightly keeps the center as a buffer and moves it by EMA after every call: reset it
        # to the case's center so that every implementation computes the same loss.
        module.center.copy_(center.reshape(1, 1, -1))
        return module(teacher, student)

    return call


def _lightly_wmse(shape, device):
    module = lightly_loader.load("WMSELoss")(
        embedding_dim=shape["d"], eps=0.0, w_iter=1, w_size=shape["w_size"], num_samples=WMSE_VIEWS
    ).to(device)
    return lambda x, w_size: module(x)


@dataclass(frozen=True)
class Family:
    """How to benchmark one loss: its inputs and the callables compared on them.

    ``reference(*inputs)`` and ``fastssl(*inputs, backend=...)`` return the loss (the codes for
    Sinkhorn); ``lightly(shape, device)`` builds lightly's callable for a case.
    """

    name: str
    make_inputs: Callable[[Mapping[str, int], torch.dtype, torch.device], tuple]
    reference: Callable[..., Tensor]
    fastssl: Callable[..., Tensor]
    lightly: Optional[Callable[[Mapping[str, int], torch.device], Callable[..., Tensor]]]
    backward: bool = True


def _ntxent_reference(a: Tensor, b: Tensor) -> Tensor:
    return reference.ntxent_loss(a, b, NTXENT_TEMPERATURE)


def _ntxent_fastssl(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return FS.ntxent_loss(a, b, NTXENT_TEMPERATURE, backend=backend)


def _bt_reference(a: Tensor, b: Tensor) -> Tensor:
    return reference.barlow_twins_loss(a, b, BT_LAMBDA)


def _bt_fastssl(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return FS.barlow_twins_loss(a, b, BT_LAMBDA, backend=backend)


def _vicreg_reference(a: Tensor, b: Tensor) -> Tensor:
    return reference.vicreg_loss(a, b, VICREG_LAMBDA, VICREG_MU, VICREG_NU, VICREG_EPS)


def _vicreg_fastssl(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return FS.vicreg_loss(a, b, VICREG_LAMBDA, VICREG_MU, VICREG_NU, VICREG_EPS, backend=backend)


def _swav_reference(high: List[Tensor]) -> Tensor:
    return reference.swav_loss(high, (), None, SWAV_TEMPERATURE, SINKHORN_ITERATIONS, SINKHORN_EPSILON)


def _swav_fastssl(high: List[Tensor], backend: str) -> Tensor:
    return FS.swav_loss(high, [], None, SWAV_TEMPERATURE, SINKHORN_ITERATIONS, SINKHORN_EPSILON, backend=backend)


def _swav_multicrop_reference(high: List[Tensor], low: List[Tensor]) -> Tensor:
    return reference.swav_loss(high, low, None, SWAV_TEMPERATURE, SINKHORN_ITERATIONS, SINKHORN_EPSILON)


def _swav_multicrop_fastssl(high: List[Tensor], low: List[Tensor], backend: str) -> Tensor:
    return FS.swav_loss(high, low, None, SWAV_TEMPERATURE, SINKHORN_ITERATIONS, SINKHORN_EPSILON, backend=backend)


def _ntxent_bank_reference(out0: Tensor, out1: Tensor, bank: Tensor) -> Tensor:
    return reference.infonce_loss(out0, out1, bank, NTXENT_TEMPERATURE)


@functools.lru_cache(maxsize=None)
def _ntxent_bank_module(backend: str, size: int, dim: int, device: torch.device) -> torch.nn.Module:
    import fastssl

    return fastssl.NTXentLoss(NTXENT_TEMPERATURE, memory_bank_size=(size, dim), backend=backend).to(device)


def _ntxent_bank_fastssl(out0: Tensor, out1: Tensor, bank: Tensor, backend: str) -> Tensor:
    """fastssl's module with its own bank of ``bank``'s size, as a user runs MoCo (the bank is
    read, then this call's keys are enqueued)."""
    return _ntxent_bank_module(backend, bank.shape[0], bank.shape[1], out0.device)(out0, out1)


def _sinkhorn_reference(scores: Tensor) -> Tensor:
    return reference.sinkhorn(scores, SINKHORN_ITERATIONS, SINKHORN_EPSILON)


def _sinkhorn_fastssl(scores: Tensor, backend: str) -> Tensor:
    return FS.sinkhorn(scores, SINKHORN_ITERATIONS, SINKHORN_EPSILON, backend=backend)


def _dino_reference(teacher: List[Tensor], student: List[Tensor], center: Tensor) -> Tensor:
    # The textbook formula in the views' dtype (the center buffer is float32, as in lightly).
    center = center.to(teacher[0].dtype)
    return reference.dino_loss(teacher, student, center, DINO_TEACHER_TEMP, DINO_STUDENT_TEMP)


def _dino_fastssl(teacher: List[Tensor], student: List[Tensor], center: Tensor, backend: str) -> Tensor:
    return FS.dino_loss(teacher, student, center, DINO_TEACHER_TEMP, DINO_STUDENT_TEMP, backend=backend)


def _wmse_reference(x: Tensor, w_size: int) -> Tensor:
    return reference.wmse_loss(x, WMSE_VIEWS, w_size, 1, 0.0)


def _wmse_fastssl(x: Tensor, w_size: int, backend: str) -> Tensor:
    return FS.wmse_loss(x, WMSE_VIEWS, w_size, 1, 0.0, backend=backend)


FAMILIES: Dict[str, Family] = {
    "ntxent": Family("ntxent", _pair_inputs, _ntxent_reference, _ntxent_fastssl, _lightly_ntxent),
    "barlow_twins": Family("barlow_twins", _pair_inputs, _bt_reference, _bt_fastssl, _lightly_barlow_twins),
    "vicreg": Family("vicreg", _pair_inputs, _vicreg_reference, _vicreg_fastssl, _lightly_vicreg),
    "swav": Family("swav", _swav_inputs, _swav_reference, _swav_fastssl, _lightly_swav),
    "sinkhorn": Family("sinkhorn", _sinkhorn_inputs, _sinkhorn_reference, _sinkhorn_fastssl, _lightly_sinkhorn, backward=False),
    "dino": Family("dino", _dino_inputs, _dino_reference, _dino_fastssl, _lightly_dino),
    "wmse": Family("wmse", _wmse_inputs, _wmse_reference, _wmse_fastssl, _lightly_wmse),
    "swav_multicrop": Family(
        "swav_multicrop", _swav_multicrop_inputs, _swav_multicrop_reference, _swav_multicrop_fastssl,
        _lightly_swav_multicrop,
    ),
    "ntxent_bank": Family(
        "ntxent_bank", _ntxent_bank_inputs, _ntxent_bank_reference, _ntxent_bank_fastssl, _lightly_ntxent_bank
    ),
}


def _swav_multicrop_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    """Element-wise (Sinkhorn on the high-resolution crops, cross-entropies on all): every crop
    read once and its gradient written once."""
    crops = shape["high"] + shape["low"]
    return roofline.Cost(flops=0.0, bytes=2.0 * crops * shape["b"] * shape["k"] * roofline._element_size(dtype))


def _ntxent_bank_cost(shape: Mapping[str, int], dtype: torch.dtype) -> roofline.Cost:
    """Queries against the bank, forward (2·n·K·d) and the queries' gradient (2·n·K·d); the bank
    read once, both views read and their gradients written."""
    n, d, k = shape["n"], shape["d"], shape["bank"]
    return roofline.Cost(flops=4.0 * n * k * d, bytes=(k * d + 4.0 * n * d) * roofline._element_size(dtype))


# New keys only: the costs of the other families stay in roofline.py.
roofline.COSTS.update(swav_multicrop=_swav_multicrop_cost, ntxent_bank=_ntxent_bank_cost)


# --------------------------------------------------------------------------------------------
# Running one row
# --------------------------------------------------------------------------------------------

#: Rows that could not run, with the reason; written to the results JSON by conftest.py.
SKIPPED: List[Dict[str, object]] = []


class RowUnavailable(Exception):
    """This implementation cannot run this case here (the message says why)."""


def build_impl(family: Family, impl: str, case: Case, device: torch.device) -> Callable[..., Tensor]:
    """The callable timed for ``impl``; raises :class:`RowUnavailable` when it does not exist here."""
    if impl == "reference":
        return family.reference
    if impl == "reference-compiled":
        # A fresh cache per row: each case compiles for its own shapes, and recompile limits
        # reached by earlier rows cannot silently send this one back to eager.
        torch._dynamo.reset()
        return torch.compile(family.reference)
    if impl in ("fastssl-auto", "fastssl-torch", "fastssl-triton"):
        if impl == "fastssl-triton" and device.type != "cuda":
            raise RowUnavailable("fastssl-triton rows need a CUDA device")
        return functools.partial(family.fastssl, backend=impl.split("-")[1])
    if impl == "lightly":
        if family.lightly is None:
            raise RowUnavailable(f"lightly has no {family.name} loss")
        try:
            return family.lightly(case.shape, device)
        except ImportError as error:
            raise RowUnavailable(f"lightly cannot be loaded: {error}") from None
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLS_ALL}")


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _tensors(args) -> List[Tensor]:
    out: List[Tensor] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


def _step(fn: Callable[..., Tensor], args: tuple, backward: bool, device: torch.device) -> None:
    """One forward (+ backward); on CUDA waits for the device, so the host timer sees it all."""
    out = fn(*args)
    if backward:
        out.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _assert_finite(out: Tensor, args: tuple, backward: bool) -> None:
    """No row may time a computation gone to NaN: the result and every input gradient of the
    first call must be finite."""
    assert torch.isfinite(out).all(), "non-finite output on finite random inputs"
    if backward:
        for x in _tensors(args):
            if x.requires_grad:
                assert x.grad is not None, "an input that requires grad got no gradient"
                assert torch.isfinite(x.grad).all(), "non-finite input gradient"


def _measured_call(
    fn: Callable[..., Tensor], args: tuple, backward: bool, device: torch.device
) -> Tuple[int, str, float, Tensor]:
    """One call under the memory measure: (peak bytes, measure, seconds, detached result)."""
    results: List[Tensor] = []

    def call():
        out = fn(*args)
        if backward:
            out.backward()
        results.append(out.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    peak, method = memory.peak_memory_bytes(call, device)
    return peak, method, time.perf_counter() - start, results[0]


def _rounds(seconds_per_call: float, device: torch.device) -> int:
    budget = float(os.environ.get("FASTSSL_BENCH_SECONDS", "1.0" if device.type == "cuda" else "2.0"))
    fewest, most = (10, 200) if device.type == "cuda" else (3, 20)
    return max(fewest, min(most, int(budget / max(seconds_per_call, 1e-6))))


def _skip(case: Case, impl: str, reason: str) -> None:
    SKIPPED.append(
        {"loss": case.loss, "impl": impl, "dtype": case.dtype_name, "shape": case.shape, "reason": reason}
    )
    pytest.skip(reason)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(benchmark, case: Case, impl: str) -> None:
    """Time ``impl`` on ``case`` with pytest-benchmark's pedantic mode and fill ``extra_info``.

    Before timing (unless benchmarks are disabled, when it only runs once as a smoke test):
    one call under the memory measure (preceded, for ``reference-compiled`` and on CUDA, by a
    warm-up call), whose result and gradients must be finite and whose duration sets the number of
    rounds (about ``FASTSSL_BENCH_SECONDS`` of timing: 2 s on CPU, 1 s on CUDA by default). Out
    of memory, a failed compile or a failing lightly module skips the row with the reason;
    any other error fails it.
    """
    device = bench_device()
    family = FAMILIES[case.loss]
    benchmark.group = f"{case.loss} {case.label} {case.dtype_name}"
    benchmark.extra_info.update(
        loss=case.loss, impl=impl, dtype=case.dtype_name, shape=case.shape, device=device.type
    )
    try:
        fn = build_impl(family, impl, case, device)
    except RowUnavailable as error:
        _skip(case, impl, str(error))

    def setup():
        args = family.make_inputs(case.shape, case.dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return args, {}

    def target(*args):
        _step(fn, args, family.backward, device)

    try:
        rounds, warmup_rounds = 1, 0
        if not getattr(benchmark, "disabled", False):
            reason = None
            try:
                if impl == "reference-compiled" or device.type == "cuda":
                    # The first call compiles, and on CUDA creates the library workspaces that
                    # later calls reuse: neither belongs in the measured call.
                    _step(fn, setup()[0], family.backward, device)
                args = setup()[0]
                peak_bytes, method, seconds_per_call, out = _measured_call(fn, args, family.backward, device)
                _assert_finite(out, args, family.backward)
                del args, out
            except Exception as error:  # noqa: BLE001 - sorted below; real failures re-raised
                if _is_out_of_memory(error):
                    reason = f"out of memory: {_first_line(error)}"
                elif impl == "reference-compiled" and not isinstance(error, AssertionError):
                    reason = f"torch.compile failed: {_first_line(error)}"
                elif impl == "lightly":
                    reason = f"lightly failed: {_first_line(error)}"
                else:
                    raise
            if reason is not None:
                _free(device)
                _skip(case, impl, reason)
            c = roofline.cost(case.loss, case.shape, case.dtype)
            matmul_rate = roofline.matmul_flops_per_s(device, case.dtype)
            copy_rate = roofline.copy_bytes_per_s(device)
            benchmark.extra_info.update(
                peak_mem_mb=peak_bytes / memory.MB,
                peak_mem_method=method,
                floor_ms=1e3 * roofline.floor_seconds(c, matmul_rate, copy_rate),
                flops=c.flops,
                min_bytes=c.bytes,
                matmul_tflops=matmul_rate / 1e12,
                copy_gbps=copy_rate / 1e9,
            )
            rounds = _rounds(seconds_per_call, device)
            warmup_rounds = 1 if seconds_per_call < 0.5 else 0
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    finally:
        if impl == "reference-compiled":
            torch._dynamo.reset()
        _free(device)


# --------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it or untracked,
    non-ignored files exist (read once per process, at the start of the run)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    status = _git("status", "--porcelain")
    return f"{head}-dirty" if status else head


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_LOAD_AT_START: List[float] = []


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def note_session_start() -> None:
    """Pin what the results must describe as it was when the run began: the commit, and the
    machine's load (other processes on a shared CPU slow every row)."""
    git_commit()
    _LOAD_AT_START[:] = [_load_average()]


def machine_info() -> Dict[str, object]:
    """What the results' ``machine_info`` gets beside pytest-benchmark's own fields."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "lightly": lightly_loader.lightly_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rates": roofline.measured_rates(),
        "load_average": [x for x in (*_LOAD_AT_START, _load_average()) if x is not None],
    }


# --------------------------------------------------------------------------------------------
# CPU comparison: each case in its own process, repetitions interleaved
# --------------------------------------------------------------------------------------------
#
# On a shared CPU the load drifts over minutes, and one process's allocator and thread-pool
# state carry over from row to row. ``compare`` therefore times every (case, implementation)
# in a fresh process, ``repetitions`` times, rotating the order of the implementations in each
# repetition, and reports the median over the processes of each process's median call.
#
#   python -m benchmarks._harness barlow_twins vicreg --repetitions 3 --seconds 3

#: The implementations compared: what a user gets by default (``backend="auto"``) and the others.
COMPARED = ("fastssl-auto", "reference", "reference-compiled", "lightly")


def register_all_families() -> None:
    """Import every ``benchmarks/test_bench_*.py``: the files that register their own families
    (and shapes, costs) into this module's tables do so on import."""
    import importlib

    for path in sorted(Path(__file__).parent.glob("test_bench_*.py")):
        importlib.import_module(f"benchmarks.{path.stem}")


def time_row(loss: str, case_index: int, impl: str, seconds: float, threads: int = 0) -> Dict[str, object]:
    """Time one implementation on one case in this process: a warm-up call (which compiles for
    ``reference-compiled``), then calls on fresh inputs for about ``seconds`` (3 to 30 calls).
    A call longer than a third of ``seconds`` (the textbook formulas at d = 8192 take tens of
    seconds on a CPU) is timed once after the warm-up. Returns the median and fastest call in
    seconds, or the reason the row cannot run. ``threads`` > 0 sets PyTorch's intra-op threads
    (1 on a machine shared with other jobs: two OpenMP threads that are descheduled in turn
    make every parallel elementwise op wait at its barrier, which measures the load, not the
    implementation)."""
    if threads > 0:
        torch.set_num_threads(threads)
    register_all_families()
    device = bench_device()
    case = cases(loss)[case_index]
    family = FAMILIES[loss]
    try:
        fn = build_impl(family, impl, case, device)
        warm_up = time.perf_counter()
        _step(fn, family.make_inputs(case.shape, case.dtype, device), family.backward, device)
        fewest = 3 if time.perf_counter() - warm_up < seconds / 3 else 1
    except RowUnavailable as error:
        return {"skipped": str(error)}
    except Exception as error:  # noqa: BLE001 - a row that cannot run is reported, not fatal
        return {"skipped": _first_line(error)}
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < fewest or (len(times) < 30 and time.perf_counter() - started < seconds):
        args = family.make_inputs(case.shape, case.dtype, device)
        begin = time.perf_counter()
        _step(fn, args, family.backward, device)
        times.append(time.perf_counter() - begin)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "calls": len(times)}


def _time_row_in_subprocess(loss: str, case_index: int, impl: str, seconds: float, threads: int) -> Dict[str, object]:
    import json
    import sys

    code = (
        "import json; from benchmarks._harness import time_row; "
        f"print(json.dumps(time_row({loss!r}, {case_index}, {impl!r}, {seconds}, {threads})))"
    )
    env = {key: value for key, value in os.environ.items() if key != "FASTSSL_BACKEND"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"skipped": f"process failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    losses: Sequence[str],
    impls: Sequence[str] = COMPARED,
    repetitions: int = 3,
    seconds: float = 3.0,
    only: Optional[str] = None,
    threads: int = 0,
) -> List[Dict[str, object]]:
    """Every case of ``losses`` (those whose name contains ``only``, when given) x ``impls``,
    one process per (case, implementation, repetition), the implementations' order rotated in
    each repetition. One result per case and implementation: the median over the repetitions of
    each process's median call. Each case's rows are printed as they complete."""
    results: List[Dict[str, object]] = []
    for loss in losses:
        for index, case in enumerate(cases(loss)):
            if only is not None and only not in str(case):
                continue
            samples: Dict[str, List[float]] = {impl: [] for impl in impls}
            skipped: Dict[str, str] = {}
            for repetition in range(repetitions):
                shift = repetition % len(impls)
                for impl in list(impls[shift:]) + list(impls[:shift]):
                    if impl in skipped:
                        continue
                    row = _time_row_in_subprocess(loss, index, impl, seconds, threads)
                    if "skipped" in row:
                        skipped[impl] = str(row["skipped"])
                    else:
                        samples[impl].append(float(row["median_s"]))  # type: ignore[arg-type]
            for impl in impls:
                values = sorted(samples[impl])
                print(f"{loss} {case} {impl}: {[round(1e3 * v, 1) for v in values]} ms {skipped.get(impl, '')}", flush=True)
                results.append({
                    "loss": loss, "case": str(case), "impl": impl,
                    "median_ms": 1e3 * values[len(values) // 2] if values else None,
                    "runs_ms": [round(1e3 * v, 2) for v in values],
                    "skipped": skipped.get(impl),
                })  # fmt: skip
    return results


def format_comparison(results: Sequence[Dict[str, object]], default: str = "fastssl-auto") -> str:
    """A markdown table: per case and implementation the median time and the default's speed-up
    over it (> 1: the default is faster)."""
    lines = ["| loss | case | implementation | median ms | runs ms | default's speed-up |", "|---|---|---|---|---|---|"]
    defaults = {(r["loss"], r["case"]): r["median_ms"] for r in results if r["impl"] == default}
    for r in results:
        base = defaults.get((r["loss"], r["case"]))
        if r["median_ms"] is None:
            lines.append(f"| {r['loss']} | {r['case']} | {r['impl']} | - | - | skipped: {r['skipped']} |")
            continue
        speedup = f"{r['median_ms'] / base:.2f}x" if base else "-"
        runs = ", ".join(f"{v:.1f}" for v in r["runs_ms"])  # type: ignore[union-attr]
        lines.append(f"| {r['loss']} | {r['case']} | {r['impl']} | {r['median_ms']:.1f} | {runs} | {speedup} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    # Run as a script this file is ``__main__``, while the bench files register their families
    # into ``benchmarks._harness``: use that module's tables and functions.
    from benchmarks import _harness as harness

    harness.register_all_families()
    harness.note_session_start()
    compare, format_comparison, machine_info = harness.compare, harness.format_comparison, harness.machine_info
    parser = argparse.ArgumentParser(description="Interleaved one-process-per-row CPU comparison")
    parser.add_argument("losses", nargs="+", choices=sorted(harness.FAMILIES))
    parser.add_argument("--impls", nargs="+", default=list(COMPARED))
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", help="only the cases whose name contains this, e.g. d=8192")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads per process (0: its default)")
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args()
    found = compare(options.losses, options.impls, options.repetitions, options.seconds, options.only, options.threads)
    print(format_comparison(found))
    if options.json:
        Path(options.json).write_text(json.dumps({"machine": machine_info(), "rows": found}, indent=1))
