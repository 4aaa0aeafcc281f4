#!/usr/bin/env bash
# The wheel is what users get: build the sdist and the wheel from a copy of the tree, install the
# wheel into a clean environment without triton (torch is the only heavy dependency), and check
# that fastssl imports, that the CUDA sources and the Triton kernel files are inside, and that a
# loss runs forward and backward on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build from a copy so that no build/ or *.egg-info lands in the checkout.
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -cf - -T - | tar -C "$work/src" -xf -
python -m build --sdist --wheel --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$wheel") and $(basename "$(ls "$work"/dist/*.tar.gz)")"

python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["fastssl/__init__.py", "fastssl/kernels/ntxent.py", "fastssl/csrc/wmse_whitening.cu",
          "fastssl/csrc/wmse_whitening.cpp", "fastssl/csrc/wmse_whitening.h", "fastssl/train/__main__.py"]
missing = [n for n in needed if n not in names]
if missing:
    sys.exit(f"wheel lacks {missing}")
print(f"wheel holds {len(names)} files, the kernels and CUDA sources included")
PY

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip install -q "$wheel"
(cd "$work" && "$work/venv/bin/python" - <<'PY'
import importlib.util
import torch
import fastssl
from fastssl.kernels import wmse_cuda

assert importlib.util.find_spec("triton") is None, "triton must not be a dependency of the wheel"
assert (wmse_cuda.CSRC / "wmse_whitening.cu").is_file(), "CUDA sources missing from the install"
a = torch.randn(16, 8, requires_grad=True)
b = torch.randn(16, 8, requires_grad=True)
loss = fastssl.NTXentLoss()(a, b) + fastssl.BarlowTwinsLoss()(a, b)
loss.backward()
assert torch.isfinite(loss) and a.grad is not None
print(f"wheel smoke test: fastssl {fastssl.__version__} from {fastssl.__file__}, loss {loss.item():.4f}, no triton")
PY
)
