"""Triton Sinkhorn-Knopp and the fused swapped-prediction loss against the reference: CPU
tensors through the interpreter, CUDA tensors compiled (``gpu`` lane).

Every buffer the kernels fill is allocated NaN-poisoned, so an element left unwritten shows up
in the compared outputs. Three launch configurations: the resident kernel (the whole matrix in
one program), the tiled sweeps split over the reduced axis, and the tiled sweeps with tiny tiles
(multi-tile loops, partial tiles and split combinations on small inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastssl
import fastssl.functional as FS
from fastssl import reference
from fastssl.kernels import sinkhorn as kernels

from _helpers import TRITON_DEVICES, assert_matches_reference, awkward_inputs, poisoned
from test_swav import SWAV_CASES, _assert_close, _swav_fns, log_domain_sinkhorn_oracle, swav_loss_with_codes

CONFIGS = ["resident", "split", "tiny_tiles"]


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    monkeypatch.setattr(kernels, "_new_buffer", lambda shape, dtype, device: poisoned(shape, dtype, device))


def _configure(monkeypatch, config: str) -> None:
    if config != "resident":
        monkeypatch.setattr(kernels, "_RESIDENT_ELEMENTS", 0)
    if config == "tiny_tiles":
        monkeypatch.setattr(kernels, "_TILE_ELEMENTS", 32)
        monkeypatch.setattr(kernels, "_TILE_CONTIGUOUS", 8)


def _scores(b, k, device, dtype=torch.float32, non_contiguous=False, scale=1.0):
    x = awkward_inputs(b, k, views=1, non_contiguous=non_contiguous)[0] * scale
    return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "config,b,k",
    [(c, b, k) for c in ["resident", "split"] for b, k in [(1, 1), (3, 129), (127, 3)]] + [("tiny_tiles", 13, 19)],
)
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_triton_matches_reference(device, config, b, k, iterations, monkeypatch):
    _configure(monkeypatch, config)
    scores = _scores(b, k, device, non_contiguous=(b == 3))
    codes = FS.sinkhorn(scores, iterations, 0.05, backend="triton")
    assert codes.dtype == torch.float32 and codes.shape == (b, k) and codes.device == scores.device
    assert torch.isfinite(codes).all()
    _assert_close(codes.cpu(), reference.sinkhorn(scores.double().cpu(), iterations, 0.05))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("iterations", [0, 3])
def test_sinkhorn_triton_extreme_scores(device, config, iterations, monkeypatch):
    _configure(monkeypatch, config)
    epsilon = 0.05
    scores = torch.randn(9) * 500 * epsilon + torch.randn(12, 9) * 3 * epsilon
    with torch.no_grad():
        assert not torch.isfinite(reference.sinkhorn(scores, iterations, epsilon)).all()
    codes = FS.sinkhorn(scores.to(device), iterations, epsilon, backend="triton").cpu()
    assert torch.isfinite(codes).all()
    _assert_close(codes, log_domain_sinkhorn_oracle(scores, iterations, epsilon), rtol=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sinkhorn_triton_half_inputs(device, dtype):
    scores = _scores(16, 7, device, dtype=dtype)
    codes = FS.sinkhorn(scores, 3, 0.05, backend="triton")
    assert codes.dtype == torch.float32
    _assert_close(codes.cpu(), reference.sinkhorn(scores.double().cpu(), 3, 0.05))


# --------------------------------------------------------------------------------------------
# Swapped-prediction loss
# --------------------------------------------------------------------------------------------

# Every loss case on the resident kernel, a few on the tiled sweeps (split and tiny tiles).
_LOSS_CASES = [("resident", *case) for case in SWAV_CASES] + [
    ("split", 2, 3, 5, 6, 7, 3),
    ("tiny_tiles", 2, 3, 5, 6, 7, 3),
    ("tiny_tiles", 2, 1, 3, 5, 3, 0),
    ("tiny_tiles", 3, 0, 0, 6, 10, 1),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("config,n_high,n_low,queue_rows,b,k,iterations", _LOSS_CASES)
def test_swav_triton_matches_reference(device, config, n_high, n_low, queue_rows, b, k, iterations, monkeypatch):
    _configure(monkeypatch, config)
    crops = [_scores(b, k, device, non_contiguous=(v == 1)) for v in range(n_high + n_low)]
    queue = None if queue_rows == 0 else [_scores(queue_rows, k, device) for _ in range(n_high)]
    impl, ref = _swav_fns(n_high, queue, 0.1, iterations, 0.05, "triton")
    assert_matches_reference(impl, ref, crops)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("config", ["resident", "split"])
def test_swav_triton_other_dtypes(device, dtype, config, monkeypatch):
    _configure(monkeypatch, config)
    # Mild scores so that the reference run at half precision (PyTorch's own error) is finite.
    scale, epsilon = (0.5, 0.5) if dtype == torch.float16 else (0.3, 0.05)
    crops = [_scores(5, 7, device, dtype=dtype, scale=scale, non_contiguous=(v == 0)) for v in range(4)]
    queue = [_scores(3, 7, device, dtype=dtype, scale=scale) for _ in range(2)]
    impl, ref = _swav_fns(2, queue, 0.1, 3, epsilon, "triton")
    assert_matches_reference(impl, ref, crops)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
def test_swav_triton_extreme_scores(device, config, monkeypatch):
    _configure(monkeypatch, config)
    epsilon, temperature = 0.05, 0.1
    offsets = torch.randn(6) * 500 * epsilon
    crops = [(offsets + torch.randn(8, 6) * 3 * epsilon) for _ in range(3)]
    with torch.no_grad():
        assert not torch.isfinite(reference.swav_loss(crops[:2], crops[2:], None, temperature, 3, epsilon))
    leaves = [c.to(device).requires_grad_(True) for c in crops]
    loss = FS.swav_loss(leaves[:2], leaves[2:], None, temperature, 3, epsilon, backend="triton")
    grads = torch.autograd.grad(loss, leaves)
    exact_crops = [c.double().requires_grad_(True) for c in crops]
    codes = [log_domain_sinkhorn_oracle(c.detach(), 3, epsilon) for c in exact_crops[:2]]
    exact = swav_loss_with_codes(exact_crops, 2, codes, temperature)
    exact_grads = torch.autograd.grad(exact, exact_crops)
    assert torch.isfinite(loss)
    _assert_close(loss.cpu(), exact, rtol=1e-4)
    for g, g_exact in zip(grads, exact_grads):
        assert torch.isfinite(g).all()
        _assert_close(g.cpu(), g_exact, rtol=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_swav_triton_gradient_only_where_needed_and_no_grad_forward(device):
    crops = [_scores(4, 5, device) for _ in range(3)]
    crops[2].requires_grad_(True)
    loss = FS.swav_loss(crops[:2], crops[2:], backend="triton")
    (grad,) = torch.autograd.grad(loss, [crops[2]])
    exact = [c.detach().double().cpu().requires_grad_(v == 2) for v, c in enumerate(crops)]
    exact_loss = reference.swav_loss(exact[:2], exact[2:])
    (grad_exact,) = torch.autograd.grad(exact_loss, [exact[2]])
    _assert_close(grad.cpu(), grad_exact)
    with torch.no_grad():
        value = FS.swav_loss(crops[:2], crops[2:], backend="triton")
    assert value.item() == pytest.approx(exact_loss.item(), rel=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_swav_triton_agrees_with_the_torch_backend_on_chunks_of_one_tensor(device):
    # Crops that are chunks of one output tensor: views of one storage, read in place.
    scores = torch.randn(5 * 6, 11, device=device, requires_grad=True)
    crops = list(scores.chunk(5))
    values = [FS.swav_loss(crops[:2], crops[2:], backend=b) for b in ["triton", "torch"]]
    grads = [torch.autograd.grad(v, scores)[0] for v in values]
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-5)
    _assert_close(grads[0].cpu(), grads[1].cpu())


def test_prepare_views_reads_views_in_place():
    """Views travel as pointer arguments: no copy unless the dtype, the K stride or the row
    stride forces one; chunks of one tensor are addressed as base + v * view_stride."""
    from fastssl.kernels._common import MAX_VIEWS, prepare_views

    separate = [torch.randn(4, 32) for _ in range(3)]
    views = prepare_views(separate, torch.float32)
    assert [t.data_ptr() for t in views.tensors] == [t.data_ptr() for t in separate]
    assert [p.data_ptr() for p in views.pointers[:3]] == [t.data_ptr() for t in separate]
    assert len(views.pointers) == MAX_VIEWS and not views.uniform and views.n_views == 3
    assert views.stride_units * views.row_align == 32 and views.row_align == 4
    chunks = list(torch.randn(12, 32).chunk(3))
    views = prepare_views(chunks, torch.float32)
    assert views.uniform and views.view_stride == 4 * 32
    assert [t.data_ptr() for t in views.tensors] == [c.data_ptr() for c in chunks]
    # A strided K axis or another dtype is copied; an odd row stride clears the alignment.
    strided = torch.randn(4, 10)[:, ::2]
    views = prepare_views([strided, chunks[0][:, :5]], torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 and t.stride(1) == 1 for t in views.tensors)
    assert torch.equal(views.tensors[0], strided.bfloat16())
    odd_rows = [torch.randn(4, 7)[:, :5] for _ in range(2)]
    views = prepare_views(odd_rows, torch.float32)
    assert [t.data_ptr() for t in views.tensors] == [t.data_ptr() for t in odd_rows]
    assert views.row_align * views.stride_units == 7 and views.row_align == 1
    # Views with different row strides are made contiguous (one row stride per group).
    views = prepare_views([odd_rows[0], separate[0][:, :5]], torch.float32)
    assert [t.stride(0) for t in views.tensors] == [5, 5] and views.stride_units * views.row_align == 5
    assert torch.equal(views.tensors[0], odd_rows[0]) and torch.equal(views.tensors[1], separate[0][:, :5])
    # More views than pointer slots: stacked once, then addressed uniformly.
    many = [torch.randn(2, 8) for _ in range(MAX_VIEWS + 1)]
    views = prepare_views(many, torch.float32)
    assert views.uniform and views.n_views == MAX_VIEWS + 1
    assert all(torch.equal(a, b) for a, b in zip(views.tensors, many))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("config", ["resident", "split"])
def test_swav_triton_non_finite_scores_give_nan(device, bad, config, monkeypatch):
    _configure(monkeypatch, config)
    crops = [_scores(6, 5, device) for _ in range(3)]
    crops[0][2, 3] = bad
    assert not torch.isfinite(FS.swav_loss(crops[:2], crops[2:], backend="triton"))
    assert not torch.isfinite(FS.sinkhorn(crops[0], 3, 0.05, backend="triton")).all()


# --------------------------------------------------------------------------------------------
# Compiled-mode check without a GPU
# --------------------------------------------------------------------------------------------
#
# The interpreter accepts code that the compiler rejects (e.g. a method call on an int argument
# that a launch specializes to the constant 1). Triton ships LLVM and ptxas, so the kernels can be
# compiled for sm_90 on a CPU machine, with the specializations a launch produces. This runs in a
# subprocess: with TRITON_INTERPRET=1 (set by conftest) Triton's own library functions are
# interpreter objects that the compiler cannot call.

_COMPILE_SCRIPT = r"""
import importlib, inspect, json, os, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert "nvidia" in triton.backends.backends
    assert "constexprs" in inspect.signature(ASTSource).parameters
