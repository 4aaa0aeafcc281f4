"""Capture every Triton launch of a loss exactly as its CUDA path issues it, on a machine
without a GPU, and compile the captured launches for sm_90.

How the CUDA path is reproduced on a CPU-only PyTorch build
-----------------------------------------------------------
* **Compiled mode, not the interpreter.** The kernel files choose their tile tables with
  ``TRITON_INTERPRET`` (interpreter tiles when it is set, CUDA tiles otherwise) and
  ``triton.jit`` returns an interpreter object when it is set at import. A capture therefore runs
  in a process where ``TRITON_INTERPRET`` is unset before any kernel module is imported
  (:func:`require_compiled_mode`; the command-line tools and the tests start such a process).
* **Tensors that say "cuda" and hold no memory.** Inputs and every tensor the loss allocates are
  ``meta`` tensors (shape, dtype and strides, no storage: 2N = 1,048,576 rows cost nothing).
  While a capture runs, ``Tensor.device`` / ``is_cuda`` report ``cuda:0`` for them to Python code
  (so every ``x.is_cuda`` / ``device.type == "cuda"`` test in the losses takes its CUDA branch),
  while C++ (the autograd engine) and PyTorch's own meta kernels still see ``meta``. A
  ``TorchDispatchMode`` maps ``device="cuda"`` arguments of factory calls to ``meta``.
* **Launches recorded, not run.** ``JITFunction.run`` is replaced by a recorder that binds the
  arguments with Triton's own binder for an sm_90 target -- the same code a real launch runs: an
  integer equal to 1 becomes a constant, integers and pointers get the 16-divisibility attribute
  (a meta tensor's ``data_ptr()`` is its storage offset in bytes, i.e. a fresh CUDA allocation is
  taken as 16-byte aligned, as the caching allocator guarantees) -- and stores the grid, the
  options (``num_warps``, ``num_stages``, ...), the signature, the constexprs and the attributes.
  ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
  then compiles what the GPU would compile (:func:`compile_launch`).
* **Eager ops and host syncs.** The same dispatch mode counts every ATen operator the loss issues
  around its kernels (allocations and views included), per forward and backward, and records host
  synchronisations: ``aten._local_scalar_dense`` (``.item()``, ``bool(tensor)``, ``int(tensor)``),
  device-to-host copies (``.cpu()``, ``.tolist()``), data-dependent output shapes
  (``nonzero``, ``masked_select``, ...), ``torch.cuda.synchronize``; and host-to-device copies
  (``torch.tensor(python data, device="cuda")``, ``cpu_tensor.to("cuda")``). A value read on the
  host during capture is a dummy (zero / ``False``): the capture follows the path a finite,
  well-conditioned input takes.
* **Custom ops run their CUDA implementation.** A ``torch.library`` custom op (``custom_op``,
  ``triton_op``) reached during capture runs its registered CUDA (or default) implementation, not
  its fake one, so the launches inside it are captured too.

Library use: ``with capture_session() as session: ...`` and :func:`capture_call`; the cases the
report and the tests capture are in :mod:`benchmarks.launch_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The GPU the launches are judged for: an H200 (sm_90, 132 SMs).
SM_COUNT = 132
TARGET_ARCH = 90
#: Per-SM limits of sm_90 used for occupancy.
REGISTERS_PER_SM = 65536
SHARED_BYTES_PER_SM = 228 * 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
#: Bytes of one flat (1-D) tensor argument a program is assumed to touch at most: the kernels'
#: workspaces are flat buffers passed whole to several launches and read in parts (see
#: Launch.tensor_bytes). Operands of two or more dimensions (views, gradients) count whole.
PROGRAM_BYTES_PER_TENSOR = 256 * 1024


def require_compiled_mode() -> None:
    """Refuse to capture under the interpreter: the kernels would pick their interpreter tiles
    and ``triton.jit`` would have returned interpreter objects."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "launch capture needs TRITON_INTERPRET unset before the kernel modules are imported "
            "(run it in a fresh process: python benchmarks/launch_report.py)"
        )


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One Triton launch as the CUDA path issues it."""

    kernel: str  # module:qualname of the @triton.jit function
    phase: str  # "forward" | "backward" | "setup"
    grid: Tuple[int, int, int]
    options: Dict[str, Any]  # the launch's explicit compile options (num_warps, num_stages, ...)
    signature: Dict[str, str]  # parameter -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: Dict[str, Any]  # parameter -> value (launch constexprs and ints specialized to 1)
    divisible_by_16: List[str]  # parameters that carry tt.divisibility = 16
    tensor_bytes: int  # bytes of the tensors passed, each once (flat ones: at most PROGRAM_BYTES_PER_TENSOR per program)
    site: str  # the launching line in the repository
    # Live objects for compiling in the capturing process (not serialized).
    jit_function: Any = dataclasses.field(default=None, repr=False, compare=False)
    raw: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.kernel.split(":")[-1]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def key(self) -> str:
        """Identity of the compiled binary (launches with equal keys compile to the same code)."""
        consts = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.constexprs.items()))
        sig = ",".join(f"{k}:{v}" for k, v in self.signature.items() if v != "constexpr")
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kernel}|{sig}|{consts}|D:{','.join(self.divisible_by_16)}|{opts}"

    def to_json(self) -> Dict[str, Any]:
        return {
            "kernel": self.kernel, "phase": self.phase, "grid": list(self.grid), "programs": self.programs,
            "options": self.options, "signature": self.signature,
            "constexprs": {k: _short(v) for k, v in self.constexprs.items()},
            "divisible_by_16": self.divisible_by_16, "tensor_bytes": self.tensor_bytes, "site": self.site,
        }


@dataclasses.dataclass
class EagerOp:
    op: str
    phase: str
    category: str  # alloc | view | compute | copy-h2d | copy-d2h | host
    bytes: int  # bytes of the tensors read and written
    flops: float  # matrix FLOPs (mm/bmm/addmm/baddbmm/linalg), else 0
    site: str


@dataclasses.dataclass
class HostSync:
    kind: str  # "sync" (the host waits for the device) | "h2d" (host-to-device copy)
    op: str
    phase: str
    site: str


@dataclasses.dataclass
class Capture:
    """Everything one forward + backward of a loss issued on its CUDA path."""

    launches: List[Launch] = dataclasses.field(default_factory=list)
    eager_ops: List[EagerOp] = dataclasses.field(default_factory=list)
    syncs: List[HostSync] = dataclasses.field(default_factory=list)
    custom_ops: List[str] = dataclasses.field(default_factory=list)
    extension_calls: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "launches": [launch.to_json() for launch in self.launches],
            "eager_ops": [dataclasses.asdict(op) for op in self.eager_ops],
            "syncs": [dataclasses.asdict(s) for s in self.syncs],
            "custom_ops": self.custom_ops,
            "extension_calls": self.extension_calls,
            "warnings": self.warnings,
            "error": self.error,
        }


def _short(value: Any) -> Any:
    """JSON-able, short form of a constexpr value (Triton dtypes and functions by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_short(v) for v in value]
    name = getattr(value, "name", None) or getattr(value, "__name__", None)
    return str(name if name is not None else value)


