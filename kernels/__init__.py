"""Triton kernels, one file per loss family, each with its launchers and ``autograd.Function``.

Importing this package does not import Triton; each family module does, on first use. Kernels
compile for CUDA tensors, and run on CPU tensors under ``TRITON_INTERPRET=1`` (set before the
first import of a kernel module), which is how the CPU test-suite checks them.
"""