except Exception as e:
    print("unsupported:", repr(e))
    sys.exit(77)
FLOATS = {"scale", "inv_temperature", "inv_epsilon", "grad_scale", "inv_teacher_temp", "inv_student_temp", "inv_normalizer"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
failures = []
for module_name, kernel_name, types, constexprs, num_warps in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module_name), kernel_name)
    params = list(inspect.signature(kernel.fn).parameters)
    def kind(p):
        if p in constexprs:
            return "constexpr"
        if p in types:
            return types[p]
        return "*fp32" if p.endswith("_ptr") else "fp32" if p in FLOATS else "i32"
    signature = {p: kind(p) for p in params}
    # Triton dtypes travel as strings ("tl.bfloat16").
    values = {p: getattr(triton.language, v[3:]) if isinstance(v, str) else v for p, v in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(p),): v for p, v in values.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as e:
        failures.append(f"{kernel_name} {constexprs}: {type(e).__name__}: {str(e)[:3000]}")
        continue
    # Register spills show as a stack frame in the cubin's resource usage (ptxas -v's figure).
    if os.path.exists(CUOBJDUMP):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        if "STACK:" in usage and int(usage.split("STACK:")[1].split()[0]) > 0:
            failures.append(f"{kernel_name} {constexprs}: register spills ({usage.strip()[:300]})")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def compile_for_sm90(specs) -> None:
    """Compile ``(module, kernel, {param: type}, {param: constexpr value}, num_warps)`` specs for
    sm_90 in a subprocess without the interpreter, and check that none spills registers; skips
    where this Triton cannot."""
    if torch.cuda.is_available():
        pytest.skip("the gpu lane compiles and runs the kernels on the device")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(specs)],
        env=env, cwd=repo, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


