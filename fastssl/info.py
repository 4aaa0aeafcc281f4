"""``python -m fastssl.info``: what runs here, and does it give the right numbers?

Prints the versions (Python, torch, Triton, CUDA, GPUs), which backend ``backend="auto"`` picks
for each loss family on each available device and why, and whether the W-MSE CUDA extension
builds. With ``--check`` it also runs every available backend of every loss on small random
inputs on each device, forward and backward, against the float64 reference, and prints a
pass/fail table — the first thing to run on a new GPU machine or to paste into a bug report.

    python -m fastssl.info            # environment and dispatch
    python -m fastssl.info --check    # + correctness of every backend (exit status 1 on a failure)

Without CUDA, Triton kernels are checked through the Triton interpreter (``TRITON_INTERPRET=1``,
set here before any kernel is imported) on CPU tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Kernels decide at import whether they are interpreted: set it before any is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import fastssl  # noqa: E402
import fastssl.functional  # noqa: E402
from fastssl import _backend  # noqa: E402

Tensor = torch.Tensor


@dataclass(frozen=True)
class Family:
    """A loss family: its losses, and where its fused implementation lives."""

    name: str
    losses: str
    kernel: Optional[str]  # module with the fused implementation, None when there is none
    kernel_kind: str = "triton"


FAMILIES: Tuple[Family, ...] = (
    Family("ntxent", "NTXentLoss, MoCo InfoNCE, uniformity", "fastssl.kernels.ntxent"),
    Family("decorrelation", "BarlowTwinsLoss, VICRegLoss", "fastssl.kernels.decorrelation"),
    Family("swav", "SwaVLoss, sinkhorn", "fastssl.kernels.sinkhorn"),
    Family("dino", "DINOLoss", "fastssl.kernels.dino"),
    Family("wmse", "WMSELoss (Cholesky whitening)", "fastssl.kernels.wmse_cuda", kernel_kind="cuda-c++"),
    Family("predictive", "NegativeCosineSimilarity, BYOL, CenterPenaltyLoss", None),
)


def versions() -> Dict[str, str]:
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastssl": getattr(fastssl, "__version__", "?"),
        "torch": torch.__version__,
        "cuda (torch build)": str(torch.version.cuda),
        "cuda available": str(torch.cuda.is_available()),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    out["FASTSSL_BACKEND"] = os.environ.get(_backend.ENV_VAR, "") or "(unset: auto)"
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out[f"gpu {index}"] = f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    return out


def devices() -> List[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def explain_auto(family: Family, device: torch.device) -> Tuple[str, str]:
    """(backend that ``auto`` picks for float32/16/bf16 inputs on ``device``, the reason)."""
    env = os.environ.get(_backend.ENV_VAR, "").strip().lower()
    if env and env != "auto":
        return env, f"{_backend.ENV_VAR}={env} replaces auto"
    if family.kernel is None:
        return "torch", "no fused kernel: the work is O(N·d) and bandwidth-bound in PyTorch already"
    if device.type != "cuda":
        return "torch", f"{device.type} tensors: the fused kernels run on CUDA (the interpreter only when asked for backend='triton')"
    if family.kernel_kind == "cuda-c++":
        from fastssl.kernels import wmse_cuda

        ext = wmse_cuda.load_extension()
        if ext is None:
            return "torch", "the CUDA extension does not build here (see the warning above)"
        return "cuda-c++", "CUDA tensors, extension built (float64, ZCA and d > 256 take the torch path)"
    if not _backend.triton_available():
        return "torch", "Triton is not installed (pip install 'fastssl-kernels[triton]' or a CUDA build of torch)"
    return "triton", "CUDA tensors and Triton installed (float64 inputs take the torch path)"


# ---------------------------------------------------------------------------------------------
# --check: each loss, each backend, against the float64 reference
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One loss on small random inputs: ``make(generator)`` gives float64 CPU inputs and
    ``run(inputs, backend)`` computes the loss."""

    name: str
    family: str
    make: Callable[[torch.Generator], List[Tensor]]
    run: Callable[[List[Tensor], str], Tensor]


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _cosines(g: torch.Generator, *shape: int) -> Tensor:
    # SwAV scores are cosines between normalized embeddings and prototypes: in [-1, 1].
    return torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1


