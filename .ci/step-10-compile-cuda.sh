#!/usr/bin/env bash
# Compile check of the CUDA C++ sources, so that a syntax error in csrc fails CI even on
# machines without a GPU:
#   * every csrc/*.cu with nvcc (object code for sm_90, the H100/H200; a register spill is an
#     error), when nvcc is on PATH;
#   * every csrc/*.cpp (the PyTorch bindings) with the host C++ compiler against
#     PyTorch's extension headers, syntax only, when a compiler and torch are available.
# Exits 0 with a message when the tools are absent; non-zero on any compile error.
set -euo pipefail
cd "$(dirname "$0")/.."

CSRC=csrc
ARCH=${FASTSSL_CUDA_ARCH:-sm_90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

shopt -s nullglob
cu_files=("$CSRC"/*.cu)
cpp_files=("$CSRC"/*.cpp)

if command -v nvcc >/dev/null 2>&1; then
    for source in "${cu_files[@]}"; do
        echo "nvcc: $source ($ARCH)"
        nvcc -std=c++17 -O3 -arch="$ARCH" -Xptxas --warn-on-spills,--warning-as-error -I"$CSRC" -c -o "$work/$(basename "$source").o" "$source"
    done
else
    echo "step-10-compile-cuda.sh: nvcc not found on PATH; skipping the CUDA compile check of ${#cu_files[@]} .cu file(s)"
fi

cxx=${CXX:-$(command -v g++ || command -v c++ || true)}
if [ -z "$cxx" ]; then
    echo "step-10-compile-cuda.sh: no host C++ compiler; skipping the syntax check of the bindings"
    exit 0
fi
if ! includes=$(python -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))
" 2>/dev/null); then
    echo "step-10-compile-cuda.sh: torch is not importable; skipping the syntax check of the bindings"
    exit 0
fi
# Recent PyTorch headers need C++20; older compilers only offer C++17.
std=c++20
echo 'int main() {}' | "$cxx" -std=c++20 -x c++ -fsyntax-only - 2>/dev/null || std=c++17
for source in "${cpp_files[@]}"; do
    echo "$cxx: $source (syntax, -std=$std)"
    # shellcheck disable=SC2086  # $includes is a list of -I flags
    "$cxx" -std="$std" -fsyntax-only -w $includes -I"$CSRC" -DTORCH_EXTENSION_NAME=fastssl_check "$source"
done
echo "step-10-compile-cuda.sh: ok"