_MODULE = "fastssl.kernels.sinkhorn"


def _views(prefix: str, dtype: str) -> dict:
    """Types of a view group's 16 pointer arguments."""
    return {f"{prefix}{i}": dtype for i in range(16)}


_P_BF16 = _views("p", "*bf16")
_P_FP16 = _views("p", "*fp16")
_BF16 = {"P_VIEWS": 2, "P_UNIFORM": False, "P_ROW_ALIGN": 8, "K_ALIGN": 16}
_FP16 = {"P_VIEWS": 1, "P_UNIFORM": True, "P_ROW_ALIGN": 1, "K_ALIGN": 1}
_C_BF16 = {"C_VIEWS": 3, "C_UNIFORM": False, "C_ROW_ALIGN": 8, "K_ALIGN": 16, "TEMPERATURE_TENSOR": False, "TEMPERATURE_GRAD": False}
_C_FP16 = {"C_VIEWS": 2, "C_UNIFORM": True, "C_ROW_ALIGN": 1, "K_ALIGN": 1, "TEMPERATURE_TENSOR": False, "TEMPERATURE_GRAD": False}
# A learnable temperature: read from its 0-d tensor, with the ∂L/∂τ partials.
_C_LEARNED = {"TEMPERATURE_TENSOR": True, "TEMPERATURE_GRAD": True}
SINKHORN_COMPILE_SPECS = [
    (_MODULE, "_partial_lse_kernel", _P_BF16, {**_BF16, "REDUCE_ROWS": True, "HAS_POTENTIAL": True, "BLOCK_KEEP": 128, "BLOCK_REDUCE": 32}, 4),
    (_MODULE, "_partial_lse_kernel", {**_P_FP16, "p_view_stride": "i64"}, {**_FP16, "REDUCE_ROWS": False, "HAS_POTENTIAL": False, "BLOCK_KEEP": 8, "BLOCK_REDUCE": 512, "n_rows": 1}, 4),
    (_MODULE, "_codes_kernel", _P_BF16, {**_BF16, "BLOCK_ROWS": 8, "BLOCK_PROTO": 512, "n_problems": 1}, 4),
    (_MODULE, "_sinkhorn_resident_kernel", _P_FP16, {**_FP16, "BLOCK_SAMPLES": 128, "BLOCK_PROTO": 128, "iterations": 1}, 8),
    (_MODULE, "_swav_ce_kernel", {**_views("c", "*bf16"), "grad_ptr": "*bf16"}, {**_C_BF16, "UNIT_ROW_SUMS": True, "COMPUTE_GRAD": True, "BLOCK_ROWS": 4, "BLOCK_PROTO": 1024, "n_rows": 1, "n_high": 1}, 4),
    (_MODULE, "_swav_ce_kernel", _views("c", "*fp16"), {**_C_FP16, "UNIT_ROW_SUMS": False, "COMPUTE_GRAD": False, "BLOCK_ROWS": 1, "BLOCK_PROTO": 16}, 4),
    # K = 16: k_units = 1 arrives as a constant.
    (_MODULE, "_partial_lse_kernel", _P_BF16, {**_BF16, "REDUCE_ROWS": True, "HAS_POTENTIAL": False, "BLOCK_KEEP": 16, "BLOCK_REDUCE": 32, "k_units": 1}, 4),
    (_MODULE, "_swav_ce_kernel", _views("c", "*bf16"), {**_C_BF16, "UNIT_ROW_SUMS": True, "COMPUTE_GRAD": True, "BLOCK_ROWS": 4, "BLOCK_PROTO": 16, "k_units": 1}, 4),
    (_MODULE, "_swav_ce_kernel", {**_views("c", "*bf16"), "grad_ptr": "*bf16"}, {**_C_BF16, **_C_LEARNED, "UNIT_ROW_SUMS": True, "COMPUTE_GRAD": True, "BLOCK_ROWS": 4, "BLOCK_PROTO": 1024}, 4),
    (_MODULE, "_swav_ce_kernel", _views("c", "*fp32"), {**_C_FP16, **_C_LEARNED, "UNIT_ROW_SUMS": False, "COMPUTE_GRAD": False, "BLOCK_ROWS": 8, "BLOCK_PROTO": 512}, 4),
]  # fmt: skip