_REPO_PREFIX = str(REPO_ROOT) + os.sep
_THIS_FILE = str(Path(__file__).resolve())


@functools.lru_cache(maxsize=4096)
def _repository_path(filename: str) -> Optional[str]:
    """``filename`` relative to the repository when it is the repository's own code (not this
    module), else None."""
    if not os.path.isabs(filename):  # "<string>", "<frozen ...>"
        return None
    path = str(Path(filename).resolve())
    if not path.startswith(_REPO_PREFIX) or path == _THIS_FILE:
        return None
    return path[len(_REPO_PREFIX):]


def _site() -> str:
    """The innermost frame of the repository's own code (not this module), as 'path:line';
    '(autograd engine)' for work no Python line of the repository asked for."""
    frame = sys._getframe(1)
    while frame is not None:
        rel = _repository_path(frame.f_code.co_filename)
        if rel is not None:
            return f"{rel}:{frame.f_lineno}"
        frame = frame.f_back
    return "(autograd engine)"


# --------------------------------------------------------------------------------------------
# The CUDA look-alike: meta tensors reported as cuda:0 to Python code
# --------------------------------------------------------------------------------------------

_CUDA = None  # torch.device("cuda", 0), set lazily (torch imported on use)
_state = types.SimpleNamespace(active=None, real_devices=0)


