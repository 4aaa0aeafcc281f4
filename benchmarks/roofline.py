r"""Roofline floors: the fewest FLOPs and bytes each loss needs for one forward + backward, and
the machine rates that turn them into a time.

The floor of a benchmark row is

.. math:: t_{floor} = \max\Big(\frac{F}{R_{mm}(\text{dtype})}, \frac{B}{R_{copy}}\Big)

with :math:`F` the matrix-product FLOPs and :math:`B` the bytes below, :math:`R_{mm}` the rate of
a large square ``torch.mm`` at the input dtype and :math:`R_{copy}` the bandwidth of a large
device-to-device ``copy_`` (bytes read + bytes written per second), both measured in the same run
on the same machine (:func:`matmul_flops_per_s`, :func:`copy_bytes_per_s`; cached per process).
A row's "% of floor" is ``floor / median``: 100 % means the implementation runs at the speed of
the hardware for the work the loss cannot avoid.

Counting rules (one place for every loss; ``s`` is the element size of the input dtype):

* FLOPs are those of the matrix products (2 per multiply-add). Element-wise work (exp, log,
  normalization, batch statistics) is O(inputs) and is charged through the bytes instead, so
  the floor ignores the special-function throughput (exp) that can matter for NT-Xent at small
  d. Symmetric products (Gram matrices) are counted as full products.
* Bytes are the unavoidable traffic of a fused implementation: every input read once and every
  input gradient written once. Intermediates (logits, correlation matrices, codes) are assumed to
  stay on chip; O(N) or O(d) vectors are ignored.
* Where the loss has two algorithms (Barlow Twins / VICReg: d×d correlation or N×N Gram
  matrices) the floor takes the cheaper one, as DESIGN §2 asks the torch path to.

Per loss (shapes as in the rows' ``extra_info["shape"]``):

``ntxent`` (n per view, d; M = 2n rows):
    forward logits :math:`S = ZZ^\top` is :math:`2M^2d`; backward :math:`dZ = (G + G^\top)Z/\tau`
    with :math:`G` the softmax-minus-target matrix is one more :math:`2M^2d`.
    F = 4M²d.  B = 2·M·d·s (read Z, write dZ).
``barlow_twins`` (n, d):
    cross path: :math:`C = \tilde A^\top\tilde B` (2nd²) and its two input gradients
    :math:`\tilde B\,G^\top`, :math:`\tilde A\,G` (2·2nd²): 6nd².
    Gram path, :math:`\|C\|_F^2 = \langle\tilde A\tilde A^\top, \tilde B\tilde B^\top\rangle/n^2`:
    two n×n Grams (2·2n²d) and the gradients :math:`G_B\tilde A`, :math:`G_A\tilde B` (2·2n²d): 8n²d.
    F = min(6nd², 8n²d).  B = 4·n·d·s (read both views, write both gradients).
``vicreg`` (n, d):
    per view the covariance :math:`Z_c^\top Z_c` (2nd²) and its gradient :math:`Z_c\,\mathrm{Cov}`
    (2nd²), or the same with the n×n Gram :math:`Z_cZ_c^\top` (2n²d + 2n²d); invariance and
    variance are element-wise.  F = 2 views · 4nd·min(n, d) = 8nd·min(n, d).  B = 4·n·d·s.
``swav`` (b, k; two high-resolution crops, no small crops):
    Sinkhorn and the swapped cross-entropies are element-wise.  F = 0.
    B = 2 crops · (read scores + write gradient) · b·k·s = 4·b·k·s.
``sinkhorn`` (b, k; forward only, codes carry no gradient):
    F = 0.  B = 2·b·k·s (read scores, write codes).
``dino`` (views = student views S, b, k; teacher views T = 2, DINO's global crops):
    the pair sum :math:`\sum_{t\ne s} P_t\cdot\log P_s` is the (T×S) product of
    (T, b·k)×(b·k, S): 2·T·S·b·k, and its gradient with respect to the S student views another
    2·T·S·b·k.  F = 4·T·S·b·k.  B = (T + 2S)·b·k·s (read teachers and students, write the
    students' gradients).
``wmse`` (d, w_size = w, sub_batches = m; two views):
    per view and sub-batch, forward: covariance :math:`X_c^\top X_c` (2wd²), Cholesky (d³/3),
    triangular solve of the w rows (wd²); backward: the solve's two products (wd² + 2wd²), the
    Cholesky backward (two triangular solves and a product, ≈ d³) and the covariance's
    (2wd²).  F = 2m · (8wd² + 4d³/3).  B = 2·(2·m·w)·d·s (read the input, write its gradient).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

#: DINO's teacher sees the two global crops; the benchmark's ``views`` are the student views.
DINO_TEACHER_VIEWS = 2


@dataclass(frozen=True)
class Cost:
    """Matrix-product FLOPs and unavoidable bytes of one forward + backward."""

    flops: float
    bytes: float


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ntxent_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    rows, d = 2 * shape["n"], shape["d"]
    return Cost(flops=4.0 * rows * rows * d, bytes=2.0 * rows * d * _element_size(dtype))


def barlow_twins_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    n, d = shape["n"], shape["d"]
    flops = min(6.0 * n * d * d, 8.0 * n * n * d)
    return Cost(flops=flops, bytes=4.0 * n * d * _element_size(dtype))


def vicreg_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    n, d = shape["n"], shape["d"]
    return Cost(flops=8.0 * n * d * min(n, d), bytes=4.0 * n * d * _element_size(dtype))


def swav_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    return Cost(flops=0.0, bytes=4.0 * shape["b"] * shape["k"] * _element_size(dtype))


def sinkhorn_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    return Cost(flops=0.0, bytes=2.0 * shape["b"] * shape["k"] * _element_size(dtype))


def dino_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    teachers, students = DINO_TEACHER_VIEWS, shape["views"]
    bk = shape["b"] * shape["k"]
    return Cost(
        flops=4.0 * teachers * students * bk,
        bytes=(teachers + 2.0 * students) * bk * _element_size(dtype),
    )


def wmse_cost(shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    d, w, m = shape["d"], shape["w_size"], shape["sub_batches"]
    blocks = 2 * m  # two views, each cut into m sub-batches
    flops = blocks * (8.0 * w * d * d + 4.0 * d**3 / 3.0)
    return Cost(flops=flops, bytes=2.0 * (2 * m * w) * d * _element_size(dtype))


COSTS: Dict[str, Callable[[Mapping[str, int], torch.dtype], Cost]] = {
    "ntxent": ntxent_cost,
    "barlow_twins": barlow_twins_cost,
    "vicreg": vicreg_cost,
    "swav": swav_cost,
    "sinkhorn": sinkhorn_cost,
    "dino": dino_cost,
    "wmse": wmse_cost,
}


def cost(loss: str, shape: Mapping[str, int], dtype: torch.dtype) -> Cost:
    """FLOPs and bytes of one forward + backward of ``loss`` at ``shape`` (see module docstring)."""
    try:
        return COSTS[loss](shape, dtype)
    except KeyError:
        raise ValueError(f"no roofline cost for loss {loss!r}; known: {sorted(COSTS)}") from None


def floor_seconds(c: Cost, matmul_flops_per_s: float, copy_bytes_per_s: float) -> float:
    """``max(FLOPs / matmul rate, bytes / copy bandwidth)``."""
    return max(c.flops / matmul_flops_per_s, c.bytes / copy_bytes_per_s)


# --------------------------------------------------------------------------------------------
# Machine rates, measured once per process and device
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up: the rate the hardware can reach."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    if device.type == "cuda":
        return 8192
    # CPU: big enough to leave the cache-bound regime, small enough for a second of measuring.
    return 2048 if dtype in (torch.float32, torch.float64) else 1024


# Rates measured at the default sizes, per (device, dtype) and per device: one measurement per
# process, shared by every benchmark row (and reported in the machine info).
_MATMUL_FLOPS_PER_S: Dict[Tuple[str, str], float] = {}
_COPY_BYTES_PER_S: Dict[str, float] = {}


def matmul_flops_per_s(
    device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 5
) -> float:
    """FLOP/s of a square ``torch.mm`` with PyTorch's default precision settings (so float32 on
    CUDA is IEEE float32 unless the process enabled TF32). Cached unless ``size`` is given."""
    key = (str(device), _dtype_name(dtype))
    if size is None and key in _MATMUL_FLOPS_PER_S:
        return _MATMUL_FLOPS_PER_S[key]
    n = size or default_matmul_size(device, dtype)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    rate = 2.0 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats)
    if size is None:
        _MATMUL_FLOPS_PER_S[key] = rate
    return rate


def copy_bytes_per_s(device: torch.device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Bytes per second (read + written) of a device-to-device ``copy_`` of ``nbytes`` (default
    1 GiB on CUDA, 256 MiB on CPU: far beyond the caches). Cached unless ``nbytes`` is given."""
    key = str(device)
    if nbytes is None and key in _COPY_BYTES_PER_S:
        return _COPY_BYTES_PER_S[key]
    size = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    rate = 2.0 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), device, repeats)
    if nbytes is None:
        _COPY_BYTES_PER_S[key] = rate
    return rate


def measured_rates() -> Dict[str, Dict[str, float]]:
    """The rates measured so far in this process, for the results' machine info:
    ``{"matmul_tflops": {"<device> <dtype>": ...}, "copy_gbps": {"<device>": ...}}``."""
    return {
        "matmul_tflops": {f"{dev} {dt}": rate / 1e12 for (dev, dt), rate in _MATMUL_FLOPS_PER_S.items()},
        "copy_gbps": {dev: rate / 1e9 for dev, rate in _COPY_BYTES_PER_S.items()},
    }