@pytest.mark.slow
def test_sinkhorn_kernels_compile_for_sm90():
    compile_for_sm90(SINKHORN_COMPILE_SPECS)


# --------------------------------------------------------------------------------------------
# Custom ops, eager ops around the kernels, fallback, CUDA graphs
# --------------------------------------------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastssl.kernels import _common  # noqa: E402


class EagerOpCounter(TorchDispatchMode):
    """Records every dispatched PyTorch op (allocations and views included), looking inside
    fastssl's custom ops: their Python implementations run under the counter, so the ops they
    issue around the kernel launches are counted too (a Triton launch is no PyTorch op)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        from fastssl.kernels import dino

        self.implementations = {
            "fastssl::swav": kernels._swav_forward,
            "fastssl::sinkhorn": kernels._sinkhorn_forward,
            "fastssl::dino": dino._dino_forward,
            "fastssl::scale_saved_gradient": _common._scale_gradient,
        }

    def __enter__(self):
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > 1:  # re-entered to run a custom op's implementation
            return super().__enter__()
        # The Triton interpreter stages every launch's tensors with PyTorch ops of its own; a
        # compiled launch issues none, so they are not counted.
        from triton.runtime import interpreter

        self._interpreter = interpreter
        self._run_grid = interpreter.GridExecutor.__call__
        self._paused = False
        counter = self

        def run_grid(executor, *args, **kwargs):
            counter._paused = True
            try:
                return counter._run_grid(executor, *args, **kwargs)
            finally:
                counter._paused = False

        interpreter.GridExecutor.__call__ = run_grid
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._interpreter.GridExecutor.__call__ = self._run_grid
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._paused:
            return func(*args, **(kwargs or {}))
        implementation = self.implementations.get(func._schema.name)
        if implementation is not None:
            with self:
                return implementation(*args, **(kwargs or {}))
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


EAGER_OP_BUDGET = 16  # per forward + backward (DESIGN §5)


@pytest.mark.parametrize("config", ["resident", "split"])
@pytest.mark.parametrize("queue_rows", [0, 4])
def test_swav_triton_eager_ops_per_step_within_budget(config, queue_rows, monkeypatch):
    _configure(monkeypatch, config)
    crops = [torch.randn(6, 9, requires_grad=True) for _ in range(4)]
    queue = None if queue_rows == 0 else [torch.randn(queue_rows, 9) for _ in range(2)]
    with EagerOpCounter() as counter:
        loss = FS.swav_loss(crops[:2], crops[2:], queue, backend="triton")
        grads = torch.autograd.grad(loss, crops)
    assert all(g is not None and g.shape == (6, 9) for g in grads)
    assert len(counter.ops) <= EAGER_OP_BUDGET + 2 * (queue_rows > 0), counter.ops  # + the H queue concatenations
    # Nothing that synchronizes with the host or copies from it.
    assert not any(name in op for op in counter.ops for name in ("_local_scalar_dense", "nonzero", "lift_fresh")), counter.ops


def test_swav_and_sinkhorn_triton_compile_fullgraph_with_aot_eager():
    """The kernels are custom ops: Dynamo records each as one node (no graph break); aot_eager
    runs their fake functions and the registered backward."""
    torch._dynamo.reset()
    projection = torch.nn.Linear(8, 7)
    swav = fastssl.SwaVLoss(backend="triton")

    def step(x0, x1, x2):
        scores = [projection(x) for x in (x0, x1, x2)]
        codes = FS.sinkhorn(scores[0], 3, 0.05, backend="triton")
        return swav(scores[:2], scores[2:]) + codes.sum() * 0

    inputs = [torch.randn(5, 8) for _ in range(3)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, list(projection.parameters()))
    expected = step(*inputs)
    expected_grads = torch.autograd.grad(expected, list(projection.parameters()))
    torch.testing.assert_close(value, expected)
    for g, g_expected in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_expected)


def test_swav_auto_falls_back_to_torch_when_a_kernel_fails(monkeypatch):
    """Under "auto" a failing launch warns once, naming the kernel, and the torch path answers;
    an explicit backend="triton" raises."""
    from fastssl import _backend, swav

    def failing_launch(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(kernels, "sum_to_scalar_kernel", {(1,): failing_launch})
    monkeypatch.setattr(kernels, "_codes_kernel", type("Failing", (), {"__getitem__": lambda self, grid: failing_launch})())
    crops = [torch.randn(4, 5) for _ in range(3)]
    expected = FS.swav_loss(crops[:2], crops[2:], backend="torch")
    monkeypatch.setattr(swav, "resolve_backend", lambda backend, tensor, *a: "triton")  # as for CUDA tensors
    monkeypatch.setattr(_backend, "_FALLBACK_WARNED", set())
    with pytest.warns(RuntimeWarning, match="swav.*simulated launch failure"):
        value = FS.swav_loss(crops[:2], crops[2:], backend="auto")
    torch.testing.assert_close(value, expected)
    with pytest.warns(RuntimeWarning, match="sinkhorn"):
        FS.sinkhorn(crops[0], backend="auto")
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        FS.swav_loss(crops[:2], crops[2:], backend="triton")


@pytest.mark.gpu
def test_swav_training_step_captures_in_a_cuda_graph():
    """One training step (forward, backward, optimizer step) replays from a CUDA graph: no host
    synchronization or host-to-device copy on the path."""
    capture_training_step(lambda outputs: fastssl.SwaVLoss(backend="triton")(outputs[:2], outputs[2:]), views=4)


def capture_training_step(loss_of_outputs, views: int, rows: int = 64, dim: int = 32, k: int = 300) -> None:
    """Capture ``loss_of_outputs([model(x) for x in inputs])``, its backward and an SGD step in a
    CUDA graph after a warm-up on a side stream; replay it and compare with eager steps."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = torch.nn.Linear(dim, k).to(device)
    reference_model = torch.nn.Linear(dim, k).to(device)
    reference_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    static_inputs = [torch.randn(rows, dim, device=device) for _ in range(views)]

    def step(net, opt):
        opt.zero_grad(set_to_none=False)
        loss = loss_of_outputs([net(x) for x in static_inputs])
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, optimizer)
            step(reference_model, reference_optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, optimizer)
    for _ in range(2):
        for x in static_inputs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        expected = step(reference_model, reference_optimizer)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, expected, rtol=1e-4, atol=1e-5)
    for p, p_ref in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("iterations", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swav_triton_learnable_temperature_gets_its_gradient(device, iterations, dtype, monkeypatch):
    """A one-element temperature tensor is read by the kernel on the device (no host read) and
    gets ∂L/∂τ, summed from the kernel's per-program partials."""
    _configure(monkeypatch, "split")
    from test_swav import learnable_temperature_fns

    # Mild scores so that the reference run at half precision (PyTorch's own error) is finite.
    scale = 1.0 if dtype == torch.float32 else 0.3
    crops = [_scores(5, 7, device, dtype=dtype, scale=scale, non_contiguous=(v == 1)) for v in range(4)]
    impl, ref = learnable_temperature_fns(2, iterations, "triton")
    assert_matches_reference(impl, ref, crops + [torch.tensor(0.13, device=device)])
    # The module path, a Parameter in float32 beside the crops' dtype.
    temperature = torch.nn.Parameter(torch.tensor(0.2, device=device))
    fastssl.SwaVLoss(temperature=temperature, backend="triton")(crops[:2], crops[2:]).backward()
    assert temperature.grad is not None and temperature.grad.dtype == torch.float32 and torch.isfinite(temperature.grad)
