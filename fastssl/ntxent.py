r"""NT-Xent (SimCLR) and InfoNCE with a memory bank (MoCo): functional API, optimized PyTorch
path and the drop-in :class:`NTXentLoss` module. The Triton kernels live in
:mod:`fastssl.kernels.ntxent`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed, reference
from fastssl._backend import check_backend_name, resolve_backend
from fastssl._checks import (
    check_distributed_available,
    check_int,
    check_nonzero,
    check_pair,
    check_tensor,
)

# --------------------------------------------------------------------------------------------
# Optimized PyTorch path
# --------------------------------------------------------------------------------------------


def _ntxent_torch(out0: Tensor, out1: Tensor, temperature: float, gather_distributed: bool) -> Tensor:
    # Placeholder until the row-chunked path lands: the reference on the (gathered) batch.
    acc = torch.promote_types(out0.dtype, torch.float32)
    out0, out1 = out0.to(acc), out1.to(acc)
    if gather_distributed:
        out0, out1 = distributed.gather(out0), distributed.gather(out1)
    return reference.ntxent_loss(out0, out1, temperature).float()


def _infonce_torch(query: Tensor, key: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    acc = torch.promote_types(query.dtype, torch.float32)
    return reference.infonce_loss(query.to(acc), key.to(acc), negatives.to(acc), temperature).float()


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def ntxent_loss(
    out0: Tensor,
    out1: Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""NT-Xent over the 2N embeddings of two views (see :func:`fastssl.reference.ntxent_loss`).

    Args:
        out0, out1: (N, d) projections of the two views (any float dtype).
        temperature: any non-zero finite number (negative too, as lightly allows).
        gather_distributed: negatives from every rank (DESIGN §3 semantics).
        backend: ``"auto" | "triton" | "torch" | "reference"``.
    Returns:
        0-d float32 loss.
    """
    check_pair("out0", out0, "out1", out1)
    temperature = check_nonzero("temperature", temperature)
    check_distributed_available("gather_distributed", gather_distributed)
    impl = resolve_backend(backend, out0)
    if impl == "reference":
        if gather_distributed:
            out0, out1 = distributed.gather(out0), distributed.gather(out1)
        return reference.ntxent_loss(out0, out1, temperature).float()
    if impl == "triton":
        from fastssl.kernels.ntxent import ntxent_loss_triton

        return ntxent_loss_triton(out0, out1, temperature, gather_distributed=gather_distributed)
    return _ntxent_torch(out0, out1, temperature, gather_distributed)


def infonce_loss(
    query: Tensor,
    key: Tensor,
    negatives: Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against their keys and a bank of negatives (MoCo).

    Args:
        query, key: (N, d), L2-normalized inside.
        negatives: (K, d) bank, used as given (no normalization, no gradient).
        gather_distributed: report the mean over all ranks' queries (gradients per DESIGN §3).
    Returns:
        0-d float32 loss.
    """
    check_pair("query", query, "key", key)
    check_tensor("negatives", negatives)
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must have shape (K, {query.shape[1]}) to match query, got {tuple(negatives.shape)}"
        )
    temperature = check_nonzero("temperature", temperature)
    impl = resolve_backend(backend, query)
    negatives = negatives.detach()
    if impl == "reference":
        loss = reference.infonce_loss(query, key, negatives, temperature).float()
    elif impl == "triton":
        from fastssl.kernels.ntxent import infonce_loss_triton

        loss = infonce_loss_triton(query, key, negatives, temperature)
    else:
        loss = _infonce_torch(query, key, negatives, temperature)
    return distributed.global_mean(loss) if gather_distributed else loss


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def _parse_bank_size(memory_bank_size: Union[int, Sequence[int]]) -> Tuple[int, Optional[int]]:
    if isinstance(memory_bank_size, bool):
        raise TypeError("memory_bank_size must be an int or a (size, dim) pair, got bool")
    if isinstance(memory_bank_size, int):
        return check_int("memory_bank_size", memory_bank_size), None
    try:
        size, dim = memory_bank_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(
            f"memory_bank_size must be an int or a (size, dim) pair, got {memory_bank_size!r}"
        ) from None
    size = check_int("memory_bank_size[0]", size)
    dim = check_int("memory_bank_size[1]", dim, minimum=1)
    return size, dim


class NTXentLoss(nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss``: SimCLR's NT-Xent, or MoCo's InfoNCE with a bank.

    Args:
        temperature: scale of the logits; any ``|temperature| >= 1e-8``.
        memory_bank_size: 0 (SimCLR), ``(size, dim)`` (MoCo, as lightly), or an int ``size``
            whose feature dimension is taken from the first batch.
        gather_distributed: negatives from all ranks; with a bank, the bank is filled with
            the keys of all ranks.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (env ``FASTSSL_BACKEND``).

    Forward ``(out0, out1)``, each (N, d). With a bank, ``out0`` are the queries and ``out1``
    the keys; the bank (normalized keys of earlier batches) provides the negatives and is
    updated with ``out1`` whenever ``out0`` requires a gradient (lightly's rule, which keeps
    the bank fixed during evaluation). Returns a 0-d float32 loss.
    """

    bank: Tensor
    bank_ptr: Tensor

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_nonzero("temperature", temperature)
        check_distributed_available("gather_distributed", gather_distributed)
        self.gather_distributed = gather_distributed
        self.backend = check_backend_name(backend)
        self.memory_bank_size, bank_dim = _parse_bank_size(memory_bank_size)
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if self.memory_bank_size > 0 and bank_dim is not None:
            self._init_bank(bank_dim, torch.device("cpu"))

    @torch.no_grad()
    def _init_bank(self, dim: int, device: torch.device) -> None:
        # Same draws as lightly's MemoryBankModule, so a seeded run gives the same bank.
        bank = F.normalize(torch.randn(self.memory_bank_size, dim), dim=-1)
        self.bank = bank.to(device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        if self.gather_distributed:
            keys = distributed.gather_no_grad(keys)
        size = self.memory_bank_size
        ptr = int(self.bank_ptr)
        # lightly's ring buffer: a batch that reaches the end fills it and wraps to 0
        # (the part that does not fit is dropped).
        if ptr + keys.shape[0] >= size:
            self.bank[ptr:] = keys[: size - ptr].to(self.bank.dtype)
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + keys.shape[0]] = keys.to(self.bank.dtype)
            self.bank_ptr[0] = ptr + keys.shape[0]

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size == 0:
            return ntxent_loss(
                out0,
                out1,
                self.temperature,
                gather_distributed=self.gather_distributed,
                backend=self.backend,
            )
        check_pair("out0", out0, "out1", out1)
        if self.bank.numel() == 0:
            self._init_bank(out0.shape[1], out0.device)
        if self.bank.shape[1] != out0.shape[1]:
            raise ValueError(
                f"out0 has {out0.shape[1]} features but the memory bank stores {self.bank.shape[1]}"
            )
        if self.bank.device != out0.device:
            self.bank = self.bank.to(out0.device)
            self.bank_ptr = self.bank_ptr.to(out0.device)
        negatives = self.bank.clone()
        if out0.requires_grad:
            self._enqueue(F.normalize(out1.detach().float(), dim=1))
        return infonce_loss(
            out0,
            out1,
            negatives,
            self.temperature,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
        )