def _cases() -> List[Case]:
    F = fastssl.functional
    cases = [
        Case("ntxent", "ntxent", lambda g: [_randn(g, 9, 17), _randn(g, 9, 17)],
             lambda x, b: F.ntxent_loss(x[0], x[1], 0.5, backend=b)),
        Case("infonce (MoCo bank)", "ntxent", lambda g: [_randn(g, 6, 16), _randn(g, 6, 16), _randn(g, 33, 16)],
             lambda x, b: F.infonce_loss(x[0], x[1], x[2], 0.2, backend=b)),
        Case("barlow_twins", "decorrelation", lambda g: [_randn(g, 10, 24), _randn(g, 10, 24)],
             lambda x, b: F.barlow_twins_loss(x[0], x[1], 5e-3, backend=b)),
        Case("vicreg", "decorrelation", lambda g: [_randn(g, 10, 24), _randn(g, 10, 24)],
             lambda x, b: F.vicreg_loss(x[0], x[1], backend=b)),
        Case("swav", "swav", lambda g: [_cosines(g, 12, 7), _cosines(g, 12, 7), _cosines(g, 12, 7)],
             lambda x, b: F.swav_loss([x[0], x[1]], [x[2]], backend=b)),
        Case("dino", "dino", lambda g: [_randn(g, 5, 32), _randn(g, 5, 32), _randn(g, 5, 32), _randn(g, 5, 32)],
             lambda x, b: F.dino_loss([x[0], x[1]], [x[2], x[3]], 0.1 * x[0].detach()[0], 0.04, 0.1, backend=b)),
        Case("wmse", "wmse", lambda g: [_randn(g, 32, 8)],
             lambda x, b: F.wmse_loss(x[0], num_samples=2, w_size=16, permutations=[torch.arange(16).flip(0)], backend=b)),
        Case("negative_cosine_similarity", "predictive", lambda g: [_randn(g, 7, 5), _randn(g, 7, 5)],
             lambda x, b: F.negative_cosine_similarity(x[0], x[1], backend=b)),
    ]
    return cases


def _backends_for(family: Family, device: torch.device) -> List[str]:
    backends = ["reference", "torch"]
    if family.kernel is not None and family.kernel_kind == "triton" and _backend.triton_available():
        if device.type == "cuda" or _backend.triton_interpreter_enabled():
            backends.append("triton")
    return backends


def _relative_error(got: Optional[Tensor], want: Optional[Tensor]) -> float:
    if want is None:  # an input the loss does not differentiate (e.g. a memory bank)
        return 0.0
    if got is None:
        return float("inf")
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check(device_list: Sequence[torch.device], dtypes: Sequence[torch.dtype], out=sys.stdout) -> int:
    """Run every case; print one row per (loss, device, dtype, backend). Returns the failures."""
    families = {f.name: f for f in FAMILIES}
    tolerance = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
    failures = 0
    header = f"{'loss':28s} {'device':6s} {'dtype':9s} {'backend':10s} {'loss err':>9s} {'grad err':>9s} {'ms':>7s}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    for case in _cases():
        g = torch.Generator().manual_seed(0)
        base = case.make(g)
        oracle_inputs = [x.clone().requires_grad_(True) for x in base]
        oracle = case.run(oracle_inputs, "reference")
        oracle.backward()
        oracle_grads = [x.grad for x in oracle_inputs]
        for device in device_list:
            for dtype in dtypes:
                for backend in _backends_for(families[case.family], device):
                    inputs = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in base]
                    start = time.perf_counter()
                    try:
                        loss = case.run(inputs, backend)
                        loss.backward()
                        error = None
                    except Exception as exc:  # report, do not stop the table
                        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:80]
                    millis = 1e3 * (time.perf_counter() - start)
                    if error is None:
                        loss_err = _relative_error(loss, oracle)
                        grad_err = max(_relative_error(x.grad, w) for x, w in zip(inputs, oracle_grads))
                        ok = loss_err <= tolerance[dtype] and grad_err <= tolerance[dtype]
                        result = "ok" if ok else f"FAIL (tolerance {tolerance[dtype]:g})"
                        row = f"{loss_err:9.2e} {grad_err:9.2e}"
                    else:
                        ok, result, row = False, f"ERROR {error}", f"{'-':>9s} {'-':>9s}"
                    failures += not ok
                    print(f"{case.name:28s} {device.type:6s} {str(dtype).removeprefix('torch.'):9s} {backend:10s} {row} {millis:7.1f}  {result}", file=out)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastssl.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run every backend of every loss against the reference")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes for --check (comma-separated)")
    args = parser.parse_args(argv)

    print("fastssl environment")
    for key, value in versions().items():
        print(f"  {key:20s} {value}")
    print("\nbackend='auto' per loss family")
    for device in devices():
        for family in FAMILIES:
            try:
                chosen, why = explain_auto(family, device)
            except Exception as exc:  # an extension build that raises still gets a row
                chosen, why = "torch", f"{type(exc).__name__}: {exc}"
            print(f"  {device.type:5s} {family.name:14s} -> {chosen:9s} {why}")
    if torch.cuda.is_available():
        from fastssl.kernels import wmse_cuda

        print(f"\nW-MSE CUDA extension: {'built' if wmse_cuda.load_extension() is not None else 'not available (torch path)'}")
    else:
        print("\nW-MSE CUDA extension: not built (no CUDA device)")
    if not args.check:
        return 0
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    print()
    try:
        failures = check(devices(), dtypes)
    except Exception:
        traceback.print_exc()
        return 2
    print(f"\n{'all backends agree with the reference' if failures == 0 else f'{failures} failure(s)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