def _is_meta(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and torch._C.TensorBase.device.__get__(t).type == "meta"


def _spoofed_device(self):
    import torch

    real = torch._C.TensorBase.device.__get__(self)
    if _state.active is not None and not _state.real_devices and real.type == "meta":
        return _CUDA
    return real


def _spoofed_is_cuda(self):
    import torch

    if _state.active is not None and not _state.real_devices and _is_meta(self):
        return True
    return torch._C.TensorBase.is_cuda.__get__(self)


def _spoofed_is_meta(self):
    import torch

    if _state.active is not None and not _state.real_devices and _is_meta(self):
        return False
    return torch._C.TensorBase.is_meta.__get__(self)


def _spoofed_get_device(self):
    import torch

    if _state.active is not None and _is_meta(self):
        return 0
    return torch._C.TensorBase.get_device(self)


class _FakeStream:
    cuda_stream = 0
    device = None

    def synchronize(self):
        _record_sync("torch.cuda.Stream.synchronize")

    def wait_stream(self, other):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeDeviceContext:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


H200_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H200 (captured)", major=9, minor=0, multi_processor_count=SM_COUNT,
    total_memory=141 * 2**30, L2_cache_size=50 * 2**20, max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=REGISTERS_PER_SM, shared_memory_per_block_optin=227 * 1024, warp_size=32,
    is_integrated=False, is_multi_gpu_board=False, gcnArchName="",
)


class _FakeTritonDriver:
    """Enough of Triton's active driver for launcher code that queries the device."""

    class utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 227 * 1024, "multiprocessor_count": SM_COUNT, "max_num_regs": REGISTERS_PER_SM,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 3201000, "mem_bus_width": 6144}

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", TARGET_ARCH, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)

    def get_device_interface(self):
        import torch

        return torch.cuda

    def is_active(self):
        return True


def _record_sync(op: str, kind: str = "sync") -> None:
    session = _state.active
    if session is not None and session.counting:
        session.capture.syncs.append(HostSync(kind, op, session.phase, _site()))


# --------------------------------------------------------------------------------------------
# Dispatch mode: device mapping, op counting, host syncs, custom ops
# --------------------------------------------------------------------------------------------

_ALLOC_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted"}
_DATA_DEPENDENT_OPS = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                       "unique_dim", "repeat_interleave", "equal",
                       "is_nonzero", "allclose"}
_MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_scaled_mm"}


