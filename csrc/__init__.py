"""CUDA C++ sources of fastssl (W-MSE's whitening kernel), shipped with the package and built
on first use by :mod:`fastssl.kernels.wmse_cuda`. This package holds no Python code."""