def _tensors_in(obj) -> List[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _matmul_flops(name: str, args, out) -> float:
    import torch

    try:
        if name in ("mm", "addmm"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        if name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if name.startswith("linalg_cholesky"):
            n = args[0].shape[-1]
            return args[0].numel() / (n * n) * n**3 / 3.0
        if name == "linalg_solve_triangular":
            a, b = args[0], args[1]
            n = a.shape[-1]
            return b.numel() / max(1, b.shape[-1] if b.shape[-2] == n else b.shape[-2]) * n * n
    except (AttributeError, IndexError, TypeError):
        return 0.0
    return 0.0


def _map_device(value):
    """cuda devices (as torch.device or string) -> meta."""
    import torch

    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("meta")
    if isinstance(value, str) and value.startswith("cuda"):
        return torch.device("meta")
    return value


def _dummy_scalar(t):
    import torch

    if t.dtype == torch.bool:
        return False
    if t.is_floating_point() or t.is_complex():
        return 0.0
    return 0


def _make_mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    class CaptureMode(TorchDispatchMode):
        def __init__(self, session):
            super().__init__()
            self.session = session

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            session = self.session
            namespace = func.namespace
            if namespace not in ("aten", "prims"):
                return self._custom_op(func, args, kwargs)
            name = func._schema.name.split("::")[-1]
            args = tree_map(_map_device, args)
            kwargs = tree_map(_map_device, kwargs)
            inputs = _tensors_in((args, kwargs))
            meta_in = [t for t in inputs if _is_meta(t)]
            real_in = [t for t in inputs if not _is_meta(t)]
            target_meta = kwargs.get("device") == torch.device("meta") or (
                name == "copy_" and args and _is_meta(args[0]))

            # Host synchronisations: values read back on the host.
            if name == "_local_scalar_dense" and meta_in:
                self._count(name, "copy-d2h", inputs, None)
                _record_sync(f"aten.{name} (.item() / bool() / int() of a device tensor)")
                return _dummy_scalar(meta_in[0])
            if name in ("_to_copy", "copy_") and meta_in and not target_meta and (
                    name == "_to_copy" and kwargs.get("device") is not None and kwargs["device"].type == "cpu"
                    or name == "copy_" and not _is_meta(args[0])):
                self._count(name, "copy-d2h", inputs, None)
                _record_sync(f"aten.{name} device-to-host (.cpu() / .tolist() / .numpy())")
                source = meta_in[0]
                result = torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
                if name == "copy_":
                    return args[0]
                return result
            if name in _DATA_DEPENDENT_OPS and meta_in and kwargs.get("output_size") is None:
                _record_sync(f"aten.{name} (data-dependent output)")
            h2d = target_meta and any(t.numel() > 0 for t in real_in) and name in ("_to_copy", "copy_", "lift_fresh_copy")
            _state.real_devices += 1
            try:
                if name == "nonzero" and meta_in:
                    out = torch.empty((0, meta_in[0].dim()), dtype=torch.int64, device="meta")
                elif h2d and name == "_to_copy":
                    source = real_in[0]
                    out = torch.empty(source.shape, dtype=kwargs.get("dtype") or source.dtype, device="meta")
                elif h2d and name == "copy_":
                    out = args[0]
                else:
                    out = func(*args, **kwargs)
            finally:
                _state.real_devices -= 1
            if h2d:
                _record_sync(f"aten.{name} host-to-device copy", kind="h2d")
                self._count(name, "copy-h2d", inputs, out)
                return out
            if name == "lift_fresh":
                return out
            if name in _ALLOC_OPS:
                category = "alloc"
            elif func.is_view or name in ("detach", "alias", "_unsafe_view"):
                category = "view"
            elif not meta_in and not _tensors_in(out) or not meta_in and not any(_is_meta(t) for t in _tensors_in(out)):
                category = "host"
            else:
                category = "compute"
            self._count(name, category, inputs, out, _matmul_flops(name, args, out))
            return out

        def _count(self, name, category, inputs, out, flops=0.0):
            session = self.session
            if not session.counting:
                return
            moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in _tensors_in(out))
            if category in ("alloc", "view"):
                moved = 0
            session.capture.eager_ops.append(EagerOp(f"aten.{name}", session.phase, category, moved, flops, _site()))

        def _custom_op(self, func, args, kwargs):
            """Run a custom op's CUDA implementation (its fake one would hide the launches)."""
            from torch._library.custom_ops import OPDEFS

            qualname = func._schema.name
            if self.session.counting:
                self.session.capture.custom_ops.append(f"{qualname} ({self.session.phase})")
            opdef = OPDEFS.get(qualname)
            if opdef is not None:
                impl = opdef._backend_fns.get("cuda") or opdef._backend_fns.get(None) or opdef._init_fn
                with self:
                    return impl(*args, **kwargs)
            # Operators registered through torch.library.Library.impl: call the CUDA kernel.
            keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
            for key in ("CUDA", "CompositeExplicitAutograd"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
                    break
            with self:
                return func.redispatch(keyset, *args, **kwargs)

    return CaptureMode


# --------------------------------------------------------------------------------------------
# The Triton launch recorder
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", TARGET_ARCH, 32))


def _binder(jit_function):
    binder = jit_function.__dict__.get("_capture_binder")
    if binder is None:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(jit_function.signature, jit_function.params, _cuda_backend())
        jit_function.__dict__["_capture_binder"] = binder
    return binder


def _record_launch(jit_function, *args, grid, warmup, **kwargs):
    """Replacement of ``JITFunction.run`` during a capture: bind as a launch on sm_90 would,
    record, launch nothing."""
    import torch

    session = _state.active
    if session is None:
        raise RuntimeError("a Triton kernel was launched outside a capture session")
    backend = _cuda_backend()
    bound_args, specialization, _ = _binder(jit_function)(*args, **kwargs)
    options, signature, constexprs, attrs = jit_function._pack_args(backend, kwargs, bound_args, specialization, None)
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    names = [p.name for p in jit_function.params]
    named_constexprs = {}
    for path, value in constexprs.items():
        named_constexprs[names[path[0]] + "".join(f"[{i}]" for i in path[1:])] = value
    divisible = sorted(names[path[0]] for path, attr in attrs.items() if any(a[0] == "tt.divisibility" for a in attr))
    explicit = {k: v for k, v in kwargs.items() if k not in names}
    seen = set()
    tensor_bytes = 0
    programs = grid[0] * grid[1] * grid[2]
    for value in bound_args.values():
        if isinstance(value, torch.Tensor):
            ident = (value.untyped_storage().data_ptr() if not _is_meta(value) else id(value), value.storage_offset())
            if ident not in seen:
                seen.add(ident)
                # A workspace shared by several launches (a flat buffer) is passed whole but read
                # in parts: a program is taken to touch at most PROGRAM_BYTES_PER_TENSOR of it.
                # Operands (two or more dimensions) are streamed whole.
                if value.dim() >= 2:
                    tensor_bytes += _nbytes(value)
                else:
                    tensor_bytes += min(_nbytes(value), programs * PROGRAM_BYTES_PER_TENSOR)
    launch = Launch(
        kernel=f"{jit_function.module}:{jit_function.fn.__qualname__}", phase=session.phase, grid=grid,
        options=explicit, signature=signature, constexprs=named_constexprs, divisible_by_16=divisible,
        tensor_bytes=tensor_bytes, site=_site(), jit_function=jit_function,
        raw=(signature, constexprs, attrs, options),
    )
    session.capture.launches.append(launch)
    return None


def _record_autotuned(autotuner, *args, **kwargs):
    """An autotuned kernel: every configuration is a launch the GPU may compile and run."""
    for config in autotuner.configs:
        merged = {**kwargs, **config.all_kwargs()}
        autotuner.fn.run(*args, **merged)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class CaptureSession:
    """State of one capture: which phase runs, whether ops are counted, what was recorded."""

    def __init__(self) -> None:
        self.capture = Capture()
        self.phase = "setup"
        self.counting = False

    @contextlib.contextmanager
    def measuring(self, phase: str) -> Iterator[None]:
        """Count ops and record launches of ``phase`` inside the block."""
        previous = (self.phase, self.counting)
        self.phase, self.counting = phase, True
        try:
            yield
        finally:
            self.phase, self.counting = previous


_session_lock = threading.Lock()


@contextlib.contextmanager
def capture_session() -> Iterator[CaptureSession]:
    """Make ``device="cuda"`` tensors meta tensors that look like CUDA ones and record Triton
    launches instead of running them (see the module docstring)."""
    global _CUDA
    require_compiled_mode()
    import torch
    import torch.cuda
    import triton
    import triton.runtime.autotuner as autotuner_module
    from triton.runtime.jit import JITFunction

    _CUDA = torch.device("cuda", 0)
    session = CaptureSession()
    patches: List[Tuple[Any, str, Any]] = []

    def patch(owner, name, value):
        patches.append((owner, name, owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)))
        setattr(owner, name, value)

    original_tensor = torch.tensor
    original_as_tensor = torch.as_tensor

    def to_device(factory):
        def make(data, *args, device=None, **kwargs):
            mapped = _map_device(device)
            if mapped is not None and getattr(mapped, "type", None) == "meta":
                host = factory(data, *args, **kwargs)
                if isinstance(data, torch.Tensor) and _is_meta(data):
                    return data if host is data else host
                _record_sync(f"torch.{factory.__name__}(python data, device='cuda') host-to-device copy", kind="h2d")
                if session.counting:
                    session.capture.eager_ops.append(EagerOp(f"torch.{factory.__name__}", session.phase, "copy-h2d",
                                                             _nbytes(host), 0.0, _site()))
                was = session.counting
                session.counting = False
                try:
                    return torch.empty(host.shape, dtype=host.dtype, device="meta")
                finally:
                    session.counting = was
            return factory(data, *args, device=device, **kwargs)

        return make

    with _session_lock:
        mode = _make_mode_class()(session)
        patch(torch.Tensor, "device", property(_spoofed_device))
        patch(torch.Tensor, "is_cuda", property(_spoofed_is_cuda))
        patch(torch.Tensor, "is_meta", property(_spoofed_is_meta))
        patch(torch.Tensor, "get_device", _spoofed_get_device)
        patch(torch, "tensor", to_device(original_tensor))
        patch(torch, "as_tensor", to_device(original_as_tensor))
        patch(torch.cuda, "_lazy_init", lambda: None)
        patch(torch.cuda, "current_device", lambda: 0)
        patch(torch.cuda, "device_count", lambda: 1)
        patch(torch.cuda, "device", _FakeDeviceContext)
        patch(torch.cuda, "current_stream", lambda device=None: _FakeStream())
        patch(torch.cuda, "default_stream", lambda device=None: _FakeStream())
        patch(torch.cuda, "synchronize", lambda device=None: _record_sync("torch.cuda.synchronize"))
        patch(torch.cuda, "get_device_properties", lambda device=None: H200_PROPERTIES)
        patch(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        patch(torch.cuda, "get_device_name", lambda device=None: H200_PROPERTIES.name)
        patch(JITFunction, "run", _record_launch)
        patch(autotuner_module.Autotuner, "run", _record_autotuned)
        driver = triton.runtime.driver
        had_driver = getattr(driver, "_active", None)
        try:
            driver.set_active(_FakeTritonDriver())
        except Exception:  # older Triton: no set_active
            pass
        _state.active = session
        try:
            with mode, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield session
            session.capture.warnings.extend(
                str(w.message).splitlines()[0][:300] for w in caught if "data pointer of" not in str(w.message))
        finally:
            _state.active = None
            try:
                driver.reset_active() if had_driver is None else driver.set_active(had_driver)
            except Exception:
                pass
            for owner, name, old in reversed(patches):
                if old is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, old)


_MISSING = object()


def capture_call(run: Callable[[CaptureSession], Any]) -> Capture:
    """``run(session)`` inside a fresh session; errors are recorded in ``Capture.error``."""
    try:
        with capture_session() as session:
            run(session)
    except Exception as error:  # reported, not raised: one family's failure must not hide the others
        capture = locals().get("session").capture if locals().get("session") is not None else Capture()
        capture.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        capture.error += "\n" + "".join(traceback.format_exception(error)[-6:])[-2000:]
        return capture
    return session.capture


def forward_backward(session: CaptureSession, loss_fn: Callable[[], Any], leaves: Sequence[Any]) -> None:
    """One forward and one backward of ``loss_fn()`` with respect to ``leaves`` (gradients
    returned, not accumulated into ``.grad``: the backward of the loss and nothing else)."""
    import torch

    with session.measuring("forward"):
        loss = loss_fn()
    if not leaves:
        return
    seed = torch.ones_like(loss)
    with session.measuring("backward"):
        torch.autograd.grad(loss, list(leaves), grad_outputs=seed, allow_unused=True)


# --------------------------------------------------------------------------------------------
# Compiling a captured launch for sm_90
# --------------------------------------------------------------------------------------------

_NVIDIA_BIN = None


def _nvidia_tool(name: str) -> Optional[str]:
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK_LINE = re.compile(r"(\d+) bytes stack frame")


def compile_launch(launch: Launch, keep_asm: bool = False) -> Dict[str, Any]:
    """Compile ``launch`` for sm_90 with this process's Triton; registers, spills, shared memory,
    whether the products became ``wgmma``, the SASS hot loop. ``{"error": ...}`` on failure."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = launch.raw
    source = ASTSource(fn=launch.jit_function, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    start = time.perf_counter()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options.__dict__)
    except Exception as error:  # the report lists it; the check fails on it
        return {"error": f"{type(error).__name__}: {str(error)[:1500]}", "compile_s": time.perf_counter() - start}
    finally:
        if previous is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    seconds = time.perf_counter() - start
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    metadata = compiled.metadata
    text = log.getvalue()
    result: Dict[str, Any] = {
        "compile_s": round(seconds, 2),
        "num_warps": metadata.num_warps,
        "num_stages": metadata.num_stages,
        "shared_bytes": int(getattr(metadata, "shared", 0)),
        "ptx_wgmma": "wgmma.mma_async" in ptx,
        "ptx_mma_sync": "mma.sync" in ptx,
        # Matrix products in the Triton IR (tt.dot / tt.dot_scaled), whatever unit they map to.
        "dots": len(re.findall(r"\btt\.dot(?:_scaled)?\b", compiled.asm.get("ttir", ""))),
    }
    regs = _PTXAS_LINE.search(text)
    spills = _SPILL_LINE.search(text)
    stack = _STACK_LINE.search(text)
    sass = _disassemble(cubin)
    usage = _resource_usage(cubin)
    result["registers"] = int(regs.group(1)) if regs else usage.get("REG")
    result["spill_store_bytes"] = int(spills.group(1)) if spills else None
    result["spill_load_bytes"] = int(spills.group(2)) if spills else None
    result["stack_bytes"] = int(stack.group(1)) if stack else usage.get("STACK")
    result["local_instructions"] = sum(1 for _, op, _ in sass if op.startswith(("STL", "LDL")))
    if result["spill_store_bytes"] is None:  # no ptxas log (cached binary): read the SASS
        result["spill_store_bytes"] = sum(1 for _, op, _ in sass if op.startswith("STL"))
        result["spill_load_bytes"] = sum(1 for _, op, _ in sass if op.startswith("LDL"))
    result["spills"] = bool(result["spill_store_bytes"] or result["spill_load_bytes"] or result["local_instructions"])
    result["sass_available"] = bool(sass)
    result.update(analyze_sass(sass))
    result["occupancy_programs_per_sm"] = occupancy(result["registers"], launch_warps(result), result["shared_bytes"])
    if keep_asm:
        result["ptx"] = ptx
        result["sass"] = "\n".join(f"/*{a:04x}*/ {op} {rest}" for a, op, rest in sass)
    return result


def launch_warps(compiled: Dict[str, Any]) -> int:
    return int(compiled.get("num_warps") or 4)


def occupancy(registers: Optional[int], warps: int, shared_bytes: int) -> int:
    """Programs of this kernel resident on one SM (registers allocated per warp in units of 256)."""
    limits = [MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // max(1, warps)]
    if registers:
        per_warp = ((registers * 32 + 255) // 256) * 256
        limits.append(REGISTERS_PER_SM // (per_warp * warps))
    if shared_bytes:
        limits.append(SHARED_BYTES_PER_SM // (shared_bytes + 1024))
    return max(0, min(limits))


def _run_tool(args: List[str], data: bytes) -> str:
    """Run an NVIDIA tool on a cubin written into a private temporary directory (removed)."""
    with tempfile.TemporaryDirectory(prefix="fastssl-sass-") as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(data)
        try:
            return subprocess.run(args + [path], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return ""


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def _disassemble(cubin: bytes) -> List[Tuple[int, str, str]]:
    tool = _nvidia_tool("cuobjdump")
    if not cubin or tool is None:
        return []
    out = _run_tool([tool, "-sass"], cubin)
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip()) for m in _SASS_LINE.finditer(out)]


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    tool = _nvidia_tool("cuobjdump")
    if not cubin or tool is None:
        return {}
    out = _run_tool([tool, "--dump-resource-usage"], cubin)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


#: SASS opcode families, for the hot loop's instruction mix.
_CATEGORIES = (
    ("matrix", ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA")),
    ("exp/log (MUFU)", ("MUFU",)),
    ("fp32 math", ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "FRND", "FMNMX")),
    ("half math", ("HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2")),
    ("conversion", ("F2F", "F2FP", "F2I", "I2F", "FRND", "I2FP", "F2IP")),
    ("global memory", ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "RED", "ATOM", "UTMALDG", "UTMASTG", "UBLKCP")),
    ("shared memory", ("LDS", "STS", "LDSM", "STSM", "ATOMS")),
    ("local memory (spills)", ("LDL", "STL")),
    ("sync/barrier", ("BAR", "WARPGROUP", "DEPBAR", "SYNCS", "WARPSYNC", "MEMBAR", "ARRIVES", "ERRBAR")),
    ("control", ("BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "YIELD", "NOP", "JMP")),
    ("shuffle/vote", ("SHFL", "VOTE", "REDUX", "MATCH")),
    ("integer/address", ("IMAD", "IADD", "LEA", "LOP", "SHF", "ISETP", "SEL", "MOV", "IABS", "IMNMX", "PRMT",
                         "S2R", "CS2R", "S2UR", "R2UR", "UMOV", "UIADD", "ULEA", "ULOP", "USHF", "UISETP", "USEL",
                         "UIMAD", "PLOP3", "P2R", "R2P", "IMUL", "POPC", "FLO", "BREV", "LDC", "ULDC", "VIADD",
                         "VIMNMX", "UPRMT", "UFLO", "UPOPC", "UBREV", "USHL", "USHR", "SHL", "SHR", "BMSK", "IDP")),
)


def _category(op: str) -> str:
    for name, prefixes in _CATEGORIES:
        if op.startswith(prefixes):
            return name
    return "other"


def _matrix_cycles(op: str) -> float:
    """Tensor-core cycles of one matrix instruction on one sm_90 SM (see launch_report's model):
    wgmma m64nNk16 (bf16/fp16) or m64nNk8 (tf32) keeps the SM's tensor cores N/2 cycles busy;
    a warp's mma.sync m16n8k16 takes 8 cycles of its sub-partition's tensor core."""
    match = re.match(r"HGMMA\.64x(\d+)x(\d+)", op)
    if match:
        return int(match.group(1)) / 2.0
    if op.startswith("HMMA"):
        return 8.0
    return 0.0


def analyze_sass(sass: List[Tuple[int, str, str]]) -> Dict[str, Any]:
    """Loops of the SASS (backward branches) and the hot loop's instruction mix.

    The hot loop is the innermost loop with the most matrix instructions (or, without any, the
    largest innermost loop). ``wgmma_wait0``: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` in it, i.e. the
    loop waits for every outstanding wgmma before going on (no overlap of the matrix products
    with the other instructions of the same warpgroup)."""
    if not sass:
        return {"loops": 0, "hot_loop": None, "sass_wgmma": False, "sass_hmma": False, "sass_instructions": 0}
    index = {addr: i for i, (addr, _, _) in enumerate(sass)}
    loops = []
    for i, (addr, op, rest) in enumerate(sass):
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target:
                start = int(target.group(1), 16)
                if start <= addr and start in index:
                    loops.append((index[start], i))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    summary: Dict[str, Any] = {
        "loops": len(loops),
        "sass_instructions": len(sass),
        "sass_wgmma": any(op.startswith("HGMMA") for _, op, _ in sass),
        "sass_hmma": any(op.startswith("HMMA") for _, op, _ in sass),
        "hot_loop": None,
    }
    best = None
    for lo, hi in innermost:
        body = sass[lo:hi + 1]
        matrix = sum(1 for _, op, _ in body if _category(op) == "matrix")
        score = (matrix, len(body))
        if best is None or score > best[0]:
            best = (score, lo, hi)
    if best is None:
        return summary
    _, lo, hi = best
    body = sass[lo:hi + 1]
    mix: Dict[str, int] = {}
    for _, op, _ in body:
        mix[_category(op)] = mix.get(_category(op), 0) + 1
    matrix_ops = sorted({op for _, op, _ in body if _category(op) == "matrix"})
    summary["hot_loop"] = {
        "instructions": len(body),
        "matrix": mix.get("matrix", 0),
        "matrix_ops": matrix_ops,
        "matrix_cycles": sum(_matrix_cycles(op) for _, op, _ in body),
        "mufu": mix.get("exp/log (MUFU)", 0),
        "ffma": sum(1 for _, op, _ in body if op.startswith("FFMA")),
        "wgmma_wait0": sum(1 for _, op, rest in body if op.startswith("WARPGROUP.DEPBAR") and re.search(r"0x0\b", rest)),
        "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
    }
    return summary


def compile_unique(launches: Sequence[Launch], progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Compile each distinct launch once; ``{launch.key: result}``."""
    results: Dict[str, Dict[str, Any]] = {}
    for launch in launches:
        if launch.key in results:
            continue
        if progress:
            progress(f"compiling {launch.name} ({len(results) + 1})")
        results[launch.key] = compile_launch(launch)
    return results


def triton_version() -> str:
    import triton

    return triton.__version__


def python_info() -> str:
    return sys.version.split()[0]
